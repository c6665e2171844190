//! Feeds arbitrary requests to the API's parser, as a client of the socket
//! would send them. The input is `METHOD URL\n` then the body; the first
//! byte's low bit says whether the request asked for an upgrade. A panic or
//! a runaway allocation is a bug, and so is a request let through that
//! breaks what the parser promises the handlers.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::Endpoint;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (head, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let (method, url) = head.split_once(' ').unwrap_or((&head, "/"));
    let upgrade = flags & 1 == 1;
    match Endpoint::parse(method, url, body, upgrade) {
        Ok(Endpoint::Snapshot(b)) => assert!(b.path.is_some() != b.stream),
        Ok(Endpoint::Exec(b)) => {
            assert!(!b.argv().is_empty());
            assert!(upgrade || !b.streamed());
        }
        Ok(Endpoint::ExecInput(_, input)) => assert_eq!(input, body),
        Ok(_) => {}
        Err((code, message)) => {
            assert!((400..500).contains(&code), "{code}");
            assert!(!message.is_empty());
        }
    }
});
