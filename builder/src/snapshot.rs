//! One worker's status as the builder uses it, read once: the figures every decision
//! needs (distccd's port, slots, unit state, stats) are derived here and nowhere else.

use distcc_proto::v1 as pb;

use crate::untrusted;

/// distccd's port when a worker does not say (it always does; old agents might not).
pub const DEFAULT_DISTCCD_PORT: u16 = 3632;

/// A worker's status (cleaned of control characters) with what is derived from it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSnapshot {
    status: pb::WorkerStatus,
    distccd_port: Result<u16, u32>,
    slots: u32,
}

impl WorkerSnapshot {
    /// From a status as a worker sent it: its strings are made printable first.
    pub fn new(status: pb::WorkerStatus) -> Self {
        let status = untrusted::cleaned(status);
        let distccd_port = match status.settings.as_ref().map_or(0, |s| s.port) {
            0 => Ok(DEFAULT_DISTCCD_PORT),
            port => u16::try_from(port).map_err(|_| port),
        };
        let slots = slots_of(&status);
        Self {
            status,
            distccd_port,
            slots,
        }
    }

    /// The status itself (for what only one caller reads).
    pub fn status(&self) -> &pb::WorkerStatus {
        &self.status
    }

    /// distccd's TCP port; `Err` with the number the worker reported when it is none.
    pub fn distccd_port(&self) -> Result<u16, u32> {
        self.distccd_port
    }

    /// A port to try distccd at: the reported one, or the default when it is no port
    /// (for routes and probes; the host list excludes such a worker).
    pub fn distccd_port_to_try(&self) -> u16 {
        self.distccd_port.unwrap_or(DEFAULT_DISTCCD_PORT)
    }

    /// Slots to use: distccd's own limit when known, else its job setting, else distccd's
    /// default (CPUs + 2); saturating, not capped (the host list caps).
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// systemd's ActiveState and SubState of distccd ("" when not said).
    pub fn unit_state(&self) -> (&str, &str) {
        self.status.unit.as_ref().map_or(("", ""), |u| {
            (u.active_state.as_str(), u.sub_state.as_str())
        })
    }

    /// distccd's statistics, when its stats page could be read.
    pub fn stats(&self) -> Option<&pb::DistccdStats> {
        self.status.stats.as_ref().filter(|s| s.available)
    }

    /// Compiles in flight (client connections open on distccd's port); 0 when unknown.
    pub fn jobs_running(&self) -> u32 {
        self.stats().map_or(0, |s| s.jobs_running)
    }

    /// distccd's listen address as configured ("" for all addresses).
    pub fn listen(&self) -> &str {
        self.status
            .settings
            .as_ref()
            .map_or("", |s| s.listen.as_str())
    }

    /// The allowlist distccd enforces: the effective one, else the configured one.
    pub fn allow(&self) -> &[String] {
        if self.status.effective_allow.is_empty() {
            self.status
                .settings
                .as_ref()
                .map_or(&[], |s| s.allow.as_slice())
        } else {
            &self.status.effective_allow
        }
    }

    pub fn compilers(&self) -> &[pb::Compiler] {
        &self.status.compilers
    }

    /// When the agent took the status, microseconds since the epoch (its clock).
    pub fn taken_at_usec(&self) -> u64 {
        self.status.taken_at_usec
    }
}

/// See [`WorkerSnapshot::slots`]. The worker's numbers saturate (a `max_kids` above
/// `u32::MAX` is `u32::MAX`, not its low bits).
fn slots_of(status: &pb::WorkerStatus) -> u32 {
    let stats_kids = status
        .stats
        .as_ref()
        .filter(|s| s.available)
        .map_or(0, |s| saturating_u32(s.max_kids));
    let jobs = status.settings.as_ref().map_or(0, |s| s.jobs);
    let cpus = status.capacity.as_ref().map_or(0, |c| c.online_cpus);
    [stats_kids, jobs, cpus.saturating_add(2)]
        .into_iter()
        .find(|n| *n > 0)
        .unwrap_or(0)
}

pub fn saturating_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn status(max_kids: u64, jobs: u32, cpus: u32, port: u32) -> pb::WorkerStatus {
        pb::WorkerStatus {
            settings: Some(pb::DistccdSettings {
                jobs,
                port,
                ..Default::default()
            }),
            capacity: Some(pb::Capacity {
                online_cpus: cpus,
                ..Default::default()
            }),
            stats: Some(pb::DistccdStats {
                available: max_kids > 0,
                max_kids,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn slots_prefer_distccd_then_jobs_then_cpus() {
        assert_eq!(WorkerSnapshot::new(status(6, 4, 2, 0)).slots(), 6);
        assert_eq!(WorkerSnapshot::new(status(0, 4, 2, 0)).slots(), 4);
        assert_eq!(WorkerSnapshot::new(status(0, 0, 2, 0)).slots(), 4);
    }

    #[test]
    fn slots_saturate_instead_of_wrapping() {
        // 2^32 + 3 kids is not 3 slots, u32::MAX CPUs + 2 does not overflow.
        let kids = WorkerSnapshot::new(status((1 << 32) + 3, 4, 2, 0));
        assert_eq!(kids.slots(), u32::MAX);
        assert_eq!(
            WorkerSnapshot::new(status(0, 0, u32::MAX, 0)).slots(),
            u32::MAX
        );
    }

    #[test]
    fn the_port_is_the_reported_one_else_the_default_and_never_truncated() {
        assert_eq!(
            WorkerSnapshot::new(status(0, 0, 2, 0)).distccd_port(),
            Ok(3632)
        );
        assert_eq!(
            WorkerSnapshot::new(status(0, 0, 2, 4000)).distccd_port(),
            Ok(4000)
        );
        let bad = WorkerSnapshot::new(status(0, 0, 2, 65536 + 22));
        assert_eq!(bad.distccd_port(), Err(65558));
        assert_eq!(bad.distccd_port_to_try(), 3632);
        assert_eq!(
            WorkerSnapshot::new(pb::WorkerStatus::default()).distccd_port(),
            Ok(3632)
        );
    }

    #[test]
    fn the_status_is_cleaned_once_built() {
        let mut raw = status(0, 0, 2, 0);
        raw.hostname = "w1\n\x1b[2J".into();
        assert_eq!(WorkerSnapshot::new(raw).status().hostname, "w1[2J");
    }
}
