//! The gRPC service: maps requests onto [`Worker`] and its errors onto status codes.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use distcc_proto::v1 as pb;
use futures_util::Stream;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::status_share::{SharedStatus, status_lanes};
use crate::tokens::{Role, TokenHash, TokenId, Tokens};
use crate::unit_control::UnitControl;
use crate::worker::{Worker, WorkerError, unit_to_proto};

pub struct AgentService<U: UnitControl> {
    worker: Arc<Worker<U>>,
    /// Flips to true on shutdown so long-lived streams end and the server can drain.
    shutdown: watch::Receiver<bool>,
    /// One permit per open WatchStatus stream (`limits.max_watch_streams`).
    watch_slots: Arc<Semaphore>,
    /// One permit per status computation in flight (see status_share.rs).
    status_lanes: Arc<Semaphore>,
    /// What WatchStatus streams send: one computation shared by every stream due.
    shared_status: Arc<SharedStatus<Result<pb::WorkerStatus, Status>>>,
}

/// WatchStatus streams ticking within this of one another send the same status.
const SHARE_WINDOW: Duration = Duration::from_millis(500);

impl<U: UnitControl> AgentService<U> {
    pub fn new(worker: Arc<Worker<U>>, shutdown: watch::Receiver<bool>) -> Self {
        let watch_slots = Arc::new(Semaphore::new(worker.config().limits.max_watch_streams));
        Self {
            worker,
            shutdown,
            watch_slots,
            status_lanes: Arc::new(status_lanes()),
            shared_status: Arc::default(),
        }
    }
}

impl From<WorkerError> for Status {
    fn from(err: WorkerError) -> Self {
        match &err {
            WorkerError::Invalid(invalid) => Status::invalid_argument(invalid.to_string()),
            WorkerError::Precondition(_)
            | WorkerError::StaleGeneration { .. }
            | WorkerError::NotEnabled { .. } => Status::failed_precondition(err.to_string()),
            WorkerError::RolledBack { .. } => Status::aborted(err.to_string()),
            WorkerError::Unit(crate::unit_control::UnitError::Refused { .. }) => {
                Status::permission_denied(err.to_string())
            }
            // The system bus is away; the agent reconnects with backoff: retry later.
            WorkerError::Unit(crate::unit_control::UnitError::Bus(_)) => {
                Status::unavailable(err.to_string())
            }
            WorkerError::Unit(_) | WorkerError::Store(_) => Status::internal(err.to_string()),
        }
    }
}

/// Who made a request: the token's id and role, and where from. Put into the request's
/// extensions by [`TokenAuth`]; every RPC that needs more than a valid token checks the role.
#[derive(Debug, Clone)]
pub struct Caller {
    pub id: TokenId,
    pub role: Role,
    /// Kept to notice a token revoked while its WatchStatus stream is open.
    pub hash: TokenHash,
    pub peer: Option<SocketAddr>,
    /// The client certificate (mTLS): subject and SHA-256 fingerprint.
    pub certificate: Option<String>,
}

/// Checks `authorization: Bearer <token>` against the tokens in effect (hashes, compared in
/// constant time). Reads them on every call so `systemctl reload` can rotate them.
#[derive(Clone)]
pub struct TokenAuth {
    tokens: Arc<dyn Fn() -> Arc<Tokens> + Send + Sync>,
}

impl TokenAuth {
    pub fn new(tokens: impl Fn() -> Arc<Tokens> + Send + Sync + 'static) -> Self {
        Self {
            tokens: Arc::new(tokens),
        }
    }

    pub fn check<T>(&self, mut request: Request<T>) -> Result<Request<T>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
            })?;
        let tokens = (self.tokens)();
        let entry = tokens.authenticate(presented).ok_or_else(|| {
            tracing::warn!(peer = ?request.remote_addr(), "refused a call with an unknown token");
            Status::unauthenticated("invalid token")
        })?;
        let caller = Caller {
            id: entry.id.clone(),
            role: entry.role,
            hash: entry.hash.clone(),
            peer: request.remote_addr(),
            certificate: request
                .peer_certs()
                .and_then(|certs| certs.first().map(|der| describe_certificate(der))),
        };
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// "CN=builder1 (sha256:ab12...)": what the audit log says of a client certificate.
fn describe_certificate(der: &[u8]) -> String {
    use sha2::Digest;
    let fingerprint: String = sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => format!("{} (sha256:{fingerprint})", cert.subject()),
        Err(_) => format!("unparsable (sha256:{fingerprint})"),
    }
}

/// The caller of `request`, when its role permits `needed`; PERMISSION_DENIED otherwise.
fn require<T>(request: &Request<T>, rpc: &str, needed: Role) -> Result<Caller, Status> {
    let caller = request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no token checked"))?;
    if caller.role.permits(needed) {
        Ok(caller)
    } else {
        Err(Status::permission_denied(format!(
            "token {} has the {} role; {rpc} needs {needed}",
            caller.id, caller.role
        )))
    }
}

/// Every change to the worker, in the journal with who asked (structured fields: the
/// token id, never the token; the peer; the client certificate) and how it ended.
fn audit<T, E: std::fmt::Display>(
    caller: &Caller,
    rpc: &str,
    request: &str,
    outcome: &Result<T, E>,
) {
    let certificate = caller.certificate.as_deref().unwrap_or("");
    let peer = caller.peer.map(|p| p.to_string()).unwrap_or_default();
    match outcome {
        Ok(_) => tracing::info!(
            target: "distcc_agent::audit",
            audit = rpc,
            token_id = caller.id.as_str(),
            role = %caller.role,
            peer,
            certificate,
            request,
            outcome = "ok",
            "{rpc} by {} from {peer}: {request}: ok",
            caller.id
        ),
        Err(e) => tracing::warn!(
            target: "distcc_agent::audit",
            audit = rpc,
            token_id = caller.id.as_str(),
            role = %caller.role,
            peer,
            certificate,
            request,
            outcome = %e,
            "{rpc} by {} from {peer}: {request}: failed: {e}",
            caller.id
        ),
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::WorkerStatus, Status>> + Send>>;

#[tonic::async_trait]
impl<U: UnitControl> pb::distcc_agent_server::DistccAgent for AgentService<U> {
    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::WorkerStatus>, Status> {
        require(&request, "Status", Role::Read)?;
        let refresh = !request.get_ref().skip_compilers;
        let _lane = self.status_lanes.acquire().await;
        Ok(Response::new(self.worker.status(refresh).await?))
    }

    type WatchStatusStream = StatusStream;

    async fn watch_status(
        &self,
        request: Request<pb::WatchStatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        let caller = require(&request, "WatchStatus", Role::Read)?;
        let config = self.worker.config();
        let interval = config
            .limits
            .watch_interval(request.get_ref().interval_ms, config.status_interval)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Held by the stream's task: released when the client goes away or the agent stops.
        let slot = self.watch_slots.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} WatchStatus streams are open, the most this agent serves \
                 (limits.max_watch_streams); use Status or retry later",
                config.limits.max_watch_streams
            ))
        })?;
        let worker = self.worker.clone();
        let (lanes, shared) = (self.status_lanes.clone(), self.shared_status.clone());
        let mut shutdown = self.shutdown.clone();
        let mut state = worker.subscribe_state();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let _slot = slot;
            // After a state change only a status computed since will do.
            let mut not_before = Instant::now().checked_sub(SHARE_WINDOW);
            loop {
                // A token revoked by `systemctl reload` ends its streams within an interval.
                if !worker
                    .config()
                    .tokens
                    .still_permits(&caller.hash, Role::Read)
                {
                    tracing::info!(
                        token_id = caller.id.as_str(),
                        "ending a WatchStatus stream: its token was revoked"
                    );
                    let _ = tx
                        .send(Err(Status::unauthenticated("the token was revoked")))
                        .await;
                    return;
                }
                // Compilers run only when their binary changed (cached per binary), so a
                // replaced compiler shows up in the stream with its new fingerprint.
                let compute = async {
                    let _lane = lanes.acquire().await;
                    worker.status(true).await.map_err(Status::from)
                };
                let status = match not_before {
                    Some(not_before) => shared.get(not_before, compute).await,
                    None => compute.await,
                };
                if tx.send(status).await.is_err() {
                    return; // the client went away
                }
                tokio::select! {
                    changed = state.changed() => {
                        if changed.is_err() { return }
                        not_before = Some(Instant::now());
                    }
                    () = tokio::time::sleep(interval) => {
                        not_before = Instant::now().checked_sub(SHARE_WINDOW);
                    }
                    // Frees the slot as soon as the client goes, not at the next send.
                    () = tx.closed() => return,
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn configure(
        &self,
        request: Request<pb::ConfigureRequest>,
    ) -> Result<Response<pb::ConfigureResponse>, Status> {
        let caller = require(&request, "Configure", Role::Admin)?;
        let outcome = self.worker.configure(request.get_ref()).await;
        audit(
            &caller,
            "Configure",
            &describe_configure(request.get_ref()),
            &outcome,
        );
        let outcome = outcome?;
        Ok(Response::new(pb::ConfigureResponse {
            previous: Some((&outcome.previous).into()),
            applied: Some((&outcome.applied).into()),
            unit: Some(unit_to_proto(&outcome.unit)),
            changed: outcome.changed,
            generation: outcome.generation,
        }))
    }

    async fn control(
        &self,
        request: Request<pb::ControlRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        let caller = require(&request, "Control", Role::Admin)?;
        let action = pb::ControlAction::try_from(request.get_ref().action)
            .map_err(|_| Status::invalid_argument("action: unknown value"))?;
        let outcome = self.worker.control(action).await;
        audit(&caller, "Control", action.as_str_name(), &outcome);
        let (unit, steps) = outcome?;
        Ok(Response::new(pb::ControlResponse {
            unit: Some(unit_to_proto(&unit)),
            steps,
        }))
    }

    async fn bootstrap(
        &self,
        request: Request<pb::BootstrapRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        let caller = require(&request, "Bootstrap", Role::Admin)?;
        let outcome = self.worker.bootstrap().await;
        audit(&caller, "Bootstrap", "", &outcome);
        let (unit, steps) = outcome?;
        Ok(Response::new(pb::ControlResponse {
            unit: Some(unit_to_proto(&unit)),
            steps,
        }))
    }

    async fn validate(
        &self,
        request: Request<pb::ValidateRequest>,
    ) -> Result<Response<pb::ValidateResponse>, Status> {
        require(&request, "Validate", Role::Read)?;
        Ok(Response::new(self.worker.validate().await))
    }
}

/// The fields a Configure request set, for the audit log (`jobs=4 allow=[198.18.0.0/24]`).
fn describe_configure(r: &pb::ConfigureRequest) -> String {
    let mut parts = Vec::new();
    if let Some(allow) = &r.allow {
        parts.push(format!("allow=[{}]", allow.cidrs.join(", ")));
    }
    let mut field = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            parts.push(format!("{name}={value}"));
        }
    };
    field("jobs", r.jobs.map(|v| v.to_string()));
    field("nice", r.nice.map(|v| v.to_string()));
    field("listen", r.listen.clone());
    field("port", r.port.map(|v| v.to_string()));
    field("stats", r.stats.map(|v| v.to_string()));
    field("stats_port", r.stats_port.map(|v| v.to_string()));
    field(
        "job_lifetime_secs",
        r.job_lifetime_secs.map(|v| v.to_string()),
    );
    field(
        "expected_generation",
        r.expected_generation.map(|v| v.to_string()),
    );
    parts.join(" ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn request(header: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(h) = header {
            r.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        r
    }

    fn auth() -> TokenAuth {
        let text = format!(
            "read builders {}\nadmin ops {}\n",
            TokenHash::of("read-0123456789abcdef"),
            TokenHash::of("admin-0123456789abcdef")
        );
        let tokens = Arc::new(Tokens::parse(std::path::Path::new("tokens"), &text).unwrap());
        TokenAuth::new(move || tokens.clone())
    }

    #[test]
    fn token_auth() {
        let auth = auth();
        let ok = auth
            .check(request(Some("Bearer admin-0123456789abcdef")))
            .unwrap();
        let caller = ok.extensions().get::<Caller>().unwrap();
        assert_eq!((caller.id.as_str(), caller.role), ("ops", Role::Admin));
        for bad in [
            None,
            Some("Bearer admin-0123456789abcdeX"),
            Some("Bearer "),
            Some("admin-0123456789abcdef"),
        ] {
            let err = auth.check(request(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }

    #[test]
    fn roles_decide_what_a_token_may_call() {
        let auth = auth();
        let read = auth
            .check(request(Some("Bearer read-0123456789abcdef")))
            .unwrap();
        assert!(require(&read, "Status", Role::Read).is_ok());
        let err = require(&read, "Configure", Role::Admin).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("builders"), "{}", err.message());
        let admin = auth
            .check(request(Some("Bearer admin-0123456789abcdef")))
            .unwrap();
        assert!(require(&admin, "Configure", Role::Admin).is_ok());
        assert!(require(&admin, "Status", Role::Read).is_ok());
        // A request that never went through the interceptor has no caller.
        let err = require(&request(None), "Status", Role::Read).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
}
