//! virtio-vsock backed by Unix sockets on the host (see [`uds`]), and by
//! services inside the VMM.
//!
//! A host service ([`Vsock::add_service`]) takes the guest's connections
//! to one host port: the device makes a socket pair per connection, keeps
//! one end and hands the other to the service. This is how the guest
//! agent's control channel reaches the VMM, with or without a host socket.
//!
//! Three queues: receive (packets to the guest), transmit (packets from
//! it) and events (TRANSPORT_RESET). Everything runs on the device thread:
//! the guest's packets when it notifies the transmit queue, the host's
//! sockets when they are ready (edge-triggered). Each connection has its
//! own credit (virtio 1.2, 5.10.6.3): we send the guest no more than its
//! buffer holds, and advertise [`CONN_BUF`] bytes of ours, so the data we
//! hold for a slow host reader is bounded.
//!
//! Connections are not saved: a restored VM's host sockets are gone. After
//! a restore the device sends the guest VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
//! so its connected sockets fail at once (ECONNRESET) instead of hanging,
//! and new connections work right away. A checkpoint-and-continue keeps
//! every connection.

pub mod packet;
mod persist;
pub mod uds;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::Sender;

use crate::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::chain::{next_chain, write_to_chain};
use super::{
    read_config_bytes, ActivateError, Active, Interrupt, QueueError, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use packet::{op, Header, HDR_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
pub use persist::{VsockHost, VsockState};
pub use uds::{HostListener, UdsError};

/// virtio device id of a socket device.
pub const TYPE_VSOCK: u32 = 19;
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// The receive buffer each connection advertises to the guest.
pub const CONN_BUF: u32 = 256 << 10;
/// The largest payload of one packet.
const MAX_PAYLOAD: usize = 64 << 10;
/// Ports the host side of host-initiated connections gets.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Event data of the listening socket; connections use 1 and up.
const LISTENER_EVENT: u32 = 0;
/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
const EVENT_TRANSPORT_RESET: u32 = 0;
/// A `CONNECT <port>` line is no longer than this.
const MAX_CONNECT_LINE: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock CID {0} is reserved: use 3 or above (below 2^32 - 1)")]
    BadCid(u64),
    #[error(transparent)]
    Uds(#[from] UdsError),
    #[error("the saved vsock device has features {acked:#x} acknowledged that it does not offer ({offered:#x})")]
    AckedNotOffered { acked: u64, offered: u64 },
}

/// Checks that `cid` can be a guest's.
pub fn check_cid(cid: u64) -> Result<(), VsockError> {
    if (3..u64::from(u32::MAX)).contains(&cid) {
        Ok(())
    } else {
        Err(VsockError::BadCid(cid))
    }
}

/// (host port, guest port).
type ConnKey = (u32, u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnState {
    /// The host asked (CONNECT), the guest has not answered.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    token: u32,
    state: ConnState,
    /// The host's stream has data we have not read (its last edge).
    readable: bool,
    /// The host will send no more: the guest was told (SHUTDOWN).
    host_eof: bool,
    /// SHUTDOWN flags the guest sent.
    guest_shutdown: u32,
    write_shut: bool,
    /// Bytes sent to the guest, and the guest's buffer as it last said.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    credit_requested: bool,
    /// Bytes of the guest's written to the host stream.
    fwd_cnt: u32,
    fwd_cnt_sent: u32,
    /// The guest's bytes the host stream did not take yet.
    pending_out: Vec<u8>,
}

impl Conn {
    fn new(stream: UnixStream, token: u32, state: ConnState) -> Conn {
        Conn {
            stream,
            token,
            state,
            readable: false,
            host_eof: false,
            guest_shutdown: 0,
            write_shut: false,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            pending_out: Vec::new(),
        }
    }

    /// How many more bytes the guest can take.
    fn credit(&self) -> usize {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight) as usize
    }

    fn has_data_for_guest(&self) -> bool {
        self.state == ConnState::Established && self.readable && !self.host_eof
    }
}

/// A host connection that has not said CONNECT yet.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

/// A packet without payload, waiting for a receive buffer.
#[derive(Clone, Copy, Debug)]
struct Control {
    op: u16,
    flags: u32,
    key: ConnKey,
}

pub struct Vsock {
    cid: u64,
    /// The host socket; without one, only host services are reachable.
    host: Option<HostListener>,
    /// Host ports served inside the VMM: where their connections go.
    services: HashMap<u32, Sender<UnixStream>>,
    acked_features: u64,
    active: Option<Active>,
    conns: HashMap<ConnKey, Conn>,
    pending: HashMap<u32, Pending>,
    /// Event data of each connection's stream.
    tokens: HashMap<u32, ConnKey>,
    next_token: u32,
    next_local_port: u32,
    control: VecDeque<Control>,
    /// Streams to watch / to stop watching and close, on the device thread
    /// ([`VirtioDevice::update_backend`]).
    to_watch: Vec<u32>,
    to_close: Vec<(u32, UnixStream)>,
}

/// What one pass of the receive path put in a buffer.
struct Outgoing {
    hdr: Header,
    payload: Vec<u8>,
}

impl Vsock {
    /// A device for guest `cid`, listening on `uds` if given.
    pub fn new(cid: u64, uds: Option<&Path>) -> Result<Self, VsockError> {
        check_cid(cid)?;
        let host = uds.map(HostListener::bind).transpose()?;
        Ok(Self::with_listener(cid, host))
    }

    fn with_listener(cid: u64, host: Option<HostListener>) -> Self {
        Vsock {
            cid,
            host,
            services: HashMap::new(),
            acked_features: 0,
            active: None,
            conns: HashMap::new(),
            pending: HashMap::new(),
            tokens: HashMap::new(),
            next_token: 1,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            to_watch: Vec::new(),
            to_close: Vec::new(),
        }
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    pub fn uds_path(&self) -> Option<&Path> {
        self.host.as_ref().map(HostListener::path)
    }

    /// Serves host port `port` inside the VMM: each guest connection to it
    /// becomes one end of a socket pair sent on `connections` (a closed
    /// receiver refuses them). Replaces a host socket's `PATH_<port>`.
    pub fn add_service(&mut self, port: u32, connections: Sender<UnixStream>) {
        self.services.insert(port, connections);
    }

    fn token(&mut self) -> u32 {
        let t = self.next_token;
        self.next_token = (self.next_token + 1) % super::BACKEND_DATA_LIMIT;
        if self.next_token == LISTENER_EVENT {
            self.next_token = 1;
        }
        t
    }

    fn local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|&(local, _)| local == p) {
                return p;
            }
        }
    }

    fn header(&self, op: u16, flags: u32, key: ConnKey, len: u32) -> Header {
        let fwd_cnt = self.conns.get(&key).map_or(0, |c| c.fwd_cnt);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF,
            fwd_cnt,
        }
    }

    fn send(&mut self, op: u16, flags: u32, key: ConnKey) {
        self.control.push_back(Control { op, flags, key });
    }

    /// Forgets a connection; its stream is closed on the device thread.
    fn remove(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.token);
            self.to_close.push((c.token, c.stream));
        }
    }

    /// Resets a connection: the guest gets RST, the host stream closes.
    fn reset(&mut self, key: ConnKey) {
        self.send(op::RST, 0, key);
        self.remove(key);
    }

    /// Writes what the host stream takes of the guest's pending bytes,
    /// then carries out a shutdown the guest asked for once all is out.
    fn flush(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.pending_out.is_empty() {
            match c.stream.write(&c.pending_out) {
                Ok(n) => {
                    c.pending_out.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("vsock: host stream of port {} failed: {e}", key.0);
                    return self.reset(key);
                }
            }
        }
        let drained = c.pending_out.is_empty();
        if drained && c.guest_shutdown & SHUTDOWN_SEND != 0 && !c.write_shut {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
            c.write_shut = true;
        }
        if drained && c.guest_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            return self.reset(key);
        }
        // Tell the guest about the room it has again before it runs out.
        if c.fwd_cnt.wrapping_sub(c.fwd_cnt_sent) >= CONN_BUF / 2 {
            self.send(op::CREDIT_UPDATE, 0, key);
        }
    }

    /// One packet from the guest.
    fn handle_tx(&mut self, h: Header, payload: &[u8]) {
        if h.dst_cid != HOST_CID || h.src_cid != self.cid {
            log::debug!("vsock: packet from {} to {} dropped", h.src_cid, h.dst_cid);
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.type_ != TYPE_STREAM {
            if h.op != op::RST {
                self.send(op::RST, 0, key);
            }
            return;
        }
        if h.op == op::REQUEST {
            return self.guest_connect(key, &h);
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if h.op != op::RST {
                self.send(op::RST, 0, key);
            }
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        if c.credit() > 0 {
            c.credit_requested = false;
        }
        match h.op {
            op::RESPONSE if c.state == ConnState::Connecting => {
                c.state = ConnState::Established;
                let ok = format!("OK {}\n", key.0);
                // A fresh socket's buffer always takes these few bytes.
                if c.stream.write_all(ok.as_bytes()).is_err() {
                    self.reset(key);
                }
            }
            op::RST => self.remove(key),
            op::SHUTDOWN => {
                c.guest_shutdown |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                self.flush(key);
            }
            op::RW if c.state == ConnState::Established => {
                if c.pending_out.len() + payload.len() > CONN_BUF as usize {
                    log::debug!("vsock: the guest overran its credit on port {}", key.0);
                    return self.reset(key);
                }
                c.pending_out.extend_from_slice(payload);
                self.flush(key);
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => self.send(op::CREDIT_UPDATE, 0, key),
            other => {
                log::debug!("vsock: unexpected op {other} on port {}", key.0);
                self.reset(key);
            }
        }
    }

    /// The guest connects to host port `key.0`: to the service on that
    /// port, or to whoever listens on `PATH_<port>`.
    fn guest_connect(&mut self, key: ConnKey, h: &Header) {
        if self.conns.contains_key(&key) {
            return self.reset(key);
        }
        let Some(stream) = self.connect_host_port(key.0) else {
            return self.send(op::RST, 0, key);
        };
        let token = self.token();
        let mut c = Conn::new(stream, token, ConnState::Established);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        self.conns.insert(key, c);
        self.tokens.insert(token, key);
        self.to_watch.push(token);
        self.send(op::RESPONSE, 0, key);
    }

    /// A non-blocking stream to what serves host port `port`.
    fn connect_host_port(&mut self, port: u32) -> Option<UnixStream> {
        let stream = if let Some(service) = self.services.get(&port) {
            let (ours, theirs) = UnixStream::pair().ok()?;
            if service.send(theirs).is_err() {
                log::debug!("vsock: the service on host port {port} is gone");
                self.services.remove(&port);
                return None;
            }
            ours
        } else {
            let path = self.host.as_ref()?.port_path(port);
            match UnixStream::connect(&path) {
                Ok(s) => s,
                Err(e) => {
                    log::debug!("vsock: guest connection to {}: {e}", path.display());
                    return None;
                }
            }
        };
        stream.set_nonblocking(true).ok()?;
        Some(stream)
    }

    /// Serves the transmit queue.
    fn transmit(&mut self, queues: &mut [Queue]) -> Result<(), QueueError> {
        let Active { mem, interrupt } = Active::get(&self.active)?;
        let Some(queue) = queues.get_mut(TX).filter(|q| q.ready()) else {
            return Err(QueueError::NoSuchQueue(TX));
        };
        let mut used_any = false;
        while let Some(chain) = next_chain(queue, &mem)? {
            let bytes = chain.read_all(&mem, HDR_LEN + MAX_PAYLOAD);
            queue.add_used(&mem, chain.head, 0)?;
            used_any = true;
            let Some((h, bytes)) = bytes.and_then(|b| Some((Header::decode(&b)?, b))) else {
                log::debug!("vsock: malformed packet dropped");
                continue;
            };
            let end = (HDR_LEN + h.len as usize).min(bytes.len());
            self.handle_tx(h, &bytes[HDR_LEN..end]);
        }
        if used_any {
            interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// The next packet for the guest, at most `room` bytes of payload.
    fn next_outgoing(&mut self, room: usize) -> Option<Outgoing> {
        if let Some(ctl) = self.control.pop_front() {
            if let Some(c) = self.conns.get_mut(&ctl.key) {
                c.fwd_cnt_sent = c.fwd_cnt;
            }
            return Some(Outgoing {
                hdr: self.header(ctl.op, ctl.flags, ctl.key, 0),
                payload: Vec::new(),
            });
        }
        let ready: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.has_data_for_guest())
            .map(|(k, _)| *k)
            .collect();
        for key in ready {
            let c = self.conns.get_mut(&key)?;
            let n = c.credit().min(room).min(MAX_PAYLOAD);
            if n == 0 {
                if !c.credit_requested {
                    c.credit_requested = true;
                    return Some(Outgoing {
                        hdr: self.header(op::CREDIT_REQUEST, 0, key, 0),
                        payload: Vec::new(),
                    });
                }
                continue;
            }
            let mut buf = vec![0u8; n];
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    c.host_eof = true;
                    c.fwd_cnt_sent = c.fwd_cnt;
                    return Some(Outgoing {
                        hdr: self.header(op::SHUTDOWN, SHUTDOWN_SEND, key, 0),
                        payload: Vec::new(),
                    });
                }
                Ok(n) => {
                    buf.truncate(n);
                    c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                    c.fwd_cnt_sent = c.fwd_cnt;
                    return Some(Outgoing {
                        hdr: self.header(op::RW, 0, key, n as u32),
                        payload: buf,
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => c.readable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("vsock: host stream of port {} failed: {e}", key.0);
                    self.remove(key);
                    return Some(Outgoing {
                        hdr: self.header(op::RST, 0, key, 0),
                        payload: Vec::new(),
                    });
                }
            }
        }
        None
    }

    fn has_outgoing(&self) -> bool {
        !self.control.is_empty() || self.conns.values().any(Conn::has_data_for_guest)
    }

    /// Fills the guest's receive buffers with what is waiting for it.
    fn receive(&mut self, queues: &mut [Queue]) -> Result<(), QueueError> {
        let Active { mem, interrupt } = Active::get(&self.active)?;
        let Some(queue) = queues.get_mut(RX).filter(|q| q.ready()) else {
            return Ok(());
        };
        let mut used_any = false;
        while self.has_outgoing() {
            let Some(chain) = next_chain(queue, &mem)? else {
                // Out of buffers: the driver kicks when it adds some.
                if queue.enable_notification(&mem)? {
                    continue;
                }
                break;
            };
            let room = chain.writable_len().saturating_sub(HDR_LEN);
            let Some(out) = self.next_outgoing(room) else {
                queue.go_to_previous_position();
                break;
            };
            let mut bytes = out.hdr.encode().to_vec();
            bytes.extend_from_slice(&out.payload);
            let written = write_to_chain(&mem, &chain.descs, &bytes);
            if written < bytes.len() {
                log::debug!("vsock: a receive buffer of {written} bytes is too small");
            }
            queue.add_used(&mem, chain.head, written as u32)?;
            used_any = true;
        }
        if used_any && queue.needs_notification(&mem).unwrap_or(true) {
            interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// Accepts the host's new connections.
    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let Some(host) = &self.host else { return };
            let stream = match host.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("vsock: accept on {}: {e}", host.path().display());
                    return;
                }
            };
            if self.active.is_none() || stream.set_nonblocking(true).is_err() {
                // No guest driver to ask yet: the host sees its connection closed.
                continue;
            }
            let token = self.token();
            let watch = Events::with_data(&stream, token, EventSet::IN | EventSet::EDGE_TRIGGERED);
            if let Err(e) = ops.add(watch) {
                log::warn!("vsock: cannot watch a host connection: {e}");
                continue;
            }
            self.pending.insert(
                token,
                Pending {
                    stream,
                    line: Vec::new(),
                },
            );
            self.read_connect_line(token, ops);
        }
    }

    /// Reads a pending connection's `CONNECT <port>` line, byte by byte
    /// (what follows it is the guest's), and asks the guest.
    fn read_connect_line(&mut self, token: u32, ops: &mut EventOps) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let done = loop {
            match p.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break Some(uds::parse_connect(&p.line)),
                Ok(1) if p.line.len() < MAX_CONNECT_LINE => p.line.push(byte[0]),
                Ok(_) => break Some(None),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break Some(None),
            }
        };
        let Some(port) = done else { return };
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        let Some(port) = port.filter(|_| self.active.is_some()) else {
            log::debug!("vsock: host connection without a good CONNECT line closed");
            let _ = ops.remove(Events::empty(&p.stream));
            return;
        };
        let watch = Events::with_data(
            &p.stream,
            token,
            EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
        );
        if let Err(e) = ops.modify(watch) {
            log::warn!("vsock: cannot watch a host connection: {e}");
        }
        let key = (self.local_port(), port);
        let mut c = Conn::new(p.stream, token, ConnState::Connecting);
        // Whatever the host sent after its line is read once established.
        c.readable = true;
        self.conns.insert(key, c);
        self.tokens.insert(token, key);
        self.send(op::REQUEST, 0, key);
    }

    /// Drops every connection (their streams close).
    fn reset_all(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.control.clear();
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, 16]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-vsock: write to read-only config at {offset:#x} ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: std::sync::Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        Active::activate(&mut self.active, mem, interrupt)
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue]) -> Result<(), QueueError> {
        match index {
            RX => self.receive(queues),
            TX => {
                self.transmit(queues)?;
                self.receive(queues)
            }
            // The driver gave event buffers; they wait for a restore.
            EVENT => Ok(()),
            _ => Err(QueueError::NoSuchQueue(index)),
        }
    }

    fn init_backend(&mut self, ops: &mut EventOps) {
        let Some(host) = &self.host else { return };
        let watch = Events::with_data(&host.listener, LISTENER_EVENT, EventSet::IN);
        if let Err(e) = ops.add(watch) {
            log::error!("vsock: cannot watch {}: {e}", host.path().display());
        }
    }

    fn backend_event(
        &mut self,
        events: Events,
        ops: &mut EventOps,
        queues: Option<&mut [Queue]>,
    ) -> Result<(), QueueError> {
        let token = events.data();
        if token == LISTENER_EVENT {
            self.accept(ops);
        } else if self.pending.contains_key(&token) {
            self.read_connect_line(token, ops);
        } else if let Some(&key) = self.tokens.get(&token) {
            let set = events.event_set();
            if let Some(c) = self.conns.get_mut(&key) {
                if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                    c.readable = true;
                }
            }
            if set.contains(EventSet::OUT) {
                self.flush(key);
            }
        }
        match queues {
            Some(queues) => self.receive(queues),
            None => Ok(()),
        }
    }

    fn update_backend(&mut self, ops: &mut EventOps) {
        for (token, stream) in self.to_close.drain(..) {
            match self.to_watch.iter().position(|&t| t == token) {
                Some(i) => {
                    self.to_watch.swap_remove(i);
                }
                None => {
                    let _ = ops.remove(Events::empty(&stream));
                }
            }
        }
        for token in self.to_watch.drain(..) {
            let Some(c) = self.tokens.get(&token).and_then(|k| self.conns.get(k)) else {
                continue;
            };
            let watch = Events::with_data(
                &c.stream,
                token,
                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
            );
            if let Err(e) = ops.add(watch) {
                log::warn!("vsock: cannot watch a connection: {e}");
            }
        }
    }

    fn restored(&mut self, queues: &mut [Queue]) -> Result<bool, QueueError> {
        self.reset_all();
        let Active { mem, interrupt } = Active::get(&self.active)?;
        let Some(queue) = queues.get_mut(EVENT).filter(|q| q.ready()) else {
            return Ok(false);
        };
        match next_chain(queue, &mem)? {
            Some(chain) => {
                let written =
                    write_to_chain(&mem, &chain.descs, &EVENT_TRANSPORT_RESET.to_le_bytes());
                queue.add_used(&mem, chain.head, written as u32)?;
                interrupt.signal_used_queue();
            }
            None => log::warn!("vsock: no event buffer for the transport reset"),
        }
        Ok(false)
    }

    fn reset(&mut self) {
        self.reset_all();
        self.active = None;
        self.acked_features = 0;
    }

    fn quiesce(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
