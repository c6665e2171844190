//! Feeds arbitrary bytes to the frame reader, as a peer would send them:
//! frame after frame until an error. A panic or a runaway allocation is a
//! bug; a decoded frame must encode again and read back the same.

#![no_main]

use std::io::Cursor;

use guest_abi::agent::{read_frame, write_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = Cursor::new(data);
    for _ in 0..1000 {
        let Ok(frame) = read_frame(&mut r) else {
            return;
        };
        let mut again = Vec::new();
        if write_frame(&mut again, &frame).is_ok() {
            let back = read_frame(&mut Cursor::new(&again)).expect("a frame we wrote reads back");
            assert_eq!(back, frame);
        }
    }
});
