//! The `qmp_stream` target: bytes from a QMP client through the crate's socket-independent protocol layer, exactly
//! as the server's client loop uses it: [`qmp::JsonSplitter`] cuts the stream into frames (chunked as the input
//! says), and a [`qmp::Session`] answers each frame.
//!
//! Two input modes:
//! - raw: arbitrary bytes, arbitrary chunking, a small size limit;
//! - structured: a sequence of well-formed requests (real command names, odd arguments, ids), serialised with
//!   optional whitespace and single-quote spelling, then chunked.
//!
//! Invariants: no panic; the splitter never buffers more than its limit; every frame gets exactly one reply line,
//! a JSON object ending in `\r\n` with exactly one of `return` / `error` (plus an optional `id`), errors with a
//! `class` and a `desc` string; the objects, arrays and strings cut from the stream do not depend on the chunking; in structured mode
//! every request gets a reply carrying its own `id`, in order.

use arbitrary::{Result, Unstructured};
use qmp::{ArgType, CommandSpec, Dispatcher, Frame, JsonSplitter, QmpError, QmpHandler, Session};
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// A VMM-like handler: a few commands with typed arguments.
struct Vm;

impl QmpHandler for Vm {
    fn commands(&self) -> Vec<CommandSpec> {
        vec![
            CommandSpec::new("stop"),
            CommandSpec::new("cont"),
            CommandSpec::new("query-status"),
            CommandSpec::new("system_reset"),
            CommandSpec::new("quit"),
            CommandSpec::new("human-monitor-command")
                .arg("command-line", ArgType::Str)
                .optional_arg("cpu-index", ArgType::Int),
            CommandSpec::new("x-typed")
                .arg("u", ArgType::Uint)
                .optional_arg("b", ArgType::Bool)
                .optional_arg("n", ArgType::Number)
                .optional_arg("o", ArgType::Object)
                .optional_arg("a", ArgType::Array)
                .optional_arg("any", ArgType::Any),
            // A built-in name: ignored by the dispatcher.
            CommandSpec::new("query-version"),
        ]
    }

    fn execute(
        &self,
        command: &str,
        args: &Map<String, Value>,
    ) -> std::result::Result<Value, QmpError> {
        match command {
            "stop" | "cont" | "system_reset" | "quit" => Ok(qmp::empty_return()),
            "query-status" => {
                Ok(json!({"status": "running", "singlestep": false, "running": true}))
            }
            "human-monitor-command" => Ok(Value::String(String::new())),
            "x-typed" => Ok(Value::Object(args.clone())),
            other => Err(QmpError::command_not_found(other)),
        }
    }
}

const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-version",
    "stop",
    "cont",
    "query-status",
    "system_reset",
    "quit",
    "human-monitor-command",
    "x-typed",
    "no-such-command",
    "",
];

fn check_reply(reply: &str, frame: &Frame) -> Value {
    assert!(reply.ends_with("\r\n"), "reply without CRLF: {reply:?}");
    let body = &reply[..reply.len() - 2];
    assert!(
        !body.contains('\n') && !body.contains('\r'),
        "multi-line reply: {reply:?}"
    );
    let v: Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(e) => panic!("reply is not JSON ({e}): {reply:?} for {frame:?}"),
    };
    let Some(obj) = v.as_object() else {
        panic!("reply is not an object: {reply:?}");
    };
    let has_return = obj.contains_key("return");
    let has_error = obj.contains_key("error");
    assert!(
        has_return != has_error,
        "reply must have exactly one of return/error: {reply:?}"
    );
    for k in obj.keys() {
        assert!(
            matches!(k.as_str(), "return" | "error" | "id"),
            "unexpected member {k} in {reply:?}"
        );
    }
    if let Some(err) = obj.get("error") {
        assert!(
            err.get("class").is_some_and(Value::is_string),
            "error without class: {reply:?}"
        );
        assert!(
            err.get("desc").is_some_and(Value::is_string),
            "error without desc: {reply:?}"
        );
    }
    if matches!(frame, Frame::Error(_)) {
        assert!(
            has_error,
            "an unparsable frame got a success reply: {reply:?}"
        );
    }
    v
}

/// Feeds `data` in the given chunk sizes; returns (frames, replies).
fn feed(
    data: &[u8],
    chunks: &[usize],
    max_bytes: usize,
    session: &mut Session,
) -> (Vec<Frame>, Vec<Value>) {
    let mut splitter = JsonSplitter::new(max_bytes);
    let mut frames = Vec::new();
    let mut replies = Vec::new();
    let mut pos = 0;
    let mut ci = 0;
    while pos < data.len() {
        let n = chunks
            .get(ci)
            .copied()
            .unwrap_or(data.len())
            .clamp(1, data.len() - pos);
        ci += 1;
        let mut out = Vec::new();
        splitter.push(&data[pos..pos + n], &mut out);
        pos += n;
        assert!(
            splitter.buffered() <= max_bytes.max(2),
            "splitter holds {} bytes with a limit of {max_bytes}",
            splitter.buffered()
        );
        for frame in out {
            if let Frame::Value(v) = &frame {
                assert!(
                    v.len() <= max_bytes.max(2),
                    "frame of {} bytes over the limit {max_bytes}",
                    v.len()
                );
            }
            let (reply, _after) = session.handle_frame_ex(frame.clone());
            replies.push(check_reply(&reply, &frame));
            frames.push(frame);
        }
    }
    (frames, replies)
}

/// The structured values (objects, arrays, strings) cut from the stream. Top-level scalars are left out: a run of
/// garbage reported at the end of one read can be followed by a scalar-looking byte in the next read, which the
/// whole-stream split would have counted as part of the garbage (a documented trade-off: garbage is answered at
/// once instead of waiting for the byte that ends it).
fn values(frames: &[Frame]) -> Vec<&Vec<u8>> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Value(v) if matches!(v.first(), Some(b'{' | b'[' | b'"')) => Some(v),
            _ => None,
        })
        .collect()
}

fn chunk_plan(u: &mut Unstructured<'_>) -> Result<Vec<usize>> {
    let n = u.int_in_range(0usize..=16)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(usize::from(u.arbitrary::<u8>()?) + 1);
    }
    Ok(v)
}

fn arg_value(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    Ok(match u.int_in_range(0u8..=9)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => json!(u.arbitrary::<i64>()?),
        3 => json!(u.arbitrary::<u64>()?),
        4 => json!(f64::from(u.arbitrary::<i32>()?) / 7.0),
        5 => {
            let n = u.int_in_range(0usize..=12)?;
            Value::String(String::from_utf8_lossy(u.bytes(n)?).into_owned())
        }
        6 if depth < 3 => {
            let n = u.int_in_range(0usize..=3)?;
            let mut a = Vec::new();
            for _ in 0..n {
                a.push(arg_value(u, depth + 1)?);
            }
            Value::Array(a)
        }
        7 if depth < 3 => {
            let n = u.int_in_range(0usize..=3)?;
            let mut m = Map::new();
            for _ in 0..n {
                m.insert(pick_key(u)?, arg_value(u, depth + 1)?);
            }
            Value::Object(m)
        }
        _ => Value::String("oob".to_string()),
    })
}

fn pick_key(u: &mut Unstructured<'_>) -> Result<String> {
    Ok((*u.choose(&[
        "u",
        "b",
        "n",
        "o",
        "a",
        "any",
        "command-line",
        "cpu-index",
        "enable",
        "x",
    ])?)
    .to_string())
}

/// One request object; `id` tags it.
fn request(u: &mut Unstructured<'_>, id: usize) -> Result<Value> {
    let mut m = Map::new();
    if !u.ratio(1, 16)? {
        let cmd = *u.choose(COMMANDS)?;
        m.insert("execute".to_string(), Value::String(cmd.to_string()));
    }
    if u.ratio(1, 2)? {
        let n = u.int_in_range(0usize..=4)?;
        let mut args = Map::new();
        for _ in 0..n {
            args.insert(pick_key(u)?, arg_value(u, 0)?);
        }
        m.insert("arguments".to_string(), Value::Object(args));
    } else if u.ratio(1, 16)? {
        m.insert("arguments".to_string(), arg_value(u, 0)?);
    }
    if u.ratio(1, 16)? {
        m.insert(pick_key(u)?, Value::Null);
    }
    m.insert("id".to_string(), json!(id));
    Ok(Value::Object(m))
}

/// Swaps the outer quotes of keys and plain strings to QEMU's single-quote spelling where that is unambiguous.
fn single_quoted(s: &str) -> Option<String> {
    if s.contains('\'') || s.contains('\\') {
        return None;
    }
    Some(s.replace('"', "'"))
}

/// The whole target.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(mode) = u.arbitrary::<u8>() else {
        return;
    };
    let Ok(chunks) = chunk_plan(&mut u) else {
        return;
    };
    let dispatcher = Arc::new(Dispatcher::new(Arc::new(Vm)));
    if mode & 1 == 0 {
        let max_bytes = [16usize, 64, 256, 4096][usize::from(mode >> 1) & 3];
        let stream = u.take_rest();
        let mut s1 = Session::new(dispatcher.clone());
        let (chunked, replies) = feed(stream, &chunks, max_bytes, &mut s1);
        assert_eq!(chunked.len(), replies.len());
        let mut s2 = Session::new(dispatcher);
        let (whole, _) = feed(stream, &[stream.len()], max_bytes, &mut s2);
        assert_eq!(
            values(&chunked),
            values(&whole),
            "structured values depend on the chunking"
        );
        return;
    }
    // Structured: well-formed requests, each must be answered with its id.
    let mut stream = Vec::new();
    let mut n = 0usize;
    while !u.is_empty() && n < 64 {
        let Ok(req) = request(&mut u, n) else { break };
        let text = if u.ratio(1, 2).unwrap_or(false) {
            serde_json::to_string_pretty(&req).unwrap_or_default()
        } else {
            serde_json::to_string(&req).unwrap_or_default()
        };
        let text = if u.ratio(1, 4).unwrap_or(false) {
            single_quoted(&text).unwrap_or(text)
        } else {
            text
        };
        stream.extend_from_slice(text.as_bytes());
        const SEPS: [&[u8]; 4] = [b"", b"\n", b"\r\n", b" \t"];
        let sep: &[u8] = u.choose(&SEPS).copied().unwrap_or(b"");
        stream.extend_from_slice(sep);
        n += 1;
    }
    let mut session = Session::new(dispatcher);
    let negotiated_first = mode & 2 != 0;
    if negotiated_first {
        let reply = session.handle_value(json!({"execute": "qmp_capabilities"}));
        assert!(
            reply.starts_with("{\"return\""),
            "negotiation failed: {reply}"
        );
    }
    let (frames, replies) = feed(&stream, &chunks, 1 << 20, &mut session);
    assert_eq!(
        frames.len(),
        n,
        "{n} requests cut into {} frames",
        frames.len()
    );
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(
            r.get("id"),
            Some(&json!(i)),
            "reply {i} carries the wrong id: {r}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random inputs in both modes hold every invariant (each call asserts them itself).
    #[test]
    fn random_inputs_hold_invariants() {
        for data in crate::test_inputs(0x5EED, 2000, 512) {
            run(&data);
        }
    }

    /// Fixed streams: one reply per frame, in order, whatever the chunking.
    #[test]
    fn stream_table() {
        let table: [(&[u8], &[usize], usize); 5] = [
            (
                b"{\"execute\":\"qmp_capabilities\",\"id\":1}{\"execute\":\"stop\",\"id\":2}",
                &[3, 5, 7],
                2,
            ),
            (b"{'execute': 'query-status'}\r\n", &[1], 1),
            (b"}}garbage{\"execute\":1}", &[2, 2], 3),
            (b"[1,[2,[3]]] \"str\" 42 ", &[4], 3),
            (b"{\"a\":\"\\\"}\"}", &[1, 1, 1], 1),
        ];
        for (stream, chunks, frames) in table {
            let mut session = Session::new(Arc::new(Dispatcher::new(Arc::new(Vm))));
            let (f, r) = feed(stream, chunks, 4096, &mut session);
            assert_eq!(f.len(), frames, "{:?}", String::from_utf8_lossy(stream));
            assert_eq!(r.len(), frames);
        }
    }
}
