//! Helpers shared by the integration tests: temp dirs, a fake handler and a line client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qmp::{
    empty_return, ArgType, CommandSpec, EventSink, QmpEndpoint, QmpError, QmpHandler, QmpServer,
    RunState, ServerConfig, SocketAddress,
};
use serde_json::{Map, Value};

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "qmp-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fake VM: stop/cont change a run state and emit events; echo returns its arguments.
pub struct FakeVm {
    pub state: Mutex<RunState>,
    pub events: EventSink,
}

impl QmpHandler for FakeVm {
    fn commands(&self) -> Vec<CommandSpec> {
        vec![
            CommandSpec::new("query-status"),
            CommandSpec::new("stop"),
            CommandSpec::new("cont"),
            CommandSpec::new("echo")
                .arg("s", ArgType::Str)
                .optional_arg("n", ArgType::Int),
            CommandSpec::new("sleep").arg("ms", ArgType::Uint),
        ]
    }

    fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut state = self.state.lock().unwrap();
        match command {
            "query-status" => Ok(serde_json::to_value(state.status_info()).unwrap()),
            "stop" => {
                if *state == RunState::Running {
                    *state = RunState::Paused;
                    self.events.send(&qmp::Event::stop());
                }
                Ok(empty_return())
            }
            "cont" => {
                if state.needs_reset() {
                    return Err(QmpError::reset_required());
                }
                if *state != RunState::Running {
                    *state = RunState::Running;
                    self.events.send(&qmp::Event::resume());
                }
                Ok(empty_return())
            }
            "echo" => Ok(Value::Object(args.clone())),
            "sleep" => {
                drop(state);
                let ms = args.get("ms").and_then(Value::as_u64).unwrap_or(0);
                std::thread::sleep(Duration::from_millis(ms));
                Ok(empty_return())
            }
            other => Err(QmpError::command_not_found(other)),
        }
    }
}

/// Field order matters: the server is dropped (and its socket removed) before the directory.
pub struct Fixture {
    pub server: Option<QmpServer>,
    pub events: EventSink,
    pub sock: PathBuf,
    pub dir: TempDir,
}

impl Fixture {
    pub fn new(tag: &str) -> Self {
        Self::with_config(tag, ServerConfig::default())
    }

    pub fn with_config(tag: &str, config: ServerConfig) -> Self {
        let dir = TempDir::new(tag);
        let sock = dir.path("qmp.sock");
        let events = EventSink::new();
        let vm = Arc::new(FakeVm {
            state: Mutex::new(RunState::Running),
            events: events.clone(),
        });
        let endpoint = QmpEndpoint {
            address: SocketAddress::Unix(sock.clone()),
            wait: false,
        };
        let server = QmpServer::start(&endpoint, vm, events.clone(), config).unwrap();
        Fixture {
            server: Some(server),
            events,
            sock,
            dir,
        }
    }

    pub fn connect(&self) -> Client {
        Client::connect(&self.sock)
    }

    pub fn server(&self) -> &QmpServer {
        self.server.as_ref().unwrap()
    }
}

/// A raw QMP client reading `\r\n`-terminated lines.
pub struct Client {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { stream, reader }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Next line, checked to end in `\r\n`, parsed.
    pub fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "unexpected EOF");
        assert!(line.ends_with("\r\n"), "line without CRLF: {line:?}");
        serde_json::from_str(line.trim_end()).unwrap()
    }

    /// Next line, or None at EOF / timeout.
    pub fn try_recv(&mut self, timeout: Duration) -> Option<Value> {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
        let mut line = String::new();
        let r = self.reader.read_line(&mut line);
        self.stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        match r {
            Ok(n) if n > 0 => Some(serde_json::from_str(line.trim_end()).unwrap()),
            _ => None,
        }
    }

    /// True when the server closed the connection.
    pub fn at_eof(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0))
    }

    pub fn greeting(&mut self) -> Value {
        let g = self.recv();
        assert!(g.get("QMP").is_some(), "not a greeting: {g}");
        g
    }

    pub fn execute(&mut self, request: Value) -> Value {
        self.send(request.to_string().as_bytes());
        self.recv()
    }

    /// Greeting + qmp_capabilities.
    pub fn negotiate(&mut self) {
        self.greeting();
        let r = self.execute(serde_json::json!({"execute": "qmp_capabilities"}));
        assert_eq!(r, serde_json::json!({"return": {}}));
    }
}
