//! How long a worker takes to turn a compile around, from its status stream alone.
//!
//! Little's law: over a window, the mean time a compile spends at distccd (queued or
//! running) is the compiles in flight integrated over time, divided by the compiles
//! finished. The agent reports both (`jobs_running`, and distccd's `compile_ok` +
//! `compile_error` counters) with the time it took them, so the builder needs nothing
//! from the compiles themselves. The compiles still in flight at the end of the window
//! are counted as if they had just finished: that keeps the estimate a lower bound, and
//! it is what judges a worker so slow that nothing finishes there at all within the
//! window (the worst case, which a ratio of finished compiles alone would never see). One worker's mean is compared with the others': a worker
//! whose compiles take several times as long (a slower or throttled CPU, another tenant)
//! gets fewer slots or none, so a build does not wait on its stragglers.
//!
//! Means are compared between workers fed by the same builds, but the job mix still
//! differs: distcc fills the hosts file in order, so the first worker gets the many tiny
//! compiles of a build's quiet phases (a kernel build's option checks) and looks several
//! times faster. Measured on the test-bed, healthy workers differed 4-5x that way. So only
//! a clear straggler counts: at least [`SLOW_RATIO`] times the median of the *other*
//! workers (one lucky worker cannot make the rest look slow), with at least
//! [`MIN_FINISHED`] compiles over at least [`MIN_SPAN`].

use std::collections::VecDeque;
use std::time::Duration;

use crate::snapshot::WorkerSnapshot;

/// How much history one estimate of the time per compile uses.
pub const WINDOW: Duration = Duration::from_secs(20);
/// How much history one estimate of throughput uses: longer, so that a worker five times
/// slower than its peers, finishing a compile every 10 s or so, is still measured.
pub const SPEED_WINDOW: Duration = Duration::from_secs(60);
/// Compiles that must finish within the window, or still be in flight at its end, for
/// an estimate.
pub const MIN_FINISHED: u64 = 3;
/// The shortest history an estimate uses.
pub const MIN_SPAN: Duration = Duration::from_secs(10);
/// How long an estimate stands when no newer one can be made (a worker left out for
/// being slow finishes no compiles): afterwards it is given work again and measured anew.
pub const HOLD: Duration = Duration::from_secs(60);
/// A worker counts as slow when its mean is at least this many times the median of the
/// other workers' means (job-mix noise alone reached 5x; a worker at 10 % of a CPU, 50x).
pub const SLOW_RATIO: f64 = 8.0;

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// When the agent took it, microseconds since the epoch.
    at_usec: u64,
    finished: u64,
    running: u32,
}

/// A worker's recent statuses and its last estimate.
#[derive(Debug, Default, Clone)]
pub struct PaceTracker {
    samples: VecDeque<Sample>,
    /// (taken at, mean seconds per compile).
    estimate: Option<(u64, f64)>,
    /// (taken at, busy seconds per finished compile): see [`busy_secs_per_compile`].
    capacity: Option<(u64, f64)>,
}

impl PaceTracker {
    /// Add a status; statuses without stats, or older than the last one, are ignored.
    pub fn observe(&mut self, worker: &WorkerSnapshot) {
        let Some(stats) = worker.stats() else {
            return;
        };
        let sample = Sample {
            at_usec: worker.taken_at_usec(),
            finished: stats.compile_ok + stats.compile_error,
            running: stats.jobs_running,
        };
        if let Some(last) = self.samples.back() {
            if sample.at_usec <= last.at_usec {
                return;
            }
            // distccd restarted: its counters start again from zero.
            if sample.finished < last.finished {
                self.samples.clear();
            }
        }
        self.samples.push_back(sample);
        let kept = micros(SPEED_WINDOW.max(WINDOW));
        while self
            .samples
            .front()
            .is_some_and(|s| sample.at_usec - s.at_usec > kept)
        {
            self.samples.pop_front();
        }
        let window = micros(WINDOW);
        let all = self.samples.make_contiguous();
        let recent = &all[all.partition_point(|s| sample.at_usec - s.at_usec > window)..];
        if let Some(mean) = little(recent) {
            self.estimate = Some((sample.at_usec, mean));
        }
        if let Some(per_compile) = busy_secs_per_compile(all) {
            self.capacity = Some((sample.at_usec, per_compile));
        }
    }

    /// Busy seconds per finished compile at this worker, as of `now_usec` (see
    /// [`busy_secs_per_compile`]); None when there is no estimate younger than [`HOLD`].
    pub fn busy_secs_per_compile(&self, now_usec: u64) -> Option<f64> {
        self.capacity
            .filter(|(at, _)| now_usec.saturating_sub(*at) <= micros(HOLD))
            .map(|(_, secs)| secs)
    }

    /// Mean seconds a compile spends at this worker, as of `now_usec`; None when there is
    /// no estimate younger than [`HOLD`].
    pub fn mean_job_secs(&self, now_usec: u64) -> Option<f64> {
        self.estimate
            .filter(|(at, _)| now_usec.saturating_sub(*at) <= micros(HOLD))
            .map(|(_, mean)| mean)
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The first and last samples, when they span at least [`MIN_SPAN`].
fn long_enough(samples: &[Sample]) -> Option<(&Sample, &Sample)> {
    let (first, last) = (samples.first()?, samples.last()?);
    (last.at_usec - first.at_usec >= micros(MIN_SPAN)).then_some((first, last))
}

/// Little's law over the samples: ∫ running dt / (finished + still running).
fn little(samples: &[Sample]) -> Option<f64> {
    let (first, last) = long_enough(samples)?;
    let finished = last.finished - first.finished + u64::from(last.running);
    if finished < MIN_FINISHED {
        return None;
    }
    // The count at each end, averaged: the agent samples, it does not integrate.
    let busy_secs = integrate(samples, |a, b| f64::from(a.running + b.running) / 2.0);
    Some(busy_secs / finished as f64)
}

/// ∫ weight dt over consecutive pairs of samples, in seconds.
fn integrate(samples: &[Sample], weight: impl Fn(&Sample, &Sample) -> f64) -> f64 {
    samples
        .windows(2)
        .map(|pair| (pair[1].at_usec - pair[0].at_usec) as f64 / 1e6 * weight(&pair[0], &pair[1]))
        .sum()
}

/// A worker's throughput while it has work: the seconds during which at least one compile
/// was in flight, divided by the compiles that finished in them. Unlike the mean time per
/// compile, this does not grow with the compiles a worker is given: a worker held to a
/// fifth of a CPU finishes compiles at the same rate with one slot or three, each just waits longer
/// with three. So it can weigh slots without feeding back on them (fewer slots, shorter
/// compiles, more slots again): [`speed_share`].
fn busy_secs_per_compile(samples: &[Sample]) -> Option<f64> {
    let (first, last) = long_enough(samples)?;
    // Only finished compiles: a worker that finishes nothing gets no figure here (its
    // latency, [`little`], is what leaves it out).
    let finished = last.finished - first.finished;
    if finished < MIN_FINISHED_FOR_SPEED {
        return None;
    }
    // Busy at both samples: the whole gap; at one of them (or a compile finished between
    // two idle samples): half of it.
    let busy_secs = integrate(samples, |a, b| match (a.running > 0, b.running > 0) {
        (true, true) => 1.0,
        (false, false) if b.finished == a.finished => 0.0,
        _ => 0.5,
    });
    (busy_secs > 0.0).then(|| busy_secs / finished as f64)
}

/// Compiles a worker must finish within [`SPEED_WINDOW`] before its throughput is
/// compared: more than for [`little`], since one big compile alone says little about speed.
pub const MIN_FINISHED_FOR_SPEED: u64 = 4;
/// A worker gets fewer slots once its busy seconds per compile are at least this many
/// times the other workers' median; below, job-mix noise could take slots from a
/// healthy worker.
pub const WEIGH_FROM: f64 = 2.0;

/// How much slower this worker turns compiles around than the others: its busy seconds
/// per compile over the median of the others'. None when either is missing or cannot be
/// compared.
pub fn slowness(mine: Option<f64>, others: Option<f64>) -> Option<f64> {
    let (mine, others) = (mine?, others?);
    (mine.is_finite() && others.is_finite() && mine > 0.0 && others > 0.0).then(|| mine / others)
}

/// The slots to give a worker `slowness` times slower than the others ([`slowness`]):
/// all of them below [`WEIGH_FROM`], else `slots / slowness` rounded, at least 1, so a
/// worker five times slower takes about a fifth of the compiles it would. Leaving a
/// worker out altogether is [`slow_share`]'s call (its compiles' latency), not this one.
pub fn speed_share(slots: u32, slowness: f64) -> u32 {
    if !(slowness.is_finite() && slowness >= WEIGH_FROM) {
        return slots;
    }
    ((f64::from(slots) / slowness).round() as u32).clamp(1, slots.max(1))
}

/// The slots to give a worker whose compiles take `mean` seconds when the other workers'
/// take `others` (their median): all of them below [`SLOW_RATIO`], else `slots / ratio`
/// rounded down (0: leave it out).
pub fn slow_share(slots: u32, mean: f64, others: f64) -> u32 {
    let fastest = others;
    // Also catches NaN: an estimate that cannot be compared changes nothing.
    if !(fastest.is_finite() && mean.is_finite() && fastest > 0.0 && mean > 0.0) {
        return slots;
    }
    let ratio = mean / fastest;
    if ratio < SLOW_RATIO {
        slots
    } else {
        (f64::from(slots) / ratio).floor() as u32
    }
}

/// The median of `values` (mean of the middle two for an even count); None when empty.
pub fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use distcc_proto::v1 as pb;

    fn status(at_secs: f64, ok: u64, running: u32) -> WorkerSnapshot {
        WorkerSnapshot::new(pb::WorkerStatus {
            taken_at_usec: (at_secs * 1e6) as u64,
            stats: Some(pb::DistccdStats {
                available: true,
                compile_ok: ok,
                jobs_running: running,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[test]
    fn medians() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0]), Some(2.5));
    }

    #[test]
    fn steady_state_gives_the_job_time() {
        // 3 compiles always in flight, one finishing every second: each takes 3 s; the
        // estimate counts the 3 in flight as finished, a slight underestimate.
        let mut t = PaceTracker::default();
        for i in 0..21u32 {
            t.observe(&status(f64::from(i), u64::from(i), 3));
        }
        let mean = t.mean_job_secs(20_000_000).unwrap();
        assert!((mean - 60.0 / 23.0).abs() < 1e-9, "{mean}");
    }

    #[test]
    fn too_few_compiles_give_no_estimate_and_the_window_slides() {
        let mut t = PaceTracker::default();
        t.observe(&status(0.0, 0, 1));
        t.observe(&status(6.0, 2, 1));
        assert_eq!(
            t.mean_job_secs(6_000_000),
            None,
            "6 s of history is too short"
        );
        t.observe(&status(10.0, 1, 1));
        assert_eq!(t.mean_job_secs(10_000_000), None, "restarted: history gone");
        t.observe(&status(20.0, 2, 0));
        assert_eq!(t.mean_job_secs(20_000_000), None, "1 compile is not enough");
        t.observe(&status(21.0, 4, 0));
        assert!(t.mean_job_secs(21_000_000).is_some(), "3 compiles in 11 s");
        // Samples older than the window drop out: later, one compile in flight finishing
        // every 4 s means 4 s per compile.
        for i in 0..=40u32 {
            t.observe(&status(22.0 + f64::from(i), 3 + u64::from(i / 4), 1));
        }
        let mean = t.mean_job_secs(62_000_000).unwrap();
        assert!((3.0..=4.5).contains(&mean), "{mean}: 4 s, a little under");
    }

    #[test]
    fn estimates_expire_after_hold_and_restarts_reset() {
        let mut t = PaceTracker::default();
        for i in 0..11u32 {
            t.observe(&status(f64::from(i), u64::from(i), 1));
        }
        assert!(t.mean_job_secs(10_000_000).is_some());
        assert!(t.mean_job_secs(10_000_000 + micros(HOLD)).is_some());
        assert_eq!(t.mean_job_secs(11_000_000 + micros(HOLD)), None);
        // distccd restarted: counters from zero, no negative rates.
        t.observe(&status(11.0, 0, 0));
        t.observe(&status(12.0, 1, 0));
        assert_eq!(t.samples.len(), 2);
        // Out-of-order statuses are ignored.
        t.observe(&status(11.5, 7, 9));
        assert_eq!(t.samples.len(), 2);
    }

    #[test]
    fn a_worker_that_finishes_nothing_is_judged_by_what_it_holds() {
        // 3 compiles in flight for 20 s, none finished: at least 20 s each, and 10 times
        // the others' 2 s.
        let mut stuck = PaceTracker::default();
        for i in 0..=20u32 {
            stuck.observe(&status(f64::from(i), 5, 3));
        }
        let mean = stuck.mean_job_secs(20_000_000).unwrap();
        assert!((mean - 20.0).abs() < 1e-9, "{mean}");
        assert_eq!(slow_share(3, mean, 2.0), 0);
    }

    #[test]
    fn throughput_does_not_follow_the_slots_given() {
        // A worker finishing one compile every 2 s: with 3 in flight (each takes 6 s)
        // or with 1 (each takes 2 s), 2 busy seconds per compile either way, while the
        // mean time per compile falls with the slots (what would feed back).
        let mut three = PaceTracker::default();
        let mut one = PaceTracker::default();
        for i in 0..=40u32 {
            three.observe(&status(f64::from(i), u64::from(i / 2), 3));
            one.observe(&status(f64::from(i), u64::from(i / 2), 1));
        }
        let now = 40_000_000;
        let (t3, t1) = (
            three.busy_secs_per_compile(now).unwrap(),
            one.busy_secs_per_compile(now).unwrap(),
        );
        // The 20 s window holds 10 finished compiles, busy throughout.
        assert!((t3 - 2.0).abs() < 1e-9, "{t3}");
        assert!((t1 - 2.0).abs() < 1e-9, "{t1}");
        assert!(three.mean_job_secs(now).unwrap() > 2.5 * one.mean_job_secs(now).unwrap());
    }

    #[test]
    fn a_worker_finishing_a_compile_every_ten_seconds_is_measured() {
        // Busy throughout, one compile finished every 10 s: too few for the time per
        // compile's 20 s, enough over the 60 s throughput window.
        let mut t = PaceTracker::default();
        for i in 0..=60u32 {
            t.observe(&status(f64::from(i), u64::from(i / 10), 1));
        }
        let secs = t.busy_secs_per_compile(60_000_000).unwrap();
        assert!((secs - 10.0).abs() < 1e-9, "{secs}");
    }

    #[test]
    fn idle_time_is_not_counted_against_a_worker() {
        // Busy 10 s finishing 10 compiles, then idle 10 s: 1 s per compile, not 2.
        let mut t = PaceTracker::default();
        for i in 0..=10u32 {
            t.observe(&status(f64::from(i), u64::from(i), 1));
        }
        for i in 11..=20u32 {
            t.observe(&status(f64::from(i), 10, 0));
        }
        let secs = t.busy_secs_per_compile(20_000_000).unwrap();
        // Half of the gap where it went idle counts: 10.5 s for 10 compiles.
        assert!((secs - 1.05).abs() < 1e-9, "{secs}");
        assert_eq!(t.busy_secs_per_compile(20_000_001 + micros(HOLD)), None);
    }

    #[test]
    fn speed_share_weighs_only_clear_differences() {
        assert_eq!(speed_share(3, 1.0), 3);
        assert_eq!(speed_share(3, 1.9), 3, "job-mix noise: keep");
        assert_eq!(speed_share(3, 5.0), 1, "a fifth of 3, at least 1");
        assert_eq!(speed_share(16, 4.0), 4);
        assert_eq!(speed_share(3, 50.0), 1, "leaving out is slow_share's call");
        assert_eq!(speed_share(3, f64::NAN), 3);
        assert_eq!(slowness(Some(5.0), Some(1.0)), Some(5.0));
        assert_eq!(slowness(Some(5.0), None), None);
        assert_eq!(slowness(Some(5.0), Some(0.0)), None);
    }

    #[test]
    fn slow_share_cuts_only_clear_stragglers() {
        assert_eq!(
            slow_share(3, 5.0, 1.0),
            3,
            "five times: job-mix noise, keep"
        );
        assert_eq!(slow_share(3, 8.0, 1.0), 0, "eight times: out");
        assert_eq!(slow_share(16, 8.0, 1.0), 2);
        assert_eq!(slow_share(3, 50.0, 0.0), 3, "no baseline: keep");
        assert_eq!(slow_share(3, f64::NAN, 1.0), 3);
    }
}
