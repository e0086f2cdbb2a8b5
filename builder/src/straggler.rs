//! Stragglers at the end of a build: a compile still running on a slow worker while
//! faster slots stand idle is redone here rather than waited for.
//!
//! Weighted slots ([`crate::pace::speed_share`]) give a slow worker fewer compiles, but
//! distcc's client fills slot 0 of every host before slot 1 of any, so the slow worker
//! still takes one of the last compiles of a build, and a big one there can hold the
//! whole build for several times its length. At that point the faster workers have free
//! slots (the build is running out of work). Aborting that compile's connection makes
//! the distcc client compile it locally at once (`DISTCC_FALLBACK`, on by default), as for
//! a lost worker ([`crate::failover`]): the client writes the object only after a whole
//! result arrived, so the output stays correct, and the work lost is the slow worker's.
//!
//! Pure: [`Stragglers::observe`] takes the workers' loads and this machine's connections
//! to them, and says which connections to abort. Connection ages are counted from the
//! first listing that showed them (a tick, 1 s, of resolution).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::failover::CutScope;
use crate::pace::{WEIGH_FROM, median};

/// A worker counts as slow here from the same slowness that weighs its slots.
pub const STRAGGLER_SLOWNESS: f64 = WEIGH_FROM;
/// No compile younger than this is redone: most finish sooner anyway.
pub const MIN_AGE: Duration = Duration::from_secs(5);
/// Nor one younger than this many times the fast workers' mean time per compile.
pub const AGE_FACTOR: f64 = 3.0;

/// One worker in the host list, as the straggler watch sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerLoad {
    pub endpoint: String,
    pub distccd: SocketAddr,
    /// Slots the host list gives it.
    pub slots: u32,
    /// Its busy seconds per compile over the other workers' median
    /// ([`crate::pace::slowness`]); None when not measured.
    pub slowness: Option<f64>,
    /// Mean seconds a compile spends there ([`crate::pace`]).
    pub mean_job_secs: Option<f64>,
}

impl WorkerLoad {
    fn is_slow(&self) -> bool {
        is_slow(self.slowness)
    }
}

/// Whether a worker this many times slower than the others ([`crate::pace::slowness`])
/// counts as slow here.
pub fn is_slow(slowness: Option<f64>) -> bool {
    slowness.is_some_and(|s| s >= STRAGGLER_SLOWNESS)
}

/// An established TCP connection of this network namespace, as `ss -e` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Connection {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub uid: u32,
}

/// A compile to redo: abort `connection` to the worker `endpoint`.
#[derive(Debug, Clone, PartialEq)]
pub struct Redo {
    pub endpoint: String,
    pub connection: Connection,
    /// How long it has run there.
    pub age: Duration,
    pub slowness: f64,
}

/// Connection ages, and the connections already aborted (not asked for twice).
#[derive(Debug, Default)]
pub struct Stragglers {
    first_seen: HashMap<(SocketAddr, SocketAddr), Instant>,
    redone: HashSet<(SocketAddr, SocketAddr)>,
}

impl Stragglers {
    /// Whether listing connections can lead anywhere: some worker in the list is slow.
    pub fn worth_listing(workers: &[WorkerLoad]) -> bool {
        workers.iter().any(WorkerLoad::is_slow)
    }

    /// One tick: the connections listed `now`; returns those to abort, oldest first, at
    /// most as many as the faster workers have idle slots, each only once.
    pub fn observe(
        &mut self,
        now: Instant,
        workers: &[WorkerLoad],
        connections: &[Connection],
        scope: &CutScope,
    ) -> Vec<Redo> {
        let listed: HashSet<(SocketAddr, SocketAddr)> =
            connections.iter().map(|c| (c.local, c.peer)).collect();
        self.first_seen.retain(|key, _| listed.contains(key));
        self.redone.retain(|key| listed.contains(key));
        for key in &listed {
            self.first_seen.entry(*key).or_insert(now);
        }
        fn on<'c>(
            w: &WorkerLoad,
            connections: &'c [Connection],
        ) -> impl Iterator<Item = &'c Connection> {
            let peer = w.distccd;
            connections.iter().filter(move |c| c.peer == peer)
        }
        let fast: Vec<&WorkerLoad> = workers.iter().filter(|w| !w.is_slow()).collect();
        let idle: usize = fast
            .iter()
            .map(|w| {
                usize::try_from(w.slots)
                    .unwrap_or(0)
                    .saturating_sub(on(w, connections).count())
            })
            .sum();
        if idle == 0 {
            return Vec::new();
        }
        let mut typical: Vec<f64> = fast.iter().filter_map(|w| w.mean_job_secs).collect();
        let bound = median(&mut typical)
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(MIN_AGE, |s| {
                MIN_AGE.max(Duration::from_secs_f64(s * AGE_FACTOR))
            });
        let mut redo: Vec<Redo> = workers
            .iter()
            .filter(|w| w.is_slow())
            .flat_map(|w| on(w, connections).map(move |c| (w, c)))
            .filter(|(_, c)| match scope {
                CutScope::All => true,
                CutScope::OwnedBy(uids) => uids.contains(&c.uid),
            })
            .filter(|(_, c)| !self.redone.contains(&(c.local, c.peer)))
            .filter_map(|(w, c)| {
                let age = now.saturating_duration_since(*self.first_seen.get(&(c.local, c.peer))?);
                (age >= bound).then(|| Redo {
                    endpoint: w.endpoint.clone(),
                    connection: *c,
                    age,
                    slowness: w.slowness.unwrap_or(f64::NAN),
                })
            })
            .collect();
        redo.sort_by_key(|r| std::cmp::Reverse(r.age));
        redo.truncate(idle);
        for r in &redo {
            self.redone.insert((r.connection.local, r.connection.peer));
        }
        redo
    }
}

/// The established connections in `ss -H -n -t -e` output (no state filter: the first
/// column is the state, then Recv-Q, Send-Q, local, peer; `uid:N` names the owner, left
/// out for uid 0).
pub fn parse_connections(text: &str) -> Vec<Connection> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.first() != Some(&"ESTAB") {
                return None;
            }
            let local = fields.get(3)?.parse().ok()?;
            let peer = fields.get(4)?.parse().ok()?;
            let uid = fields
                .iter()
                .find_map(|f| f.strip_prefix("uid:"))
                .map_or(Some(0), |n| n.parse().ok())?;
            Some(Connection { local, peer, uid })
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn worker(n: u8, slots: u32, slowness: Option<f64>) -> WorkerLoad {
        WorkerLoad {
            endpoint: format!("198.18.3.1{n}:3634"),
            distccd: format!("198.18.3.1{n}:3632").parse().unwrap(),
            slots,
            slowness,
            mean_job_secs: Some(1.0),
        }
    }

    fn conn(to: u8, port: u16, uid: u32) -> Connection {
        Connection {
            local: format!("198.18.3.1:{port}").parse().unwrap(),
            peer: format!("198.18.3.1{to}:3632").parse().unwrap(),
            uid,
        }
    }

    #[test]
    fn a_long_compile_on_a_slow_worker_is_redone_once_fast_slots_are_idle() {
        let workers = [
            worker(1, 3, Some(0.9)),
            worker(2, 3, Some(1.0)),
            worker(3, 1, Some(5.0)),
        ];
        let t0 = Instant::now();
        let mut s = Stragglers::default();
        // Fast workers full: nothing, however old.
        let full: Vec<Connection> = (0..3)
            .map(|i| conn(1, 40000 + i, 0))
            .chain((0..3).map(|i| conn(2, 40010 + i, 0)))
            .chain([conn(3, 40020, 0)])
            .collect();
        assert!(s.observe(t0, &workers, &full, &CutScope::All).is_empty());
        let later = t0 + Duration::from_secs(30);
        assert!(s.observe(later, &workers, &full, &CutScope::All).is_empty());
        // The build runs out of work: w1 idle. The w3 compile is 31 s old: redone.
        let tail = [conn(2, 40010, 0), conn(3, 40020, 0)];
        let redo = s.observe(
            later + Duration::from_secs(1),
            &workers,
            &tail,
            &CutScope::All,
        );
        assert_eq!(redo.len(), 1);
        assert_eq!(redo[0].endpoint, "198.18.3.13:3634");
        assert_eq!(redo[0].connection, conn(3, 40020, 0));
        assert_eq!(redo[0].age, Duration::from_secs(31));
        // Asked once: not again while it is still listed.
        let again = s.observe(
            later + Duration::from_secs(2),
            &workers,
            &tail,
            &CutScope::All,
        );
        assert!(again.is_empty());
    }

    #[test]
    fn young_compiles_fast_workers_and_other_owners_are_left_alone() {
        let workers = [worker(1, 3, None), worker(3, 3, Some(4.0))];
        let t0 = Instant::now();
        let mut s = Stragglers::default();
        let conns = [
            conn(1, 40000, 1000),
            conn(3, 40001, 1000),
            conn(3, 40002, 2000),
        ];
        assert!(s.observe(t0, &workers, &conns, &CutScope::All).is_empty());
        // 4 s: younger than MIN_AGE.
        let t4 = t0 + Duration::from_secs(4);
        assert!(s.observe(t4, &workers, &conns, &CutScope::All).is_empty());
        // 6 s, only uid 2000's sessions asked: only its compile.
        let only = CutScope::OwnedBy(BTreeSet::from([2000]));
        let redo = s.observe(t0 + Duration::from_secs(6), &workers, &conns, &only);
        assert_eq!(
            redo.iter().map(|r| r.connection).collect::<Vec<_>>(),
            [conn(3, 40002, 2000)]
        );
    }

    #[test]
    fn the_age_bound_follows_the_fast_workers_compile_time_and_idle_slots_cap_it() {
        let mut fast = worker(1, 2, Some(1.0));
        fast.mean_job_secs = Some(4.0);
        let workers = [fast, worker(3, 3, Some(3.0))];
        let t0 = Instant::now();
        let mut s = Stragglers::default();
        let conns = [conn(3, 40001, 0), conn(3, 40002, 0), conn(3, 40003, 0)];
        s.observe(t0, &workers, &conns, &CutScope::All);
        // 4 s per compile on the fast worker: 12 s before a redo.
        let t11 = t0 + Duration::from_secs(11);
        assert!(s.observe(t11, &workers, &conns, &CutScope::All).is_empty());
        // Two idle slots on w1: two of the three redone.
        let t12 = t0 + Duration::from_secs(12);
        assert_eq!(s.observe(t12, &workers, &conns, &CutScope::All).len(), 2);
        // The connections that ended are forgotten.
        s.observe(t12, &workers, &[], &CutScope::All);
        assert!(s.first_seen.is_empty() && s.redone.is_empty());
    }

    #[test]
    fn nothing_to_list_without_a_slow_worker() {
        assert!(!Stragglers::worth_listing(&[
            worker(1, 3, Some(1.9)),
            worker(2, 3, None)
        ]));
        assert!(Stragglers::worth_listing(&[worker(1, 3, Some(2.0))]));
    }

    #[test]
    fn ss_lines_parse_into_established_connections() {
        let text = "ESTAB 0 0 198.18.3.1:40020 198.18.3.13:3632 uid:1000 ino:5 sk:1\n\
                    ESTAB 0 0 198.18.3.1:40021 198.18.3.13:3632 ino:6 sk:2\n\
                    SYN-SENT 0 1 198.18.3.1:40022 198.18.3.13:3632 uid:1000\n\
                    garbage\n";
        assert_eq!(
            parse_connections(text),
            [conn(3, 40020, 1000), conn(3, 40021, 0)]
        );
    }
}
