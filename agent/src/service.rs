//! The gRPC service: maps requests onto [`Worker`] and its errors onto status codes.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use distcc_proto::v1 as pb;
use futures_util::Stream;
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::unit_control::UnitControl;
use crate::worker::{Worker, WorkerError, unit_to_proto};

pub struct AgentService<U: UnitControl> {
    worker: Arc<Worker<U>>,
    /// Flips to true on shutdown so long-lived streams end and the server can drain.
    shutdown: watch::Receiver<bool>,
}

impl<U: UnitControl> AgentService<U> {
    pub fn new(worker: Arc<Worker<U>>, shutdown: watch::Receiver<bool>) -> Self {
        Self { worker, shutdown }
    }
}

impl From<WorkerError> for Status {
    fn from(err: WorkerError) -> Self {
        match &err {
            WorkerError::Invalid(invalid) => Status::invalid_argument(invalid.to_string()),
            WorkerError::Precondition(_) | WorkerError::StaleGeneration { .. } => {
                Status::failed_precondition(err.to_string())
            }
            WorkerError::RolledBack { .. } => Status::aborted(err.to_string()),
            WorkerError::Unit(crate::unit_control::UnitError::Refused { .. }) => {
                Status::permission_denied(err.to_string())
            }
            WorkerError::Unit(_) | WorkerError::Store(_) => Status::internal(err.to_string()),
        }
    }
}

/// Checks `authorization: Bearer <token>` in constant time. Cloned into the interceptor;
/// reads the token in effect on every call so `systemctl reload` can rotate it.
#[derive(Clone)]
pub struct TokenAuth {
    token: Arc<dyn Fn() -> String + Send + Sync>,
}

impl TokenAuth {
    pub fn new(token: impl Fn() -> String + Send + Sync + 'static) -> Self {
        Self {
            token: Arc::new(token),
        }
    }

    pub fn check<T>(&self, request: Request<T>) -> Result<Request<T>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
            })?;
        let expected = (self.token)();
        if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("invalid token"))
        }
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::WorkerStatus, Status>> + Send>>;

#[tonic::async_trait]
impl<U: UnitControl> pb::distcc_agent_server::DistccAgent for AgentService<U> {
    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::WorkerStatus>, Status> {
        let refresh = !request.get_ref().skip_compilers;
        Ok(Response::new(self.worker.status(refresh).await?))
    }

    type WatchStatusStream = StatusStream;

    async fn watch_status(
        &self,
        request: Request<pb::WatchStatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        let interval = match request.get_ref().interval_ms {
            0 => self.worker.config().status_interval,
            ms if ms < 100 => {
                return Err(Status::invalid_argument(
                    "interval_ms: must be 0 or at least 100",
                ));
            }
            ms => Duration::from_millis(u64::from(ms)),
        };
        let worker = self.worker.clone();
        let mut shutdown = self.shutdown.clone();
        let mut state = worker.subscribe_state();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                // Compilers run only when their binary changed (cached per binary), so a
                // replaced compiler shows up in the stream with its new fingerprint.
                let status = worker.status(true).await.map_err(Status::from);
                if tx.send(status).await.is_err() {
                    return; // the client went away
                }
                tokio::select! {
                    changed = state.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(interval) => {}
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
        let outcome = self.worker.configure(request.get_ref()).await?;
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
        let action = pb::ControlAction::try_from(request.get_ref().action)
            .map_err(|_| Status::invalid_argument("action: unknown value"))?;
        let (unit, steps) = self.worker.control(action).await?;
        Ok(Response::new(pb::ControlResponse {
            unit: Some(unit_to_proto(&unit)),
            steps,
        }))
    }

    async fn bootstrap(
        &self,
        _: Request<pb::BootstrapRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        let (unit, steps) = self.worker.bootstrap().await?;
        Ok(Response::new(pb::ControlResponse {
            unit: Some(unit_to_proto(&unit)),
            steps,
        }))
    }

    async fn validate(
        &self,
        _: Request<pb::ValidateRequest>,
    ) -> Result<Response<pb::ValidateResponse>, Status> {
        Ok(Response::new(self.worker.validate().await))
    }
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

    #[test]
    fn token_auth() {
        let auth = TokenAuth::new(|| "0123456789abcdef".to_owned());
        assert!(auth.check(request(Some("Bearer 0123456789abcdef"))).is_ok());
        for bad in [
            None,
            Some("Bearer 0123456789abcdeX"),
            Some("Bearer "),
            Some("0123456789abcdef"),
        ] {
            let err = auth.check(request(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }
}
