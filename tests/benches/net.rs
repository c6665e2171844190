//! Host <-> guest TCP over virtio-net and a TAP, and streams over
//! virtio-vsock: round-trip latency of a 64-byte echo, vsock connection
//! set-up, and throughput each way, as medians with their spread.
//!
//!     VMM_BINS=old/vmm,new/vmm NET_BENCH_MIB=4 NET_BENCH_RUNS=3 \
//!         cargo bench -p vmm-tests --bench net
//!
//! Each binary (the first is the baseline; default: the one under test)
//! boots the default guest once, in its own network namespace, with the
//! test server (`vmm-netserve`, TCP and vsock) as its command. The guest
//! kernel is interpreted here, so every packet costs it milliseconds:
//! expect figures in the hundreds of KB/s, bounded by the guest's stacks.

use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};

use vmm_tests::bench::{env_usize as env, summary};
use vmm_tests::netns::{echo, NetNs, GUEST_IP};
use vmm_tests::vsock;
use vmm_tests::{rootfs_copy, Running, Scratch};

const PORT: u16 = 7000;
const VSOCK_PORT: u32 = 5000;

fn bench(bin: &str, mib: usize, runs: usize) {
    // The helpers read VMM_BIN on each spawn; this thread is the only one.
    std::env::set_var("VMM_BIN", bin);
    let s = Scratch::new("net-bench");
    let ns = NetNs::new("bench");
    let rootfs = rootfs_copy(&s.0);
    let net = format!("tap={},ip={GUEST_IP}/24", ns.tap);
    let uds = s.0.join("v.sock");
    let vsock_arg = format!("cid=3,uds={}", uds.display());
    let script = format!("vmm-netserve --vsock {VSOCK_PORT} & exec vmm-netserve {PORT}");
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
            "--",
            "sh",
            "-c",
            &script,
        ],
        &s.0,
    );
    assert!(
        vm.wait_for(Duration::from_secs(900), |o| o.contains("listening on")
            && o.contains("vsock listening")),
        "{}\n{}",
        vm.output(),
        vm.stderr()
    );
    println!("== {bin}");

    let mut c = ns.connect(PORT, Duration::from_secs(60)).unwrap();
    c.write_all(b"echo\n").unwrap();
    let msg = [0x42u8; 64];
    echo(&mut c, &msg).unwrap();
    let rtt: Vec<f64> = (0..runs.max(1) * 10)
        .map(|_| {
            let t = Instant::now();
            echo(&mut c, &msg).unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    summary("64-byte echo round trip", "ms", rtt);

    let bytes = mib << 20;
    let mut to_guest = Vec::new();
    let mut from_guest = Vec::new();
    for _ in 0..runs {
        let mut sink = ns.connect(PORT, Duration::from_secs(10)).unwrap();
        sink.set_read_timeout(Some(Duration::from_secs(3600)))
            .unwrap();
        let t = Instant::now();
        sink.write_all(b"sink\n").unwrap();
        let chunk = vec![0x33u8; 1 << 20];
        for _ in 0..mib {
            sink.write_all(&chunk).unwrap();
        }
        sink.shutdown(std::net::Shutdown::Write).unwrap();
        let mut line = String::new();
        BufReader::new(&sink).read_line(&mut line).unwrap();
        assert_eq!(
            line.split_whitespace().next(),
            Some(bytes.to_string().as_str())
        );
        to_guest.push(bytes as f64 / 1e6 / t.elapsed().as_secs_f64());

        let mut source = ns.connect(PORT, Duration::from_secs(10)).unwrap();
        source
            .set_read_timeout(Some(Duration::from_secs(3600)))
            .unwrap();
        let t = Instant::now();
        source
            .write_all(format!("source {bytes}\n").as_bytes())
            .unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = source.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        assert_eq!(got, bytes);
        from_guest.push(bytes as f64 / 1e6 / t.elapsed().as_secs_f64());
    }
    summary(&format!("tcp host -> guest {mib} MiB"), "MB/s", to_guest);
    summary(&format!("tcp guest -> host {mib} MiB"), "MB/s", from_guest);

    let setup: Vec<f64> = (0..runs.max(1) * 10)
        .map(|_| {
            let t = Instant::now();
            let (c, _) = vsock::connect(&uds, VSOCK_PORT).unwrap();
            let ms = t.elapsed().as_secs_f64() * 1e3;
            drop(c);
            ms
        })
        .collect();
    summary("vsock connect (to OK)", "ms", setup);
    let (mut c, _) = vsock::connect(&uds, VSOCK_PORT).unwrap();
    c.write_all(b"echo\n").unwrap();
    echo(&mut c, &msg).unwrap();
    let rtt: Vec<f64> = (0..runs.max(1) * 10)
        .map(|_| {
            let t = Instant::now();
            echo(&mut c, &msg).unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    summary("vsock 64-byte round trip", "ms", rtt);
    let (mut to_guest, mut from_guest) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (mut c, _) = vsock::connect(&uds, VSOCK_PORT).unwrap();
        let t = Instant::now();
        vsock::sink_pattern(&mut c, bytes as u64).unwrap();
        to_guest.push(bytes as f64 / 1e6 / t.elapsed().as_secs_f64());
        let (mut c, _) = vsock::connect(&uds, VSOCK_PORT).unwrap();
        let t = Instant::now();
        c.write_all(format!("source {bytes}\n").as_bytes()).unwrap();
        assert_eq!(vsock::read_pattern(&mut c).unwrap(), bytes as u64);
        from_guest.push(bytes as f64 / 1e6 / t.elapsed().as_secs_f64());
    }
    summary(&format!("vsock host -> guest {mib} MiB"), "MB/s", to_guest);
    summary(
        &format!("vsock guest -> host {mib} MiB"),
        "MB/s",
        from_guest,
    );
    vm.kill();
}

fn main() {
    let mib = env("NET_BENCH_MIB", 4);
    let runs = env("NET_BENCH_RUNS", 3);
    let bins: Vec<String> = match std::env::var("VMM_BINS") {
        Ok(v) => v.split(',').map(str::to_string).collect(),
        Err(_) => vec![vmm_tests::vmm_bin().display().to_string()],
    };
    println!("virtio-net over TAP and virtio-vsock, {runs} runs of {mib} MiB each way:");
    for bin in &bins {
        bench(bin, mib, runs);
    }
}
