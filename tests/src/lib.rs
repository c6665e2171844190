//! Helpers for the integration tests: they run the real `vmm` binary on real
//! guests under KVM and assert on what the guest itself prints.

pub mod disk;
pub mod netns;
pub mod oci;
pub mod vsock;

/// The test guest (resources/test-guest): where it is, how to run it, and
/// what it says.
pub mod test_guest {
    use std::path::Path;

    /// `target/test-guest.elf`, which `cargo build` builds.
    pub fn elf() -> String {
        let p = super::workspace().join("target/test-guest.elf");
        assert!(
            p.exists(),
            "{} is missing: cargo build builds it",
            p.display()
        );
        p.display().to_string()
    }

    /// `vmm run` of the test guest with `vcpus`, `mem` MiB and `cmdline`.
    pub fn run_args(vcpus: u32, mem: u32, cmdline: &str) -> Vec<String> {
        let (vcpus, mem) = (vcpus.to_string(), mem.to_string());
        [
            "run",
            "--kernel",
            &elf(),
            "--vcpus",
            &vcpus,
            "--mem",
            &mem,
            "--cmdline",
            cmdline,
        ]
        .map(String::from)
        .to_vec()
    }

    /// The test guest with `vcpus`, `mem` MiB and `cmdline`, its API socket
    /// `api.sock` in `dir`.
    pub fn run_with_api(dir: &Path, vcpus: u32, mem: u32, cmdline: &str) -> super::Running {
        run_with_api_and(dir, vcpus, mem, cmdline, &[])
    }

    /// [`run_with_api`] with `extra` flags for `vmm run`.
    pub fn run_with_api_and(
        dir: &Path,
        vcpus: u32,
        mem: u32,
        cmdline: &str,
        extra: &[&str],
    ) -> super::Running {
        let mut args = run_args(vcpus, mem, cmdline);
        args.extend(["--api-sock", "api.sock"].map(String::from));
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        super::Running::spawn(&args, dir)
    }

    /// The numbers of its `tick N` lines.
    pub fn ticks(out: &str) -> Vec<u64> {
        out.lines()
            .filter_map(|l| l.trim().strip_prefix("tick "))
            .filter_map(|n| n.trim().parse().ok())
            .collect()
    }

    /// How many times the guest said `verify ok` (its memory held what it
    /// last wrote there).
    pub fn verified(out: &str) -> usize {
        out.matches("verify ok").count()
    }

    /// `vmm restore --from image` in `dir` of a guest running `verify`,
    /// until it has checked its memory three times or found it wrong, then
    /// killed: whether it checked it, and what it said.
    pub fn restore_verifying(dir: &Path, image: &str) -> (bool, super::Outcome) {
        let mut r = super::Running::spawn(&["restore", "--from", image], dir);
        let ok = r.wait_for(std::time::Duration::from_secs(60), |o| {
            verified(o) >= 3 || o.contains("BAD")
        });
        (ok, r.kill())
    }

    /// `vmm snapshot --json` of the VM whose API socket is `api.sock` in
    /// `dir`, into `out`, with `extra` flags: its answer, or the error it
    /// printed.
    pub fn snapshot(dir: &Path, out: &str, extra: &[&str]) -> Result<serde_json::Value, String> {
        let mut args = vec!["snapshot", "--api-sock", "api.sock", "--out", out, "--json"];
        args.extend_from_slice(extra);
        let o = super::vmm_in(dir, &args);
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).into_owned());
        }
        serde_json::from_slice(&o.stdout).map_err(|e| format!("{e}: {:?}", o.stdout))
    }
}

/// What the benchmarks share: their knobs and how they print.
pub mod bench {
    use std::time::{Duration, Instant};

    /// Milliseconds from `start` until the test guest in `r` prints its
    /// first tick (looking every millisecond).
    pub fn until_tick(r: &mut super::Running, start: Instant) -> f64 {
        assert!(
            r.wait_for_every(Duration::from_millis(1), Duration::from_secs(300), |o| o
                .contains("tick ")),
            "no tick:\n{}\n{}",
            r.output(),
            r.stderr()
        );
        start.elapsed().as_secs_f64() * 1000.0
    }

    /// A numeric knob from the environment.
    pub fn env_usize(name: &str, default: usize) -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// Prints the median of `v` with its spread (min, max) and count.
    pub fn summary(label: &str, unit: &str, mut v: Vec<f64>) {
        if v.is_empty() {
            println!("  {label:28} (no samples)");
            return;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let median = v[v.len() / 2];
        println!(
            "  {label:28} median {median:10.2} {unit}   min {:10.2}   max {:10.2}   n={}",
            v[0],
            v[v.len() - 1],
            v.len()
        );
    }
}

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// The `vmm` binary under test: $VMM_BIN, or target/release/vmm (built by the
/// test command before the tests run).
pub fn vmm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VMM_BIN") {
        return p.into();
    }
    let p = workspace().join("target/release/vmm");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release` first (tests/run-all.sh does)",
        p.display()
    );
    p
}

/// True when KVM can be used. Under CI a missing /dev/kvm fails the test
/// instead of skipping it.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "{test}: /dev/kvm is not usable, and CI=true: this is a failure, not a skip"
        );
        eprintln!("{test}: skipped: /dev/kvm is not usable on this machine");
    }
    ok
}

/// What a finished `vmm` run left behind.
#[derive(Debug)]
pub struct Outcome {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl Outcome {
    /// Console output with carriage returns removed.
    pub fn out(&self) -> String {
        self.stdout.replace('\r', "")
    }
}

/// Runs `vmm` with `args`, feeding `stdin`, killing it after `timeout`.
pub fn run_vmm(args: &[&str], stdin: &[u8], timeout: Duration) -> Outcome {
    let mut r = Running::spawn(args, Path::new("."));
    r.send(&String::from_utf8_lossy(stdin));
    // Keep stdin open a moment for interactive guests, then close it.
    std::thread::sleep(Duration::from_millis(200));
    r.close_stdin();
    r.finish(timeout)
}

/// The default guest's directory: the VMM's own lookup, so the tests use
/// the guest `vmm run` boots.
pub fn guest_dir() -> PathBuf {
    vmm::guest::default_guest_dir()
}

/// A scratch directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("vmm-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create scratch dir");
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies the default rootfs so a test can write to it without touching the original.
pub fn rootfs_copy(dir: &Path) -> PathBuf {
    let src = guest_dir().join("rootfs.ext4");
    assert!(
        src.exists(),
        "{} is missing: run resources/build-guest.sh first",
        src.display()
    );
    let dst = dir.join("rootfs.ext4");
    // cp --sparse keeps the copy as small as the original.
    let ok = Command::new("cp")
        .args(["--sparse=always"])
        .arg(&src)
        .arg(&dst)
        .status()
        .expect("run cp")
        .success();
    assert!(ok, "copying the rootfs failed");
    dst
}

/// A `vmm` running in the background whose output is collected as it comes.
pub struct Running {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    err: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    start: Instant,
}

fn collect(
    mut r: impl Read + Send + 'static,
    into: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

impl Running {
    /// Starts `vmm args` in `dir`, with its stdin a pipe ([`Running::send`]).
    pub fn spawn(args: &[&str], dir: &Path) -> Running {
        let mut cmd = Command::new(vmm_bin());
        cmd.args(args);
        Self::spawn_command(cmd, dir)
    }

    /// Starts `vmm args` in `dir` with `env` added to its environment.
    pub fn spawn_env(args: &[&str], dir: &Path, env: &[(&str, &Path)]) -> Running {
        let mut cmd = Command::new(vmm_bin());
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn_command(cmd, dir)
    }

    /// Starts `vmm args` inside the network namespace `ns`.
    pub fn spawn_in(ns: &netns::NetNs, args: &[&str], dir: &Path) -> Running {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .arg(vmm_bin())
            .args(args);
        Self::spawn_command(cmd, dir)
    }

    fn spawn_command(mut cmd: Command, dir: &Path) -> Running {
        let mut child = cmd
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start vmm");
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let err = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().expect("piped"), out.clone()),
            collect(child.stderr.take().expect("piped"), err.clone()),
        ];
        Running {
            stdin: child.stdin.take(),
            child,
            out,
            err,
            readers,
            start: Instant::now(),
        }
    }

    /// The `vmm` process's pid, to signal it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Types `text` on the guest's console.
    pub fn send(&mut self, text: &str) {
        if let Some(s) = self.stdin.as_mut() {
            let _ = s.write_all(text.as_bytes());
            let _ = s.flush();
        }
    }

    /// Closes the guest's console input.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Console output so far, carriage returns removed.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).replace('\r', "")
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// Waits until the output satisfies `pred`; false on timeout or exit.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
        self.wait_for_every(Duration::from_millis(50), timeout, pred)
    }

    /// [`Running::wait_for`], looking every `every` (benchmarks that time
    /// milliseconds look every millisecond).
    pub fn wait_for_every(
        &mut self,
        every: Duration,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if pred(&self.output()) {
                return true;
            }
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return pred(&self.output());
            }
            std::thread::sleep(every);
        }
        false
    }

    /// Waits for the process to end (killing it after `timeout`).
    pub fn finish(mut self, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        let status = loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                break s.code();
            }
            if Instant::now() > deadline {
                timed_out = true;
                let _ = self.child.kill();
                break self.child.wait().ok().and_then(|s| s.code());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Outcome {
            status,
            stdout: String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned(),
            stderr: String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned(),
            elapsed: self.start.elapsed(),
            timed_out,
        }
    }

    /// Kills the process at once.
    pub fn kill(mut self) -> Outcome {
        let _ = self.child.kill();
        self.finish(Duration::from_secs(10))
    }
}

/// A `vmm` left running by a failed test is killed, not left to spin.
impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `vmm args` to completion in `dir`.
pub fn vmm_in(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(vmm_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("cannot run vmm")
}

/// `vmm agent --api-sock SOCK ARGS...`, fed `stdin`, to completion.
pub fn vmm_agent(sock: &Path, args: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut child = Command::new(vmm_bin())
        .arg("agent")
        .arg("--api-sock")
        .arg(sock)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vmm agent");
    let mut input = child.stdin.take().expect("piped");
    input.write_all(stdin).expect("write the command's stdin");
    drop(input);
    child.wait_with_output().expect("wait for vmm agent")
}

/// What `vmm ARGS` prints on a terminal (a pseudo-terminal from `script`),
/// run in `dir` with `env` added, within `wait`; then it and its children
/// are killed.
pub fn on_a_terminal(
    args: &str,
    dir: Option<&Path>,
    env: &[(&str, &str)],
    wait: Duration,
) -> String {
    use std::os::unix::process::CommandExt;
    let cmd = format!("{} {args}", vmm_bin().display());
    let mut command = Command::new("script");
    command
        .args(["-qfec", &cmd, "/dev/null"])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0);
    if let Some(d) = dir {
        command.current_dir(d);
    }
    let mut child = command.spawn().expect("script (util-linux) runs");
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    std::thread::sleep(wait);
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .status();
    let _ = child.wait();
    String::from_utf8_lossy(&reader.join().unwrap()).into_owned()
}

/// One HTTP/1.1 request on a fresh connection to the API socket `sock`;
/// the response's head and its body (by its Content-Length, as an HTTP
/// client reads it: a server may keep the connection open, e.g. to discard
/// a refused body).
pub fn http(sock: &str, request: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut c = std::os::unix::net::UnixStream::connect(sock)?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(request.as_bytes())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return Ok(text);
            }
        }
        let n = c.read(&mut buf)?;
        if n == 0 {
            return Ok(String::from_utf8_lossy(&got).into_owned());
        }
        got.extend_from_slice(&buf[..n]);
    }
}
