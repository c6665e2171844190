//! `vmm`: the command-line front end.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};

use guest_abi::agent::{ProcessUser, StartRequest};
use vmm::boot::VmConfig;
use vmm::events::{SnapshotBody, SnapshotOptions};
use vmm::runner;

/// Runs before Rust's runtime replaces a closed stdout with /dev/null, so
/// that `--out -` can refuse a closed stdout instead of losing the image.
#[used]
#[link_section = ".init_array"]
static NOTE_CLOSED_STDOUT: extern "C" fn() = vmm::terminal::note_closed_stdout;

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A micro-VMM that boots and checkpoints whole Linux VMs under KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and run a command (or a shell) in it.
    #[command(
        after_help = "Examples:\n  vmm run --name web -- python3 -m http.server\n  vmm run --image busybox.tar:busybox:latest -- sh -c 'echo hi'"
    )]
    Run(RunArgs),
    /// Checkpoint a running VM (through its API socket) into an image.
    #[command(after_help = "Example:\n  vmm snapshot web --out web.img")]
    Snapshot(SnapshotArgs),
    /// Start a VM from an image and carry on where it was.
    #[command(after_help = "Example:\n  vmm restore --from web.img --name web2")]
    Restore(RestoreArgs),
    /// Show what an image holds; --verify checks all of it.
    #[command(after_help = "Example:\n  vmm inspect --verify web.img")]
    Inspect(InspectArgs),
    /// Work on image files: `flatten` merges an increment and its parents.
    #[command(
        subcommand,
        after_help = "Example:\n  vmm image flatten inc3.img --out full.img"
    )]
    Image(ImageCommand),
    /// Talk to the guest agent of a running VM.
    #[command(after_help = "Example:\n  vmm agent web exec -- ls /")]
    Agent(AgentArgs),
    /// Show or remove the warm images `vmm run` starts from, and the root disks of images.
    #[command(after_help = "Example:\n  vmm cache ls")]
    Cache(CacheArgs),
    /// List the running VMs that have a name (vmm run --name).
    #[command(after_help = "Example:\n  vmm ps --json")]
    Ps {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a running VM now (its vmm exits).
    #[command(after_help = "Example:\n  vmm stop web")]
    Stop(Target),
    /// Stop a running VM's vCPUs until `vmm resume`.
    #[command(after_help = "Example:\n  vmm pause web")]
    Pause(Target),
    /// Let a paused VM run again.
    #[command(after_help = "Example:\n  vmm resume web")]
    Resume(Target),
}

#[derive(clap::Args)]
struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// List the warm images (name, size, age, last use, what they boot)
    /// and the root disks made of container images.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove warm images or image root disks by name (or all of them).
    Rm {
        #[arg(required_unless_present = "all")]
        names: Vec<String>,
        #[arg(long, conflicts_with = "names")]
        all: bool,
    },
    /// Remove the least recently used warm images, and image root disks,
    /// beyond a total size for each.
    Prune {
        /// The size of warm images to keep, in MiB.
        #[arg(long, value_name = "MIB", default_value_t = vmm::warm::DEFAULT_MAX_BYTES >> 20)]
        max_size: u64,
        /// The size of image root disks to keep (blocks they take), in MiB.
        #[arg(long, value_name = "MIB", default_value_t = container_image::DEFAULT_MAX_BYTES >> 20)]
        max_disks_size: u64,
    },
}

/// How a running VMM is controlled (run and restore alike).
#[derive(clap::Args)]
struct ControlArgs {
    /// Serve the control API (HTTP/1.1 + JSON) on this Unix socket.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Name the VM: its API socket goes to the standard place (/run/vmm/NAME.sock
    /// as root, else $XDG_RUNTIME_DIR/vmm/NAME.sock), where `vmm ps`, `vmm
    /// snapshot NAME`, `vmm agent NAME`, `vmm stop NAME`, ... find it.
    #[arg(long, conflicts_with = "api_sock")]
    name: Option<String>,
    /// Where checkpoints go that the guest asks for (vmm-ckpt,
    /// vmm_checkpoint()), that --checkpoint-on's signal or
    /// PUT /vm/checkpoint asks for: DIR/NAME.vmm. Without it they are refused.
    #[arg(long, value_name = "DIR")]
    snapshot_dir: Option<PathBuf>,
    /// Checkpoint the VM into --snapshot-dir each time this signal reaches
    /// the vmm process (USR1, USR2, HUP, ...).
    #[arg(long, value_name = "SIGNAL", value_parser = parse_signal)]
    checkpoint_on: Option<i32>,
    /// Run without the per-thread seccomp filters (for debugging: a
    /// forbidden system call otherwise stops the VMM, naming thread and call).
    #[arg(long)]
    no_seccomp: bool,
    /// Run without the Landlock confinement of file access (for debugging,
    /// or to write snapshots anywhere; without it, the VMM writes images
    /// only into --snapshot-dir and the warm-start cache).
    #[arg(long)]
    no_landlock: bool,
}

fn parse_signal(s: &str) -> Result<i32, String> {
    vmm::checkpoint::parse_signal(s).map_err(|e| e.to_string())
}

impl ControlArgs {
    fn options(self) -> anyhow::Result<runner::RunOptions> {
        if self.no_seccomp {
            vmm::seccomp::disable();
        }
        if self.checkpoint_on.is_some() && self.snapshot_dir.is_none() {
            anyhow::bail!("--checkpoint-on needs --snapshot-dir DIR (where the images go)");
        }
        // Absolute, so the paths reported to the guest and the API are.
        let snapshot_dir = match &self.snapshot_dir {
            Some(dir) if dir.is_dir() => Some(std::fs::canonicalize(dir)?),
            Some(dir) => anyhow::bail!("--snapshot-dir {}: not a directory", dir.display()),
            None => None,
        };
        let api_sock = match &self.name {
            Some(name) => {
                let path = vmm::names::socket_for_new(name)?;
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    anyhow::bail!(
                        "the name '{name}' is taken: a VM answers on {}",
                        path.display()
                    );
                }
                Some(path)
            }
            None => self.api_sock,
        };
        let mut sandbox = vmm::sandbox::Sandbox::new(!self.no_landlock);
        if let Some(dir) = &snapshot_dir {
            sandbox.allow(dir, vmm::sandbox::Allow::Images);
        }
        if let Some(sock) = &api_sock {
            sandbox.allow_parent(sock, vmm::sandbox::Allow::Sockets);
        }
        Ok(runner::RunOptions {
            api_sock,
            name: self.name,
            image: None,
            snapshot_dir,
            checkpoint_on: self.checkpoint_on,
            start: None,
            sandbox,
            restore_report: runner::Report::Quiet,
            track_restored: false,
        })
    }
}

/// Which running VM a command is for: its name, or its API socket.
#[derive(clap::Args)]
struct Target {
    /// The VM's name (vmm run --name NAME).
    #[arg(
        value_name = "NAME",
        required_unless_present = "api_sock",
        conflicts_with = "api_sock"
    )]
    name: Option<String>,
    /// The running VMM's API socket, instead of a name.
    #[arg(long)]
    api_sock: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> anyhow::Result<PathBuf> {
        match (&self.name, &self.api_sock) {
            (Some(name), _) => Ok(vmm::names::socket_of(name)?),
            (None, Some(path)) => Ok(path.clone()),
            (None, None) => anyhow::bail!("name the VM, or give --api-sock PATH"),
        }
    }
}

#[derive(clap::Args)]
struct AgentArgs {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Check that the agent answers; prints its restore generation and the round trip.
    Ping,
    /// Run a command in the guest: its output here, its exit status ours.
    Exec(AgentExecArgs),
    /// Sync and freeze the guest's writable filesystems.
    Freeze,
    /// Thaw what freeze froze.
    Thaw,
}

#[derive(clap::Args)]
struct AgentExecArgs {
    /// Run on a pseudo-terminal in the guest, with this terminal in raw mode
    /// (implies --interactive).
    #[arg(short, long)]
    tty: bool,
    /// Pass this process's stdin to the command.
    #[arg(short, long)]
    interactive: bool,
    /// Set an environment variable (NAME=value), repeatable.
    #[arg(short, long, value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest kernel: an uncompressed ELF vmlinux or a bzImage [default: the default guest's].
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk to hand to the kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Root filesystem image (raw ext4), attached as virtio-blk /dev/vda [default: the default guest's].
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Run a container image: an OCI image layout directory or a `docker
    /// save` / `podman save` archive, PATH or PATH:TAG. Its layers become
    /// a root disk (made once, then cached) with the guest agent added; its
    /// Entrypoint, Cmd (replaced by a command after --), Env, WorkingDir and
    /// User are honoured. Runs are ephemeral and start warm.
    #[arg(long, value_name = "PATH[:TAG]", conflicts_with = "rootfs")]
    image: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// Number of vCPUs (1 to 8).
    #[arg(long, default_value_t = 1)]
    vcpus: u64,
    /// Kernel command line, replacing the default one (devices are still appended).
    #[arg(long)]
    cmdline: Option<String>,
    #[command(flatten)]
    control: ControlArgs,
    /// Attach a virtio-net device to an existing TAP interface (repeatable):
    /// tap=NAME[,mac=MAC][,ip=ADDR/PREFIX[,gw=GW]]. With ip=, the guest agent
    /// configures the interface (and the default route through gw=).
    #[arg(long, value_name = "tap=NAME,...")]
    net: Vec<vmm::boot::NetConfig>,
    /// Add a virtio-vsock device: the guest's context id (3 or above) and
    /// the host socket. A host program connects to PATH and writes
    /// "CONNECT <port>\n" to reach a guest listener; a guest connecting to
    /// the host (CID 2) on port P reaches PATH_P.
    #[arg(long, value_name = "cid=N,uds=PATH")]
    vsock: Option<vmm::boot::VsockConfig>,
    /// Print boot milestones (first guest instruction, first console output,
    /// agent start, exit; ms from process start) as a JSON line on stderr at exit.
    #[arg(long)]
    timings: bool,
    /// Say nothing of our own on stderr but errors (no note that the boot
    /// will be slow on a host without hardware virtualization).
    #[arg(long, short)]
    quiet: bool,
    /// Boot, even if a warm image of this machine is cached (and save none).
    #[arg(long)]
    cold: bool,
    /// The guest's writes to the rootfs go to a copy-on-write overlay that
    /// ends with the VM; the rootfs file is never written. Always on for
    /// the default guest. Ephemeral runs start warm from a cached image.
    #[arg(long)]
    ephemeral: bool,
    /// The container command and its arguments; without one, an interactive shell.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(clap::Args)]
struct SnapshotArgs {
    #[command(flatten)]
    target: Target,
    /// Where the image goes: a file (written atomically) or - for stdout.
    #[arg(long)]
    out: String,
    /// Print the VMM's answer as JSON instead of a line (with --out -, on
    /// stderr, since stdout carries the image).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    options: SnapshotOptions,
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// The image: a file, or - for stdin. From a file the VM runs at once
    /// and its memory arrives as it touches it (lazy restore); stdin
    /// cannot be read out of order, so it is read whole first.
    #[arg(long)]
    from: String,
    /// Read all of the image's memory before the VM runs (as from stdin),
    /// instead of lazily.
    #[arg(long)]
    eager: bool,
    /// Keep track of the pages the VM writes from the start, so that its
    /// first snapshot can be an increment on this image (--parent). It
    /// costs the guest: its memory is mapped in small pages while tracked.
    #[arg(long)]
    track: bool,
    #[command(flatten)]
    control: ControlArgs,
    /// Where the image's disks are materialized (sparse files named after the image id).
    #[arg(long, default_value = ".")]
    disk_dir: PathBuf,
    /// Attach the image's network devices, in order, to these TAPs instead
    /// of the ones they had (tap=NAME, once per device): clones of one
    /// image run side by side.
    #[arg(long, value_name = "tap=NAME")]
    net: Vec<RestoreNet>,
    /// Listen for the image's vsock device on this socket instead of the
    /// saved path (uds=PATH), so clones run side by side.
    #[arg(long, value_name = "uds=PATH")]
    vsock: Option<RestoreVsock>,
    /// Print restore milestones as a JSON line on stderr at exit.
    #[arg(long)]
    timings: bool,
    /// Say what was restored as JSON (on stderr, like the line it replaces).
    #[arg(long)]
    json: bool,
    /// Say nothing of our own on stderr but errors (no result line, no
    /// progress bar).
    #[arg(long, short)]
    quiet: bool,
}

#[derive(clap::Subcommand)]
enum ImageCommand {
    /// Write an increment and the images below it as one full image.
    Flatten {
        /// The increment (its parents are found as `vmm restore` finds them).
        image: String,
        /// The full image to write (atomically).
        #[arg(long)]
        out: PathBuf,
        /// none, zstd or zstd:LEVEL (1 to 19).
        #[arg(long, default_value = "zstd:1")]
        compress: snapshot::Compression,
    },
}

fn image_cmd(command: ImageCommand) -> anyhow::Result<i32> {
    match command {
        ImageCommand::Flatten {
            image,
            out,
            compress,
        } => {
            let (written, below) = vmm::image::flatten(&image, &out, compress)
                .with_context(|| format!("cannot flatten {image}"))?;
            let line = format!(
                "flattened {image} and the {below} image(s) below it into {}: full image {}, {}\n",
                written.destination,
                written.image_id,
                mib(written.summary.bytes)
            );
            std::io::Write::write_all(&mut std::io::stdout(), line.as_bytes())?;
            Ok(0)
        }
    }
}

#[derive(clap::Args)]
struct InspectArgs {
    /// The image file (- for stdin).
    image: String,
    /// Check every checksum and decode every chunk.
    #[arg(long)]
    verify: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Keeps the last bytes written, to check that a streamed image is whole.
struct Tail<W> {
    inner: W,
    last: Vec<u8>,
    bytes: u64,
}

impl<W: std::io::Write> std::io::Write for Tail<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.last.extend_from_slice(&b[..n]);
        let keep = self.last.len().saturating_sub(snapshot::format::FOOTER_LEN);
        self.last.drain(..keep);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Asks the VMM for its image as a stream and writes it to `out`; once
/// the whole image (ending with its footer) came, the VMM's answer (what
/// was written, the pause), its destination being `destination`.
fn stream_snapshot(
    sock: &std::path::Path,
    options: SnapshotOptions,
    out: impl std::io::Write,
    destination: &str,
) -> anyhow::Result<serde_json::Value> {
    let req = SnapshotBody::new(None, options);
    let mut tail = Tail {
        inner: out,
        last: Vec::new(),
        bytes: 0,
    };
    let mut answer = None;
    let code = vmm::client::request(
        sock,
        "PUT",
        "/vm/snapshot",
        serde_json::to_string(&req)?.as_bytes(),
        &mut tail,
        &mut |h| {
            if let Some((name, value)) = h.split_once(':') {
                if name.eq_ignore_ascii_case(vmm::api::ANSWER_TRAILER) {
                    answer = serde_json::from_str::<serde_json::Value>(value.trim()).ok();
                }
            }
        },
    )?;
    std::io::Write::flush(&mut tail)?;
    if code != 200 {
        anyhow::bail!("snapshot failed: HTTP {code}");
    }
    // The VMM's reason, when it failed and said why.
    if let Some(e) = answer.as_ref().and_then(|a| a.get("error")) {
        anyhow::bail!("snapshot failed: {}", e.as_str().unwrap_or("?"))
    }
    // A whole image ends with the index footer; a failed snapshot
    // closes the stream early.
    let footer = <[u8; snapshot::format::FOOTER_LEN]>::try_from(tail.last.as_slice());
    if !footer.is_ok_and(|f| snapshot::format::decode_footer(&f).is_some()) {
        anyhow::bail!(
            "snapshot failed: the image stream ended after {} bytes without its end (see the VMM's log)",
            tail.bytes
        );
    }
    // The VMM's account of it (its trailer); the bytes we wrote, if it
    // has none.
    let mut answer = match answer {
        Some(a) if a.is_object() => a,
        _ => serde_json::json!({ "bytes": tail.bytes }),
    };
    answer["destination"] = destination.into();
    Ok(answer)
}

/// Runs `work` (a snapshot request to the VMM at `sock`) while a thread
/// shows the VMM's progress with writing the image (`GET /vm`) on a bar.
fn with_progress<T>(sock: &std::path::Path, wanted: bool, work: impl FnOnce() -> T) -> T {
    use std::sync::atomic::{AtomicBool, Ordering};
    let over = std::sync::Arc::new(AtomicBool::new(false));
    let watcher = std::io::stderr().is_terminal() && wanted;
    let watcher = watcher.then(|| {
        let (over, sock) = (over.clone(), sock.to_path_buf());
        std::thread::spawn(move || {
            let mut bar = vmm::progress::Bar::new("snapshot", true);
            while !over.load(Ordering::Acquire) {
                std::thread::sleep(std::time::Duration::from_millis(100));
                let Ok(info) = vmm::client::json(&sock, "GET", "/vm", &serde_json::Value::Null)
                else {
                    continue;
                };
                let p = &info["progress"];
                if let (Some(done), Some(total)) = (p["done"].as_u64(), p["total"].as_u64()) {
                    bar.update(done, Some(total));
                }
            }
            bar.finish();
        })
    });
    let result = work();
    over.store(true, Ordering::Release);
    if let Some(w) = watcher {
        let _ = w.join();
    }
    result
}

/// `vmm snapshot`'s result: the VMM's answer as JSON, or a line.
fn snapshot_result(json: bool, answer: &serde_json::Value) -> String {
    if json {
        answer.to_string()
    } else {
        snapshot_line(answer)
    }
}

/// An increment's parent, checked before the VM is asked: a whole image
/// (its index and footer are there: a parent cut short would make the
/// chain unrestorable), and neither it nor an image below it is where the
/// increment goes. Returns its absolute path and its id.
fn check_parent(parent: &std::path::Path, out: &str) -> anyhow::Result<(PathBuf, String)> {
    let abs = std::path::absolute(parent)?;
    let mut file = std::fs::File::open(&abs)?;
    let (header, _) = snapshot::open_index(&mut file)?;
    if out != "-" {
        let below = vmm::image::parents_of(&abs.to_string_lossy())?;
        let out = std::path::Path::new(out);
        let chain = std::iter::once(abs.as_path()).chain(below.iter().map(|(_, p)| p.as_path()));
        if let Some(p) = chain.into_iter().find(|p| vmm::image::same_file(p, out)) {
            anyhow::bail!(
                "the increment would replace {}, which it builds on",
                p.display()
            );
        }
    }
    Ok((abs, snapshot::format::id_hex(&header.image_id)))
}

fn snapshot_cmd(mut args: SnapshotArgs) -> anyhow::Result<i32> {
    let sock = args.target.socket()?;
    if let Some(parent) = args.options.parent.take() {
        let (abs, id) = check_parent(&parent, &args.out)
            .with_context(|| format!("--parent {}", parent.display()))?;
        args.options.parent_id = Some(id);
        args.options.parent = Some(abs);
    }
    if args.out == "-" {
        if vmm::terminal::stdout_was_closed() {
            anyhow::bail!("--out -: stdout is closed; redirect it to where the image should go");
        }
        let answer = with_progress(&sock, !args.json, || {
            stream_snapshot(&sock, args.options, std::io::stdout().lock(), "stdout")
        })?;
        let line = snapshot_result(args.json, &answer);
        std::io::Write::write_all(&mut std::io::stderr(), format!("{line}\n").as_bytes())?;
        return Ok(0);
    }
    let out = PathBuf::from(&args.out);
    let abs = if out.is_absolute() {
        out
    } else {
        std::env::current_dir()?.join(out)
    };
    let req = SnapshotBody::new(Some(abs.clone()), args.options.clone());
    let mut body = Vec::new();
    let request = serde_json::to_string(&req)?;
    let code = with_progress(&sock, !args.json, || {
        vmm::client::request(
            &sock,
            "PUT",
            "/vm/snapshot",
            request.as_bytes(),
            &mut body,
            &mut |_| {},
        )
    })?;
    let line = match code {
        200 => snapshot_result(
            args.json,
            &serde_json::from_slice(&body).unwrap_or_default(),
        ),
        // Landlock keeps the VMM from writing there; we may: the image
        // comes through the socket and we write it, as atomically.
        403 => {
            log::info!(
                "the VMM may not write {}: {}; writing its stream here",
                abs.display(),
                vmm::client::error_text(&body)
            );
            let (atomic, file) = vmm::atomic_file::AtomicFile::create(&abs)?;
            let destination = atomic.destination().display().to_string();
            let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
            let answer = with_progress(&sock, !args.json, || {
                stream_snapshot(&sock, args.options, &mut writer, &destination)
            })?;
            let file = writer.into_inner().map_err(|e| e.into_error())?;
            atomic.commit(file)?;
            snapshot_result(args.json, &answer)
        }
        _ => anyhow::bail!("snapshot failed: {}", vmm::client::error_text(&body)),
    };
    std::io::Write::write_all(&mut std::io::stdout(), format!("{line}\n").as_bytes())?;
    Ok(0)
}

/// One line for a person: what was written where, how small, how long the
/// VM was paused.
fn snapshot_line(a: &serde_json::Value) -> String {
    let num = |k: &str| a[k].as_f64().unwrap_or(0.0);
    let bytes = num("bytes") as u64;
    let memory = num("memory_pages") * 4096.0;
    let ratio = if bytes > 0 && memory > 0.0 {
        format!(
            " for {} of memory ({:.0}x smaller)",
            mib(memory as u64),
            memory / bytes as f64
        )
    } else {
        String::new()
    };
    let kind = match a["parent_id"].as_str() {
        Some(p) => format!("increment {} on {p}", a["image_id"].as_str().unwrap_or("?")),
        None => format!("snapshot {}", a["image_id"].as_str().unwrap_or("?")),
    };
    // A write in the background ends after the resume: it is in total_ms.
    let background = a["background"].as_bool().unwrap_or(false);
    let in_all = num("prepare_ms")
        + num("freeze_ms")
        + num("total_ms")
        + if background {
            0.0
        } else {
            num("resume_thaw_ms")
        };
    let how = if background {
        " (written while it ran)".to_string()
    } else {
        a["full_pause"]
            .as_str()
            .map(|why| format!(" (for the whole write: {why})"))
            .unwrap_or_default()
    };
    format!(
        "{kind} written to {}: {}{ratio}; VM paused {:.1} ms{how}, {in_all:.0} ms in all",
        a["destination"].as_str().unwrap_or("?"),
        mib(bytes),
        num("pause_ms"),
    )
}

/// "5.6 MiB", "312 KiB".
fn mib(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    } else {
        format!("{} KiB", bytes.div_ceil(1024))
    }
}

/// An image to read: a file, or stdin for `-`.
fn open_image(path: &str) -> anyhow::Result<Box<dyn std::io::Read>> {
    if path == "-" {
        return Ok(Box::new(std::io::stdin()));
    }
    let file = std::fs::File::open(path).with_context(|| format!("cannot open image {path}"))?;
    Ok(Box::new(file))
}

/// `vmm restore --net tap=NAME`: only the TAP changes; the guest keeps its
/// MAC and addresses.
#[derive(Clone)]
struct RestoreNet(String);

impl std::str::FromStr for RestoreNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let cfg: vmm::boot::NetConfig = s.parse().map_err(|e| format!("{e}"))?;
        if cfg.mac.is_some() || cfg.ip.is_some() {
            return Err("a restored guest keeps its MAC and address: give only tap=NAME".into());
        }
        Ok(RestoreNet(cfg.tap))
    }
}

/// `vmm restore --vsock uds=PATH`: the guest keeps its CID.
#[derive(Clone)]
struct RestoreVsock(PathBuf);

impl std::str::FromStr for RestoreVsock {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("uds=") {
            Some(p) if !p.is_empty() && !p.contains(',') => Ok(RestoreVsock(p.into())),
            _ => Err("expected uds=PATH (a restored guest keeps its CID)".into()),
        }
    }
}

fn restore_cmd(args: RestoreArgs, start: Instant) -> anyhow::Result<i32> {
    let (from, lazy): (Box<dyn std::io::Read>, _) = if args.from == "-" {
        (Box::new(std::io::stdin()), None)
    } else {
        let file = std::fs::File::open(&args.from)
            .with_context(|| format!("cannot open image {}", args.from))?;
        let lazy = match args.eager {
            true => None,
            false => Some(file.try_clone().context("cannot keep the image open")?),
        };
        (Box::new(file), lazy)
    };
    // A bar for the image read, if it takes a while (a file's size is its
    // total; stdin's is not known, nor how much of a file a lazy restore
    // reads before the guest runs: its states and disks).
    let total = (args.from != "-" && lazy.is_none())
        .then(|| std::fs::metadata(&args.from).ok().map(|m| m.len()))
        .flatten();
    let bar = vmm::progress::Bar::new("restoring", !args.quiet && !args.json);
    let from = Box::new(vmm::progress::Reader::new(from, total, bar));
    let overrides = vmm::device_manager::RestoreOverrides {
        taps: args.net.into_iter().map(|n| n.0).collect(),
        vsock_uds: args.vsock.map(|v| v.0),
    };
    let mut opts = args.control.options()?;
    opts.restore_report = match (args.quiet, args.json) {
        (true, _) => runner::Report::Quiet,
        (false, true) => runner::Report::Json,
        (false, false) => runner::Report::Line,
    };
    opts.track_restored = args.track;
    let finished = runner::restore(
        from,
        lazy,
        &args.from,
        &args.disk_dir,
        &overrides,
        &opts,
        start,
    )
    .with_context(|| format!("cannot restore from {}", args.from))?;
    if args.timings {
        eprintln!("{}", finished.timings);
    }
    Ok(finished.status)
}

fn inspect_cmd(args: InspectArgs) -> anyhow::Result<i32> {
    let input = open_image(args.image.as_str())?;
    let report = snapshot::inspect::inspect(std::io::BufReader::new(input), args.verify)
        .with_context(|| format!("{} is not a good image", args.image))?;
    // An increment's parents, as a restore would find them.
    let chain = (report.incremental && args.image != "-")
        .then(|| vmm::image::parents_of(&args.image).map_err(|e| vmm::error_chain(&e)));
    let text = if args.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(chain) = &chain {
            v["chain"] = match chain {
                Ok(parents) => parents
                    .iter()
                    .map(|(id, path)| serde_json::json!({ "image_id": id, "path": path }))
                    .collect(),
                Err(e) => serde_json::json!({ "error": e }),
            };
        }
        serde_json::to_string_pretty(&v)? + "\n"
    } else {
        let mut text = report.to_string();
        match &chain {
            Some(Ok(parents)) => {
                for (i, (id, path)) in parents.iter().enumerate() {
                    let label = if i == 0 { "chain" } else { "" };
                    text += &format!("{label:13}{id} {}\n", path.display());
                }
                text += &format!("{:13}{} (this image)\n", "", report.image_id);
            }
            Some(Err(e)) => text += &format!("chain        broken: {e}\n"),
            None => {}
        }
        text
    };
    use std::io::Write;
    std::io::stdout().write_all(text.as_bytes())?;
    // An increment whose chain is broken cannot be restored: say so.
    Ok(if matches!(chain, Some(Err(_))) { 1 } else { 0 })
}

fn agent_cmd(args: AgentArgs) -> anyhow::Result<i32> {
    use std::io::Write;
    let sock = &args.target.socket()?;
    let call = |path: &str| vmm::client::json(sock, "PUT", path, &serde_json::json!({}));
    let text = match args.command {
        AgentCommand::Ping => {
            let v = call("/agent/ping").context("ping")?;
            format!(
                "agent answers: generation {}, round trip {:.1} ms\n",
                v["generation"],
                v["rtt_ms"].as_f64().unwrap_or(0.0)
            )
        }
        AgentCommand::Freeze => {
            let v = call("/agent/freeze").context("freeze")?;
            format!("frozen: {}\n", v["frozen"])
        }
        AgentCommand::Thaw => {
            let v = call("/agent/thaw").context("thaw")?;
            format!("thawed: {}\n", v["thawed"])
        }
        AgentCommand::Exec(e) => {
            let (rows, cols) = vmm::terminal::size().unwrap_or((24, 80));
            let _raw = e.tty.then(vmm::terminal::RawTerminal::enter_if_tty);
            let end = vmm::client::exec(
                sock,
                guest_abi::agent::ExecRequest {
                    argv: e.command,
                    env: e.env,
                    tty: e.tty,
                    stdin: e.tty || e.interactive,
                    rows,
                    cols,
                },
            )
            .context("exec")?;
            drop(_raw);
            if let Some(m) = end.message {
                eprintln!("vmm: {m}");
            }
            return Ok(end.status);
        }
    };
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(0)
}

fn run(args: RunArgs, start: Instant) -> anyhow::Result<i32> {
    // A container image: its root disk (made once, then cached) and the
    // process its config describes.
    let image = match &args.image {
        Some(reference) => Some(prepare_image(reference, args.quiet)?),
        None => None,
    };
    let default_rootfs = args.rootfs.is_none() && image.is_none();
    let rootfs = image.as_ref().map(|i| i.rootfs.clone()).or(args.rootfs);
    let (kernel, rootfs) = match (args.kernel, rootfs) {
        (None, None) => (
            vmm::guest::default_kernel()?,
            Some(vmm::guest::default_rootfs()?),
        ),
        (None, Some(r)) => (vmm::guest::default_kernel()?, Some(r)),
        (Some(k), r) => (k, r),
    };
    let vcpus = u8::try_from(args.vcpus).unwrap_or(u8::MAX);
    let vcpus = if u64::from(vcpus) == args.vcpus {
        vcpus
    } else {
        0
    };
    if vcpus == 0 {
        anyhow::bail!("--vcpus must be between 1 and 8 (got {})", args.vcpus);
    }
    let default_rootfs = default_rootfs && rootfs.is_some();
    let mut cfg = VmConfig {
        kernel,
        initrd: args.initrd,
        rootfs,
        mem_mib: args.mem,
        vcpus,
        cmdline: args.cmdline,
        command: args.command,
        nets: args.net,
        vsock: args.vsock,
        // An image's disk is the cache's: never written.
        ephemeral: args.ephemeral || default_rootfs || image.is_some(),
        start_by_agent: false,
    };
    let timings = args.timings;
    let mut opts = args.control.options()?;
    opts.image = args.image.clone();
    let process = match &image {
        Some(image) => {
            // The process goes over the control channel (the kernel's
            // command line could not hold an image's environment).
            let process = image_process(
                image,
                args.image.as_deref().unwrap_or_default(),
                &cfg.command,
            )?;
            cfg.command.clear();
            cfg.start_by_agent = true;
            opts.start = Some(runner::StartPlan {
                process: process.clone(),
                save_warm: None,
            });
            process
        }
        None => StartRequest {
            argv: (!cfg.command.is_empty())
                .then(|| cfg.command.iter().map(|a| a.as_bytes().to_vec()).collect()),
            ..StartRequest::default()
        },
    };
    // A bad configuration is reported as such, not as a warm-start miss.
    cfg.validate().context("cannot run the VM")?;
    // A warm image holds no TAP or host socket of its own: machines with
    // them boot.
    let warm = cfg.ephemeral
        && cfg.rootfs.is_some()
        && !args.cold
        && cfg.nets.is_empty()
        && cfg.vsock.is_none();
    if warm {
        match warm_plan(&cfg) {
            Ok((cache, key)) => {
                if let Some(image) = cache.lookup(&key) {
                    opts.start = Some(runner::StartPlan {
                        process: process.clone(),
                        save_warm: None,
                    });
                    match runner::warm_start(&image, &opts, start) {
                        Ok(finished) => return Ok(report(finished, timings)),
                        Err(runner::WarmStartError::Run(e)) => {
                            return Err(e).context("cannot run the restored VM")
                        }
                        Err(e) => {
                            let _ = cache.remove(&key.name());
                            // Confined already (the image failed late): a
                            // boot could not make its disk overlay.
                            if vmm::sandbox::image_dirs().is_some() {
                                return Err(e).context(
                                    "the warm image was discarded; run the command again to boot",
                                );
                            }
                            log::warn!(
                                "{}; it is discarded and the guest boots instead",
                                vmm::error_chain(&e)
                            );
                        }
                    }
                }
                cfg.start_by_agent = true;
                opts.start = Some(runner::StartPlan {
                    process,
                    save_warm: Some((cache, key)),
                });
            }
            Err(e) => log::warn!("no warm start: {}", vmm::error_chain(&e)),
        }
    }
    // A person at a terminal waiting on a Linux boot (our command line, so
    // our kernel) should know why it takes a minute, once.
    if !args.quiet
        && cfg.cmdline.is_none()
        && std::io::stderr().is_terminal()
        && vmm::arch::cpuid::CpuTemplate::detect() == vmm::arch::cpuid::CpuTemplate::Interpreted
    {
        let later = if opts.start.as_ref().is_some_and(|p| p.save_warm.is_some()) {
            "; later runs start from a warm image in about 2 s"
        } else {
            ""
        };
        let note = format!(
            "vmm: this host has no hardware virtualization, so the guest kernel is interpreted: booting takes about a minute{later}\n"
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), note.as_bytes());
    }
    let finished = runner::run(cfg, &opts, start).context("cannot run the VM")?;
    Ok(report(finished, timings))
}

/// Opens the image `reference` and makes (or finds) its root disk.
fn prepare_image(reference: &str, quiet: bool) -> anyhow::Result<container_image::Prepared> {
    let context = || format!("cannot use the image {reference}");
    let image = container_image::Image::open(reference).with_context(context)?;
    let agent = vmm::guest::default_agent().with_context(context)?;
    let cache =
        container_image::ImageCache::open(&vmm::guest::image_cache_dir()).with_context(context)?;
    if !quiet && std::io::stderr().is_terminal() && !cache.has(&image, &agent) {
        let note = format!(
            "vmm: making a root disk of {reference} ({}), once: later runs use it again\n",
            short_id(image.id())
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), note.as_bytes());
    }
    let t0 = Instant::now();
    let (prepared, built) = cache.prepare(&image, &agent).with_context(context)?;
    if built {
        log::info!(
            "root disk of {reference} made in {:?}: {}",
            t0.elapsed(),
            prepared.rootfs.display()
        );
    }
    Ok(prepared)
}

/// The image's id as docker shows it: 12 hex digits.
fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..12.min(hex.len())]
}

/// What the agent runs for an image: its config, with `command` (if any)
/// in place of its Cmd.
fn image_process(
    image: &container_image::Prepared,
    reference: &str,
    command: &[String],
) -> anyhow::Result<StartRequest> {
    let p = &image.process;
    let bytes = |v: &[String]| v.iter().map(|s| s.as_bytes().to_vec()).collect();
    let argv = p
        .argv(command)
        .with_context(|| format!("cannot run the image {reference}"))?;
    // The console is a terminal, as for every `vmm run`: say which, as
    // the agent does for the default guest (docker -t says xterm).
    let mut env = p.env.clone();
    if !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=linux".into());
    }
    Ok(StartRequest {
        argv: Some(bytes(&argv)),
        env: Some(bytes(&env)),
        workdir: Some(p.workdir.as_bytes().to_vec()),
        user: Some(ProcessUser {
            uid: p.uid,
            gid: p.gid,
            groups: p.groups.clone(),
        }),
    })
}

/// The warm-start cache and this machine's key in it.
fn warm_plan(
    cfg: &VmConfig,
) -> Result<(vmm::warm::WarmCache, vmm::warm::WarmKey), vmm::warm::WarmError> {
    Ok((
        vmm::warm::WarmCache::open_default()?,
        vmm::warm::WarmKey::of(cfg)?,
    ))
}

fn report(finished: runner::Finished, timings: bool) -> i32 {
    if timings {
        eprintln!("{}", finished.timings);
    }
    finished.status
}

fn cache_cmd(args: CacheArgs) -> anyhow::Result<i32> {
    use std::io::Write;
    let cache = vmm::warm::WarmCache::open_default()?;
    let disks = container_image::ImageCache::open(&vmm::guest::image_cache_dir())?;
    let mut out = String::new();
    match args.command {
        CacheCommand::Ls { json } => {
            let list = cache.list();
            let disk_list = disks.list();
            let secs = |t: std::time::SystemTime| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            };
            if json {
                let mut v: Vec<serde_json::Value> = list
                    .iter()
                    .map(|l| {
                        serde_json::json!({
                            "kind": "warm",
                            "name": l.name,
                            "bytes": l.bytes,
                            "created": l.entry.created,
                            "last_used": l.last_used.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                            "boot_ms": l.entry.boot_ms,
                            "key": l.entry.key,
                        })
                    })
                    .collect();
                v.extend(disk_list.iter().map(|d| {
                    serde_json::json!({
                        "kind": "image",
                        "name": d.name,
                        "bytes": d.bytes,
                        "created": d.prepared.created,
                        "last_used": secs(d.last_used),
                        "image": d.prepared.reference,
                        "id": d.prepared.id,
                        "rootfs": d.prepared.rootfs,
                    })
                }));
                out = serde_json::to_string_pretty(&v)? + "\n";
            } else {
                out.push_str(&format!(
                    "{:<16}  {:>9}  {:>7}  {:>9}  {:>8}  {}\n",
                    "NAME", "SIZE", "AGE", "USED", "SAVES", "MACHINE"
                ));
                let now = std::time::SystemTime::now();
                for l in &list {
                    let created =
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(l.entry.created);
                    let k = &l.entry.key;
                    out.push_str(&format!(
                        "{:<16}  {:>5.1} MiB  {:>7}  {:>9}  {:>6.1} s  {} MiB, {} vCPU, {} on {}\n",
                        l.name,
                        l.bytes as f64 / (1 << 20) as f64,
                        ago(now, created),
                        ago(now, l.last_used),
                        l.entry.boot_ms as f64 / 1000.0,
                        k.mem_mib,
                        k.vcpus,
                        k.kernel.path.display(),
                        k.rootfs.path.display(),
                    ));
                }
                let total: u64 = list.iter().map(|l| l.bytes).sum();
                out.push_str(&format!(
                    "{} warm images, {:.1} MiB in {}\n",
                    list.len(),
                    total as f64 / (1 << 20) as f64,
                    cache.dir().display()
                ));
                if !disk_list.is_empty() {
                    out.push_str(&format!(
                        "\n{:<29}  {:>9}  {:>7}  {:>9}  {}\n",
                        "IMAGE ROOT DISK", "SIZE", "AGE", "USED", "IMAGE"
                    ));
                    for d in &disk_list {
                        let created = std::time::UNIX_EPOCH
                            + std::time::Duration::from_secs(d.prepared.created);
                        let age = if d.prepared.created == 0 {
                            "?".to_string()
                        } else {
                            ago(now, created)
                        };
                        out.push_str(&format!(
                            "{:<29}  {:>5.1} MiB  {:>7}  {:>9}  {} ({})\n",
                            d.name,
                            d.bytes as f64 / (1 << 20) as f64,
                            age,
                            ago(now, d.last_used),
                            d.prepared.reference,
                            short_id(&d.prepared.id),
                        ));
                    }
                    let total: u64 = disk_list.iter().map(|d| d.bytes).sum();
                    out.push_str(&format!(
                        "{} image root disks, {:.1} MiB in {}\n",
                        disk_list.len(),
                        total as f64 / (1 << 20) as f64,
                        vmm::guest::image_cache_dir().display()
                    ));
                }
            }
        }
        CacheCommand::Rm { names, all } => {
            if all {
                for l in cache.list() {
                    cache.remove(&l.name)?;
                    out.push_str(&format!("removed {}\n", l.name));
                }
                for d in disks.list() {
                    disks.remove(&d.name)?;
                    out.push_str(&format!("removed {}\n", d.name));
                }
            }
            for n in &names {
                // Names differ: a warm image's is 16 hex digits, a disk's
                // 16, a dash and 12.
                match cache.remove(n) {
                    Err(vmm::warm::WarmError::NoSuchEntry(_)) => disks.remove(n).map_err(|_| {
                        anyhow::anyhow!(
                            "no warm image or image root disk is named {n} (see vmm cache ls)"
                        )
                    })?,
                    other => other?,
                }
                out.push_str(&format!("removed {n}\n"));
            }
        }
        CacheCommand::Prune {
            max_size,
            max_disks_size,
        } => {
            let removed = cache.prune(max_size.saturating_mul(1 << 20));
            for r in &removed {
                out.push_str(&format!("removed {} ({} bytes)\n", r.name, r.bytes));
            }
            let removed_disks = disks.prune(max_disks_size.saturating_mul(1 << 20))?;
            for d in &removed_disks {
                out.push_str(&format!(
                    "removed {} ({}, {} bytes)\n",
                    d.name, d.prepared.reference, d.bytes
                ));
            }
            out.push_str(&format!(
                "{} removed\n",
                removed.len() + removed_disks.len()
            ));
        }
    }
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(0)
}

/// `vmm stop|pause|resume NAME`: one API call, its state on stdout.
fn lifecycle_cmd(target: &Target, path: &str) -> anyhow::Result<i32> {
    let sock = target.socket()?;
    let v = vmm::client::json(&sock, "PUT", path, &serde_json::json!({}))?;
    let state = v["state"].as_str().unwrap_or("?");
    std::io::Write::write_all(&mut std::io::stdout(), format!("{state}\n").as_bytes())?;
    Ok(0)
}

/// `vmm ps`: the named VMs that answer, one line each; sockets nobody
/// answers on are left by VMs that died, and removed.
fn ps_cmd(json: bool) -> anyhow::Result<i32> {
    let dir = vmm::names::runtime_dir();
    let mut vms = Vec::new();
    for (name, path) in vmm::names::list(&dir) {
        match vmm::client::json(&path, "GET", "/vm", &serde_json::json!({})) {
            Ok(v) => vms.push(v),
            Err(vmm::client::ClientError::NoVmm(_)) => {
                if std::os::unix::net::UnixStream::connect(&path).is_err() {
                    log::info!("{name}: nobody answers on {}, removed", path.display());
                    let _ = std::fs::remove_file(&path);
                }
            }
            Err(e) => log::warn!("{name}: {e}"),
        }
    }
    let text = if json {
        format!("{}\n", serde_json::Value::Array(vms))
    } else {
        let mut t = format!(
            "{:<16} {:>8} {:>5} {:>8} {:<12} {:>8}  {}\n",
            "NAME", "PID", "VCPUS", "MEMORY", "STATE", "UPTIME", "IMAGE / KERNEL ON ROOTFS"
        );
        for v in &vms {
            let uptime = std::time::Duration::from_millis(v["uptime_ms"].as_u64().unwrap_or(0));
            let now = std::time::SystemTime::now();
            t.push_str(&format!(
                "{:<16} {:>8} {:>5} {:>8} {:<12} {:>8}  {}{}\n",
                v["name"].as_str().unwrap_or("?"),
                v["pid"].to_string(),
                v["vcpus"].to_string(),
                format!("{} MiB", v["mem_mib"]),
                v["state"].as_str().unwrap_or("?"),
                ago(now, now - uptime),
                match v["image"].as_str() {
                    Some(image) => format!("image {image}"),
                    None => v["kernel"].as_str().unwrap_or("?").to_string(),
                },
                v["rootfs"]
                    .as_str()
                    .filter(|_| v["image"].is_null())
                    .map(|r| format!(" on {r}"))
                    .unwrap_or_default(),
            ));
        }
        t
    };
    std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes())?;
    Ok(0)
}

/// "5 s", "3 min", "2 h", "4 d" before `now`.
fn ago(now: std::time::SystemTime, then: std::time::SystemTime) -> String {
    let s = now.duration_since(then).unwrap_or_default().as_secs();
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86400),
    }
}

/// Help and version go out as clap prints them; a bad command line is one
/// line naming the problem, like every other error.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    // One line: clap's first line, with what it lists on the indented
    // lines below (the missing arguments) joined to it.
    let text = e.render().to_string();
    let mut lines = text.lines();
    let mut line = lines.next().unwrap_or("bad command line").to_string();
    for more in lines.take_while(|l| l.starts_with("  ")) {
        line.push(' ');
        line.push_str(more.trim());
    }
    eprintln!("vmm: {line} (see vmm --help)");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let start = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let result = match cli.command {
        Command::Run(args) => run(args, start),
        Command::Snapshot(args) => snapshot_cmd(args),
        Command::Restore(args) => restore_cmd(args, start),
        Command::Inspect(args) => inspect_cmd(args),
        Command::Image(command) => image_cmd(command),
        Command::Agent(args) => agent_cmd(args),
        Command::Cache(args) => cache_cmd(args),
        Command::Ps { json } => ps_cmd(json),
        Command::Stop(t) => lifecycle_cmd(&t, "/vm/shutdown"),
        Command::Pause(t) => lifecycle_cmd(&t, "/vm/pause"),
        Command::Resume(t) => lifecycle_cmd(&t, "/vm/resume"),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("vmm: error: {}", vmm::error_chain(&*e));
            ExitCode::from(1)
        }
    }
}
