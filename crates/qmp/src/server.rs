//! Listening sockets and per-client threads.
//!
//! Threads: one accept thread per server (`qmp-accept`), and per client a reader thread
//! (`qmp-client`, which also runs the handler) and a writer thread (`qmp-writer`) fed by a bounded
//! queue that carries both replies and events, so a slow client never blocks the VMM.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::event::{Delivery, EventSink};
use crate::framing::{Frame, JsonSplitter};
use crate::session::{greeting, Dispatcher, QmpHandler, Session};
use crate::spec::{QmpEndpoint, SocketAddress};
use crate::wire::to_wire;

/// Default limit of simultaneous clients per server.
pub const DEFAULT_MAX_CLIENTS: usize = 16;
/// Default limit of one request (4 MiB); longer ones get an error and are skipped.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 << 20;

/// Outgoing messages waiting for one client (replies and events).
const CLIENT_QUEUE: usize = 256;
/// How long a write to a client may block before the client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `shutdown` waits for clients to flush and finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Server limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Simultaneous clients; more are answered with an error and closed.
    pub max_clients: usize,
    /// Longest accepted request, in bytes.
    pub max_request_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_clients: DEFAULT_MAX_CLIENTS,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

/// Failure to set up a QMP socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("Failed to bind socket to {path}: {source}")]
    BindUnix { path: PathBuf, source: io::Error },
    #[error("Failed to bind socket to {path}: Address already in use (another process is listening on it)")]
    UnixInUse { path: PathBuf },
    #[error("Failed to bind socket to {path}: it exists and is not a socket; not removing it")]
    NotASocket { path: PathBuf },
    #[error("Failed to bind socket to {addr}: {source}")]
    BindTcp { addr: String, source: io::Error },
    #[error("Failed to accept the first QMP connection on {endpoint}: {source}")]
    Accept { endpoint: String, source: io::Error },
    #[error("Failed to start a QMP thread: {0}")]
    Thread(io::Error),
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) {
        // The peer may already be gone; nothing to do about errors here.
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        };
    }

    fn set_write_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(Some(t)),
            Stream::Tcp(s) => s.set_write_timeout(Some(t)),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                // QMP messages are small; do not let Nagle delay replies.
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        }
    }
}

struct ClientEntry {
    /// Used to shut the socket down from outside the client's threads.
    stream: Stream,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    dispatcher: Arc<Dispatcher>,
    sink: EventSink,
    config: ServerConfig,
    clients: Mutex<HashMap<u64, ClientEntry>>,
    next_client: AtomicU64,
    closing: AtomicBool,
}

impl Shared {
    fn clients(&self) -> MutexGuard<'_, HashMap<u64, ClientEntry>> {
        self.clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The socket file a Unix server created, removed again on shutdown if it is still ours.
struct UnixPathGuard {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl UnixPathGuard {
    fn remove(&self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// A running QMP server on one socket. Dropping it (or [`QmpServer::shutdown`]) stops
/// accepting, lets every client flush what was queued for it, closes the clients and removes the
/// Unix socket file.
pub struct QmpServer {
    shared: Arc<Shared>,
    endpoint: QmpEndpoint,
    local: Option<std::net::SocketAddr>,
    unix_path: Option<UnixPathGuard>,
    accept_thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpServer")
            .field("endpoint", &self.endpoint.to_string())
            .field("local", &self.local)
            .finish()
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates a Unix listening socket at `path` with mode 0600, with no window in which another
/// user could connect: it is bound inside a fresh 0700 directory next to `path`, chmod-ed, then
/// renamed into place. A stale socket at `path` (nobody listening) is replaced; a live socket or
/// a non-socket file is an error.
fn bind_unix(path: &Path) -> Result<(UnixListener, UnixPathGuard), ServerError> {
    let bind_err = |source| ServerError::BindUnix {
        path: path.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::UnixInUse {
                    path: path.to_path_buf(),
                });
            }
            tracing::info!(path = %path.display(), "qmp: removing stale socket");
        }
        Ok(_) => {
            return Err(ServerError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp_dir = parent.join(format!(".qmp{}.{n}", std::process::id()));
    let tmp_sock = tmp_dir.join("s");
    // sun_path holds 107 bytes plus the NUL.
    let listener = if tmp_sock.as_os_str().len() < 108 {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp_dir)
            .map_err(bind_err)?;
        let result = (|| {
            let l = UnixListener::bind(&tmp_sock)?;
            fs::set_permissions(&tmp_sock, fs::Permissions::from_mode(0o600))?;
            fs::rename(&tmp_sock, path)?;
            Ok(l)
        })();
        let _ = fs::remove_file(&tmp_sock);
        let _ = fs::remove_dir(&tmp_dir);
        result.map_err(bind_err)?
    } else {
        // Path too long for the private-directory trick: bind in place and restrict at once.
        let _ = fs::remove_file(path);
        let l = UnixListener::bind(path).map_err(bind_err)?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        l
    };
    let meta = fs::symlink_metadata(path).map_err(bind_err)?;
    Ok((
        listener,
        UnixPathGuard {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

fn bind_tcp(host: &str, port: u16) -> Result<TcpListener, ServerError> {
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let err = |source| ServerError::BindTcp {
        addr: addr.clone(),
        source,
    };
    let addrs: Vec<_> = addr.to_socket_addrs().map_err(err)?.collect();
    TcpListener::bind(&addrs[..]).map_err(err)
}

impl QmpServer {
    /// Binds the endpoint and starts serving. With `endpoint.wait` (QEMU's `wait=on`), this
    /// blocks until the first client connects (after printing QEMU's "waiting for connection"
    /// notice to stderr); that client is then served like any other.
    pub fn start(
        endpoint: &QmpEndpoint,
        handler: Arc<dyn QmpHandler>,
        sink: EventSink,
        config: ServerConfig,
    ) -> Result<QmpServer, ServerError> {
        let (listener, unix_path, local) = match &endpoint.address {
            SocketAddress::Unix(path) => {
                let (l, guard) = bind_unix(path)?;
                (Listener::Unix(l), Some(guard), None)
            }
            SocketAddress::Tcp { host, port } => {
                let l = bind_tcp(host, *port)?;
                let local = l.local_addr().ok();
                (Listener::Tcp(l), None, local)
            }
        };
        let shared = Arc::new(Shared {
            dispatcher: Arc::new(Dispatcher::new(handler)),
            sink,
            config,
            clients: Mutex::new(HashMap::new()),
            next_client: AtomicU64::new(0),
            closing: AtomicBool::new(false),
        });
        let mut server = QmpServer {
            shared: shared.clone(),
            endpoint: endpoint.clone(),
            local,
            unix_path,
            accept_thread: None,
        };
        if endpoint.wait {
            let shown = match (&endpoint.address, local) {
                (SocketAddress::Tcp { .. }, Some(a)) => format!("tcp:{a},server=on"),
                _ => endpoint.to_string(),
            };
            eprintln!("enlighten: info: waiting for connection on: disconnected:{shown}");
            let stream = listener.accept().map_err(|source| ServerError::Accept {
                endpoint: shown,
                source,
            })?;
            spawn_client(&shared, stream)?;
        }
        let accept_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("qmp-accept".to_string())
            .spawn(move || accept_loop(listener, accept_shared))
            .map_err(ServerError::Thread)?;
        server.accept_thread = Some(handle);
        Ok(server)
    }

    /// The endpoint this server was started with.
    pub fn endpoint(&self) -> &QmpEndpoint {
        &self.endpoint
    }

    /// The bound TCP address (useful with port 0); `None` for Unix sockets.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.local
    }

    /// Number of connected clients.
    pub fn client_count(&self) -> usize {
        self.shared.clients().len()
    }

    /// Stops the server: no new clients, every client gets what was queued for it (e.g. the
    /// reply to `quit` and a final SHUTDOWN event), then is disconnected; the socket file is
    /// removed. Waits at most about two seconds. Must not be called from inside
    /// [`QmpHandler::execute`].
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.shared.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(handle) = self.accept_thread.take() {
            self.wake_accept();
            let deadline = Instant::now() + SHUTDOWN_GRACE;
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
        // Stop reading from every client; each reader finishes its current request, flushes its
        // queue and exits.
        let handles: Vec<JoinHandle<()>> = {
            let mut clients = self.shared.clients();
            clients
                .values_mut()
                .filter_map(|c| {
                    c.stream.shutdown(Shutdown::Read);
                    c.thread.take()
                })
                .collect()
        };
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        for h in handles {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
        for c in self.shared.clients().values() {
            c.stream.shutdown(Shutdown::Both);
        }
        if let Some(guard) = &self.unix_path {
            guard.remove();
        }
    }

    /// Unblocks the accept thread by connecting to ourselves.
    fn wake_accept(&self) {
        match &self.endpoint.address {
            SocketAddress::Unix(path) => {
                let _ = UnixStream::connect(path);
            }
            SocketAddress::Tcp { .. } => {
                if let Some(mut addr) = self.local {
                    if addr.ip().is_unspecified() {
                        addr.set_ip(match addr {
                            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                        });
                    }
                    let _ = TcpStream::connect_timeout(&addr, Duration::from_millis(500));
                }
            }
        }
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    loop {
        let stream = listener.accept();
        if shared.closing.load(Ordering::SeqCst) {
            return;
        }
        match stream {
            Ok(stream) => {
                if let Err(e) = spawn_client(&shared, stream) {
                    tracing::warn!("qmp: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("qmp: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn spawn_client(shared: &Arc<Shared>, mut stream: Stream) -> Result<(), ServerError> {
    let _ = stream.set_write_timeout(WRITE_TIMEOUT);
    let mut clients = shared.clients();
    if clients.len() >= shared.config.max_clients {
        drop(clients);
        tracing::warn!("qmp: refusing a client: too many clients");
        let reply = serde_json::json!({"error": {"class": "GenericError",
            "desc": format!("Too many QMP clients (the limit is {})", shared.config.max_clients)}});
        let _ = stream.set_write_timeout(Duration::from_millis(200));
        let _ = stream.write_all(to_wire(&reply).as_bytes());
        stream.shutdown(Shutdown::Both);
        return Ok(());
    }
    let id = shared.next_client.fetch_add(1, Ordering::Relaxed);
    let control = match stream.try_clone() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("qmp: dropping a client: cannot duplicate its socket: {e}");
            stream.shutdown(Shutdown::Both);
            return Ok(());
        }
    };
    let client_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name(format!("qmp-client-{id}"))
        .spawn(move || {
            client_main(&client_shared, id, stream);
            client_shared.clients().remove(&id);
        })
        .map_err(ServerError::Thread)?;
    clients.insert(
        id,
        ClientEntry {
            stream: control,
            thread: Some(thread),
        },
    );
    Ok(())
}

fn writer_main(mut stream: Stream, rx: Receiver<Delivery>) {
    while let Ok(delivery) = rx.recv() {
        match delivery {
            Delivery::Line(line) => {
                if stream.write_all(line.as_bytes()).is_err() {
                    // Peer gone or stuck past the write timeout: make the reader stop too.
                    stream.shutdown(Shutdown::Both);
                    return;
                }
            }
            Delivery::Close => return,
        }
    }
}

fn client_main(shared: &Arc<Shared>, id: u64, mut stream: Stream) {
    let (tx, rx) = sync_channel::<Delivery>(CLIENT_QUEUE);
    let writer = match stream.try_clone().and_then(|w| {
        std::thread::Builder::new()
            .name(format!("qmp-writer-{id}"))
            .spawn(move || writer_main(w, rx))
    }) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("qmp: cannot start a writer thread: {e}");
            stream.shutdown(Shutdown::Both);
            return;
        }
    };
    tracing::debug!(client = id, "qmp client connected");
    let mut subscription = None;
    if tx.send(Delivery::Line(Arc::from(greeting()))).is_ok() {
        serve(shared, &mut stream, &tx, &mut subscription);
    }
    if let Some(sub) = subscription {
        shared.sink.unsubscribe(sub);
    }
    // Flush what is queued (at most CLIENT_QUEUE lines, each bounded by the write timeout).
    let _ = tx.send(Delivery::Close);
    drop(tx);
    let _ = writer.join();
    stream.shutdown(Shutdown::Both);
    tracing::debug!(client = id, "qmp client disconnected");
}

fn serve(
    shared: &Arc<Shared>,
    stream: &mut Stream,
    tx: &SyncSender<Delivery>,
    subscription: &mut Option<u64>,
) {
    let mut session = Session::new(shared.dispatcher.clone());
    let mut splitter = JsonSplitter::new(shared.config.max_request_bytes);
    let mut buf = vec![0u8; 64 * 1024];
    let mut frames: Vec<Frame> = Vec::new();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if shared.closing.load(Ordering::SeqCst) {
            return;
        }
        splitter.push(&buf[..n], &mut frames);
        for frame in frames.drain(..) {
            let was_negotiated = session.negotiated();
            let (reply, succeeded) = session.handle_frame_ex(frame);
            let reply: Arc<str> = Arc::from(reply);
            if !was_negotiated && session.negotiated() && subscription.is_none() {
                let Ok(overflow) = stream.try_clone() else {
                    return;
                };
                match shared.sink.subscribe_client(
                    tx.clone(),
                    reply,
                    Box::new(move || overflow.shutdown(Shutdown::Both)),
                ) {
                    Some(id) => *subscription = Some(id),
                    None => return,
                }
            } else if tx.send(Delivery::Line(reply)).is_err() {
                return;
            }
            if let Some(command) = succeeded {
                session.after_reply(&command);
            }
        }
    }
}
