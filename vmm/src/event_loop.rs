//! The device thread: one event loop (rust-vmm's `event-manager`) where
//! device backends do their work, off the vCPU threads.
//!
//! It serves virtio queues: a guest's QueueNotify write signals an
//! ioeventfd inside KVM (no exit to the VMM), this thread wakes, and the
//! device serves the queue and raises its irqfd. Backends that produce work
//! on their own (a TAP, vsock's sockets) register their file descriptors
//! through their virtio device's subscriber (`VirtioDevice::init_backend`).
//!
//! The machine's owner pauses the loop after the vCPUs and resumes it before
//! them. Pausing drains the devices (every request made available is
//! served), then parks the thread, so nothing touches guest memory or a
//! device while a snapshot is taken.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What the loop holds: anything that reacts to file descriptors.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The devices, as the loop drains them around a pause.
pub trait Drain: Send + Sync {
    /// Serves every request the devices' queues hold.
    fn drain(&self);
}

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot create the device event loop")]
    Create(#[source] event_manager::Error),
    #[error("cannot create the device loop's wake-up eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start the device thread")]
    Thread(#[source] std::io::Error),
    #[error("the device thread has stopped")]
    Gone,
    #[error("the device thread did not answer within {0:?}")]
    Timeout(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoopRequest {
    Pause,
    Resume,
    Exit,
}

/// How long a pause may take: draining serves what the queues hold.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The main thread's end of the device thread.
pub struct EventLoop {
    thread: Option<JoinHandle<()>>,
    wake: EventFd,
    requests: Sender<LoopRequest>,
    answers: Receiver<()>,
}

impl EventLoop {
    /// Starts the device thread, running, with the devices' subscribers.
    pub fn start(
        subscribers: Vec<Subscriber>,
        devices: Arc<dyn Drain>,
    ) -> Result<Self, EventLoopError> {
        let wake = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::EventFd)?;
        let (req_tx, req_rx) = mpsc::channel();
        let (ans_tx, ans_rx) = mpsc::channel();
        let exit = Arc::new(AtomicBool::new(false));
        let control = Control {
            wake: wake.try_clone().map_err(EventLoopError::EventFd)?,
            requests: req_rx,
            answers: ans_tx,
            devices,
            exit: exit.clone(),
        };
        // The manager is built here so a failure is reported, then moved
        // into the thread that runs it.
        let mut manager = EventManager::<Subscriber>::new().map_err(EventLoopError::Create)?;
        manager.add_subscriber(Arc::new(Mutex::new(control)));
        for s in subscribers {
            manager.add_subscriber(s);
        }
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                // Fail closed: unconfined, no device work is done.
                if !crate::seccomp::confine_or_log(crate::seccomp::ThreadKind::Devices) {
                    return;
                }
                while !exit.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        log::error!("device event loop: {e}");
                        return;
                    }
                }
            })
            .map_err(EventLoopError::Thread)?;
        Ok(EventLoop {
            thread: Some(thread),
            wake,
            requests: req_tx,
            answers: ans_rx,
        })
    }

    fn ask(&self, request: LoopRequest) -> Result<(), EventLoopError> {
        self.requests
            .send(request)
            .map_err(|_| EventLoopError::Gone)?;
        self.wake.write(1).map_err(|_| EventLoopError::Gone)?;
        match self.answers.recv_timeout(ANSWER_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(RecvTimeoutError::Timeout) => Err(EventLoopError::Timeout(ANSWER_TIMEOUT)),
            Err(RecvTimeoutError::Disconnected) => Err(EventLoopError::Gone),
        }
    }

    /// Drains the devices and parks the thread until [`EventLoop::resume`].
    pub fn pause(&self) -> Result<(), EventLoopError> {
        self.ask(LoopRequest::Pause)
    }

    /// Lets the devices work again (serving anything left in their queues).
    pub fn resume(&self) -> Result<(), EventLoopError> {
        self.ask(LoopRequest::Resume)
    }

    /// Ends the thread.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            match self.ask(LoopRequest::Exit) {
                Ok(()) | Err(EventLoopError::Gone) => {
                    let _ = t.join();
                }
                Err(e) => log::warn!("{e}; leaving it behind"),
            }
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The loop's own subscriber: the main thread's requests.
struct Control {
    wake: EventFd,
    requests: Receiver<LoopRequest>,
    answers: Sender<()>,
    devices: Arc<dyn Drain>,
    exit: Arc<AtomicBool>,
}

impl Control {
    fn answer(&self) {
        let _ = self.answers.send(());
    }

    /// Serves `request`; returns false once the loop must end.
    fn serve(&self, request: LoopRequest) -> bool {
        match request {
            LoopRequest::Pause => {
                self.devices.drain();
                self.answer();
                // Parked: no other subscriber runs until this returns.
                loop {
                    match self.requests.recv() {
                        Ok(LoopRequest::Resume) => {
                            self.devices.drain();
                            self.answer();
                            return true;
                        }
                        Ok(LoopRequest::Pause) => self.answer(),
                        Ok(LoopRequest::Exit) | Err(_) => return self.end(),
                    }
                }
            }
            LoopRequest::Resume => {
                self.answer();
                true
            }
            LoopRequest::Exit => self.end(),
        }
    }

    fn end(&self) -> bool {
        self.exit.store(true, Ordering::Release);
        self.answer();
        false
    }
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.wake, EventSet::IN)) {
            log::error!("device event loop: cannot watch its wake-up eventfd: {e}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.wake.read();
        while let Ok(request) = self.requests.try_recv() {
            if !self.serve(request) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    /// Counts the wake-ups of one eventfd.
    struct Counter {
        evt: EventFd,
        seen: Arc<AtomicUsize>,
    }

    impl MutEventSubscriber for Counter {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let n = self.evt.read().unwrap_or(0);
            self.seen.fetch_add(n as usize, Ordering::AcqRel);
        }
    }

    /// Counts the drains.
    struct Drains(AtomicUsize);
    impl Drain for Drains {
        fn drain(&self) {
            self.0.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn wait_for(seen: &AtomicUsize, n: usize) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if seen.load(Ordering::Acquire) == n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn a_paused_loop_drains_then_serves_nothing_until_resumed() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = Counter {
            evt: evt.try_clone().unwrap(),
            seen: seen.clone(),
        };
        let drains = Arc::new(Drains(AtomicUsize::new(0)));
        let mut lp = EventLoop::start(vec![Arc::new(Mutex::new(counter))], drains.clone()).unwrap();

        evt.write(1).unwrap();
        assert!(wait_for(&seen, 1), "a running loop serves its subscribers");

        lp.pause().unwrap();
        assert_eq!(drains.0.load(Ordering::Acquire), 1, "pausing drains");
        evt.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(seen.load(Ordering::Acquire), 1, "a paused loop served");

        lp.resume().unwrap();
        assert_eq!(drains.0.load(Ordering::Acquire), 2, "resuming drains");
        assert!(
            wait_for(&seen, 2),
            "the event that came while paused is served"
        );

        lp.stop();
        assert!(matches!(lp.pause(), Err(EventLoopError::Gone)));
    }
}
