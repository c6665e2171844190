//! `vmm-ckpt [NAME]`: checkpoints the VM from a shell. Exits 0 in the run
//! that asked (the image is durable on the host), 1 in a VM restored from
//! that image, 2 on failure (the reason on stderr), so a script can branch:
//!
//! ```sh
//! vmm-ckpt warm; case $? in 0) echo saved;; 1) echo restored;; *) exit 1;; esac
//! ```

use std::process::ExitCode;

use vmm_ckpt::{checkpoint, Checkpointed};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = match args.as_slice() {
        [] => None,
        [flag] if flag == "-h" || flag == "--help" => {
            println!("usage: vmm-ckpt [NAME]\ncheckpoints the VM; exits 0 in the original run, 1 after a restore, 2 on failure");
            return ExitCode::SUCCESS;
        }
        [name] => Some(name.as_str()),
        _ => {
            eprintln!("vmm-ckpt: usage: vmm-ckpt [NAME]");
            return ExitCode::from(2);
        }
    };
    match checkpoint(name) {
        Ok(Checkpointed::Original(_)) => ExitCode::SUCCESS,
        Ok(Checkpointed::Restored(_)) => ExitCode::from(1),
        Err(e) => {
            eprintln!("vmm-ckpt: {e}");
            ExitCode::from(2)
        }
    }
}
