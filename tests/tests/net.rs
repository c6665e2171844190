//! virtio-net over TAP, virtio-vsock over Unix sockets and virtio-rng in
//! the default Linux guest: a TCP server in the guest answers a client on
//! the host; connections (TCP and vsock) survive a checkpoint-and-continue;
//! clones of one image run side by side on their own TAPs and announce
//! themselves; a restore resets vsock connections so the guest sees an
//! error, not a hang; bad options are refused before anything starts.
//!
//! One Linux boot for the whole binary ([`booted`]); the other tests
//! restore its image.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vmm_tests::netns::{echo, NetNs, GUEST_IP, HOST_IP};
use vmm_tests::vsock;
use vmm_tests::{kvm_available, rootfs_copy, vmm_bin, vmm_in, Running, Scratch};

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
const PORT: u16 = 7000;
/// The guest's vsock listener, and the host port its holder connects to.
const VSOCK_PORT: u32 = 5000;
const HOLD_PORT: u32 = 6000;
const CID: &str = "7";

/// What the one boot left for the other tests.
struct Booted {
    /// Lives as long as the test binary.
    dir: PathBuf,
    image: PathBuf,
    /// The guest's MAC, as the host's neighbour table learned it.
    mac: String,
    /// The guest's console up to the server's start.
    console: String,
}

static BOOTED: OnceLock<Booted> = OnceLock::new();

/// Boots the default guest on a TAP, with the test server as its command,
/// checks it serves, across a checkpoint-and-continue too, and keeps the
/// image.
fn booted() -> &'static Booted {
    BOOTED.get_or_init(|| {
        let scratch = Scratch::new("net");
        let dir = scratch.0.clone();
        std::mem::forget(scratch);
        let ns = NetNs::new("a");
        let sock = dir.join("api.sock");
        let net = format!("tap={},ip={GUEST_IP}/24,gw={HOST_IP}", ns.tap);
        let rootfs = rootfs_copy(&dir);
        let script = format!(
            "echo rng=$(cat /sys/class/misc/hw_random/rng_current); \
             echo entropy=$(cat /proc/sys/kernel/random/entropy_avail); \
             vmm-netserve --vsock {VSOCK_PORT} & vmm-netserve --vsock-hold {HOLD_PORT} & \
             exec vmm-netserve {PORT}"
        );
        let uds = dir.join("v.sock");
        let hold = UnixListener::bind(dir.join(format!("v.sock_{HOLD_PORT}"))).unwrap();
        let vsock_arg = format!("cid={CID},uds={}", uds.display());
        let mut vm = Running::spawn_in(
            &ns,
            &[
                "run",
                "--rootfs",
                rootfs.to_str().unwrap(),
                "--net",
                &net,
                "--vsock",
                &vsock_arg,
                "--api-sock",
                sock.to_str().unwrap(),
                "--",
                "sh",
                "-c",
                &script,
            ],
            &dir,
        );
        assert!(
            vm.wait_for(BOOT_TIMEOUT, |o| o
                .contains(&format!("listening on {PORT}"))
                && o.contains("vsock-hold connected 1")
                && o.contains("vsock listening")),
            "the servers did not start:\n{}\n{}",
            vm.output(),
            vm.stderr()
        );
        let console = vm.output();
        // The guest connected to the host: its connection is here.
        let (mut held, _) = hold.accept().unwrap();
        held.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        assert_eq!(echo(&mut held, b"held 1").unwrap(), b"held 1");
        let (mut vconn, _) = vsock::connect(&uds, VSOCK_PORT).expect("host -> guest vsock");
        vconn.write_all(b"echo\n").unwrap();
        assert_eq!(echo(&mut vconn, b"vsock before").unwrap(), b"vsock before");

        let mut conn = ns
            .connect(PORT, Duration::from_secs(60))
            .expect("connect to the guest");
        conn.write_all(b"echo\n").unwrap();
        assert_eq!(echo(&mut conn, b"before").unwrap(), b"before");

        // A second VMM cannot take the TAP the first holds.
        let busy = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(vmm_bin())
            .arg("run")
            .arg("--kernel")
            .arg(vmm_tests::workspace().join("target/test-guest.elf"))
            .arg("--net")
            .arg(format!("tap={}", ns.tap))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&busy.stderr);
        assert!(!busy.status.success(), "{err}");
        assert!(err.contains(&format!("{} is busy", ns.tap)), "{err}");

        // Checkpoint and continue: the open connection keeps working.
        let snap = vmm_in(
            &dir,
            &[
                "snapshot",
                "--api-sock",
                sock.to_str().unwrap(),
                "--out",
                "net.img",
            ],
        );
        assert!(
            snap.status.success(),
            "{}",
            String::from_utf8_lossy(&snap.stderr)
        );
        assert_eq!(
            echo(&mut conn, b"after the checkpoint").unwrap(),
            b"after the checkpoint"
        );
        // vsock connections both ways too.
        assert_eq!(echo(&mut held, b"held 2").unwrap(), b"held 2");
        assert_eq!(echo(&mut vconn, b"vsock after").unwrap(), b"vsock after");
        assert!(
            !vm.output().contains("vsock-hold lost"),
            "a checkpoint-and-continue reset vsock:\n{}",
            vm.output()
        );
        let mac = ns.neighbour().expect("the host learned the guest's MAC");
        drop(conn);
        vm.kill();
        Booted {
            image: dir.join("net.img"),
            dir,
            mac,
            console,
        }
    })
}

#[test]
fn a_guest_on_a_tap_serves_tcp_across_a_checkpoint_and_continue() {
    if !kvm_available("a_guest_on_a_tap_serves_tcp_across_a_checkpoint_and_continue") {
        return;
    }
    let b = booted();
    assert!(b.image.exists());
    assert!(
        b.mac.starts_with("02:"),
        "a generated MAC is local: {}",
        b.mac
    );
}

#[test]
fn virtio_rng_is_the_guests_hardware_rng() {
    if !kvm_available("virtio_rng_is_the_guests_hardware_rng") {
        return;
    }
    let console = &booted().console;
    assert!(
        console.lines().any(|l| l.trim() == "rng=virtio_rng.0"),
        "{console}"
    );
    let entropy: u32 = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("entropy="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no entropy line:\n{console}"));
    assert!(entropy > 0, "{console}");
}

/// Restores the image into `ns` (on its TAP), in its own directory `dir`,
/// with the vsock socket at `dir/v.sock`.
fn restore_into(ns: &NetNs, b: &Booted, dir: &Path) -> Running {
    std::fs::create_dir_all(dir).unwrap();
    let tap = format!("tap={}", ns.tap);
    let uds = format!("uds={}", dir.join("v.sock").display());
    Running::spawn_in(
        ns,
        &[
            "restore",
            "--from",
            b.image.to_str().unwrap(),
            "--net",
            &tap,
            "--vsock",
            &uds,
        ],
        dir,
    )
}

/// Waits for the guest's gratuitous ARP to reach the namespace.
fn announced(ns: &NetNs, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(mac) = ns.neighbour() {
            return Some(mac);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn clones_of_one_image_serve_side_by_side_on_their_own_taps() {
    if !kvm_available("clones_of_one_image_serve_side_by_side_on_their_own_taps") {
        return;
    }
    let b = booted();
    let (ns1, ns2) = (NetNs::new("b"), NetNs::new("c"));
    let mut vm1 = restore_into(&ns1, b, &b.dir.join("clone1"));
    let mut vm2 = restore_into(&ns2, b, &b.dir.join("clone2"));
    for (ns, vm) in [(&ns1, &mut vm1), (&ns2, &mut vm2)] {
        // Nothing sent to the guest yet: only its announcement can have
        // taught the namespace its MAC.
        let mac = announced(ns, Duration::from_secs(60));
        assert_eq!(
            mac.as_deref(),
            Some(b.mac.as_str()),
            "no announcement with the guest's MAC in {}:\n{}",
            ns.name,
            vm.stderr()
        );
    }
    for (i, ns) in [&ns1, &ns2].into_iter().enumerate() {
        let mut c = ns
            .connect(PORT, Duration::from_secs(60))
            .expect("connect to the clone");
        c.write_all(b"echo\n").unwrap();
        let msg = format!("hello clone {i}");
        assert_eq!(echo(&mut c, msg.as_bytes()).unwrap(), msg.as_bytes());
    }
    // Both still serve, a bulk transfer each way included.
    let mut sink = ns1.connect(PORT, Duration::from_secs(10)).unwrap();
    sink.write_all(b"sink\n").unwrap();
    let data = vec![7u8; 256 << 10];
    sink.write_all(&data).unwrap();
    sink.shutdown(std::net::Shutdown::Write).unwrap();
    let mut line = String::new();
    BufReader::new(&sink).read_line(&mut line).unwrap();
    let want = format!(
        "{} {:016x}",
        data.len(),
        vsock::fnv(vsock::FNV_START, &data)
    );
    assert_eq!(line.trim(), want);
    let mut source = ns2.connect(PORT, Duration::from_secs(10)).unwrap();
    source.write_all(b"source 262144\n").unwrap();
    assert_eq!(vsock::read_pattern(&mut source).unwrap(), 262144);
    vm1.kill();
    vm2.kill();
}

#[test]
fn a_restore_resets_vsock_connections_and_new_ones_work() {
    if !kvm_available("a_restore_resets_vsock_connections_and_new_ones_work") {
        return;
    }
    let b = booted();
    let ns = NetNs::new("e");
    let dir = b.dir.join("vsock-restore");
    std::fs::create_dir_all(&dir).unwrap();
    let hold = UnixListener::bind(dir.join(format!("v.sock_{HOLD_PORT}"))).unwrap();
    let mut vm = restore_into(&ns, b, &dir);
    // The guest's connection from before the snapshot fails at once (the
    // transport reset), and the guest connects again: to the new path.
    assert!(
        vm.wait_for(Duration::from_secs(60), |o| o
            .contains("vsock-hold connected 2")),
        "the guest did not reconnect:\n{}\n{}",
        vm.output(),
        vm.stderr()
    );
    let out = vm.output();
    assert!(
        out.contains("vsock-hold lost: Connection reset by peer"),
        "{out}"
    );
    let (mut held, _) = hold.accept().unwrap();
    held.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    assert_eq!(echo(&mut held, b"held again").unwrap(), b"held again");

    let uds = dir.join("v.sock");
    // 64 MiB from the guest through one connection, every byte checked,
    // and 1 MiB to it, checked by its FNV-1a.
    let (mut s, _) = vsock::connect(&uds, VSOCK_PORT).unwrap();
    s.write_all(format!("source {}\n", 64u64 << 20).as_bytes())
        .unwrap();
    assert_eq!(vsock::read_pattern(&mut s).unwrap(), 64 << 20);
    let (mut s, _) = vsock::connect(&uds, VSOCK_PORT).unwrap();
    vsock::sink_pattern(&mut s, 1 << 20).unwrap();

    // 100 connections opened, used and closed, one after the other.
    let mut ports = std::collections::HashSet::new();
    for i in 0..100 {
        let (mut c, port) = vsock::connect(&uds, VSOCK_PORT)
            .unwrap_or_else(|e| panic!("connection {i}: {e}\n{}", vm.stderr()));
        c.write_all(b"echo\n").unwrap();
        let msg = format!("connection {i}");
        assert_eq!(echo(&mut c, msg.as_bytes()).unwrap(), msg.as_bytes());
        ports.insert(port);
    }
    assert_eq!(ports.len(), 100, "each connection has its own host port");
    // A port nobody listens on in the guest: refused, not hung.
    assert!(vsock::connect(&uds, 4999).is_err());
    vm.kill();
}

#[test]
fn bad_network_options_are_refused_before_the_guest_starts() {
    if !kvm_available("bad_network_options_are_refused_before_the_guest_starts") {
        return;
    }
    let b = booted();
    let ns = NetNs::new("d");
    let s = Scratch::new("net-bad");
    let kernel = vmm_tests::workspace().join("target/test-guest.elf");
    let k = kernel.to_str().unwrap();
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .arg(vmm_bin())
            .args(args);
        let out = cmd.current_dir(&s.0).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{args:?} succeeded: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        err
    };
    let tap = format!("tap={}", ns.tap);
    let notes = s.0.join("notes.txt");
    std::fs::write(&notes, "data").unwrap();
    let not_a_socket = format!("cid=3,uds={}", notes.display());
    let restore_uds = format!("uds={}", notes.display());
    let image = b.image.to_str().unwrap();
    for (args, want) in [
        (
            vec!["run", "--kernel", k, "--vsock", "cid=2,uds=v.sock"],
            "reserved",
        ),
        (
            vec!["run", "--kernel", k, "--vsock", "cid=3"],
            "both required",
        ),
        (
            vec!["run", "--kernel", k, "--vsock", &not_a_socket],
            "notes.txt exists and is not a socket",
        ),
        (
            vec![
                "restore",
                "--from",
                image,
                "--net",
                &tap,
                "--vsock",
                &restore_uds,
            ],
            "cannot set up virtio-vsock/2",
        ),
        (
            vec!["run", "--kernel", k, "--net", "tap=vmm-none0"],
            "there is no network interface vmm-none0",
        ),
        (
            vec!["run", "--kernel", k, "--net", "tap=lo"],
            "lo is not a TAP",
        ),
        (
            vec!["run", "--kernel", k, "--net", "tap=x,mac=02:00:00:00:00"],
            "not a MAC address",
        ),
        (
            vec!["run", "--kernel", k, "--net", "tap=x,mac=01:00:00:00:00:01"],
            "not a MAC address",
        ),
        (
            vec!["run", "--kernel", k, "--net", "ip=10.0.0.2/24"],
            "tap=NAME is required",
        ),
        (
            vec!["run", "--kernel", k, "--net", &tap, "--net", &tap],
            "given to two network devices",
        ),
        (
            vec![
                "restore",
                "--from",
                b.image.to_str().unwrap(),
                "--net",
                &tap,
                "--net",
                "tap=lo",
            ],
            "the image's network devices are: virtio-net/1",
        ),
        (
            vec![
                "restore",
                "--from",
                b.image.to_str().unwrap(),
                "--net",
                "tap=vmm-none0",
            ],
            "cannot attach virtio-net/1 to its TAP: there is no network interface vmm-none0",
        ),
        (
            vec![
                "restore",
                "--from",
                b.image.to_str().unwrap(),
                "--net",
                &format!("{tap},mac=02:00:00:00:00:01"),
            ],
            "keeps its MAC",
        ),
    ] {
        let err = run(&args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A refused restore wrote nothing (no disk materialized), and the
    // file in the socket's place is untouched.
    let left: Vec<_> = std::fs::read_dir(&s.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["notes.txt"], "a refused command left files behind");
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "data");
}
