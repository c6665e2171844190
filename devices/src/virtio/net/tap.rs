//! A host TAP interface, opened by name, with virtio-net headers on every
//! frame (IFF_VNET_HDR): frames cross between the guest's buffers and the
//! TAP unchanged, offloads included.
//!
//! Only an existing TAP is attached: the user (or a CNI plugin) creates and
//! addresses it, and `vmm` never creates host interfaces of its own.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_iow_nr;

/// The size of the header before each frame: struct virtio_net_hdr with
/// num_buffers, as virtio 1.x drivers lay it out.
pub const VNET_HDR_LEN: usize = 12;

const IFNAMSIZ: usize = 16;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

/// TUNSETOFFLOAD flags: what the TAP may hand us unfinished.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

ioctl_iow_nr!(TUNSETIFF, b'T' as u32, 202, libc::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, b'T' as u32, 208, libc::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, b'T' as u32, 216, libc::c_int);

/// struct ifreq with the flags member of its union.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} is not a valid interface name (1 to 15 bytes, no '/', ':' or spaces)")]
    BadName(String),
    #[error("there is no network interface {0} (create it with: ip tuntap add dev {0} mode tap)")]
    Missing(String),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error("{0} is busy: another process has it open")]
    Busy(String),
    #[error("{0} is not a TAP interface")]
    NotTap(String),
    #[error("not allowed to attach to {0} (run as root or as the TAP's owner)")]
    Permission(String, #[source] io::Error),
    #[error("cannot attach to TAP {0}")]
    Attach(String, #[source] io::Error),
    #[error("cannot set up virtio-net headers on TAP {0}")]
    VnetHdr(String, #[source] io::Error),
}

/// An open TAP queue, non-blocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Checks that `name` can be an interface name.
pub fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() < IFNAMSIZ
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(TapError::BadName(name.to_string()))
    }
}

/// Whether the interface `name` exists in this network namespace.
fn exists(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call;
    // if_nametoindex only reads it.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

impl Tap {
    /// Attaches to the existing TAP interface `name`, with virtio-net
    /// headers and no offloads until [`Tap::set_offload`].
    pub fn open(name: &str) -> Result<Tap, TapError> {
        check_name(name)?;
        if !exists(name) {
            return Err(TapError::Missing(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq; `req` has its
        // layout (name, then the flags of the union, padded to 40 bytes) and
        // lives through the call.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name.to_string()),
                Some(libc::EINVAL) => TapError::NotTap(name.to_string()),
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission(name.to_string(), e),
                _ => TapError::Attach(name.to_string(), e),
            });
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points to `hdr_len` for the duration of the call.
        let ret = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &hdr_len) };
        if ret < 0 {
            return Err(TapError::VnetHdr(
                name.to_string(),
                io::Error::last_os_error(),
            ));
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        tap.set_offload(0)?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the TAP may deliver with its work left to the guest
    /// (`TUN_F_*`): partial checksums, unsegmented TCP.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is
        // passed.
        let ret =
            unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD(), libc::c_ulong::from(flags)) };
        if ret < 0 {
            return Err(TapError::VnetHdr(
                self.name.clone(),
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Reads one frame (header first); `WouldBlock` when none is waiting.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    /// Sends one frame (header first), whole.
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        check_name("tap0").unwrap();
        check_name("a-very-long-nm").unwrap();
        for bad in ["", "sixteen-bytes-xx", "a/b", "a b", "a:1"] {
            assert!(
                matches!(check_name(bad), Err(TapError::BadName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_missing_interface_is_named() {
        let e = Tap::open("vmm-no-such0").unwrap_err();
        assert!(matches!(e, TapError::Missing(_)), "{e}");
        assert!(e.to_string().contains("ip tuntap add dev vmm-no-such0"));
    }

    #[test]
    fn loopback_is_not_a_tap() {
        let e = Tap::open("lo").unwrap_err();
        assert!(matches!(e, TapError::NotTap(_)), "{e}");
    }
}
