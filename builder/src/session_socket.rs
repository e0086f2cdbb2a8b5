//! The session protocol between `builderctl` (a user's `enter`, `leave`, `preflight`,
//! `status`, `hosts`) and `builderctl daemon`, over the Unix stream socket
//! `daemon_socket` (`/run/distcc-builder/session.sock`, `distcc-builder.socket`).
//!
//! Newline-delimited JSON, one object per line, each line at most [`MAX_REQUEST_LINE`]
//! (client to daemon) or [`MAX_RESPONSE_LINE`] bytes. Requests are tagged by `"request"`
//! ([`Request`]); every answer is an object with one key naming what it is ([`Response`]).
//! Errors carry a typed [`ErrorKind`]: clients decide on the kind, never on the message.
//!
//! The daemon knows a session by its open connection and the peer's credentials
//! (SO_PEERCRED): it authorises uid 0 and members of `build_group` ([`authorise`], with the
//! group database, not the socket's mode alone), and takes the user a workspace is for
//! from the peer's uid, never from a request.
//!
//! This module holds the protocol types, the line codec, the client, and the server's
//! connection handling; what the daemon does with a request is a [`SessionHandler`]
//! (`crate::daemon`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::broadcast;

use crate::cluster::WorkerView;
use crate::host_list::HostList;
use crate::workspace::Prepared;

/// Longest request line the daemon reads (a request is a few dozen bytes).
pub const MAX_REQUEST_LINE: usize = 4096;
/// Longest answer line a client reads (a snapshot of many workers is the largest).
pub const MAX_RESPONSE_LINE: usize = 4 << 20;
/// How long the daemon waits for a session to take a line before it drops the session
/// (a client that stopped reading must not hold the daemon's memory).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client waits for an answer (a daemon activated by the connection surveys
/// the workers first; a workspace request starts a systemd unit).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Client to daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Open a session on this connection: the answer is [`Response::Session`], then
    /// [`Response::Event`]s until the client closes. `cut_slow`: abort this user's
    /// connections to a worker just judged slow (a confirmed loss is cut for everyone).
    OpenSession {
        #[serde(default)]
        cut_slow: bool,
    },
    /// Mount (or reuse) the peer's own workspace: [`Response::Workspace`].
    Workspace,
    /// Unmount the peer's own workspace when nothing uses it: [`Response::Left`].
    Leave,
    /// The workers and the host list now, for `status` and `hosts`: [`Response::Snapshot`].
    Snapshot,
}

/// Daemon to client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Session(SessionOpened),
    Event(EventLine),
    Workspace(WorkspaceReady),
    Left(Left),
    Snapshot(Snapshot),
    Error(DaemonError),
}

/// The answer to [`Request::OpenSession`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionOpened {
    /// The hosts file the daemon keeps (`/etc/distcc/hosts`); a session's DISTCC_DIR/hosts
    /// links to it.
    pub hosts_file: PathBuf,
    pub failover: Failover,
    /// The host list now.
    pub host_list: HostList,
}

/// Whether a lost worker's connections are aborted for the builds on this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failover {
    /// `"armed"`.
    Armed,
    /// `{"not_armed": "why"}`.
    NotArmed(String),
}

impl std::fmt::Display for Failover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failover::Armed => f.write_str("armed"),
            Failover::NotArmed(why) => write!(f, "not armed: {why}"),
        }
    }
}

/// One steering log line (`$DISTCC_DIR/steering.log` without its time stamp).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLine {
    pub kind: EventKind,
    pub line: String,
}

/// What kind of steering event a line reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The hosts file changed (a worker in or out).
    HostsChanged,
    /// A worker was confirmed lost; its connections were aborted (or that failed).
    Lost,
    /// A worker was judged slow; the sessions' connections that asked were aborted.
    SlowCut,
    /// A worker's agent stream broke while its distccd answers: kept, not cut.
    AgentAway,
    /// Statuses again after `agent_away`.
    AgentBack,
    /// distccd's port silent but the machine answers on the agent's: out, not cut.
    MachineUp,
    /// A compile running long on a slow worker while faster slots stood idle was
    /// aborted, to be redone on the builder.
    StragglerRedo,
    /// Events lost because this session did not keep up, or a kind this client does not
    /// know (a newer daemon).
    #[serde(other)]
    Other,
}

/// The answer to [`Request::Workspace`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceReady {
    pub path: PathBuf,
    /// `"mounted"` now, or `"reused"` (already mounted).
    pub mounted: Prepared,
}

/// The answer to [`Request::Leave`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Left {
    pub path: PathBuf,
}

/// The answer to [`Request::Snapshot`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub workers: Vec<WorkerView>,
    pub host_list: HostList,
}

/// `{"error": {"kind": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Error)]
#[error("{message}")]
pub struct DaemonError {
    pub kind: ErrorKind,
    pub message: String,
}

impl DaemonError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// What went wrong, for the client to decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The peer is neither root nor a member of `build_group`.
    NotInGroup,
    /// The workspace is used by a process (leave).
    InUse,
    /// The workspace is not mounted (leave).
    NotMounted,
    /// The workspace unit could not mount it.
    MountFailed,
    /// A line that is not a request (bad JSON, unknown request, too long).
    BadRequest,
    /// The request does not apply to this peer (root asking for a user workspace, a uid
    /// without a valid user name).
    NotApplicable,
    /// The daemon could not do it for a reason of its own (a failed RPC, systemctl).
    Internal,
    /// A kind this client does not know (a newer daemon).
    #[serde(other)]
    Unknown,
}

/// Why a line could not be read or understood.
#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("reading the session socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("a line longer than {limit} bytes")]
    TooLong { limit: usize },
    #[error("a line that is not UTF-8")]
    NotUtf8,
    #[error("a line that is not a message of the protocol: {0}")]
    BadJson(#[from] serde_json::Error),
}

/// The next line (without its newline), at most `limit` bytes; `None` at the end of the
/// stream. A line over the limit is an error (the stream is not read past it).
pub async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<Option<String>, ProtocolError> {
    let mut buf = Vec::new();
    let bound = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let n = (&mut *reader)
        .take(bound)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > limit {
        return Err(ProtocolError::TooLong { limit });
    }
    // A last line without a newline (the peer closed) is still a line.
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| ProtocolError::NotUtf8)
}

/// One message from one line.
pub fn decode<T: serde::de::DeserializeOwned>(line: &str) -> Result<T, ProtocolError> {
    Ok(serde_json::from_str(line)?)
}

/// One message as one line (JSON never contains a raw newline).
pub fn encode<T: Serialize>(message: &T) -> String {
    let mut line = serde_json::to_string(message).unwrap_or_else(|e| {
        // Serialising our own plain data types cannot fail; say so if it ever does.
        serde_json::json!({"error": {"kind": "internal", "message": e.to_string()}}).to_string()
    });
    line.push('\n');
    line
}

async fn write_message<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    message: &T,
) -> std::io::Result<()> {
    let line = encode(message);
    match tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(line.as_bytes())).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the peer does not read",
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Authorisation

/// Who is on the other end of a connection (SO_PEERCRED, and the user database).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// The user's name, when the uid has one.
    pub user: Option<String>,
}

/// The daemon's rule (pure): root, or a member of the build group (`groups`: every group
/// of the user per the group database, primary included; `build_gid`: `None` when the
/// group does not exist).
pub fn authorise(
    uid: u32,
    groups: &[u32],
    build_gid: Option<u32>,
    build_group: &str,
) -> Result<(), DaemonError> {
    if uid == 0 || build_gid.is_some_and(|gid| groups.contains(&gid)) {
        return Ok(());
    }
    Err(DaemonError::new(
        ErrorKind::NotInGroup,
        match build_gid {
            Some(_) => format!("uid {uid} is not in the {build_group} group"),
            None => format!("the {build_group} group does not exist on this machine"),
        },
    ))
}

/// The groups of user `name` (primary `gid` included), from the group database.
pub fn groups_of(name: &str, gid: u32) -> Vec<u32> {
    let Ok(name) = std::ffi::CString::new(name) else {
        return Vec::new();
    };
    nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid))
        .map(|groups| groups.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_else(|_| vec![gid])
}

/// The gid of group `name`, if it exists.
pub fn group_id(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// Peer credentials and the daemon's decision on them, looked up now (group membership
/// changes take effect for new connections).
pub fn identify(stream: &UnixStream, build_group: &str) -> Result<Peer, DaemonError> {
    let cred = stream.peer_cred().map_err(|e| {
        DaemonError::new(
            ErrorKind::Internal,
            format!("reading the peer's credentials: {e}"),
        )
    })?;
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(cred.uid()))
        .ok()
        .flatten();
    let groups = user
        .as_ref()
        .map_or_else(Vec::new, |u| groups_of(&u.name, u.gid.as_raw()));
    authorise(cred.uid(), &groups, group_id(build_group), build_group)?;
    Ok(Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
        user: user.map(|u| u.name),
    })
}

// ---------------------------------------------------------------------------------------
// Server

/// An open session, as the handler hands it to the connection: its events, and whatever
/// must live exactly as long as the session (dropped when the connection closes).
pub struct OpenedSession {
    pub reply: SessionOpened,
    pub events: broadcast::Receiver<EventLine>,
    pub guard: Box<dyn Send + Sync>,
}

/// What the daemon does with requests (`crate::daemon::Daemon`; tests use their own).
pub trait SessionHandler: Send + Sync + 'static {
    fn open_session(
        &self,
        peer: &Peer,
        cut_slow: bool,
    ) -> impl Future<Output = Result<OpenedSession, DaemonError>> + Send;
    fn workspace(
        &self,
        peer: &Peer,
    ) -> impl Future<Output = Result<WorkspaceReady, DaemonError>> + Send;
    fn leave(&self, peer: &Peer) -> impl Future<Output = Result<Left, DaemonError>> + Send;
    fn snapshot(&self, peer: &Peer) -> impl Future<Output = Result<Snapshot, DaemonError>> + Send;
}

/// Serve connections until the listener fails; each connection in its own task.
pub async fn serve<H: SessionHandler>(
    listener: tokio::net::UnixListener,
    build_group: String,
    handler: Arc<H>,
) -> std::io::Result<()> {
    let build_group: Arc<str> = build_group.into();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of file descriptors and the like: back off instead of spinning.
            Err(e) if is_transient(&e) => {
                tracing::warn!("accepting a session: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let (handler, build_group) = (handler.clone(), build_group.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &build_group, &*handler).await {
                tracing::debug!("session connection ended: {e}");
            }
        });
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE | nix::libc::ENOBUFS | nix::libc::ENOMEM)
    ) || matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::Interrupted
    )
}

/// One connection: authorise, then answer requests; once a session is open, forward its
/// events until the client closes.
async fn connection<H: SessionHandler>(
    stream: UnixStream,
    build_group: &str,
    handler: &H,
) -> Result<(), ProtocolError> {
    let peer = identify(&stream, build_group);
    let (read, mut write) = stream.into_split();
    let peer = match peer {
        Ok(peer) => peer,
        Err(refusal) => {
            tracing::info!("refused a session connection: {refusal}");
            write_message(&mut write, &Response::Error(refusal)).await?;
            return Ok(());
        }
    };
    let mut reader = BufReader::new(read);
    let mut session: Option<OpenedSession> = None;
    loop {
        let line = match &mut session {
            None => read_line(&mut reader, MAX_REQUEST_LINE).await,
            Some(open) => tokio::select! {
                line = read_line(&mut reader, MAX_REQUEST_LINE) => line,
                event = open.events.recv() => {
                    let event = match event {
                        Ok(event) => event,
                        Err(broadcast::error::RecvError::Lagged(n)) => EventLine {
                            kind: EventKind::Other,
                            line: format!("{n} steering events not shown (this session did not keep up)"),
                        },
                        // The daemon is stopping.
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    };
                    write_message(&mut write, &Response::Event(event)).await?;
                    continue;
                }
            },
        };
        let line = match line {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(()),
            Err(e @ (ProtocolError::TooLong { .. } | ProtocolError::NotUtf8)) => {
                // The stream cannot be resynchronised: say why and close.
                let error = DaemonError::new(ErrorKind::BadRequest, e.to_string());
                write_message(&mut write, &Response::Error(error)).await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if line.trim().is_empty() {
            continue;
        }
        let response = match decode::<Request>(&line) {
            Err(e) => Response::Error(DaemonError::new(ErrorKind::BadRequest, e.to_string())),
            Ok(Request::OpenSession { .. }) if session.is_some() => Response::Error(
                DaemonError::new(ErrorKind::BadRequest, "a session is already open here"),
            ),
            Ok(Request::OpenSession { cut_slow }) => {
                match handler.open_session(&peer, cut_slow).await {
                    Ok(open) => {
                        let reply = Response::Session(open.reply.clone());
                        session = Some(open);
                        reply
                    }
                    Err(e) => Response::Error(e),
                }
            }
            Ok(Request::Workspace) => handler
                .workspace(&peer)
                .await
                .map_or_else(Response::Error, Response::Workspace),
            Ok(Request::Leave) => handler
                .leave(&peer)
                .await
                .map_or_else(Response::Error, Response::Left),
            Ok(Request::Snapshot) => handler
                .snapshot(&peer)
                .await
                .map_or_else(Response::Error, Response::Snapshot),
        };
        write_message(&mut write, &response).await?;
    }
}

/// The daemon's listening socket: systemd's (socket activation, `LISTEN_FDS`, fd 3)
/// when there is one, else `path` bound here with mode 0660 (development). Must run
/// before any thread is started (it clears the activation variables).
pub fn listener(path: &Path) -> Result<(std::os::unix::net::UnixListener, bool), ListenError> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() > 0 {
        let listener = fds
            .take_unix_listener(0)
            .map_err(ListenError::Activation)?
            .ok_or(ListenError::NotAUnixListener)?;
        // systemd passes it blocking; tokio needs it non-blocking.
        listener
            .set_nonblocking(true)
            .map_err(ListenError::Activation)?;
        return Ok((listener, true));
    }
    Ok((bind(path)?, false))
}

/// Bind `path` (mode 0660), replacing a socket nobody listens on.
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, ListenError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let failed = |source| ListenError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(failed(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(failed(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another daemon serves it",
            )));
        }
        std::fs::remove_file(path).map_err(failed)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(failed)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(failed)?;
    listener.set_nonblocking(true).map_err(failed)?;
    Ok(listener)
}

#[derive(Debug, Error)]
pub enum ListenError {
    #[error("taking the socket systemd passed (LISTEN_FDS): {0}")]
    Activation(std::io::Error),
    #[error("the socket systemd passed (fd 3) is not a listening Unix stream socket")]
    NotAUnixListener,
    #[error("binding {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

// ---------------------------------------------------------------------------------------
// Client

/// Why a client got no answer it can use.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Nothing listens there (no daemon, no socket unit).
    #[error("builder daemon not reachable at {}: {source}", path.display())]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The socket's mode keeps this user out (not in its group).
    #[error("not allowed to connect to {}: {source}", path.display())]
    PermissionDenied {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The daemon answered with an error (decide on its `kind`).
    #[error("the builder daemon: {0}")]
    Daemon(DaemonError),
    #[error("the builder daemon: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the builder daemon closed the connection")]
    Closed,
    #[error("the builder daemon gave no answer within {0:?}")]
    Timeout(Duration),
    #[error("the builder daemon answered {got} to {asked}")]
    Unexpected {
        asked: &'static str,
        got: &'static str,
    },
}

impl ClientError {
    /// The daemon's error kind, when it answered with one.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Daemon(e) => Some(e.kind),
            _ => None,
        }
    }

    /// The daemon is not there (as opposed to refusing or failing).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. })
    }
}

impl Response {
    fn name(&self) -> &'static str {
        match self {
            Response::Session(_) => "session",
            Response::Event(_) => "event",
            Response::Workspace(_) => "workspace",
            Response::Left(_) => "left",
            Response::Snapshot(_) => "snapshot",
            Response::Error(_) => "error",
        }
    }
}

/// A connection to the daemon.
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).await.map_err(|source| {
            if source.kind() == std::io::ErrorKind::PermissionDenied {
                ClientError::PermissionDenied {
                    path: path.to_owned(),
                    source,
                }
            } else {
                ClientError::Unreachable {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        let (read, writer) = stream.into_split();
        Ok(Client {
            reader: BufReader::new(read),
            writer,
        })
    }

    async fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        self.writer
            .write_all(encode(request).as_bytes())
            .await
            .map_err(|e| ClientError::Protocol(e.into()))
    }

    /// The next message; the daemon's errors become [`ClientError::Daemon`].
    async fn receive(&mut self) -> Result<Response, ClientError> {
        match read_line(&mut self.reader, MAX_RESPONSE_LINE).await? {
            None => Err(ClientError::Closed),
            Some(line) => match decode::<Response>(&line)? {
                Response::Error(e) => Err(ClientError::Daemon(e)),
                response => Ok(response),
            },
        }
    }

    async fn ask(&mut self, request: &Request) -> Result<Response, ClientError> {
        self.send(request).await?;
        loop {
            let answer = tokio::time::timeout(ANSWER_TIMEOUT, self.receive())
                .await
                .map_err(|_| ClientError::Timeout(ANSWER_TIMEOUT))??;
            // Events of a session on this connection are not answers.
            if !matches!(answer, Response::Event(_)) {
                return Ok(answer);
            }
        }
    }

    pub async fn workspace(&mut self) -> Result<WorkspaceReady, ClientError> {
        match self.ask(&Request::Workspace).await? {
            Response::Workspace(ready) => Ok(ready),
            other => Err(unexpected("workspace", &other)),
        }
    }

    pub async fn leave(&mut self) -> Result<Left, ClientError> {
        match self.ask(&Request::Leave).await? {
            Response::Left(left) => Ok(left),
            other => Err(unexpected("leave", &other)),
        }
    }

    pub async fn snapshot(&mut self) -> Result<Snapshot, ClientError> {
        match self.ask(&Request::Snapshot).await? {
            Response::Snapshot(snapshot) => Ok(snapshot),
            other => Err(unexpected("snapshot", &other)),
        }
    }

    /// Turn this connection into a session: its description now, then its events.
    pub async fn open_session(
        mut self,
        cut_slow: bool,
    ) -> Result<(SessionOpened, Session), ClientError> {
        match self.ask(&Request::OpenSession { cut_slow }).await? {
            Response::Session(opened) => Ok((opened, Session { client: self })),
            other => Err(unexpected("open_session", &other)),
        }
    }
}

fn unexpected(asked: &'static str, got: &Response) -> ClientError {
    ClientError::Unexpected {
        asked,
        got: got.name(),
    }
}

/// An open session: held open for as long as the session lasts.
pub struct Session {
    client: Client,
}

impl Session {
    /// The next steering event; [`ClientError::Closed`] when the daemon went away.
    pub async fn next_event(&mut self) -> Result<EventLine, ClientError> {
        loop {
            match self.client.receive().await? {
                Response::Event(event) => return Ok(event),
                // Nothing else is asked on a session's connection; skip what is not ours.
                _ => continue,
            }
        }
    }
}

/// How long a session waits between attempts to reach a daemon that went away.
pub const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Follow a session's steering lines for as long as the caller runs this (it never
/// returns). When the daemon goes away (restart, upgrade) it says so, and opens a new
/// session once the daemon is back (socket activation queues the connection meanwhile;
/// without it, it asks again every [`RECONNECT_DELAY`]); the daemon arms failover for the
/// machine's builds again as it starts, so the compiles in flight go on meanwhile with the
/// hosts file as it was.
pub async fn follow(
    socket: &Path,
    mut session: Session,
    cut_slow: bool,
    mut on_line: impl FnMut(String),
) {
    loop {
        while let Ok(event) = session.next_event().await {
            on_line(event.line);
        }
        on_line(
            "builder daemon: connection lost; reconnecting (compiles go on with the last hosts file)"
                .to_owned(),
        );
        session = loop {
            let opened = match Client::connect(socket).await {
                Ok(client) => client.open_session(cut_slow).await,
                Err(e) => Err(e),
            };
            match opened {
                Ok((opened, session)) => {
                    on_line(format!(
                        "builder daemon: session reopened, failover {}",
                        opened.failover
                    ));
                    break session;
                }
                Err(_) => tokio::time::sleep(RECONNECT_DELAY).await,
            }
        };
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::exclusion::{Exclusion, ExclusionKind};
    use crate::host_list::{HostEntry, Verdict, WorkerVerdict};

    fn list() -> HostList {
        HostList {
            workers: vec![WorkerVerdict {
                endpoint: "198.18.0.11:3634".into(),
                verdict: Verdict::Included {
                    entry: HostEntry {
                        host: "198.18.0.11".into(),
                        port: 3632,
                        slots: 3,
                        lzo: true,
                    },
                    warnings: vec!["fewer slots than distccd has".into()],
                },
            }],
            local_slots: 2,
        }
    }

    #[test]
    fn requests_have_the_documented_shape() {
        for (request, text) in [
            (
                Request::OpenSession { cut_slow: true },
                r#"{"request":"open_session","cut_slow":true}"#,
            ),
            (Request::Workspace, r#"{"request":"workspace"}"#),
            (Request::Leave, r#"{"request":"leave"}"#),
            (Request::Snapshot, r#"{"request":"snapshot"}"#),
        ] {
            assert_eq!(encode(&request), format!("{text}\n"));
            assert_eq!(decode::<Request>(text).unwrap(), request);
        }
        // cut_slow is optional.
        assert_eq!(
            decode::<Request>(r#"{"request":"open_session"}"#).unwrap(),
            Request::OpenSession { cut_slow: false }
        );
    }

    #[test]
    fn responses_round_trip_with_the_documented_shape() {
        let session = Response::Session(SessionOpened {
            hosts_file: "/etc/distcc/hosts".into(),
            failover: Failover::NotArmed("no CAP_NET_ADMIN".into()),
            host_list: list(),
        });
        let text = encode(&session);
        assert!(
            text.starts_with(r#"{"session":{"hosts_file":"/etc/distcc/hosts","failover":{"not_armed":"no CAP_NET_ADMIN"},"host_list":{"workers":[{"endpoint":"198.18.0.11:3634""#),
            "{text}"
        );
        assert_eq!(decode::<Response>(&text).unwrap(), session);
        let armed = encode(&Failover::Armed);
        assert_eq!(armed, "\"armed\"\n");
        for response in [
            Response::Event(EventLine {
                kind: EventKind::Lost,
                line: "198.18.0.12:3634: lost (...): aborted 3 connections to it".into(),
            }),
            Response::Workspace(WorkspaceReady {
                path: "/run/distcc-workspaces/alice".into(),
                mounted: Prepared::Reused,
            }),
            Response::Left(Left {
                path: "/run/distcc-workspaces/alice".into(),
            }),
            Response::Snapshot(Snapshot {
                workers: Vec::new(),
                host_list: list(),
            }),
            Response::Error(DaemonError::new(ErrorKind::InUse, "in use by 12 (make)")),
        ] {
            assert_eq!(decode::<Response>(&encode(&response)).unwrap(), response);
        }
        assert_eq!(
            encode(&Response::Workspace(WorkspaceReady {
                path: "/run/distcc-workspaces/alice".into(),
                mounted: Prepared::Mounted,
            })),
            "{\"workspace\":{\"path\":\"/run/distcc-workspaces/alice\",\"mounted\":\"mounted\"}}\n"
        );
        assert_eq!(
            encode(&Response::Error(DaemonError::new(
                ErrorKind::NotInGroup,
                "no"
            ))),
            "{\"error\":{\"kind\":\"not_in_group\",\"message\":\"no\"}}\n"
        );
        // A newer daemon's kinds are understood as unknown, not as a broken protocol.
        let e: Response = decode(r#"{"error":{"kind":"quota_exceeded","message":"x"}}"#).unwrap();
        assert_eq!(
            e,
            Response::Error(DaemonError::new(ErrorKind::Unknown, "x"))
        );
        let e: Response = decode(r#"{"event":{"kind":"drained","line":"x"}}"#).unwrap();
        assert!(matches!(
            e,
            Response::Event(EventLine {
                kind: EventKind::Other,
                ..
            })
        ));
    }

    /// An excluded worker crosses the socket as its kind and text (the shape of `hosts
    /// --json`) and reads back as `Exclusion::Reported` with both; written again, the same
    /// JSON.
    #[test]
    fn an_excluded_worker_crosses_with_its_kind_and_text() {
        let mut with_out = list();
        with_out.workers.push(WorkerVerdict {
            endpoint: "198.18.0.12:3634".into(),
            verdict: Verdict::Excluded(Exclusion::Inactive {
                active_state: "failed".into(),
                sub_state: "failed".into(),
            }),
        });
        let text = encode(&with_out);
        assert!(
            text.contains(
                r#""excluded_reason":"distccd is failed (failed)","excluded_kind":"inactive""#
            ),
            "{text}"
        );
        let back: HostList = decode(&text).unwrap();
        assert_eq!(back.workers[0], with_out.workers[0]);
        assert_eq!(
            back.workers[1].verdict,
            Verdict::Excluded(Exclusion::Reported {
                kind: ExclusionKind::Inactive,
                reason: "distccd is failed (failed)".into(),
            })
        );
        assert_eq!(
            back.workers[1].excluded_kind(),
            Some(ExclusionKind::Inactive)
        );
        assert_eq!(encode(&back), text);
        assert_eq!(back.total_slots(), with_out.total_slots());
        // Neither in nor out, or both: not a verdict.
        for bad in [
            r#"{"endpoint":"w:1","entry":null,"excluded_reason":null,"excluded_kind":null,"warnings":[]}"#,
            r#"{"endpoint":"w:1","entry":{"host":"w","port":3632,"slots":1,"lzo":false},"excluded_reason":"x","excluded_kind":"slow","warnings":[]}"#,
        ] {
            assert!(decode::<WorkerVerdict>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_lines_are_typed_errors() {
        for line in [
            "not json",
            r#"{"request":"mount_everything"}"#,
            r#"{"request":"open_session","cut_slow":"yes"}"#,
            r#"{"workspace":{}}"#,
            "",
        ] {
            assert!(
                matches!(decode::<Request>(line), Err(ProtocolError::BadJson(_))),
                "{line}"
            );
        }
    }

    #[tokio::test]
    async fn lines_are_bounded() {
        let mut input: &[u8] = b"{\"request\":\"leave\"}\nlast";
        assert_eq!(
            read_line(&mut input, 64).await.unwrap().as_deref(),
            Some(r#"{"request":"leave"}"#)
        );
        assert_eq!(
            read_line(&mut input, 64).await.unwrap().as_deref(),
            Some("last")
        );
        assert_eq!(read_line(&mut input, 64).await.unwrap(), None);
        // Exactly at the bound is fine; one byte more is not.
        let mut input: &[u8] = b"abcd\nabcde\n";
        assert_eq!(
            read_line(&mut input, 4).await.unwrap().as_deref(),
            Some("abcd")
        );
        assert!(matches!(
            read_line(&mut input, 4).await,
            Err(ProtocolError::TooLong { limit: 4 })
        ));
        let long = vec![b'x'; MAX_REQUEST_LINE * 4];
        let mut input: &[u8] = &long;
        assert!(matches!(
            read_line(&mut input, MAX_REQUEST_LINE).await,
            Err(ProtocolError::TooLong { .. })
        ));
        let mut input: &[u8] = b"\xff\xfe\n";
        assert!(matches!(
            read_line(&mut input, 64).await,
            Err(ProtocolError::NotUtf8)
        ));
    }

    #[test]
    fn root_and_members_of_the_group_are_authorised() {
        assert!(authorise(0, &[], None, "distcc-build").is_ok());
        assert!(authorise(1000, &[1000, 990], Some(990), "distcc-build").is_ok());
        let refused = authorise(1001, &[1001, 27], Some(990), "distcc-build").unwrap_err();
        assert_eq!(refused.kind, ErrorKind::NotInGroup);
        assert!(refused.message.contains("distcc-build"), "{refused}");
        // No group at all: nobody but root.
        let refused = authorise(1000, &[1000], None, "distcc-build").unwrap_err();
        assert_eq!(refused.kind, ErrorKind::NotInGroup);
        assert!(refused.message.contains("does not exist"), "{refused}");
    }

    #[test]
    fn group_database_lookups() {
        // root's own primary group holds root; a group that does not exist has no id.
        assert!(groups_of("root", 0).contains(&0));
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-here"), None);
    }

    /// A handler that answers from fixed data and hands out a broadcast of events.
    struct Fake {
        /// A receiver only: the channel closes when the test drops its sender.
        events: broadcast::Receiver<EventLine>,
    }

    impl SessionHandler for Fake {
        async fn open_session(
            &self,
            _peer: &Peer,
            cut_slow: bool,
        ) -> Result<OpenedSession, DaemonError> {
            Ok(OpenedSession {
                reply: SessionOpened {
                    hosts_file: "/etc/distcc/hosts".into(),
                    failover: if cut_slow {
                        Failover::Armed
                    } else {
                        Failover::NotArmed("asked without cut_slow".into())
                    },
                    host_list: list(),
                },
                events: self.events.resubscribe(),
                guard: Box::new(()),
            })
        }
        async fn workspace(&self, peer: &Peer) -> Result<WorkspaceReady, DaemonError> {
            Err(DaemonError::new(
                ErrorKind::NotApplicable,
                format!("uid {}", peer.uid),
            ))
        }
        async fn leave(&self, _peer: &Peer) -> Result<Left, DaemonError> {
            Err(DaemonError::new(ErrorKind::InUse, "in use by 1 (sh)"))
        }
        async fn snapshot(&self, _peer: &Peer) -> Result<Snapshot, DaemonError> {
            Ok(Snapshot {
                workers: Vec::new(),
                host_list: list(),
            })
        }
    }

    /// The server half on a real socket in a temporary directory, a real client: a
    /// session gets its description and then every event; errors arrive typed; a line
    /// over the bound is refused and the connection closed.
    #[tokio::test]
    async fn a_session_over_a_real_socket_gets_its_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/session.sock");
        let listener = tokio::net::UnixListener::from_std(bind(&path).unwrap()).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o660);
        }
        // A second daemon on the same path is refused while this one listens.
        assert!(matches!(bind(&path), Err(ListenError::Bind { .. })));
        let (events, receiver) = broadcast::channel(16);
        let fake = Arc::new(Fake { events: receiver });
        // Whoever runs the tests is authorised when the test is root; otherwise only
        // if in this group (the primary group of the running user).
        let group = nix::unistd::Group::from_gid(nix::unistd::getegid())
            .unwrap()
            .unwrap()
            .name;
        let server = tokio::spawn(serve(listener, group, fake));

        let mut client = Client::connect(&path).await.unwrap();
        let snapshot = client.snapshot().await.unwrap();
        assert_eq!(snapshot.host_list, list());
        let err = client.leave().await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::InUse));
        let err = client.workspace().await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::NotApplicable));
        let (opened, mut session) = client.open_session(true).await.unwrap();
        assert_eq!(opened.failover, Failover::Armed);
        assert_eq!(opened.hosts_file, Path::new("/etc/distcc/hosts"));
        for n in 0..3 {
            events
                .send(EventLine {
                    kind: EventKind::HostsChanged,
                    line: format!("198.18.0.1{n}:3634: out, distccd is failed"),
                })
                .unwrap();
        }
        for n in 0..3 {
            let event = session.next_event().await.unwrap();
            assert_eq!(event.kind, EventKind::HostsChanged);
            assert_eq!(
                event.line,
                format!("198.18.0.1{n}:3634: out, distccd is failed")
            );
        }

        // Raw lines: a bad request is answered with a typed error and the connection
        // stays; a line over the bound is answered and the connection closed.
        let stream = UnixStream::connect(&path).await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        write
            .write_all(b"{\"request\":\"format_disk\"}\n")
            .await
            .unwrap();
        let line = read_line(&mut reader, MAX_RESPONSE_LINE)
            .await
            .unwrap()
            .unwrap();
        match decode::<Response>(&line).unwrap() {
            Response::Error(e) => assert_eq!(e.kind, ErrorKind::BadRequest),
            other => panic!("{other:?}"),
        }
        write
            .write_all(b"{\"request\":\"snapshot\"}\n")
            .await
            .unwrap();
        let line = read_line(&mut reader, MAX_RESPONSE_LINE)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(
            decode::<Response>(&line).unwrap(),
            Response::Snapshot(_)
        ));
        write
            .write_all(&vec![b'x'; MAX_REQUEST_LINE + 10])
            .await
            .unwrap();
        let line = read_line(&mut reader, MAX_RESPONSE_LINE)
            .await
            .unwrap()
            .unwrap();
        match decode::<Response>(&line).unwrap() {
            Response::Error(e) => assert_eq!(e.kind, ErrorKind::BadRequest),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            read_line(&mut reader, MAX_RESPONSE_LINE).await.unwrap(),
            None
        );

        // The session ends with the daemon's events: the client sees the connection close.
        drop(events);
        assert!(matches!(
            session.next_event().await,
            Err(ClientError::Closed | ClientError::Protocol(_))
        ));
        // Nothing listens any more: unreachable, which `enter` reports with the fix.
        server.abort();
        drop(dir);
        match Client::connect(&path).await {
            Err(e) => assert!(e.is_unreachable(), "{e}"),
            Ok(_) => panic!("connected to a daemon that is gone"),
        }
    }

    /// A session outlives a restart of the daemon: it says the connection was lost, opens
    /// a new session on the daemon that comes back on the same path, and gets its events.
    #[tokio::test]
    async fn a_session_reconnects_when_the_daemon_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session.sock");
        let group = nix::unistd::Group::from_gid(nix::unistd::getegid())
            .unwrap()
            .unwrap()
            .name;
        let start = |events: &broadcast::Sender<EventLine>| {
            let listener = tokio::net::UnixListener::from_std(bind(&path).unwrap()).unwrap();
            tokio::spawn(serve(
                listener,
                group.clone(),
                Arc::new(Fake {
                    events: events.subscribe(),
                }),
            ))
        };
        let (first_events, _) = broadcast::channel(16);
        let first = start(&first_events);
        let (_, session) = Client::connect(&path)
            .await
            .unwrap()
            .open_session(true)
            .await
            .unwrap();
        let (lines, mut received) = tokio::sync::mpsc::unbounded_channel();
        let follower = tokio::spawn({
            let path = path.clone();
            async move {
                follow(&path, session, true, |line| {
                    let _ = lines.send(line);
                })
                .await;
            }
        });
        let line = |text: &str| EventLine {
            kind: EventKind::HostsChanged,
            line: text.to_owned(),
        };
        first_events.send(line("before the restart")).unwrap();
        assert_eq!(received.recv().await.unwrap(), "before the restart");

        // The daemon stops: its listener (dropped once the task is) and its sessions end.
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        drop(first_events);
        assert!(
            received
                .recv()
                .await
                .unwrap()
                .starts_with("builder daemon: connection lost; reconnecting"),
        );
        // A new daemon on the same path (the stale socket replaced).
        let (second_events, _) = broadcast::channel(16);
        let _second = start(&second_events);
        assert_eq!(
            received.recv().await.unwrap(),
            "builder daemon: session reopened, failover armed"
        );
        second_events.send(line("after the restart")).unwrap();
        assert_eq!(received.recv().await.unwrap(), "after the restart");
        follower.abort();
    }
}
