//! Network namespaces with a TAP in each, for the network tests: a guest's
//! `vmm` runs inside one (`ip netns exec`), and the test talks to the guest
//! from a thread that entered it.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

/// The host's side of every test TAP; the guest is HOST_IP + 1.
pub const HOST_IP: &str = "172.31.0.1";
pub const GUEST_IP: &str = "172.31.0.2";

fn ip(args: &[&str]) -> std::process::Output {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace holding one TAP, up, at HOST_IP/24. Deleted (TAP
/// included) when dropped.
pub struct NetNs {
    pub name: String,
    pub tap: String,
}

impl NetNs {
    /// `tag` keeps names unique within a test binary; the pid across
    /// binaries. Neighbour entries are made from gratuitous ARPs
    /// (arp_accept), so a guest's announcement shows in `neighbour`.
    pub fn new(tag: &str) -> NetNs {
        let name = format!("vmmt-{tag}-{}", std::process::id());
        let tap = format!("vt{tag}{}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = NetNs { name, tap };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&["ip", "tuntap", "add", "dev", &ns.tap, "mode", "tap"]);
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            &ns.tap,
        ]);
        ns.exec(&["ip", "link", "set", &ns.tap, "up"]);
        ns.exec(&["sysctl", "-q", "-w", "net.ipv4.conf.all.arp_accept=1"]);
        ns.exec(&[
            "sysctl",
            "-q",
            "-w",
            &format!("net.ipv4.conf.{}.arp_accept=1", ns.tap),
        ]);
        ns
    }

    /// Runs a command inside the namespace; panics if it fails.
    pub fn exec(&self, argv: &[&str]) -> String {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(argv);
        String::from_utf8_lossy(&ip(&args).stdout).into_owned()
    }

    /// The MAC the namespace's neighbour table holds for the guest, if any.
    pub fn neighbour(&self) -> Option<String> {
        let out = self.exec(&["ip", "neigh", "show", GUEST_IP, "dev", &self.tap]);
        let mut words = out.split_whitespace();
        words.find(|w| *w == "lladdr")?;
        words.next().map(str::to_string)
    }

    /// Runs `f` on a thread inside the namespace: the sockets it makes live
    /// there (and may be used from any thread afterwards).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open the netns");
            // SAFETY: setns(2) takes a descriptor of a network namespace,
            // open for the call; it switches only this thread, which ends
            // after `f`.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the thread in the netns panicked")
    }

    /// A TCP connection to the guest's port, retried until `timeout`.
    pub fn connect(&self, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
        self.run(move || {
            let addr: SocketAddr = format!("{GUEST_IP}:{port}").parse().expect("address");
            let deadline = Instant::now() + timeout;
            loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Ok(s) => {
                        s.set_read_timeout(Some(Duration::from_secs(60)))?;
                        return Ok(s);
                    }
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Sends `msg` on an `echo` connection (TCP or vsock) and reads it back.
pub fn echo<S: std::io::Read + std::io::Write>(s: &mut S, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    Ok(back)
}
