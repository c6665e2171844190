//! `vmm`: the command-line front end.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};

use vmm::runner::{self, VmConfig};

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
    Run(RunArgs),
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
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// Number of vCPUs (1 to 8).
    #[arg(long, default_value_t = 1)]
    vcpus: u64,
    /// Kernel command line, replacing the default one (devices are still appended).
    #[arg(long)]
    cmdline: Option<String>,
    /// Serve the control API (HTTP/1.1 + JSON) on this Unix socket.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Print boot milestones (first guest instruction, first console output,
    /// agent start, exit; ms from process start) as a JSON line on stderr at exit.
    #[arg(long)]
    timings: bool,
    /// The container command and its arguments; without one, an interactive shell.
    #[arg(last = true)]
    command: Vec<String>,
}

fn run(args: RunArgs, start: Instant) -> anyhow::Result<i32> {
    let (kernel, rootfs) = match (args.kernel, args.rootfs) {
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
    let cfg = VmConfig {
        kernel,
        initrd: args.initrd,
        rootfs,
        mem_mib: args.mem,
        vcpus,
        cmdline: args.cmdline,
        api_sock: args.api_sock,
        command: args.command,
    };
    let timings = args.timings;
    let finished = runner::run(cfg, start).context("cannot run the VM")?;
    if timings {
        eprintln!("{}", finished.timings);
    }
    Ok(finished.status)
}

fn main() -> ExitCode {
    let start = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args, start),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            // One line: the chain of causes, outermost first.
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("vmm: error: {}", msg.join(": "));
            ExitCode::from(1)
        }
    }
}
