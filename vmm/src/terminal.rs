//! Puts the controlling terminal into raw mode while a guest console is attached,
//! so keys reach the guest as typed, and restores it afterwards; and what
//! the standard descriptors were when the process started.

use std::sync::atomic::{AtomicBool, Ordering};

/// Restores the saved terminal settings when dropped.
pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal.
    pub fn enter_if_tty() -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it on success.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and a valid pointer to a termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side log lines stay readable.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: valid descriptor and termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores settings read from this same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

/// The size of the terminal on stdout, (rows, columns), if it is one.
pub fn size() -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data; TIOCGWINSZ fills it on success.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a pointer to a winsize that outlives the call.
    if unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } != 0 {
        return None;
    }
    (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Whether stdout was closed when the process started. Rust's runtime puts
/// /dev/null on a closed stdin, stdout or stderr before `main`, so an image
/// streamed to a closed stdout would vanish without an error; `main` runs
/// [`note_closed_stdout`] from `.init_array`, before the runtime does that.
static STDOUT_CLOSED_AT_START: AtomicBool = AtomicBool::new(false);

/// Records whether stdout is closed; meant to run before Rust's runtime
/// starts (see `main.rs`).
pub extern "C" fn note_closed_stdout() {
    // SAFETY: F_GETFD only queries this process's descriptor table.
    if unsafe { libc::fcntl(libc::STDOUT_FILENO, libc::F_GETFD) } == -1 {
        STDOUT_CLOSED_AT_START.store(true, Ordering::Relaxed);
    }
}

/// Whether stdout was closed when the process started.
pub fn stdout_was_closed() -> bool {
    STDOUT_CLOSED_AT_START.load(Ordering::Relaxed)
}
