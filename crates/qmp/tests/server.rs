//! End-to-end tests over real sockets.

mod common;

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, FakeVm, Fixture, TempDir};
use qmp::{
    Event, EventSink, GuestPanicAction, GuestPanicInformation, QmpEndpoint, QmpServer, RunState,
    ServerConfig, ServerError, ShutdownCause, SocketAddress,
};
use serde_json::{json, Value};

fn err(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn greeting_negotiation_and_commands() {
    let f = Fixture::new("greet");
    let mut c = f.connect();
    assert_eq!(
        c.greeting(),
        json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
               "package": format!("enlighten {}", env!("CARGO_PKG_VERSION"))},
               "capabilities": []}})
    );
    let expecting = "Expecting capabilities negotiation with 'qmp_capabilities'";
    assert_eq!(
        c.execute(json!({"execute": "query-status"})),
        err("CommandNotFound", expecting)
    );
    assert_eq!(
        c.execute(json!({"execute": "no-such", "id": 5})),
        json!({"error": {"class": "CommandNotFound", "desc": expecting}, "id": 5})
    );
    assert_eq!(
        c.execute(json!({"execute": "qmp_capabilities", "arguments": {}})),
        json!({"return": {}})
    );
    assert_eq!(
        c.execute(json!({"execute": "qmp_capabilities"})),
        err(
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored"
        )
    );
    assert_eq!(
        c.execute(json!({"execute": "no-such", "id": "x"})),
        json!({"error": {"class": "CommandNotFound",
               "desc": "The command no-such has not been found"}, "id": "x"})
    );
    assert_eq!(
        c.execute(json!({"execute": "query-status", "id": "__qmp#00001"})),
        json!({"return": {"running": true, "singlestep": false, "status": "running"},
               "id": "__qmp#00001"})
    );
    let names: Vec<String> = c.execute(json!({"execute": "query-commands"}))["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    for expected in [
        "qmp_capabilities",
        "query-commands",
        "query-version",
        "query-status",
        "stop",
        "cont",
        "echo",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    assert_eq!(
        c.execute(json!({"execute": "query-version"}))["return"]["qemu"],
        json!({"major": 7, "minor": 2, "micro": 0})
    );
}

#[test]
fn id_echo_of_several_types() {
    let f = Fixture::new("ids");
    let mut c = f.connect();
    c.negotiate();
    for id in [
        json!("__qmp#00000"),
        json!(0),
        json!(u64::MAX),
        json!(-2.5),
        json!(null),
        json!(false),
        json!([1, [2], "3"]),
        json!({"a": {"b": []}}),
    ] {
        assert_eq!(
            c.execute(json!({"execute": "echo", "arguments": {"s": "v"}, "id": id})),
            json!({"return": {"s": "v"}, "id": id})
        );
    }
}

#[test]
fn framing_without_newline_batched_and_split() {
    let f = Fixture::new("framing");
    let mut c = f.connect();
    c.greeting();
    // No newline, several requests in one write.
    c.send(
        br#"{"execute":"qmp_capabilities"}{"execute":"echo","arguments":{"s":"a"},"id":1}  {"execute":"echo","arguments":{"s":"b"},"id":2}"#,
    );
    assert_eq!(c.recv(), json!({"return": {}}));
    assert_eq!(c.recv(), json!({"return": {"s": "a"}, "id": 1}));
    assert_eq!(c.recv(), json!({"return": {"s": "b"}, "id": 2}));
    // One request split over many writes, including inside a string and an escape.
    let req = br#"{"execute":"echo","arguments":{"s":"x\"}{y","n":-7},"id":"split"}"#;
    for chunk in req.chunks(3) {
        c.send(chunk);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        c.recv(),
        json!({"return": {"s": "x\"}{y", "n": -7}, "id": "split"})
    );
}

#[test]
fn garbage_and_malformed_json_keep_the_connection() {
    let f = Fixture::new("garbage");
    let mut c = f.connect();
    c.negotiate();
    c.send(b"\x00\x01\xff}}]");
    let e = c.recv();
    assert_eq!(e["error"]["class"], "GenericError");
    assert!(e["error"]["desc"]
        .as_str()
        .unwrap()
        .starts_with("JSON parse error, "));
    assert!(e.get("id").is_none());
    c.send(br#"{"execute": "echo", "arguments": {"s": }, "id": 1}"#);
    let e = c.recv();
    assert_eq!(e["error"]["class"], "GenericError");
    assert!(e["error"]["desc"]
        .as_str()
        .unwrap()
        .starts_with("JSON parse error, "));
    c.send(b"[1,2]");
    assert_eq!(
        c.recv(),
        err("GenericError", "QMP input must be a JSON object")
    );
    c.send(br#"bogus{"execute":"echo","arguments":{"s":"alive"},"id":9}"#);
    let e = c.recv();
    assert!(e["error"]["desc"]
        .as_str()
        .unwrap()
        .starts_with("JSON parse error"));
    assert_eq!(c.recv(), json!({"return": {"s": "alive"}, "id": 9}));
}

#[test]
fn ten_megabyte_string_is_refused_and_others_unaffected() {
    let f = Fixture::with_config(
        "big",
        ServerConfig {
            max_request_bytes: 1 << 20,
            ..ServerConfig::default()
        },
    );
    let mut other = f.connect();
    other.negotiate();
    let mut big = f.connect();
    big.negotiate();

    let sender = {
        let mut stream = big.stream.try_clone().unwrap();
        std::thread::spawn(move || {
            stream
                .write_all(br#"{"execute":"echo","arguments":{"s":""#)
                .unwrap();
            let chunk = vec![b'a'; 1 << 20];
            for _ in 0..10 {
                stream.write_all(&chunk).unwrap();
            }
            stream
                .write_all(br#""}}{"execute":"echo","arguments":{"s":"after"},"id":"after"}"#)
                .unwrap();
        })
    };
    // The other client keeps working while the big request streams in.
    for i in 0..20 {
        assert_eq!(
            other.execute(json!({"execute": "echo", "arguments": {"s": "o"}, "id": i})),
            json!({"return": {"s": "o"}, "id": i})
        );
    }
    assert_eq!(
        big.recv(),
        err(
            "GenericError",
            "JSON parse error, request larger than 1048576 bytes"
        )
    );
    sender.join().unwrap();
    assert_eq!(big.recv(), json!({"return": {"s": "after"}, "id": "after"}));
    assert_eq!(
        other.execute(json!({"execute": "query-status"}))["return"]["status"],
        "running"
    );
}

#[test]
fn disconnect_mid_request_affects_nobody() {
    let f = Fixture::new("disc");
    let mut stay = f.connect();
    stay.negotiate();
    for partial in [
        &br#"{"execute":"qmp_capab"#[..],
        &br#"{"execute":"echo","arguments":{"s":"xx"#[..],
        &b"{"[..],
    ] {
        let mut gone = f.connect();
        gone.greeting();
        gone.send(partial);
        drop(gone);
    }
    // A client that disconnects while its command is running.
    let mut slow = f.connect();
    slow.negotiate();
    slow.send(br#"{"execute":"sleep","arguments":{"ms":200}}"#);
    drop(slow);
    wait_until("clients to go away", || f.server().client_count() == 1);
    assert_eq!(
        stay.execute(json!({"execute": "echo", "arguments": {"s": "ok"}})),
        json!({"return": {"s": "ok"}})
    );
    let mut again = f.connect();
    again.negotiate();
}

#[test]
fn concurrent_clients_negotiate_separately_and_events_reach_only_negotiated_ones() {
    let f = Fixture::new("events");
    let mut a = f.connect();
    let mut b = f.connect();
    a.negotiate();
    b.greeting(); // b stays in negotiation mode
    wait_until("a subscribed", || f.events.subscriber_count() == 1);

    // a's stop emits STOP; only a sees it.
    a.send(br#"{"execute":"stop","id":1}"#);
    let mut got = [a.recv(), a.recv()];
    got.sort_by_key(|v| v.get("event").is_none());
    assert_eq!(got[0]["event"], "STOP");
    assert!(got[0].get("data").is_none());
    assert_eq!(got[1], json!({"return": {}, "id": 1}));
    // Events from another thread.
    let sink = f.events.clone();
    std::thread::spawn(move || {
        sink.send(&Event::guest_panicked(
            GuestPanicAction::Poweroff,
            Some(GuestPanicInformation::hyperv([0x1e, 1, 2, 3, u64::MAX])),
        ));
        sink.send(&Event::stop());
        sink.send(&Event::shutdown(ShutdownCause::GuestPanic));
    })
    .join()
    .unwrap();
    let e1 = a.recv();
    assert_eq!(e1["event"], "GUEST_PANICKED");
    assert_eq!(
        e1["data"],
        json!({"action": "poweroff", "info": {"type": "hyper-v", "arg1": 0x1e, "arg2": 1,
               "arg3": 2, "arg4": 3, "arg5": u64::MAX}})
    );
    assert!(e1["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
    assert!(e1["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    assert_eq!(a.recv()["event"], "STOP");
    let shutdown = a.recv();
    assert_eq!(shutdown["event"], "SHUTDOWN");
    assert_eq!(
        shutdown["data"],
        json!({"guest": true, "reason": "guest-panic"})
    );
    // b got nothing: its next line is the answer to its own command.
    assert_eq!(
        b.execute(json!({"execute": "query-status"})),
        err(
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        )
    );
    b.execute(json!({"execute": "qmp_capabilities"}));
    f.events.emit(
        "RESET",
        Some(json!({"guest": false, "reason": "host-qmp-system-reset"})),
    );
    for c in [&mut a, &mut b] {
        let r = c.recv();
        assert_eq!(r["event"], "RESET");
        assert_eq!(
            r["data"],
            json!({"guest": false, "reason": "host-qmp-system-reset"})
        );
    }
}

#[test]
fn socket_is_0600_stale_socket_replaced_and_removed_on_drop() {
    let dir = TempDir::new("sockfile");
    let path = dir.path("vm.qmp");
    // A stale socket: bound, then its listener dropped without unlinking.
    drop(UnixListener::bind(&path).unwrap());
    assert!(std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_socket());
    assert!(UnixStream::connect(&path).is_err());

    let events = EventSink::new();
    let vm = Arc::new(FakeVm {
        state: Mutex::new(RunState::Prelaunch),
        events: events.clone(),
    });
    let endpoint = QmpEndpoint {
        address: SocketAddress::Unix(path.clone()),
        wait: false,
    };
    let server = QmpServer::start(
        &endpoint,
        vm.clone(),
        events.clone(),
        ServerConfig::default(),
    )
    .unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // No leftover temporary directory next to the socket.
    let entries: Vec<_> = std::fs::read_dir(&dir.0).unwrap().collect();
    assert_eq!(entries.len(), 1);
    let mut c = Client::connect(&path);
    c.negotiate();
    assert_eq!(
        c.execute(json!({"execute": "query-status"}))["return"],
        json!({"running": false, "singlestep": false, "status": "prelaunch"})
    );

    // A live socket is not stolen.
    match QmpServer::start(
        &endpoint,
        vm.clone(),
        events.clone(),
        ServerConfig::default(),
    ) {
        Err(ServerError::UnixInUse { .. }) => {}
        other => panic!("expected UnixInUse, got {other:?}"),
    }
    server.shutdown();
    assert!(c.at_eof());
    assert!(!path.exists(), "socket file removed on shutdown");

    // A regular file is never removed.
    std::fs::write(&path, b"precious").unwrap();
    match QmpServer::start(&endpoint, vm, events, ServerConfig::default()) {
        Err(e @ ServerError::NotASocket { .. }) => {
            assert!(e.to_string().contains("not a socket"), "{e}")
        }
        other => panic!("expected NotASocket, got {other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn too_many_clients_get_an_error() {
    let f = Fixture::with_config(
        "limit",
        ServerConfig {
            max_clients: 2,
            ..ServerConfig::default()
        },
    );
    let mut a = f.connect();
    let mut b = f.connect();
    a.negotiate();
    b.negotiate();
    let mut c = f.connect();
    assert_eq!(
        c.recv(),
        err("GenericError", "Too many QMP clients (the limit is 2)")
    );
    assert!(c.at_eof());
    drop(a);
    wait_until("a slot to free up", || f.server().client_count() == 1);
    let mut d = f.connect();
    d.negotiate();
    assert_eq!(
        b.execute(json!({"execute": "echo", "arguments": {"s": "b"}})),
        json!({"return": {"s": "b"}})
    );
}

#[test]
fn shutdown_flushes_queued_events() {
    let mut f = Fixture::new("flush");
    let mut c = f.connect();
    c.negotiate();
    wait_until("subscription", || f.events.subscriber_count() == 1);
    f.events.send(&Event::shutdown(ShutdownCause::HostQmpQuit));
    f.server.take().unwrap().shutdown();
    let e = c.recv();
    assert_eq!(e["event"], "SHUTDOWN");
    assert_eq!(
        e["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert!(c.at_eof());
    assert_eq!(f.events.subscriber_count(), 0);
}

#[test]
fn a_client_that_never_reads_does_not_block_emit() {
    let f = Fixture::new("slow");
    let mut lazy = f.connect();
    lazy.negotiate();
    let mut good = f.connect();
    good.negotiate();
    wait_until("subscriptions", || f.events.subscriber_count() == 2);
    // `good` reads concurrently; `lazy` never reads. Events go out in bursts of 100, each
    // burst after `good` has read the previous one, so only `lazy` can fall behind.
    let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = read.clone();
    let reader = std::thread::spawn(move || {
        for _ in 0..20_000 {
            let v = good.recv();
            assert_eq!(v["event"], "X");
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        good
    });
    let start = Instant::now();
    let big = json!({"pad": "p".repeat(200)});
    let mut slowest_emit = Duration::ZERO;
    for burst in 1..=200 {
        for _ in 0..100 {
            let t = Instant::now();
            f.events.emit("X", Some(big.clone()));
            slowest_emit = slowest_emit.max(t.elapsed());
        }
        wait_until("good to read a burst", || {
            read.load(std::sync::atomic::Ordering::SeqCst) >= burst * 100
        });
    }
    // Never blocked on the lazy client's full socket.
    assert!(slowest_emit < Duration::from_secs(1), "{slowest_emit:?}");
    assert!(start.elapsed() < Duration::from_secs(60));
    let mut good = reader.join().unwrap();
    assert_eq!(f.events.subscriber_count(), 1, "lazy client disconnected");
    assert_eq!(
        good.execute(json!({"execute": "echo", "arguments": {"s": "g"}})),
        json!({"return": {"s": "g"}})
    );
    drop(lazy);
}

#[test]
fn tcp_endpoint_and_wait_on() {
    let endpoint = QmpEndpoint::parse_qmp("tcp:127.0.0.1:0,server=on,wait=on").unwrap();
    assert!(endpoint.wait);
    let events = EventSink::new();
    let vm = Arc::new(FakeVm {
        state: Mutex::new(RunState::Running),
        events: events.clone(),
    });
    // Port 0 is only known after binding, so find a free port first.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = QmpEndpoint {
        address: SocketAddress::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
        wait: true,
    };
    let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = started.clone();
    let ev = events.clone();
    let starter = std::thread::spawn(move || {
        let s = QmpServer::start(&endpoint, vm, ev, ServerConfig::default()).unwrap();
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        s
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !started.load(std::sync::atomic::Ordering::SeqCst),
        "start() must block until a client connects"
    );
    let mut stream = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let server = starter.join().unwrap();
    assert_eq!(server.local_addr().unwrap().port(), port);
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    assert!(line.starts_with("{\"QMP\": "), "{line}");
    assert!(line.ends_with("\r\n"));
    stream
        .write_all(br#"{"execute":"qmp_capabilities"}{"execute":"query-status","id":1}"#)
        .unwrap();
    let mut replies = Vec::new();
    for _ in 0..2 {
        line.clear();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        replies.push(serde_json::from_str::<Value>(line.trim_end()).unwrap());
    }
    assert_eq!(replies[0], json!({"return": {}}));
    assert_eq!(replies[1]["return"]["status"], "running");
    server.shutdown();
}
