//! Worker logic against a fake unit that behaves like distccd.service where it matters:
//! on start it reads the environment file the agent wrote and binds the port in it, and
//! fails when it cannot (as distccd does for an address this host does not have).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use super::*;
use crate::config::AgentConfig;
use crate::confinement::{Confinement, ConfinementState, Limits};
use crate::settings::{AllowPolicy, Allowlist, DistccdSettings, Port};
use crate::unit_control::{ChangeStream, UnitFuture};

#[derive(Default)]
struct FakeState {
    listener: Option<TcpListener>,
    failed: bool,
    /// What systemd reports as `UnitFileState`; the package makes it "enabled".
    unit_file_state: &'static str,
    calls: Vec<&'static str>,
    /// What SetUnitProperties set, as systemd would keep it.
    confinement: Option<Confinement>,
    /// The next confine() fails as if systemd or polkit refused it.
    refuse_confine: bool,
    /// DISTCCD_OPTS read at the last launch: the running distccd's arguments.
    running_args: Option<Vec<String>>,
    /// Bumped on every launch, like distccd's main PID.
    launches: u32,
}

struct FakeDistccd {
    env_file: PathBuf,
    state: Mutex<FakeState>,
}

impl FakeDistccd {
    fn calls(&self) -> Vec<&'static str> {
        self.state.lock().unwrap().calls.clone()
    }

    fn port(&self) -> Option<u16> {
        self.state
            .lock()
            .unwrap()
            .listener
            .as_ref()
            .map(|l| l.local_addr().unwrap().port())
    }

    /// Binds what distccd would: `--listen` and `--port` of the DISTCCD_OPTS line.
    fn launch(&self) {
        let mut state = self.state.lock().unwrap();
        state.listener = None;
        let text = std::fs::read_to_string(&self.env_file)
            .expect("distccd.service needs its environment file");
        let opts = text
            .lines()
            .find_map(|l| l.strip_prefix("DISTCCD_OPTS=\""))
            .and_then(|l| l.strip_suffix('"'))
            .expect("DISTCCD_OPTS");
        let args: Vec<&str> = opts.split_whitespace().collect();
        state.running_args = Some(args.iter().map(|a| (*a).to_owned()).collect());
        state.launches += 1;
        let value = |flag: &str| {
            let at = args.iter().position(|a| *a == flag).expect(flag);
            args[at + 1]
        };
        let addr = SocketAddr::new(
            value("--listen").parse().unwrap(),
            value("--port").parse().unwrap(),
        );
        match TcpListener::bind(addr) {
            Ok(listener) => {
                state.listener = Some(listener);
                state.failed = false;
            }
            Err(_) => {
                state.failed = true;
                state.running_args = None;
            }
        }
    }

    fn confinement_set(&self) -> Option<Confinement> {
        self.state.lock().unwrap().confinement.clone()
    }

    fn launches(&self) -> u32 {
        self.state.lock().unwrap().launches
    }

    fn record(&self, call: &'static str) {
        self.state.lock().unwrap().calls.push(call);
    }
}

impl UnitControl for FakeDistccd {
    fn unit_name(&self) -> &str {
        "distccd.service"
    }
    fn start(&self) -> UnitFuture<'_, ()> {
        self.record("start");
        self.launch();
        Box::pin(async { Ok(()) })
    }
    fn stop(&self) -> UnitFuture<'_, ()> {
        self.record("stop");
        let mut state = self.state.lock().unwrap();
        state.listener = None;
        state.running_args = None;
        Box::pin(async { Ok(()) })
    }
    fn restart(&self) -> UnitFuture<'_, ()> {
        self.record("restart");
        self.launch();
        Box::pin(async { Ok(()) })
    }
    fn reset_failed(&self) -> UnitFuture<'_, ()> {
        self.record("reset-failed");
        self.state.lock().unwrap().failed = false;
        Box::pin(async { Ok(()) })
    }
    fn confine(&self, confinement: &Confinement) -> UnitFuture<'_, ()> {
        self.record("confine");
        let mut state = self.state.lock().unwrap();
        let result = if std::mem::take(&mut state.refuse_confine) {
            Err(UnitError::Refused {
                operation: "set-property".into(),
                message: "org.freedesktop.DBus.Error.AccessDenied: denied".into(),
            })
        } else {
            state.confinement = Some(confinement.clone());
            Ok(())
        };
        Box::pin(async move { result })
    }
    fn confinement(&self) -> UnitFuture<'_, ConfinementState> {
        let state = self.state.lock().unwrap();
        let c = state.confinement.clone();
        let active = state.listener.is_some();
        Box::pin(async move {
            Ok(
                c.map_or_else(ConfinementState::default, |c| ConfinementState {
                    ip_allow: c.ip_allow,
                    ip_deny: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
                    ip_ingress_bytes: active.then_some(0),
                    tasks_max: c.tasks_max,
                    memory_max_bytes: c.memory_max_bytes,
                }),
            )
        })
    }
    fn running_args(&self) -> UnitFuture<'_, Option<Vec<String>>> {
        let args = self.state.lock().unwrap().running_args.clone();
        Box::pin(async move { Ok(args) })
    }
    fn state(&self) -> UnitFuture<'_, UnitState> {
        let s = self.state.lock().unwrap();
        let (active_state, sub_state) = match (&s.listener, s.failed) {
            (_, true) => ("failed", "failed"),
            (Some(_), false) => ("active", "running"),
            (None, false) => ("inactive", "dead"),
        };
        let state = UnitState {
            load_state: "loaded".into(),
            active_state: active_state.into(),
            sub_state: sub_state.into(),
            // The fake holds its port in this process, as distccd holds it in its own.
            main_pid: if s.listener.is_some() {
                std::process::id()
            } else {
                0
            },
            unit_file_state: s.unit_file_state.into(),
            ..Default::default()
        };
        Box::pin(async move { Ok(state) })
    }
    fn changes(&self) -> UnitFuture<'_, ChangeStream> {
        Box::pin(async { Ok(Box::pin(futures_util::stream::pending()) as ChangeStream) })
    }
}

fn port(number: u16) -> Port {
    Port::try_from(i64::from(number)).unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Fixture {
    _dir: tempfile::TempDir,
    worker: Worker<FakeDistccd>,
}

const LIMITS: Limits = Limits {
    tasks_max: 96,
    memory_max_bytes: 1 << 30,
};

impl Fixture {
    fn new(allow: &[&str]) -> Self {
        Self::within(allow, allow)
    }

    /// Allowlist `allow` under the policy `allow_within`.
    fn within(allow: &[&str], allow_within: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let within: Allowlist = allow_within.iter().map(|a| a.parse().unwrap()).collect();
        let allow: Allowlist = allow.iter().map(|a| a.parse().unwrap()).collect();
        let distccd = DistccdSettings {
            allow: allow.clone(),
            listen: "127.0.0.1".parse().unwrap(),
            port: port(free_port()),
            stats: false,
            ..Default::default()
        };
        let config = AgentConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tokens: Default::default(),
            tokens_file: dir.path().join("tokens"),
            warnings: Vec::new(),
            transport: crate::config::Transport::Plaintext { insecure: false },
            state_dir: dir.path().to_owned(),
            unit: "distccd.service".into(),
            status_interval: Duration::from_secs(10),
            job_timeout: Duration::from_secs(5),
            masquerade_dir: dir.path().join("masquerade"),
            distccd_tmpdir: dir.path().to_owned(),
            policy: AllowPolicy {
                allow_within: within,
                permit_public: false,
                max_allow_entries: AllowPolicy::DEFAULT_MAX_ALLOW_ENTRIES,
            },
            confinement: LIMITS,
            distccd,
            limits: crate::limits::Limits::default(),
        };
        let unit = FakeDistccd {
            env_file: config.state_dir.join(crate::settings_store::ENV_FILE),
            state: Mutex::new(FakeState {
                unit_file_state: "enabled",
                ..Default::default()
            }),
        };
        Self {
            _dir: dir,
            worker: Worker::new(unit, config),
        }
    }

    fn unit(&self) -> &FakeDistccd {
        self.worker.unit()
    }
}

#[tokio::test]
async fn first_start_bootstraps_once() {
    let f = Fixture::new(&["198.18.0.0/24"]);
    assert!(f.worker.first_start().await.unwrap());
    assert_eq!(f.unit().calls(), ["confine", "start"]);
    // A later agent start (restart, upgrade) leaves distccd alone.
    assert!(!f.worker.first_start().await.unwrap());
    assert_eq!(f.unit().calls(), ["confine", "start"]);
}

#[tokio::test]
async fn a_distccd_an_operator_disabled_is_not_started() {
    for (unit_file_state, command) in [
        ("disabled", "`systemctl enable distccd`"),
        (
            "masked",
            "`systemctl unmask distccd && systemctl enable distccd`",
        ),
    ] {
        let f = Fixture::new(&["198.18.0.0/24"]);
        f.unit().state.lock().unwrap().unit_file_state = unit_file_state;
        let err = f.worker.first_start().await.unwrap_err();
        assert!(matches!(err, WorkerError::NotEnabled { .. }), "{err}");
        // Nothing written, nothing started: the next start is still a first start.
        assert!(f.worker.store.load().unwrap().is_none());
        let err = f.worker.bootstrap().await.unwrap_err();
        assert!(err.to_string().contains(command), "{err}");
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(f.unit().calls().is_empty(), "{:?}", f.unit().calls());
        // Once an operator enables it again, Bootstrap starts it.
        f.unit().state.lock().unwrap().unit_file_state = "enabled";
        let (state, steps) = f.worker.bootstrap().await.unwrap();
        assert!(state.is_active(), "{steps:?}");
        assert_eq!(f.unit().calls(), ["confine", "start"]);
    }
}

#[tokio::test]
async fn without_an_allowlist_nothing_starts() {
    let f = Fixture::new(&[]);
    assert!(!f.worker.first_start().await.unwrap());
    let err = f
        .worker
        .control(pb::ControlAction::Start)
        .await
        .unwrap_err();
    assert!(matches!(err, WorkerError::Precondition(_)), "{err}");
    assert!(f.unit().calls().is_empty());
    assert!(
        f.worker
            .status_line()
            .await
            .starts_with("waiting for an allowlist")
    );
}

#[tokio::test]
async fn configure_persists_and_restarts() {
    let f = Fixture::new(&["198.18.0.0/24"]);
    f.worker.first_start().await.unwrap();
    let port = free_port();
    let update = pb::ConfigureRequest {
        port: Some(u32::from(port)),
        jobs: Some(6),
        ..Default::default()
    };
    let outcome = f.worker.configure(&update).await.unwrap();
    assert!(outcome.changed);
    assert_eq!(
        (outcome.applied.port.get(), outcome.applied.jobs.get()),
        (port, 6)
    );
    assert_eq!(
        outcome.generation, 2,
        "the first start persisted generation 1"
    );
    assert_eq!(f.unit().port(), Some(port), "restarted on the new port");
    assert_eq!(f.worker.current_settings().unwrap().port.get(), port);
    // Same again: nothing to do, no restart, no new generation.
    let calls = f.unit().calls().len();
    let again = f.worker.configure(&update).await.unwrap();
    assert!(!again.changed);
    assert_eq!(again.generation, 2);
    assert_eq!(f.unit().calls().len(), calls);
}

#[tokio::test]
async fn a_stale_generation_changes_nothing() {
    let f = Fixture::new(&["198.18.0.0/24"]);
    f.worker.first_start().await.unwrap();
    let (_, generation) = f.worker.current_settings_generation().unwrap();
    assert_eq!(generation, 1);
    let first = pb::ConfigureRequest {
        jobs: Some(5),
        expected_generation: Some(generation),
        ..Default::default()
    };
    assert_eq!(f.worker.configure(&first).await.unwrap().generation, 2);
    // A second admin who read generation 1 before that change.
    let second = pb::ConfigureRequest {
        jobs: Some(9),
        expected_generation: Some(generation),
        ..Default::default()
    };
    let err = f.worker.configure(&second).await.unwrap_err();
    assert!(
        matches!(
            err,
            WorkerError::StaleGeneration {
                expected: 1,
                current: 2
            }
        ),
        "{err}"
    );
    assert_eq!(f.worker.current_settings().unwrap().jobs.get(), 5);
}

#[tokio::test]
async fn invalid_requests_touch_nothing() {
    let f = Fixture::new(&["198.18.0.0/24"]);
    f.worker.first_start().await.unwrap();
    let before = f.worker.current_settings().unwrap();
    for (update, field) in [
        (
            pb::ConfigureRequest {
                allow: Some(pb::AllowList {
                    cidrs: vec!["198.18.0.0/16".into()],
                }),
                ..Default::default()
            },
            "allow[0]",
        ),
        (
            pb::ConfigureRequest {
                allow: Some(pb::AllowList {
                    cidrs: vec!["x".into()],
                }),
                ..Default::default()
            },
            "allow[0]",
        ),
        (
            pb::ConfigureRequest {
                nice: Some(-5),
                ..Default::default()
            },
            "nice",
        ),
        (
            pb::ConfigureRequest {
                port: Some(0),
                ..Default::default()
            },
            "port",
        ),
    ] {
        match f.worker.configure(&update).await.unwrap_err() {
            WorkerError::Invalid(e) => assert_eq!(e.field, field),
            other => panic!("{field}: {other}"),
        }
    }
    assert_eq!(f.unit().calls(), ["confine", "start"]);
    assert_eq!(f.worker.current_settings().unwrap(), before);
}

#[tokio::test]
async fn a_failed_restart_rolls_back() {
    let f = Fixture::new(&["198.18.0.0/24"]);
    f.worker.first_start().await.unwrap();
    let before = f.worker.current_settings().unwrap();
    // An address this host does not have: binding fails, as it does for distccd.
    let update = pb::ConfigureRequest {
        listen: Some("192.0.2.1".into()),
        ..Default::default()
    };
    let err = f.worker.configure(&update).await.unwrap_err();
    assert!(matches!(err, WorkerError::RolledBack { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("restored the previous settings (distccd active (running))"),
        "{err}"
    );
    assert_eq!(
        f.worker.current_settings_generation().unwrap(),
        (before.clone(), 1)
    );
    assert_eq!(
        f.unit().port(),
        Some(before.port.get()),
        "serving on the previous settings"
    );
    assert_eq!(
        f.unit().calls(),
        [
            "confine",
            "start",
            "confine",
            "restart",
            "confine",
            "reset-failed",
            "restart"
        ]
    );
}

#[tokio::test]
async fn reset_is_stop_reset_failed_start() {
    let f = Fixture::new(&["198.18.0.0/24"]);
    f.worker.first_start().await.unwrap();
    let (state, steps) = f.worker.control(pb::ControlAction::Reset).await.unwrap();
    assert!(state.is_active());
    assert_eq!(steps.len(), 3);
    assert_eq!(
        f.unit().calls(),
        ["confine", "start", "stop", "reset-failed", "start"]
    );
}

#[tokio::test]
async fn the_first_allowlist_set_by_reload_bootstraps() {
    let f = Fixture::new(&[]);
    assert!(!f.worker.first_start().await.unwrap());
    let mut config = (*f.worker.config()).clone();
    config.distccd.allow = ["198.18.0.0/24".parse().unwrap()].into_iter().collect();
    config.policy.allow_within = config.distccd.allow.clone();
    let outcome = f.worker.reload(config).await.unwrap().expect("applied");
    assert!(outcome.unit.is_active());
    assert_eq!(f.unit().calls(), ["confine", "start"]);
}

fn allow_request(cidrs: &[&str]) -> pb::ConfigureRequest {
    pb::ConfigureRequest {
        allow: Some(pb::AllowList {
            cidrs: cidrs.iter().map(|c| (*c).to_owned()).collect(),
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn an_allowlist_change_inside_the_policy_only_swaps_the_kernel_filter() {
    let f = Fixture::within(&["198.18.0.5/32", "198.18.0.6/32"], &["198.18.0.0/24"]);
    f.worker.first_start().await.unwrap();
    let launches = f.unit().launches();
    let outcome = f
        .worker
        .configure(&allow_request(&["198.18.0.5/32"]))
        .await
        .unwrap();
    assert!(outcome.changed);
    assert_eq!(f.unit().calls(), ["confine", "start", "confine"]);
    assert_eq!(f.unit().launches(), launches, "distccd was not restarted");
    let filter: Vec<String> = f
        .unit()
        .confinement_set()
        .unwrap()
        .ip_allow
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(filter, ["198.18.0.5/32", "127.0.0.0/8", "::1/128"]);
    // distccd's own --allow stayed the policy's.
    let env = std::fs::read_to_string(&f.unit().env_file).unwrap();
    assert!(
        env.contains("DISTCCD_OPTS=\"--allow 198.18.0.0/24 "),
        "{env}"
    );
    let report = f.worker.validate().await;
    let check = report
        .checks
        .iter()
        .find(|c| c.name == "kernel-filter")
        .unwrap();
    assert!(check.passed, "{check:?}");
}

#[tokio::test]
async fn a_refused_filter_change_rolls_back_without_a_restart() {
    let f = Fixture::within(&["198.18.0.5/32"], &["198.18.0.0/24"]);
    f.worker.first_start().await.unwrap();
    let before = f.worker.current_settings_generation().unwrap();
    let filter_before = f.unit().confinement_set();
    f.unit().state.lock().unwrap().refuse_confine = true;
    let err = f
        .worker
        .configure(&allow_request(&["198.18.0.6/32"]))
        .await
        .unwrap_err();
    assert!(matches!(err, WorkerError::RolledBack { .. }), "{err}");
    assert_eq!(f.worker.current_settings_generation().unwrap(), before);
    assert_eq!(f.unit().confinement_set(), filter_before);
    assert_eq!(
        f.unit().calls(),
        ["confine", "start", "confine", "confine"],
        "no restart on either side"
    );
}

#[tokio::test]
async fn validate_fails_when_the_filter_differs() {
    let f = Fixture::within(&["198.18.0.5/32"], &["198.18.0.0/24"]);
    f.worker.first_start().await.unwrap();
    // Someone widened the unit's filter by hand.
    f.unit().state.lock().unwrap().confinement = Some(Confinement {
        ip_allow: vec!["198.18.0.0/16".parse().unwrap()],
        ..Confinement::new(&f.worker.current_settings().unwrap(), LIMITS)
    });
    let report = f.worker.validate().await;
    let check = report
        .checks
        .iter()
        .find(|c| c.name == "kernel-filter")
        .unwrap();
    assert!(
        !check.passed && check.reason.contains("IPAddressAllow"),
        "{check:?}"
    );
    // The next agent start repairs it.
    f.worker.enforce_confinement().await.unwrap();
    let report = f.worker.validate().await;
    let check = report
        .checks
        .iter()
        .find(|c| c.name == "kernel-filter")
        .unwrap();
    assert!(check.passed, "{check:?}");
}
