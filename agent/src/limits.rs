//! The `[limits]` table of agent.toml: every bound on what clients may hold or cost the
//! agent (connections, streams, handshake and request time, idle connections, WatchStatus
//! subscribers and their interval, request size).
//!
//! Each key is a validated newtype with a floor and a ceiling, and a default; a value
//! outside its range is an error naming file, line and key (config.rs). Pure: no I/O.

use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::settings::bounded_setting;

/// File descriptors the agent needs besides client connections (D-Bus, the listener,
/// distccd's stats page, /proc reads, journal, compilers run for Status): the headroom
/// `LimitNOFILE=` must leave above `max_connections`.
pub const RESERVED_FDS: u64 = 128;

/// The validated bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Accepted TCP connections held at once (TLS handshakes included); a connection past
    /// it is closed as soon as it is accepted.
    pub max_connections: usize,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS on every connection.
    pub max_streams_per_connection: u32,
    /// A TLS handshake not finished by then is dropped.
    pub tls_handshake_timeout: Duration,
    /// Bound on every unary RPC (Configure's restart and rollback included); streams
    /// are bounded by `idle_timeout` and keepalive instead.
    pub request_timeout: Duration,
    /// A connection that sends nothing for this long is closed (before or after the
    /// HTTP/2 handshake). Live clients answer the keepalive pings, so they never are.
    pub idle_timeout: Duration,
    /// The agent pings every connection this often...
    pub keepalive_interval: Duration,
    /// ...and closes it when the ping is not answered within this.
    pub keepalive_timeout: Duration,
    /// WatchStatus streams open at once, over all clients.
    pub max_watch_streams: usize,
    /// Range of WatchStatus's `interval_ms` (0 means the configured status interval).
    pub watch_interval_min: Duration,
    pub watch_interval_max: Duration,
    /// Largest request message accepted (gRPC `max_decoding_message_size`).
    pub max_request_bytes: usize,
}

bounded_setting!(
    /// `max_connections`.
    MaxConnections(u32) in 1..=1_048_576
);
bounded_setting!(
    /// `max_streams_per_connection`.
    StreamsPerConnection(u32) in 1..=1024
);
bounded_setting!(
    /// `tls_handshake_timeout_secs`.
    HandshakeSecs(u32) in 1..=300
);
bounded_setting!(
    /// `request_timeout_secs`, `keepalive_interval_secs`, `keepalive_timeout_secs`.
    TimeoutSecs(u32) in 1..=3600
);
bounded_setting!(
    /// `idle_timeout_secs`.
    IdleSecs(u32) in 2..=86_400
);
bounded_setting!(
    /// `max_watch_streams`.
    WatchStreams(u32) in 1..=65_536
);
bounded_setting!(
    /// `watch_interval_min_ms`, `watch_interval_max_ms`.
    IntervalMs(u32) in 100..=3_600_000
);
bounded_setting!(
    /// `max_request_bytes`.
    RequestBytes(u32) in 1024..=16_777_216
);

// The default must fit `LimitNOFILE=` in systemd/distcc-agent.service with RESERVED_FDS.
const DEFAULT_MAX_CONNECTIONS: u32 = 2048;
const DEFAULT_STREAMS_PER_CONNECTION: u32 = 32;
const DEFAULT_HANDSHAKE_SECS: u32 = 10;
// Configure may wait for a restart and a rollback restart (job_timeout_secs each).
const DEFAULT_REQUEST_TIMEOUT_SECS: u32 = 120;
const DEFAULT_IDLE_SECS: u32 = 60;
const DEFAULT_KEEPALIVE_INTERVAL_SECS: u32 = 20;
const DEFAULT_KEEPALIVE_TIMEOUT_SECS: u32 = 10;
const DEFAULT_WATCH_STREAMS: u32 = 256;
// builderctl enter watches every 1 s; each update costs a Status (about 1 ms of CPU).
const DEFAULT_WATCH_INTERVAL_MIN_MS: u32 = 1000;
// A stream that waits for changes only asks for a long interval (tests use 10 minutes).
const DEFAULT_WATCH_INTERVAL_MAX_MS: u32 = 3_600_000;
// The largest legitimate request is a Configure with a long allowlist: a few KiB.
const DEFAULT_REQUEST_BYTES: u32 = 65_536;

/// `[limits]` as written: each value already within its range (serde checks it where the
/// value is, so the error names its line and key).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    max_connections: Option<MaxConnections>,
    max_streams_per_connection: Option<StreamsPerConnection>,
    tls_handshake_timeout_secs: Option<HandshakeSecs>,
    request_timeout_secs: Option<TimeoutSecs>,
    idle_timeout_secs: Option<IdleSecs>,
    keepalive_interval_secs: Option<TimeoutSecs>,
    keepalive_timeout_secs: Option<TimeoutSecs>,
    max_watch_streams: Option<WatchStreams>,
    watch_interval_min_ms: Option<IntervalMs>,
    watch_interval_max_ms: Option<IntervalMs>,
    max_request_bytes: Option<RequestBytes>,
}

/// Values of `[limits]` that contradict each other; `key` is the one to change.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("limits.{key}: {message}")]
pub struct LimitsError {
    pub key: &'static str,
    pub message: String,
}

/// Why a WatchStatus `interval_ms` was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("interval_ms: {requested} is outside {min}..={max} (0: the agent's status interval)")]
pub struct IntervalError {
    pub requested: u32,
    pub min: u128,
    pub max: u128,
}

impl Default for Limits {
    fn default() -> Self {
        Self::from_raw(&RawLimits::default()).expect("the defaults agree with each other")
    }
}

impl Limits {
    /// Defaults for what is not written, then the checks across keys: the keepalive must
    /// settle before the idle timeout cuts a live client, and the watch interval range
    /// must not be inverted.
    pub fn from_raw(raw: &RawLimits) -> Result<Self, LimitsError> {
        let secs = |v: u32| Duration::from_secs(u64::from(v));
        let millis = |v: u32| Duration::from_millis(u64::from(v));
        let count = |v: u32| usize::try_from(v).unwrap_or(usize::MAX);

        let idle = raw
            .idle_timeout_secs
            .map_or(DEFAULT_IDLE_SECS, IdleSecs::get);
        let interval = raw
            .keepalive_interval_secs
            .map_or(DEFAULT_KEEPALIVE_INTERVAL_SECS, TimeoutSecs::get);
        let timeout = raw
            .keepalive_timeout_secs
            .map_or(DEFAULT_KEEPALIVE_TIMEOUT_SECS, TimeoutSecs::get);
        if u64::from(interval) + u64::from(timeout) >= u64::from(idle) {
            return Err(LimitsError {
                key: "idle_timeout_secs",
                message: format!(
                    "{idle} must exceed keepalive_interval_secs + keepalive_timeout_secs ({}): \
                     a live client only sends when pinged",
                    u64::from(interval) + u64::from(timeout)
                ),
            });
        }
        let watch_min = raw
            .watch_interval_min_ms
            .map_or(DEFAULT_WATCH_INTERVAL_MIN_MS, IntervalMs::get);
        let watch_max = raw
            .watch_interval_max_ms
            .map_or(DEFAULT_WATCH_INTERVAL_MAX_MS, IntervalMs::get);
        if watch_min > watch_max {
            return Err(LimitsError {
                key: "watch_interval_max_ms",
                message: format!("{watch_max} is below watch_interval_min_ms ({watch_min})"),
            });
        }
        Ok(Self {
            max_connections: count(
                raw.max_connections
                    .map_or(DEFAULT_MAX_CONNECTIONS, MaxConnections::get),
            ),
            max_streams_per_connection: raw
                .max_streams_per_connection
                .map_or(DEFAULT_STREAMS_PER_CONNECTION, StreamsPerConnection::get),
            tls_handshake_timeout: secs(
                raw.tls_handshake_timeout_secs
                    .map_or(DEFAULT_HANDSHAKE_SECS, HandshakeSecs::get),
            ),
            request_timeout: secs(
                raw.request_timeout_secs
                    .map_or(DEFAULT_REQUEST_TIMEOUT_SECS, TimeoutSecs::get),
            ),
            idle_timeout: secs(idle),
            keepalive_interval: secs(interval),
            keepalive_timeout: secs(timeout),
            max_watch_streams: count(
                raw.max_watch_streams
                    .map_or(DEFAULT_WATCH_STREAMS, WatchStreams::get),
            ),
            watch_interval_min: millis(watch_min),
            watch_interval_max: millis(watch_max),
            max_request_bytes: count(
                raw.max_request_bytes
                    .map_or(DEFAULT_REQUEST_BYTES, RequestBytes::get),
            ),
        })
    }

    /// The interval a WatchStatus stream gets for `interval_ms`: 0 is `default` (the
    /// configured status interval, clamped into the range), anything else must lie in
    /// `watch_interval_min..=watch_interval_max`.
    pub fn watch_interval(
        &self,
        interval_ms: u32,
        default: Duration,
    ) -> Result<Duration, IntervalError> {
        if interval_ms == 0 {
            return Ok(default.clamp(self.watch_interval_min, self.watch_interval_max));
        }
        let requested = Duration::from_millis(u64::from(interval_ms));
        if requested < self.watch_interval_min || requested > self.watch_interval_max {
            return Err(IntervalError {
                requested: interval_ms,
                min: self.watch_interval_min.as_millis(),
                max: self.watch_interval_max.as_millis(),
            });
        }
        Ok(requested)
    }

    /// The connection cap that fits a file-descriptor limit of `nofile` (RLIMIT_NOFILE's
    /// soft value), keeping [`RESERVED_FDS`] for the agent's own use.
    pub fn connections_within(&self, nofile: u64) -> usize {
        let room = usize::try_from(nofile.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
        self.max_connections.min(room.max(1))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Limits, String> {
        let raw: RawLimits = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        Limits::from_raw(&raw).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let limits = Limits::default();
        assert_eq!(limits.max_connections, 2048);
        assert_eq!(limits.max_streams_per_connection, 32);
        assert_eq!(limits.tls_handshake_timeout, Duration::from_secs(10));
        assert_eq!(limits.request_timeout, Duration::from_secs(120));
        assert_eq!(limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(limits.keepalive_interval, Duration::from_secs(20));
        assert_eq!(limits.keepalive_timeout, Duration::from_secs(10));
        assert_eq!(limits.max_watch_streams, 256);
        assert_eq!(limits.watch_interval_min, Duration::from_millis(1000));
        assert_eq!(limits.watch_interval_max, Duration::from_secs(3600));
        assert_eq!(limits.max_request_bytes, 65536);
        assert_eq!(parse("").unwrap(), limits);
    }

    #[test]
    fn every_key_is_read() {
        let limits = parse(
            "max_connections = 4096\nmax_streams_per_connection = 8\n\
             tls_handshake_timeout_secs = 5\nrequest_timeout_secs = 30\nidle_timeout_secs = 90\n\
             keepalive_interval_secs = 30\nkeepalive_timeout_secs = 20\nmax_watch_streams = 512\n\
             watch_interval_min_ms = 500\nwatch_interval_max_ms = 60000\nmax_request_bytes = 131072\n",
        )
        .unwrap();
        assert_eq!(limits.max_connections, 4096);
        assert_eq!(limits.max_streams_per_connection, 8);
        assert_eq!(limits.tls_handshake_timeout, Duration::from_secs(5));
        assert_eq!(limits.request_timeout, Duration::from_secs(30));
        assert_eq!(limits.idle_timeout, Duration::from_secs(90));
        assert_eq!(limits.keepalive_interval, Duration::from_secs(30));
        assert_eq!(limits.keepalive_timeout, Duration::from_secs(20));
        assert_eq!(limits.max_watch_streams, 512);
        assert_eq!(limits.watch_interval_min, Duration::from_millis(500));
        assert_eq!(limits.watch_interval_max, Duration::from_secs(60));
        assert_eq!(limits.max_request_bytes, 131072);
    }

    #[test]
    fn out_of_range_is_refused() {
        for text in [
            "max_connections = 0",
            "max_connections = -5",
            "max_watch_streams = 100000",
            "watch_interval_min_ms = 10",
            "max_request_bytes = 12",
            "request_timeout_secs = 0",
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains("is outside"), "{text}: {err}");
        }
    }

    #[test]
    fn idle_timeout_must_outlast_the_keepalive() {
        let err = parse("idle_timeout_secs = 30\nkeepalive_interval_secs = 20\n").unwrap_err();
        assert!(err.starts_with("limits.idle_timeout_secs: "), "{err}");
        assert!(err.contains("keepalive"), "{err}");
        parse("idle_timeout_secs = 31\nkeepalive_interval_secs = 20\n").unwrap();
    }

    #[test]
    fn inverted_watch_range_is_refused() {
        let err =
            parse("watch_interval_min_ms = 5000\nwatch_interval_max_ms = 4000\n").unwrap_err();
        assert!(err.starts_with("limits.watch_interval_max_ms: "), "{err}");
    }

    #[test]
    fn unknown_key_is_refused() {
        assert!(toml::from_str::<RawLimits>("max_conections = 3").is_err());
    }

    #[test]
    fn watch_interval_has_a_floor_and_a_ceiling() {
        let limits = Limits::default();
        let default = Duration::from_secs(10);
        assert_eq!(limits.watch_interval(0, default), Ok(default));
        assert_eq!(
            limits.watch_interval(1000, default),
            Ok(Duration::from_secs(1))
        );
        assert_eq!(
            limits.watch_interval(3_600_000, default),
            Ok(Duration::from_secs(3600))
        );
        for refused in [1, 999, 3_600_001, u32::MAX] {
            let err = limits.watch_interval(refused, default).unwrap_err();
            assert!(err.to_string().starts_with("interval_ms: "), "{err}");
        }
        // The configured default is kept inside the range too.
        assert_eq!(
            limits.watch_interval(0, Duration::from_millis(500)),
            Ok(Duration::from_secs(1))
        );
    }

    #[test]
    fn connection_cap_fits_the_descriptor_limit() {
        let limits = Limits::default();
        assert_eq!(limits.connections_within(8192), 2048);
        assert_eq!(limits.connections_within(1024), 1024 - 128);
        assert_eq!(limits.connections_within(10), 1);
    }
}
