//! Entry points of the fuzz targets in `fuzz/` (cargo-fuzz, nightly) and of the tests that
//! replay their seeds and regressions on stable (`tests/fuzz_regressions.rs`). Each takes
//! arbitrary bytes, must not panic, and panics when an invariant of what it parsed breaks
//! (libFuzzer reports a panic as a crash).

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use distcc_proto::v1 as pb;
use prost::Message;

use crate::cluster::{Probe, view};
use crate::config::{BuilderConfig, ConfigError};
use crate::host_list::{
    HostList, LocalCompiler, MAX_WORKER_SLOTS, Policy, WorkerInput, endpoint_host,
};
use crate::snapshot::WorkerSnapshot;
use crate::state_files;
use crate::untrusted::{cleaned, is_unsafe};
use distcc_config_file::ConfigFile;

/// Endpoints the fuzzed status is judged for: by address, loopback, by name, IPv6.
const ENDPOINTS: [&str; 4] = [
    "198.18.0.11:3634",
    "127.0.0.1:3634",
    "w1.example:3634",
    "[fd00::11]:3634",
];

/// A `WorkerStatus` as any worker could send it: prost-decode, then the host list and the
/// status row, as the builder computes them for each kind of endpoint and policy. Checks:
/// the hosts file has only comment lines and one host line, no control characters; an
/// included worker is written with the endpoint's own host (never an address the worker
/// names), a port and 1..=[`MAX_WORKER_SLOTS`] slots; slot totals do not overflow.
pub fn host_list_from_status_bytes(data: &[u8]) {
    let Ok(status) = pb::WorkerStatus::decode(data) else {
        return;
    };
    let local = [LocalCompiler {
        name: "gcc".into(),
        version: "gcc (Debian 12.2.0-14) 12.2.0".into(),
        target: "x86_64-linux-gnu".into(),
        fingerprint: "a".repeat(64),
    }];
    // Raw and already cleaned: a snapshot cleans either way.
    let clean = cleaned(status.clone());
    for status in [status, clean] {
        let snapshot = WorkerSnapshot::new(status);
        for (allow_mismatch, local_slots) in [(false, 2), (true, u32::MAX)] {
            let policy = Policy {
                allow_mismatch,
                local_slots,
                lzo: true,
            };
            let builder_addr: Option<IpAddr> = "198.18.0.1".parse().ok();
            let inputs: Vec<WorkerInput<'_>> = ENDPOINTS
                .iter()
                .map(|endpoint| WorkerInput {
                    endpoint,
                    status: Ok(&snapshot),
                    builder_addr,
                    mean_job_secs: Some(1.0),
                    busy_secs_per_compile: Some(1.0),
                    agent_away: None,
                })
                .collect();
            let list = HostList::compute(&inputs, &local, &policy);
            check_host_list(&list);
            let probe = Probe {
                endpoint: ENDPOINTS[0].to_owned(),
                status: Ok(snapshot.clone()),
                latency: Duration::ZERO,
                builder_addr,
            };
            let _ = view(&probe, list.verdict(ENDPOINTS[0]));
        }
    }
}

fn check_host_list(list: &HostList) {
    for (worker, endpoint) in list.workers.iter().zip(ENDPOINTS) {
        assert_eq!(
            worker.entry().is_some(),
            worker.exclusion().is_none(),
            "{worker:?}"
        );
        if let Some(entry) = worker.entry() {
            assert_eq!(entry.host, endpoint_host(endpoint), "{worker:?}");
            assert!(entry.port != 0, "{worker:?}");
            assert!((1..=MAX_WORKER_SLOTS).contains(&entry.slots), "{worker:?}");
        }
    }
    let expected_remote = list
        .included()
        .map(|e| u64::from(e.slots))
        .sum::<u64>()
        .min(u64::from(u32::MAX));
    assert_eq!(u64::from(list.remote_slots()), expected_remote);
    assert!(list.total_slots() >= list.remote_slots());
    let text = list.render();
    assert!(
        !text.chars().any(|c| c != '\n' && is_unsafe(c)),
        "control character in {text:?}"
    );
    let host_lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(host_lines.len(), 1, "{text:?}");
    let expected: Vec<String> = list
        .included()
        .map(|e| e.render())
        .chain((list.local_slots > 0).then(|| format!("localhost/{}", list.local_slots)))
        .collect();
    assert_eq!(host_lines[0], expected.join(" "), "{text:?}");
    let explained = list.explain();
    assert!(
        !explained.chars().any(|c| c != '\n' && is_unsafe(c)),
        "control character in {explained:?}"
    );
}

/// A distcc state file (`binstate_PID`) of any content: parsed without panic; a parsed
/// task's names carry no control characters and fit distcc's 128-byte fields. (The
/// directory walk around it, [`state_files::read_states`], does file I/O per call, which
/// would slow fuzzing a hundredfold; its unit tests cover it.)
pub fn state_file(data: &[u8]) {
    if let Some(task) = state_files::parse(data) {
        for name in [&task.file, &task.host] {
            assert!(!name.chars().any(is_unsafe), "{task:?}");
            // Lossy UTF-8 can turn one byte into three (U+FFFD).
            assert!(name.len() <= 3 * 128, "{task:?}");
        }
        let _ = task.phase.name();
    }
}

/// `builder.toml` text of any content, with the files it names read as a fixed token (no
/// filesystem): parses or fails with an error naming a line inside the text; what parses
/// honours every documented bound.
pub fn builder_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let read = |_: &Path| Ok(b"0123456789abcdef0123\n".to_vec());
    let file = ConfigFile::new(Path::new("builder.toml"), text);
    match BuilderConfig::parse(&file, read) {
        Ok(config) => {
            for worker in &config.workers {
                let (host, port) = worker.rsplit_once(':').expect("checked host:port");
                assert!(!host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
            }
            assert!(
                (Duration::from_millis(50)..=Duration::from_secs(60)).contains(&config.deadline)
            );
            assert!(config.local_slots <= 256);
            // Tokens are read lazily, by the commands that use them.
            assert!(!config.token_file.path.as_os_str().is_empty());
        }
        Err(ConfigError::Invalid { line, message, .. }) => {
            assert!(line >= 1 && line <= text.lines().count() + 1, "line {line}");
            assert!(!message.is_empty());
        }
        Err(ConfigError::Read { .. }) => unreachable!("the text is given"),
    }
}
