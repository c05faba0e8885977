//! The HTTP server: shared state, listener, graceful shutdown, and the
//! library API tests and `main` use ([`start_standalone`], [`start_remote`],
//! [`start`], [`SidecarHandle`]).
//!
//! Shutdown ([`SidecarHandle::shutdown`], or SIGTERM/Ctrl-C in `main`):
//! 1. stop accepting connections; idle keep-alive connections close;
//!    connections opened before (the listener's backlog included) still
//!    get their request answered, then close (`server/connections.rs`);
//! 2. in-flight requests and streams run on for up to `shutdown_grace`;
//! 3. then the remaining ones are cancelled: streams end with an error chunk
//!    in the client's format, waiting requests answer 503, and their leases
//!    are released as `Cancelled`;
//! 4. the router closes its session (`Router::close`), then background
//!    tasks (control-plane publisher, discovery, remote-session tasks) are
//!    cancelled and awaited.
//!
//! Every task is owned by the handle's [`TaskTracker`]; nothing is spawned
//! fire-and-forget.
//!
//! Threads: connections are served on `server_threads` single-threaded
//! runtimes (default 0 = one per core;
//! [`switchyard_control_plane::cores`]), each connection on the thread the
//! accept loop handed it to, with that thread's own backend connection pools
//! (and, in remote mode, its own `Route` stream): a request is handled from
//! its first byte to its release without waking another thread. The
//! caller's runtime accepts connections and runs the background tasks.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use switchyard_control_plane::{
    config::{Config, ConfigError, Secret, Timeouts},
    cores::{self, CoreRuntimes},
    endpoint::EndpointKind,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{metrics::Metrics, proxy::upstream::UpstreamClients, router::Router, routes};

/// After the grace period, how long connections get to flush the error
/// chunk that ends their cancelled streams before the server stops waiting.
const FLUSH_AFTER_CANCEL: Duration = Duration::from_secs(2);

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address tried.
        addr: SocketAddr,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The backend HTTP clients could not be built (TLS setup).
    #[error(transparent)]
    HttpClient(#[from] crate::proxy::upstream::ClientError),
    /// The embedded control plane's gRPC address could not be bound.
    #[error("cannot serve the control plane's gRPC API on {addr}: {source}")]
    ControlPlaneListen {
        /// Address tried.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The embedded control plane's `state_file` could not be read.
    #[error(transparent)]
    StateFile(#[from] switchyard_control_plane::admin_file::AdminFileError),
    /// The embedded control plane's discovery could not start.
    #[error("cannot start discovery: {0}")]
    Discovery(#[source] switchyard_control_plane::discovery::DiscoveryError),
    /// The built-in default configuration is invalid (a bug).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The per-core server threads could not be started.
    #[error("cannot start the server threads: {0}")]
    Threads(#[source] std::io::Error),
}

struct Shared {
    router: Router,
    config: Arc<Config>,
    clients: UpstreamClients,
    metrics: Metrics,
    /// Cancelled when the shutdown grace is over: in-flight work stops.
    hard_stop: CancellationToken,
    /// Cancelled when graceful shutdown starts (no new connections).
    stopping: CancellationToken,
}

/// State shared by every handler. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    shared: Arc<Shared>,
}

impl AppState {
    /// State for a sidecar routing through `router` with `config`'s
    /// sidecar settings, router key and backend keys.
    pub(crate) fn new(router: Router, config: Arc<Config>) -> Result<Self, StartError> {
        let clients = UpstreamClients::new(&config.sidecar).map_err(StartError::HttpClient)?;
        Ok(Self {
            shared: Arc::new(Shared {
                router,
                config,
                clients,
                metrics: Metrics::new(),
                hard_stop: CancellationToken::new(),
                stopping: CancellationToken::new(),
            }),
        })
    }

    /// The same state with backend connection pools of its own, for the
    /// connections of one server thread.
    fn for_thread(&self) -> Result<Self, StartError> {
        let shared = &self.shared;
        let clients =
            UpstreamClients::new(&shared.config.sidecar).map_err(StartError::HttpClient)?;
        Ok(Self {
            shared: Arc::new(Shared {
                router: shared.router.clone(),
                config: shared.config.clone(),
                clients,
                metrics: shared.metrics.clone(),
                hard_stop: shared.hard_stop.clone(),
                stopping: shared.stopping.clone(),
            }),
        })
    }

    /// The routing handle.
    pub(crate) fn router(&self) -> &Router {
        &self.shared.router
    }

    /// The sidecar's metrics.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The pooled backend clients.
    pub(crate) fn clients(&self) -> &UpstreamClients {
        &self.shared.clients
    }

    /// The key clients must present, if any.
    pub(crate) fn router_api_key(&self) -> Option<&Secret> {
        self.shared.config.router_api_key.as_ref()
    }

    /// The API key configured for a backend endpoint, if any.
    pub(crate) fn backend_key(&self, endpoint: &str) -> Option<&Secret> {
        self.shared
            .config
            .endpoint(endpoint)
            .and_then(|e| e.api_key.as_ref())
    }

    /// Timeouts for an endpoint kind.
    pub(crate) fn timeouts(&self, kind: EndpointKind) -> Timeouts {
        self.shared.config.sidecar.timeouts(kind)
    }

    /// Most endpoints tried per request.
    pub(crate) fn max_attempts(&self) -> u32 {
        self.shared.config.sidecar.max_attempts
    }

    /// Browser origins allowed (CORS).
    pub(crate) fn allowed_origins(&self) -> &[String] {
        &self.shared.config.sidecar.allowed_origins
    }

    /// Largest request body.
    pub(crate) fn max_body_bytes(&self) -> usize {
        self.shared.config.sidecar.max_body_bytes
    }

    /// Cancelled when in-flight work must stop (end of shutdown grace).
    pub(crate) fn shutdown_token(&self) -> CancellationToken {
        self.shared.hard_stop.clone()
    }

    /// Cancelled when graceful shutdown starts. Requests and model streams
    /// run on (until [`Self::shutdown_token`]); streams that never end by
    /// themselves (`/api/usage-stream`) end here, so an open dashboard does
    /// not hold the sidecar's shutdown for the whole grace.
    pub(crate) fn stopping_token(&self) -> CancellationToken {
        self.shared.stopping.clone()
    }
}

/// How the sidecar reaches routing decisions.
#[derive(Debug)]
pub enum Mode {
    /// Control plane embedded in this process.
    Standalone {
        /// Full configuration (endpoints required).
        config: Config,
        /// Also serve the embedded control plane's gRPC API here (for the
        /// `switchyard` CLI).
        control_plane_listen: Option<SocketAddr>,
    },
    /// Control plane reached over gRPC.
    Remote {
        /// gRPC URL, e.g. `http://127.0.0.1:50051`.
        control_plane_url: String,
        /// Optional configuration: backend API keys, router key, sidecar
        /// settings, and the endpoints the sidecar probes and routes on
        /// itself while the control plane cannot tell it.
        config: Option<Config>,
    },
}

impl Mode {
    /// The configuration, if there is one.
    pub fn config(&self) -> Option<&Config> {
        match self {
            Mode::Standalone { config, .. } => Some(config),
            Mode::Remote { config, .. } => config.as_ref(),
        }
    }

    /// The `server_threads` setting (the default without a configuration).
    fn server_threads(&self) -> usize {
        self.config().map_or(
            switchyard_control_plane::config::defaults::SERVER_THREADS,
            |c| c.sidecar.server_threads,
        )
    }
}

/// Everything [`start`] needs.
#[derive(Debug)]
pub struct StartOptions {
    /// Standalone or remote.
    pub mode: Mode,
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// Session name shown in the control plane (default: [`default_name`]).
    pub name: String,
}

/// The session name when none is given: `SWITCHYARD_NAME`, else the
/// host name, else `switchyard-sidecar`.
pub fn default_name() -> String {
    std::env::var("SWITCHYARD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "switchyard-sidecar".to_owned())
}

/// A running sidecar.
pub struct SidecarHandle {
    /// The address it listens on.
    pub addr: SocketAddr,
    router: Router,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for SidecarHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SidecarHandle {
    /// The routing handle (cluster state, local in-flight leases).
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// A token that starts the graceful shutdown when cancelled (for
    /// signal handlers).
    pub fn shutdown_trigger(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Waits until the sidecar has stopped (after a trigger).
    pub async fn wait(self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Graceful shutdown (see the module docs); returns when every task
    /// has ended.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.wait().await;
    }
}

/// Starts a standalone sidecar: control plane embedded, discovery probes
/// running in this process.
pub async fn start_standalone(
    config: Config,
    listen: SocketAddr,
) -> Result<SidecarHandle, StartError> {
    start(StartOptions {
        mode: Mode::Standalone {
            config,
            control_plane_listen: None,
        },
        listen,
        name: default_name(),
    })
    .await
}

/// Starts a sidecar routed by the control plane at `control_plane_url`. It
/// starts even when the control plane is down (degraded mode).
pub async fn start_remote(
    control_plane_url: String,
    config: Option<Config>,
    listen: SocketAddr,
) -> Result<SidecarHandle, StartError> {
    start(StartOptions {
        mode: Mode::Remote {
            control_plane_url,
            config,
        },
        listen,
        name: default_name(),
    })
    .await
}

/// Starts a sidecar.
pub async fn start(options: StartOptions) -> Result<SidecarHandle, StartError> {
    let listener = cores::listen(options.listen).map_err(|source| StartError::Bind {
        addr: options.listen,
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: options.listen,
        source,
    })?;
    let cores = match options.mode.server_threads() {
        0 => CoreRuntimes::per_core("http"),
        n => CoreRuntimes::start("http", n),
    }
    .map_err(StartError::Threads)?;
    let tasks = TaskTracker::new();
    // Background work (control plane, discovery, remote session) stops
    // after the router has closed its session.
    let background = CancellationToken::new();
    let built = build_state(options.mode, &options.name, &cores, &tasks, &background).await;
    let (router, config, state) = match built {
        Ok(parts) => parts,
        Err(e) => {
            // Do not leave discovery or session tasks behind.
            background.cancel();
            tasks.close();
            tasks.wait().await;
            return Err(e);
        }
    };
    let stop = state.stopping_token();
    let client_header_timeout = config.sidecar.client_header_timeout;
    let servers = match spawn_servers(&cores, &state, &stop, client_header_timeout) {
        Ok(servers) => servers,
        Err(e) => {
            router.close().await;
            background.cancel();
            tasks.close();
            tasks.wait().await;
            return Err(e);
        }
    };
    tracing::info!(%addr, name = %options.name, threads = cores.len(), "sidecar listening");
    tasks.spawn(serve(
        Serving {
            listener,
            cores,
            servers,
        },
        state,
        stop.clone(),
        config.sidecar.shutdown_grace,
        background,
        tasks.clone(),
    ));
    Ok(SidecarHandle {
        addr,
        router,
        stop,
        tasks,
    })
}

/// The router for `mode` (its background tasks on `tasks`, stopped by
/// `background`; remote: a lane per thread of `cores`) and the handlers'
/// shared state.
async fn build_state(
    mode: Mode,
    name: &str,
    cores: &CoreRuntimes,
    tasks: &TaskTracker,
    background: &CancellationToken,
) -> Result<(Router, Arc<Config>, AppState), StartError> {
    let (router, config) = match mode {
        Mode::Standalone {
            config,
            control_plane_listen,
        } => {
            let config = Arc::new(config);
            let grpc = match control_plane_listen {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|source| StartError::ControlPlaneListen { addr, source })?,
                ),
                None => None,
            };
            let router =
                crate::standalone::embedded_router(config.clone(), name, grpc, tasks, background)?;
            (router, config)
        }
        Mode::Remote {
            control_plane_url,
            config,
        } => {
            let config = Arc::new(match config {
                Some(c) => c,
                None => Config::from_yaml("", &|_| None)?,
            });
            let router = crate::standalone::remote_router(
                control_plane_url,
                name.to_owned(),
                &config,
                cores.handles().cloned().collect(),
                tasks,
                background,
            )
            .await;
            (router, config)
        }
    };
    let state = AppState::new(router.clone(), config.clone())?;
    Ok((router, config, state))
}

/// The listen socket, the server threads and their HTTP servers.
struct Serving {
    listener: TcpListener,
    cores: CoreRuntimes,
    /// One per thread, with the inbox the accept loop hands it sockets on.
    servers: Vec<ThreadServer>,
}

struct ThreadServer {
    inbox: mpsc::UnboundedSender<std::net::TcpStream>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Starts an HTTP server on every thread of `cores`, each with backend
/// pools of its own (the first uses `state`'s, the others
/// [`AppState::for_thread`]); they stop accepting when `stop` fires.
fn spawn_servers(
    cores: &CoreRuntimes,
    state: &AppState,
    stop: &CancellationToken,
    client_header_timeout: Duration,
) -> Result<Vec<ThreadServer>, StartError> {
    let mut servers = Vec::with_capacity(cores.len());
    for (i, runtime) in cores.handles().enumerate() {
        let (inbox, sockets) = mpsc::unbounded_channel();
        let state = if i == 0 {
            state.clone()
        } else {
            state.for_thread()?
        };
        let done = runtime.spawn(connections::serve(
            Inbox { sockets },
            routes::Entry::new(state),
            client_header_timeout,
            stop.clone(),
        ));
        servers.push(ThreadServer { inbox, done });
    }
    Ok(servers)
}

/// A server thread's listener: the sockets the accept loop hands it,
/// registered with this thread's reactor.
struct Inbox {
    sockets: mpsc::UnboundedReceiver<std::net::TcpStream>,
}

impl Inbox {
    /// The next socket, registered with this thread's reactor; waits
    /// forever once the accept loop has ended (the server stops on its
    /// shutdown signal).
    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        match self.remaining().await {
            Some(accepted) => accepted,
            // The accept loop ended (shutdown): the server stops accepting
            // on its shutdown signal.
            None => std::future::pending().await,
        }
    }

    /// The next socket, or `None` once the accept loop has ended and every
    /// socket it handed over was taken (after a stop: those it accepted
    /// before, its backlog included).
    async fn remaining(&mut self) -> Option<(TcpStream, SocketAddr)> {
        while let Some(socket) = self.sockets.recv().await {
            let registered = cores::register(socket).and_then(|tcp| {
                let peer = tcp.peer_addr()?;
                Ok((tcp, peer))
            });
            match registered {
                Ok(accepted) => return Some(accepted),
                // Reset before it got here: nothing to serve.
                Err(e) => tracing::debug!(error = %e, "dropping an accepted connection"),
            }
        }
        None
    }
}

async fn serve(
    serving: Serving,
    state: AppState,
    stop: CancellationToken,
    grace: Duration,
    background: CancellationToken,
    tasks: TaskTracker,
) {
    let Serving {
        listener,
        cores,
        servers,
    } = serving;
    let router = state.router().clone();
    let hard_stop = state.shutdown_token();
    let (inboxes, done): (Vec<_>, Vec<_>) = servers.into_iter().map(|s| (s.inbox, s.done)).unzip();
    let server = async {
        cores::accept_in_turn(listener, inboxes.len(), &stop, |i, socket| {
            // A thread whose server ended (it failed) drops its sockets.
            let _ = inboxes[i].send(socket);
        })
        .await;
        // Every socket accepted is handed over: the threads serve what is
        // in their inboxes, then stop waiting for more.
        drop(inboxes);
        let mut result = Ok(());
        for server in done {
            match server.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(e) => result = Err(std::io::Error::other(e)),
            }
        }
        result
    };
    let mut server = std::pin::pin!(server);
    let ended = tokio::select! {
        r = &mut server => Some(r),
        () = async {
            stop.cancelled().await;
            tracing::info!(?grace, "shutting down: no new connections, waiting for in-flight requests");
            tokio::time::sleep(grace).await;
        } => None,
    };
    let result = match ended {
        Some(r) => r,
        None => {
            tracing::warn!("shutdown grace over: cancelling the remaining requests");
            hard_stop.cancel();
            match tokio::time::timeout(FLUSH_AFTER_CANCEL, &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(
                        "connections still open after cancelling; closing the server anyway"
                    );
                    Ok(())
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP server failed");
    }
    hard_stop.cancel();
    router.close().await;
    background.cancel();
    // Closes the connections still open (after a timed-out flush) and ends
    // what runs on the threads (remote mode: the `Route` streams), after
    // the router has closed its session.
    cores.stop().await;
    tasks.close();
    tracing::info!("sidecar stopped");
}

mod connections;
#[cfg(test)]
mod tests;
