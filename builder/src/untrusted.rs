//! What a worker says is not trusted: its strings are made printable before they reach a
//! terminal (escape sequences could rewrite the screen or hide a row) or a hosts file (a
//! newline in an excluded worker's reason would start a host line of the worker's choice).
//!
//! [`clean_status`] is applied where a `WorkerStatus` enters the builder (every Status and
//! WatchStatus answer); [`printable`] to every other agent string (gRPC error messages,
//! Validate checks, Control steps). [`clean_status`] destructures every message
//! exhaustively, so a field added to the proto does not compile until it is considered.

use std::borrow::Cow;

use distcc_proto::v1 as pb;

/// True for characters that must not reach a terminal or a hosts file: C0 and C1 controls
/// (newline, carriage return, escape, DEL...) and the Unicode bidirectional overrides,
/// which reorder what a terminal shows ("Trojan Source").
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` without the characters of [`is_unsafe`]; borrowed when there were none.
pub fn printable(text: &str) -> Cow<'_, str> {
    if text.chars().any(is_unsafe) {
        Cow::Owned(text.chars().filter(|c| !is_unsafe(*c)).collect())
    } else {
        Cow::Borrowed(text)
    }
}

/// Strip [`is_unsafe`] characters from `text` in place.
pub fn clean(text: &mut String) {
    if text.chars().any(is_unsafe) {
        text.retain(|c| !is_unsafe(c));
    }
}

/// Every string a worker's status carries, cleaned in place. Map keys of the stats values
/// are rebuilt cleaned (two keys that differ only by control characters keep the last).
pub fn clean_status(status: &mut pb::WorkerStatus) {
    let pb::WorkerStatus {
        hostname,
        agent_version,
        unit,
        settings,
        capacity,
        stats,
        compilers,
        distcc_version,
        taken_at_usec: _,
        effective_allow,
        settings_generation: _,
        runtime,
    } = status;
    if let Some(pb::RuntimeSettings {
        pid: _,
        argv,
        drift,
        error,
    }) = runtime
    {
        argv.iter_mut().chain(drift.iter_mut()).for_each(clean);
        clean(error);
    }
    clean(hostname);
    clean(agent_version);
    clean(distcc_version);
    effective_allow.iter_mut().for_each(clean);
    if let Some(pb::UnitState {
        load_state,
        active_state,
        sub_state,
        main_pid: _,
        state_since_usec: _,
        unit_file_state,
        n_restarts: _,
        result,
    }) = unit
    {
        for text in [load_state, active_state, sub_state, unit_file_state, result] {
            clean(text);
        }
    }
    if let Some(pb::DistccdSettings {
        allow,
        jobs: _,
        nice: _,
        listen,
        port: _,
        stats: _,
        stats_port: _,
        job_lifetime_secs: _,
    }) = settings
    {
        allow.iter_mut().for_each(clean);
        clean(listen);
    }
    if let Some(pb::Capacity {
        online_cpus: _,
        load1: _,
        load5: _,
        load15: _,
        mem_total_bytes: _,
        mem_available_bytes: _,
        tmpdir,
        tmpdir_free_bytes: _,
    }) = capacity
    {
        clean(tmpdir);
    }
    if let Some(pb::DistccdStats {
        available: _,
        error,
        values,
        compile_ok: _,
        compile_error: _,
        compile_timeout: _,
        tcp_accept: _,
        rej_overload: _,
        current_load: _,
        max_kids: _,
        longest_job,
        free_space_mb: _,
        jobs_running: _,
    }) = stats
    {
        clean(error);
        clean(longest_job);
        if values.keys().any(|k| k.chars().any(is_unsafe)) {
            *values = std::mem::take(values)
                .into_iter()
                .map(|(k, v)| (printable(&k).into_owned(), v))
                .collect();
        }
    }
    for pb::Compiler {
        name,
        path,
        version,
        target,
        fingerprint,
        error,
    } in compilers
    {
        for text in [name, path, version, target, fingerprint, error] {
            clean(text);
        }
    }
}

/// The status with [`clean_status`] applied.
pub fn cleaned(mut status: pb::WorkerStatus) -> pb::WorkerStatus {
    clean_status(&mut status);
    status
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const HOSTILE: &str = "w1\n198.6.6.6:3632/64\x1b[2J\r\u{7f}\u{9b}31m\u{202e}";

    #[test]
    fn control_characters_and_bidi_overrides_are_stripped() {
        assert_eq!(printable(HOSTILE), "w1198.6.6.6:3632/64[2J31m");
        assert!(matches!(
            printable("gcc (Debian 12.2.0-14) 12.2.0"),
            Cow::Borrowed(_)
        ));
        // Ordinary non-ASCII text stays.
        assert_eq!(printable("bäcker-ü"), "bäcker-ü");
        let mut text = "a\tb\u{0}c".to_owned();
        clean(&mut text);
        assert_eq!(text, "abc");
    }

    /// A status whose every string field holds [`HOSTILE`]. When the proto grows a field,
    /// `clean_status`'s exhaustive destructuring stops compiling until the field is
    /// considered there (and added here).
    #[test]
    fn every_string_field_is_cleaned() {
        let h = || HOSTILE.to_owned();
        let status = pb::WorkerStatus {
            hostname: h(),
            agent_version: h(),
            unit: Some(pb::UnitState {
                load_state: h(),
                active_state: h(),
                sub_state: h(),
                unit_file_state: h(),
                result: h(),
                ..Default::default()
            }),
            settings: Some(pb::DistccdSettings {
                allow: vec![h(), h()],
                listen: h(),
                ..Default::default()
            }),
            capacity: Some(pb::Capacity {
                tmpdir: h(),
                ..Default::default()
            }),
            stats: Some(pb::DistccdStats {
                error: h(),
                longest_job: h(),
                values: [(h(), 1.0)].into_iter().collect(),
                ..Default::default()
            }),
            compilers: vec![pb::Compiler {
                name: h(),
                path: h(),
                version: h(),
                target: h(),
                fingerprint: h(),
                error: h(),
            }],
            distcc_version: h(),
            taken_at_usec: 7,
            effective_allow: vec![h()],
            settings_generation: 3,
            runtime: Some(pb::RuntimeSettings {
                pid: 1,
                argv: vec![h()],
                drift: vec![h()],
                error: h(),
            }),
        };
        let debug = format!("{:?}", cleaned(status));
        // Debug escapes control characters as \n, \u{1b}...: none may be left.
        for bad in ["\\n", "\\r", "\\u{1b}", "\\u{7f}", "\\u{9b}", "\\u{202e}"] {
            assert!(!debug.contains(bad), "{bad} left in {debug}");
        }
        assert_eq!(
            debug.matches("198.6.6.6:3632/64[2J31m").count(),
            25,
            "{debug}"
        );
    }
}
