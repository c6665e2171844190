//! What the agent does as soon as a restored VM runs, in this order: set
//! the wall clock from the host's, reseed the kernel's RNG with fresh host
//! entropy (clones of one image must not share their random numbers), thaw
//! the filesystems the snapshot froze, count the restore in
//! /run/vmm/generation, signal the registered programs, run the hooks in
//! /etc/vmm/restore.d, and answer the checkpoint requests the image held
//! (`restored`).

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use guest_abi::agent::local::{GENERATION_PATH, RESTORE_HOOKS_DIR};
use guest_abi::agent::{AfterRestore, Reply};

use crate::children;
use crate::control::Agent;
use crate::init::say;
use crate::sys::{self, Spawn};
use crate::{command, freeze};

/// How long one hook may run before the agent stops waiting for it.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// `received`: when the request arrived; the host's time in it is that
/// old by the time the clock is set. `hooks`: [`restore_hooks`], looked up
/// when the request arrived.
pub fn after_restore(
    agent: &Agent,
    ar: &AfterRestore,
    received: Instant,
    hooks: Vec<std::path::PathBuf>,
) -> Reply {
    let t0 = Instant::now();
    let mut steps = Vec::new();
    let mut step = |name: &str, since: &mut Instant| {
        steps.push((name.to_string(), since.elapsed().as_micros() as u64));
        *since = Instant::now();
    };
    let mut t = Instant::now();
    let host = Duration::new(ar.unix_secs.max(0) as u64, ar.unix_nanos) + received.elapsed();
    if let Err(e) = sys::set_realtime(host.as_secs() as i64, host.subsec_nanos()) {
        say(format!("cannot set the clock after a restore: {e}"));
    }
    step("clock", &mut t);
    if ar.entropy.is_empty() {
        say("the VMM sent no entropy; the RNG is not reseeded");
    } else if let Err(e) = sys::add_entropy_and_reseed(&ar.entropy) {
        say(format!("cannot reseed the RNG after a restore: {e}"));
    }
    step("entropy", &mut t);
    let _ = freeze::thaw(agent);
    step("thaw", &mut t);
    let generation = agent.generation.fetch_add(1, Ordering::AcqRel) + 1;
    write_generation(generation);
    step("generation", &mut t);
    agent.notify.after_restore();
    step("signals", &mut t);
    let hooks = run_hooks(hooks, generation, &ar.image);
    step("hooks", &mut t);
    agent.answer_orphans(&ar.image);
    Reply::Restored {
        generation,
        hooks,
        micros: t0.elapsed().as_micros() as u64,
        steps,
    }
}

/// Writes the generation file (on the agent's tmpfs /run).
pub fn write_generation(generation: u64) {
    let tmp = format!("{GENERATION_PATH}.tmp");
    let written = std::fs::write(&tmp, format!("{generation}\n"))
        .and_then(|()| std::fs::rename(&tmp, GENERATION_PATH));
    if let Err(e) = written {
        say(format!("cannot write {GENERATION_PATH}: {e}"));
    }
}

/// The executables in `dir`, in name order.
fn hooks_in(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut hooks: Vec<_> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .map(|e| e.path())
        .collect();
    hooks.sort();
    hooks
}

/// Runs each hook in turn, with VMM_GENERATION and VMM_IMAGE set; their
/// output goes to the console. Returns how many ran.
/// The restore hooks to run, in order.
pub fn restore_hooks() -> Vec<std::path::PathBuf> {
    hooks_in(std::path::Path::new(RESTORE_HOOKS_DIR))
}

fn run_hooks(hooks: Vec<std::path::PathBuf>, generation: u64, image: &str) -> u32 {
    let mut ran = 0;
    for hook in hooks {
        let inherited = std::env::vars_os().map(|(k, v)| {
            use std::os::unix::ffi::OsStringExt;
            (k.into_vec(), v.into_vec())
        });
        let extra = [
            (
                b"VMM_GENERATION".to_vec(),
                generation.to_string().into_bytes(),
            ),
            (b"VMM_IMAGE".to_vec(), image.as_bytes().to_vec()),
        ];
        let env = command::environment(inherited.chain(extra));
        let path = hook.as_os_str().as_encoded_bytes().to_vec();
        let (Ok(p), Ok(envp)) = (
            CString::new(path),
            env.into_iter()
                .map(CString::new)
                .collect::<Result<Vec<_>, _>>(),
        ) else {
            continue;
        };
        let spec = Spawn {
            candidates: vec![p.clone()],
            argv: vec![p],
            envp,
            controlling_tty: false,
            unshare_flags: 0,
            workdir: CString::from(c"/"),
            user: None,
            stdio: None,
        };
        match children::spawn(&spec) {
            Ok((_, status)) => {
                ran += 1;
                match status.recv_timeout(HOOK_TIMEOUT) {
                    Ok(st) if st != 0 => say(format!(
                        "restore hook {} failed (wait status {st:#x})",
                        hook.display()
                    )),
                    Ok(_) => {}
                    Err(_) => say(format!(
                        "restore hook {} still runs after {HOOK_TIMEOUT:?}; going on",
                        hook.display()
                    )),
                }
            }
            Err(e) => say(format!("cannot run restore hook {}: {e}", hook.display())),
        }
    }
    ran
}
