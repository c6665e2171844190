//! The guest's I/O buses as the vCPU threads see them: what a port or MMIO
//! access does is the device manager's business.

/// What a guest port write asks of the VM, besides reaching its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortEffect {
    None,
    /// The guest asked for a machine reset (or reported its exit status):
    /// the VM ends.
    Reset,
}

/// What a device bus does with a guest access.
pub trait Bus: Send + Sync {
    fn pio_in(&self, port: u16, data: &mut [u8]);
    fn pio_out(&self, port: u16, data: &[u8]) -> PortEffect;
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    fn mmio_write(&self, addr: u64, data: &[u8]);
}
