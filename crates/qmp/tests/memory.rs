//! A client streaming a huge request must not make the server buffer it. Its own test binary,
//! so no other test allocates in this process while it measures the peak RSS.

mod common;

use std::io::Write;

use common::Fixture;
use qmp::ServerConfig;
use serde_json::json;

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_64_mib_string_does_not_grow_the_server() {
    let f = Fixture::with_config(
        "memory",
        ServerConfig {
            max_request_bytes: 1 << 20,
            ..ServerConfig::default()
        },
    );
    let mut c = f.connect();
    c.negotiate();
    let before = peak_rss_kib();
    let mut stream = c.stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        stream
            .write_all(br#"{"execute":"echo","arguments":{"s":""#)
            .unwrap();
        let chunk = vec![b'z'; 256 << 10];
        for _ in 0..256 {
            stream.write_all(&chunk).unwrap();
        }
        stream
            .write_all(br#""}}{"execute":"echo","arguments":{"s":"end"},"id":1}"#)
            .unwrap();
    });
    let e = c.recv();
    assert_eq!(
        e["error"]["desc"],
        "JSON parse error, request larger than 1048576 bytes"
    );
    writer.join().unwrap();
    assert_eq!(c.recv(), json!({"return": {"s": "end"}, "id": 1}));
    let grown = peak_rss_kib().saturating_sub(before);
    // 64 MiB went through; the server may hold about 1 MiB of it (+ read buffers).
    assert!(grown < 16 << 10, "peak RSS grew by {grown} KiB");
    eprintln!("peak RSS grew by {grown} KiB while 64 MiB streamed through");
}
