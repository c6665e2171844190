//! Milestones of a VM's life, measured from process start, for the boot
//! benchmark (`vmm run --timings`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Each milestone is recorded once, the first time it happens (0 = not yet).
pub struct Timeline {
    start: Instant,
    first_instruction_us: AtomicU64,
    first_console_us: AtomicU64,
    agent_start_us: AtomicU64,
}

impl Timeline {
    pub fn new(start: Instant) -> Self {
        Timeline {
            start,
            first_instruction_us: AtomicU64::new(0),
            first_console_us: AtomicU64::new(0),
            agent_start_us: AtomicU64::new(0),
        }
    }

    fn mark(&self, slot: &AtomicU64) {
        if slot.load(Ordering::Relaxed) == 0 {
            let us = (self.start.elapsed().as_micros() as u64).max(1);
            let _ = slot.compare_exchange(0, us, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// The boot vCPU is about to enter the guest for the first time.
    pub fn first_instruction(&self) {
        self.mark(&self.first_instruction_us);
    }

    /// The guest wrote its first byte to the console.
    pub fn console_output(&self) {
        self.mark(&self.first_console_us);
    }

    /// The guest agent announced itself on the progress port.
    pub fn agent_started(&self) {
        self.mark(&self.agent_start_us);
    }

    /// One JSON line with every milestone in milliseconds (null if it never happened).
    pub fn report(&self) -> String {
        let ms = |a: &AtomicU64| match a.load(Ordering::Relaxed) {
            0 => serde_json::Value::Null,
            us => serde_json::json!(us as f64 / 1000.0),
        };
        serde_json::json!({
            "first_instruction_ms": ms(&self.first_instruction_us),
            "first_console_ms": ms(&self.first_console_us),
            "agent_start_ms": ms(&self.agent_start_us),
            "exit_ms": self.start.elapsed().as_micros() as f64 / 1000.0,
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milestones_are_recorded_once() {
        let t = Timeline::new(Instant::now());
        assert!(t.report().contains("\"agent_start_ms\":null"));
        t.first_instruction();
        let first = t.first_instruction_us.load(Ordering::Relaxed);
        std::thread::sleep(std::time::Duration::from_millis(2));
        t.first_instruction();
        assert_eq!(t.first_instruction_us.load(Ordering::Relaxed), first);
        t.console_output();
        t.agent_started();
        let r: serde_json::Value = serde_json::from_str(&t.report()).unwrap();
        assert!(
            r["first_console_ms"].as_f64().unwrap() >= r["first_instruction_ms"].as_f64().unwrap()
        );
        assert!(r["exit_ms"].as_f64().unwrap() > 0.0);
    }
}
