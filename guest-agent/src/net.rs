//! Network set-up: loopback up, and each interface the VMM gave an address
//! (`vmm.net=`) found by its MAC, addressed, brought up, with the default
//! route through its gateway. A handful of ioctls: no `ip` binary to start
//! (every exec costs hundreds of interpreted system calls here).

use std::net::Ipv4Addr;

use guest_abi::net::NetSpec;

use crate::init::say;
use crate::sys::NetConfigSocket;

/// Configures the network; problems are reported, not fatal.
pub fn configure(specs: &[NetSpec]) {
    let sock = match NetConfigSocket::new() {
        Ok(s) => s,
        Err(e) => {
            say(format!("cannot configure the network: socket: {e}"));
            return;
        }
    };
    if let Err(e) = sock.set_up("lo") {
        say(format!("cannot bring up lo: {e}"));
    }
    if specs.is_empty() {
        return;
    }
    let interfaces = interfaces();
    for spec in specs {
        let mac = guest_abi::net::format_mac(&spec.mac);
        let Some((name, _)) = interfaces.iter().find(|(_, a)| *a == mac) else {
            say(format!("no network interface has MAC {mac}"));
            continue;
        };
        if let Err(e) = apply(&sock, name, spec.addr, spec.prefix, spec.gateway) {
            say(format!("cannot configure {name}: {e}"));
        }
    }
}

fn apply(
    sock: &NetConfigSocket,
    name: &str,
    addr: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
) -> std::io::Result<()> {
    sock.set_address(name, addr, prefix)?;
    sock.set_up(name)?;
    if let Some(gw) = gateway {
        sock.add_default_route(gw)?;
    }
    Ok(())
}

/// (name, MAC as sysfs prints it) of every interface.
fn interfaces() -> Vec<(String, String)> {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let addr = std::fs::read_to_string(e.path().join("address")).ok()?;
            Some((name, addr.trim().to_ascii_lowercase()))
        })
        .collect()
}
