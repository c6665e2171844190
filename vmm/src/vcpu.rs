//! The vCPU threads: one per vCPU, each a small state machine driven by the
//! main thread through a [`VcpuHandle`].
//!
//! ```text
//!            Resume                 Exit (from any state)
//!   Paused ─────────▶ Running ─────────────────────────▶ Exited
//!     ▲  ◀───────────  │  │
//!     │      Pause     │  └─ the guest stops the VM: report it, then Paused
//!     └─ Save ─┘ (only while Paused)
//! ```
//!
//! A thread starts **paused**: nothing runs until the machine's owner says
//! so. Each state answers only the requests it allows and refuses the rest
//! with [`VcpuResponse::NotAllowed`], so saving a running vCPU cannot
//! happen. The main thread kicks a running vCPU out of KVM_RUN with
//! [`kick_signal`] until it answers.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::GuestMemoryMmap;

use crate::bus::Bus;
use crate::events::{StopReason, VmEvent};
use crate::kvm::persist::{PersistError, VcpuState};
use crate::kvm::vcpu::{kick_signal, RunOutcome, Vcpu};
use crate::timeline::Timeline;

/// Where a vCPU thread is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Out of KVM_RUN with its pending I/O finished, waiting for requests.
    Paused,
    /// In and out of KVM_RUN.
    Running,
    /// The thread has ended.
    Exited,
}

/// What the main thread asks of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuRequest {
    /// Leave KVM_RUN, finish pending I/O, and wait (allowed while running).
    Pause,
    /// Run the guest (allowed while paused).
    Resume,
    /// Read the vCPU's KVM state (allowed while paused).
    Save,
    /// End the thread (allowed always).
    Exit,
}

/// A vCPU thread's answer: exactly one per request.
pub enum VcpuResponse {
    Paused,
    Resumed,
    Saved(Box<VcpuState>),
    Exited,
    /// The request is not allowed in the thread's current state.
    NotAllowed(VcpuRequest, RunState),
    /// Saving failed.
    SaveFailed(Box<PersistError>),
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuThreadError {
    #[error("vCPU {0} has stopped")]
    Gone(u8),
    #[error("vCPU {0} did not answer within {1:?}")]
    Timeout(u8, Duration),
    #[error("vCPU {id}: {request:?} is not allowed while {state:?}")]
    NotAllowed {
        id: u8,
        request: VcpuRequest,
        state: RunState,
    },
    #[error("vCPU {id} answered {request:?} with something else")]
    Protocol { id: u8, request: VcpuRequest },
    #[error("cannot save vCPU {id}")]
    Save {
        id: u8,
        #[source]
        source: Box<PersistError>,
    },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(String),
    #[error("cannot start the thread of vCPU {id}")]
    Spawn {
        id: u8,
        #[source]
        source: std::io::Error,
    },
}

/// What every vCPU thread of one VM shares.
pub struct VcpuContext {
    pub bus: Arc<dyn Bus>,
    pub memory: GuestMemoryMmap,
    /// Where a vCPU reports that the VM must stop.
    pub events: Sender<VmEvent>,
    pub timeline: Arc<Timeline>,
}

/// How long a vCPU may take to answer: a pause waits for the current exit
/// to be handled, which an interpreted guest can make slow.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The main thread's end of one vCPU thread.
pub struct VcpuHandle {
    id: u8,
    thread: Option<JoinHandle<()>>,
    requests: Sender<VcpuRequest>,
    responses: Receiver<VcpuResponse>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of [`kick_signal`] once per process: the
/// signal's only job is to make KVM_RUN return EINTR, and its default
/// action would end the process.
fn install_kick_handler() -> Result<(), VcpuThreadError> {
    static INSTALLED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(VcpuThreadError::Signal)
}

impl VcpuHandle {
    /// Starts `vcpu`'s thread, paused.
    pub fn spawn(vcpu: Vcpu, ctx: Arc<VcpuContext>) -> Result<Self, VcpuThreadError> {
        install_kick_handler()?;
        let id = vcpu.id();
        let (req_tx, req_rx) = mpsc::channel();
        let (resp_tx, resp_rx) = mpsc::channel();
        let thread = VcpuThread {
            vcpu,
            ctx,
            requests: req_rx,
            responses: resp_tx,
        };
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || thread.run())
            .map_err(|source| VcpuThreadError::Spawn { id, source })?;
        Ok(VcpuHandle {
            id,
            thread: Some(handle),
            requests: req_tx,
            responses: resp_rx,
        })
    }

    /// Sends `request` and waits for its answer, kicking the thread out of
    /// KVM_RUN until it comes (a signal that lands just before KVM_RUN is
    /// lost, so one kick is not enough).
    pub fn request(&self, request: VcpuRequest) -> Result<VcpuResponse, VcpuThreadError> {
        use vmm_sys_util::signal::Killable;
        let id = self.id;
        self.requests
            .send(request)
            .map_err(|_| VcpuThreadError::Gone(id))?;
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            if let Some(t) = &self.thread {
                let _ = t.kill(kick_signal());
            }
            match self.responses.recv_timeout(Duration::from_millis(2)) {
                Ok(VcpuResponse::NotAllowed(request, state)) => {
                    return Err(VcpuThreadError::NotAllowed { id, request, state })
                }
                Ok(r) => return Ok(r),
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuThreadError::Gone(id)),
                Err(RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    return Err(VcpuThreadError::Timeout(id, ANSWER_TIMEOUT))
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Asks for `request`, expecting an answer that `ok` accepts.
    fn expect(
        &self,
        request: VcpuRequest,
        ok: fn(&VcpuResponse) -> bool,
    ) -> Result<(), VcpuThreadError> {
        if ok(&self.request(request)?) {
            Ok(())
        } else {
            Err(VcpuThreadError::Protocol {
                id: self.id,
                request,
            })
        }
    }

    pub fn pause(&self) -> Result<(), VcpuThreadError> {
        self.expect(VcpuRequest::Pause, |r| matches!(r, VcpuResponse::Paused))
    }

    pub fn resume(&self) -> Result<(), VcpuThreadError> {
        self.expect(VcpuRequest::Resume, |r| matches!(r, VcpuResponse::Resumed))
    }

    pub fn save(&self) -> Result<VcpuState, VcpuThreadError> {
        match self.request(VcpuRequest::Save)? {
            VcpuResponse::Saved(s) => Ok(*s),
            VcpuResponse::SaveFailed(source) => Err(VcpuThreadError::Save {
                id: self.id,
                source,
            }),
            _ => Err(VcpuThreadError::Protocol {
                id: self.id,
                request: VcpuRequest::Save,
            }),
        }
    }

    /// Ends the thread and waits for it (a thread that has already ended
    /// is fine).
    pub fn exit(&mut self) {
        let answered = match self.request(VcpuRequest::Exit) {
            Ok(_) | Err(VcpuThreadError::Gone(_)) => true,
            Err(e) => {
                log::warn!("{e}; leaving its thread behind");
                false
            }
        };
        if let Some(t) = self.thread.take() {
            if answered {
                let _ = t.join();
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.exit();
        }
    }
}

/// The vCPU thread itself.
struct VcpuThread {
    vcpu: Vcpu,
    ctx: Arc<VcpuContext>,
    requests: Receiver<VcpuRequest>,
    responses: Sender<VcpuResponse>,
}

impl VcpuThread {
    fn run(mut self) {
        // Fail closed: a vCPU thread that cannot be confined does not run
        // the guest (its handle then reports the thread gone).
        if !crate::seccomp::confine_or_log(crate::seccomp::ThreadKind::Vcpu) {
            log::error!("vCPU {} does not run", self.vcpu.id());
            return;
        }
        let mut state = RunState::Paused;
        while state != RunState::Exited {
            state = match state {
                RunState::Paused => self.paused(),
                RunState::Running => self.running(),
                RunState::Exited => RunState::Exited,
            };
        }
    }

    fn answer(&self, r: VcpuResponse) {
        // The handle may be gone if the VMM is ending; nothing to tell then.
        let _ = self.responses.send(r);
    }

    /// Waits for one request and serves it.
    fn paused(&mut self) -> RunState {
        let Ok(request) = self.requests.recv() else {
            return RunState::Exited;
        };
        match request {
            VcpuRequest::Resume => {
                self.answer(VcpuResponse::Resumed);
                RunState::Running
            }
            VcpuRequest::Save => {
                self.answer(match self.vcpu.save() {
                    Ok(s) => VcpuResponse::Saved(Box::new(s)),
                    Err(e) => VcpuResponse::SaveFailed(Box::new(e)),
                });
                RunState::Paused
            }
            VcpuRequest::Exit => {
                self.answer(VcpuResponse::Exited);
                RunState::Exited
            }
            VcpuRequest::Pause => {
                self.answer(VcpuResponse::NotAllowed(request, RunState::Paused));
                RunState::Paused
            }
        }
    }

    /// Runs the guest until a request or a stop.
    fn running(&mut self) -> RunState {
        if self.vcpu.id() == 0 {
            self.ctx.timeline.first_instruction();
        }
        loop {
            match self.requests.try_recv() {
                Ok(VcpuRequest::Pause) => {
                    self.vcpu.finish_pending_io();
                    self.answer(VcpuResponse::Paused);
                    return RunState::Paused;
                }
                Ok(VcpuRequest::Exit) => {
                    self.answer(VcpuResponse::Exited);
                    return RunState::Exited;
                }
                Ok(request @ (VcpuRequest::Resume | VcpuRequest::Save)) => {
                    self.answer(VcpuResponse::NotAllowed(request, RunState::Running));
                }
                Err(TryRecvError::Disconnected) => return RunState::Exited,
                Err(TryRecvError::Empty) => {}
            }
            match self.vcpu.run(self.ctx.bus.as_ref(), &self.ctx.memory) {
                RunOutcome::Continue | RunOutcome::Interrupted => {}
                RunOutcome::Stop(reason) => {
                    self.stop_vm(reason);
                    return RunState::Paused;
                }
            }
        }
    }

    /// Tells the main thread the VM must stop; the machine's owner then
    /// pauses or ends the other vCPUs.
    fn stop_vm(&self, reason: StopReason) {
        // The receiver may be gone if the VMM is ending already.
        let _ = self.ctx.events.send(VmEvent::Stop(reason));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::PortEffect;
    use crate::test_vm;

    /// Nothing on the buses: the spinning guest never touches them.
    struct NoDevices;
    impl Bus for NoDevices {
        fn pio_in(&self, _: u16, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn pio_out(&self, _: u16, _: &[u8]) -> PortEffect {
            PortEffect::None
        }
        fn mmio_read(&self, _: u64, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn mmio_write(&self, _: u64, _: &[u8]) {}
    }

    fn refused(r: Result<impl Sized, VcpuThreadError>, req: VcpuRequest, in_state: RunState) {
        match r {
            Err(VcpuThreadError::NotAllowed { request, state, .. }) => {
                assert_eq!((request, state), (req, in_state))
            }
            Err(e) => panic!("{req:?} failed otherwise: {e}"),
            Ok(_) => panic!("{req:?} was allowed while {in_state:?}"),
        }
    }

    #[test]
    fn a_vcpu_thread_starts_paused_and_answers_only_what_its_state_allows() {
        let vm = test_vm::vm();
        let (events, stops) = mpsc::channel();
        let ctx = Arc::new(VcpuContext {
            bus: Arc::new(NoDevices),
            memory: vm.memory().clone(),
            events,
            timeline: test_vm::timeline(),
        });
        let mut h = VcpuHandle::spawn(test_vm::vcpu(&vm), ctx).unwrap();

        // Paused from the start: it can be saved, not paused again.
        let s = h.save().unwrap();
        assert_eq!(s.regs.rip, test_vm::SPIN_AT);
        refused(h.pause(), VcpuRequest::Pause, RunState::Paused);

        // Running: neither saved nor resumed again.
        h.resume().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        refused(h.save(), VcpuRequest::Save, RunState::Running);
        refused(h.resume(), VcpuRequest::Resume, RunState::Running);

        // Paused out of KVM_RUN, still spinning on the same instruction.
        h.pause().unwrap();
        assert_eq!(h.save().unwrap().regs.rip, test_vm::SPIN_AT);
        h.resume().unwrap();
        h.pause().unwrap();

        h.exit();
        assert!(matches!(
            h.request(VcpuRequest::Resume),
            Err(VcpuThreadError::Gone(0))
        ));
        assert!(stops.try_recv().is_err(), "the guest never stopped the VM");
    }
}
