//! Progress bars on a terminal (indicatif), for work that takes more than
//! a second: `vmm snapshot` (from the VMM's count, `GET /vm`) and `vmm
//! restore` (bytes of the image read). Nothing is drawn when stderr is not
//! a terminal, or for work that ends sooner.

use std::io::{IsTerminal, Read};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Shown once the work has taken this long (`VMM_PROGRESS_AFTER_MS`
/// changes it, for tests).
fn show_after() -> Duration {
    let ms = std::env::var("VMM_PROGRESS_AFTER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    Duration::from_millis(ms)
}

/// A bar that appears only after [`show_after`], on a terminal.
pub struct Bar {
    label: &'static str,
    started: Instant,
    after: Duration,
    enabled: bool,
    bar: Option<ProgressBar>,
}

impl Bar {
    /// `wanted`: the user did not ask for quiet or machine output.
    pub fn new(label: &'static str, wanted: bool) -> Self {
        Bar {
            label,
            started: Instant::now(),
            after: show_after(),
            enabled: wanted && std::io::stderr().is_terminal(),
            bar: None,
        }
    }

    /// `done` bytes of `total` (when known).
    pub fn update(&mut self, done: u64, total: Option<u64>) {
        if !self.enabled || self.started.elapsed() < self.after {
            return;
        }
        let label = self.label;
        let bar = self.bar.get_or_insert_with(|| {
            let style = match total {
                Some(_) => ProgressStyle::with_template(
                    "{msg} [{bar:20}] {binary_bytes}/{binary_total_bytes}, {binary_bytes_per_sec}, {eta} left",
                ),
                None => ProgressStyle::with_template(
                    "{msg} {spinner} {binary_bytes}, {binary_bytes_per_sec}",
                ),
            }
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            let b = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr())
                .with_style(style)
                .with_message(label);
            b.set_position(0);
            b
        });
        if let Some(t) = total {
            bar.set_length(t);
        }
        bar.set_position(done);
    }

    /// Takes the bar off the terminal.
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A reader that shows how much of `total` bytes it has read; the bar goes
/// when the reader does.
pub struct Reader<R> {
    inner: R,
    done: u64,
    total: Option<u64>,
    bar: Bar,
}

impl<R: Read> Reader<R> {
    pub fn new(inner: R, total: Option<u64>, bar: Bar) -> Self {
        Reader {
            inner,
            done: 0,
            total,
            bar,
        }
    }
}

impl<R: Read> Read for Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        self.bar.update(self.done, self.total);
        if self.total.is_some_and(|t| self.done >= t) {
            self.bar.finish();
        }
        Ok(n)
    }
}
