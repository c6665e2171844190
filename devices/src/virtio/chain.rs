//! Descriptor chains as devices see them: popped whole, then read from or
//! written into in order.

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::QueueError;

/// One descriptor of a chain.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    pub write: bool,
}

pub struct Chain {
    pub head: u16,
    pub descs: Vec<Desc>,
}

impl Chain {
    /// How many bytes the device may write into the chain.
    pub fn writable_len(&self) -> usize {
        self.descs
            .iter()
            .filter(|d| d.write)
            .map(|d| d.len as usize)
            .sum()
    }

    /// Reads the chain's driver-written bytes, at most `max`.
    pub fn read_all(&self, mem: &GuestMemoryMmap, max: usize) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        for d in self.descs.iter().filter(|d| !d.write) {
            let start = out.len();
            let len = (d.len as usize).min(max - start);
            out.resize(start + len, 0);
            mem.read_slice(&mut out[start..], d.addr).ok()?;
            if out.len() == max {
                break;
            }
        }
        Some(out)
    }
}

/// The next chain the driver made available, if any.
pub fn next_chain(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Option<Chain>, QueueError> {
    // A chain is no longer than the queue (a longer one loops).
    let limit = usize::from(queue.size());
    let Some(chain) = queue.iter(mem)?.next() else {
        return Ok(None);
    };
    let head = chain.head_index();
    let descs = chain
        .take(limit)
        .map(|d| Desc {
            addr: d.addr(),
            len: d.len(),
            write: d.is_write_only(),
        })
        .collect();
    Ok(Some(Chain { head, descs }))
}

/// Scatters `data` over the chain's writable buffers; returns how much fit.
pub fn write_to_chain(mem: &GuestMemoryMmap, descs: &[Desc], data: &[u8]) -> usize {
    let mut done = 0;
    for d in descs.iter().filter(|d| d.write) {
        if done == data.len() {
            break;
        }
        let n = (d.len as usize).min(data.len() - done);
        if mem.write_slice(&data[done..done + n], d.addr).is_err() {
            return done;
        }
        done += n;
    }
    done
}
