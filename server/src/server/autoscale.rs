//! The concurrency autoscaler of one revision, after Knative's: it samples the revision's
//! concurrency (requests in flight plus requests held for it) every tick and wants
//! `ceil(average ÷ target)` instances, averaged over a long *stable* window; a burst seen over
//! the short *panic* window (a tenth of the stable one) that wants at least twice the ready
//! instances switches to panic mode, which follows the panic average up and never scales down
//! until the burst has been gone for a whole stable window.
//!
//! Pure: time comes in as arguments, so the decisions are tested on made-up clocks.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Panic when the panic window wants this many times the ready instances (Knative's 200%).
const PANIC_THRESHOLD: f64 = 2.0;

#[derive(Debug, Default)]
pub struct Autoscaler {
    /// (when, concurrency), oldest first, covering at most the stable window.
    samples: VecDeque<(Instant, u32)>,
    sum: u64,
    /// In panic mode until then (extended while the burst lasts).
    panic_until: Option<Instant>,
    /// The most instances wanted during this panic: panic mode never scales down.
    panic_floor: u32,
}

/// The panic window for a stable window: a tenth of it, at least a second.
pub fn panic_window(stable: Duration) -> Duration {
    (stable / 10).max(Duration::from_secs(1)).min(stable)
}

impl Autoscaler {
    /// Records the concurrency seen at `now`, forgetting samples older than the stable window.
    pub fn observe(&mut self, now: Instant, concurrency: u32, stable: Duration) {
        self.samples.push_back((now, concurrency));
        self.sum += u64::from(concurrency);
        while let Some(&(t, c)) = self.samples.front() {
            if now.saturating_duration_since(t) <= stable {
                break;
            }
            self.samples.pop_front();
            self.sum -= u64::from(c);
        }
    }

    /// True when there is nothing to remember: no load in the whole window and no panic.
    pub fn is_quiet(&self) -> bool {
        self.sum == 0 && self.panic_until.is_none()
    }

    fn panic_average(&self, now: Instant, window: Duration) -> f64 {
        let (mut sum, mut n) = (0u64, 0u64);
        for &(t, c) in self.samples.iter().rev() {
            if now.saturating_duration_since(t) > window {
                break;
            }
            sum += u64::from(c);
            n += 1;
        }
        if n == 0 {
            0.0
        } else {
            sum as f64 / n as f64
        }
    }

    fn stable_average(&self) -> f64 {
        if self.samples.is_empty() {
            0.0
        } else {
            self.sum as f64 / self.samples.len() as f64
        }
    }

    /// How many instances the revision wants now (before min and max), given how many are
    /// ready and the concurrency `target` per instance.
    pub fn desired(&mut self, now: Instant, ready: u32, target: u32, stable: Duration) -> u32 {
        let target = f64::from(target.max(1));
        let want = |avg: f64| (avg / target).ceil().min(f64::from(u32::MAX)) as u32;
        let stable_want = want(self.stable_average());
        let panic_want = want(self.panic_average(now, panic_window(stable)));
        if f64::from(panic_want) >= PANIC_THRESHOLD * f64::from(ready.max(1)) {
            self.panic_until = Some(now + stable);
        } else if self.panic_until.is_some_and(|t| now >= t) {
            self.panic_until = None;
            self.panic_floor = 0;
        }
        if self.panic_until.is_some() {
            self.panic_floor = self.panic_floor.max(panic_want);
            self.panic_floor
        } else {
            stable_want
        }
    }

    pub fn panicking(&self) -> bool {
        self.panic_until.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);
    const STABLE: Duration = Duration::from_secs(60);

    /// Feeds `concurrency` for `secs` seconds of ticks; returns the last decision.
    fn run(a: &mut Autoscaler, t: &mut Instant, secs: u64, concurrency: u32, ready: &mut u32, target: u32) -> u32 {
        let mut d = 0;
        for _ in 0..secs * 10 {
            *t += TICK;
            a.observe(*t, concurrency, STABLE);
            d = a.desired(*t, *ready, target, STABLE);
            *ready = d.max(1); // instances come up at once in this model
        }
        d
    }

    #[test]
    fn three_times_the_target_wants_three_instances_and_the_calm_brings_it_back() {
        let mut a = Autoscaler::default();
        let mut t = Instant::now();
        let mut ready = 1;
        assert_eq!(run(&mut a, &mut t, 10, 30, &mut ready, 10), 3, "a load of 3x the target");
        // The load stops: the stable average stays above zero for a while (no flapping)...
        assert!(run(&mut a, &mut t, 5, 0, &mut ready, 10) >= 1);
        // ...and after a whole stable window of calm nothing is wanted any more.
        assert_eq!(run(&mut a, &mut t, 61, 0, &mut ready, 10), 0);
        assert!(a.is_quiet());
    }

    #[test]
    fn a_burst_panics_at_once_and_panic_never_scales_down() {
        let mut a = Autoscaler::default();
        let mut t = Instant::now();
        let mut ready = 1;
        run(&mut a, &mut t, 60, 5, &mut ready, 10); // a steady trickle: one instance
        assert_eq!(ready, 1);
        // A burst to 80 in flight: within about a second the decision follows it, though the
        // 60 s average has hardly moved.
        let mut first = 0;
        for _ in 0..10 {
            t += TICK;
            a.observe(t, 80, STABLE);
            first = a.desired(t, 1, 10, STABLE);
        }
        assert!(a.panicking(), "a second into the burst the panic window wants twice the ready instances");
        assert!(first >= 2, "the panic window already sees the burst: {first}");
        let d = run(&mut a, &mut t, 6, 80, &mut ready, 10);
        assert_eq!(d, 8);
        // The burst halves: panic mode keeps the 8.
        assert_eq!(run(&mut a, &mut t, 10, 40, &mut ready, 10), 8, "no scale-down while panicking");
        // Once calm for longer than a stable window, the stable average rules again.
        let d = run(&mut a, &mut t, 70, 40, &mut ready, 10);
        assert!(!a.panicking());
        assert_eq!(d, 4);
    }

    #[test]
    fn a_rise_under_twice_the_ready_instances_follows_the_stable_average_without_panic() {
        let mut a = Autoscaler::default();
        let mut t = Instant::now();
        let mut ready = 1;
        assert_eq!(run(&mut a, &mut t, 65, 30, &mut ready, 10), 3);
        assert!(!a.panicking(), "the first burst's panic is over");
        let mut seen = Vec::new();
        for _ in 0..65 {
            seen.push(run(&mut a, &mut t, 1, 50, &mut ready, 10));
            assert!(!a.panicking(), "5 wanted for 3 ready is under the threshold");
        }
        assert_eq!(*seen.last().unwrap(), 5);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "a steady climb: {seen:?}");
        assert!(seen[5] < 5, "the stable window smooths the step: {seen:?}");
    }

    #[test]
    fn windows() {
        assert_eq!(panic_window(Duration::from_secs(60)), Duration::from_secs(6));
        assert_eq!(panic_window(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(panic_window(Duration::from_millis(500)), Duration::from_millis(500));
    }
}
