//! Log lines that hostile or broken peers can cause, rate-limited: a flood
//! of bad connections must not become a flood of log lines (or of disk
//! writes). Each call site has its own [`Throttle`]; at most one line per
//! [`INTERVAL`] passes, saying how many were held back since the last.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// At most one line per call site this often.
pub(crate) const INTERVAL: Duration = Duration::from_secs(5);

fn since_start() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One call site's allowance.
#[derive(Debug)]
pub(crate) struct Throttle {
    /// When the last line passed (ms since the first use; 0: never).
    last: AtomicU64,
    held: AtomicU64,
}

impl Throttle {
    pub(crate) const fn new() -> Self {
        Self {
            last: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may pass now (`n` were held back since the
    /// last one), `None` when it must be held back.
    pub(crate) fn allow(&self) -> Option<u64> {
        self.allow_at(since_start() + 1)
    }

    /// [`Throttle::allow`] at `now` (ms, above zero).
    fn allow_at(&self, now: u64) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= INTERVAL.as_millis() as u64;
        if due
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// `warn!` through a static [`Throttle`] of its own; adds a `held_back`
/// field (lines of this kind not logged since the last one).
macro_rules! warn_throttled {
    ($($arg:tt)+) => {{
        static THROTTLE: $crate::throttle::Throttle = $crate::throttle::Throttle::new();
        if let Some(held_back) = THROTTLE.allow() {
            tracing::warn!(held_back, $($arg)+);
        }
    }};
}
pub(crate) use warn_throttled;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let t = Throttle::new();
        let every = INTERVAL.as_millis() as u64;
        assert_eq!(t.allow_at(10), Some(0));
        for ms in 0..1000 {
            assert_eq!(t.allow_at(10 + ms), None);
        }
        assert_eq!(t.allow_at(10 + every), Some(1000));
        assert_eq!(t.allow_at(11 + every), None);
    }
}
