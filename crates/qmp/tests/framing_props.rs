//! Property tests of the framing layer and the session: arbitrary input never panics, memory
//! stays bounded, and valid requests survive any chunking.

use std::sync::Arc;

use proptest::prelude::*;
use qmp::{
    empty_return, CommandSpec, Dispatcher, Frame, JsonSplitter, QmpError, QmpHandler, Session,
};
use serde_json::{json, Map, Value};

struct Echo;
impl QmpHandler for Echo {
    fn commands(&self) -> Vec<CommandSpec> {
        vec![CommandSpec::new("ping")]
    }
    fn execute(&self, _command: &str, _args: &Map<String, Value>) -> Result<Value, QmpError> {
        Ok(empty_return())
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "[ -~]{0,12}".prop_map(Value::String),
        "[\"'\\\\{}\\[\\]]{0,6}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..20)
    ) {
        let limit = 256;
        let mut splitter = JsonSplitter::new(limit);
        let mut session = Session::new(Arc::new(Dispatcher::new(Arc::new(Echo))));
        let mut frames = Vec::new();
        for chunk in &chunks {
            splitter.push(chunk, &mut frames);
            prop_assert!(splitter.buffered() <= limit);
            for f in frames.drain(..) {
                if let Frame::Value(v) = &f {
                    prop_assert!(v.len() <= limit);
                }
                let line = session.handle_frame(f);
                prop_assert!(line.ends_with("\r\n"));
                let reply: Value = serde_json::from_str(line.trim_end()).unwrap();
                prop_assert!(reply.get("return").is_some() || reply.get("error").is_some());
            }
        }
    }

    #[test]
    fn values_survive_any_chunking(
        values in prop::collection::vec(json_value(), 1..6),
        cuts in prop::collection::vec(any::<usize>(), 0..10),
        pretty in any::<bool>(),
    ) {
        // Only containers and strings are self-delimiting; wrap scalars in an array.
        let values: Vec<Value> = values
            .into_iter()
            .map(|v| if v.is_object() || v.is_array() || v.is_string() { v } else { json!([v]) })
            .collect();
        let mut stream = Vec::new();
        for v in &values {
            let text = if pretty {
                serde_json::to_string_pretty(v).unwrap()
            } else {
                serde_json::to_string(v).unwrap()
            };
            stream.extend_from_slice(text.as_bytes());
        }
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        points.sort_unstable();
        let mut splitter = JsonSplitter::new(1 << 20);
        let mut frames = Vec::new();
        let mut last = 0;
        for p in points.into_iter().chain(std::iter::once(stream.len())) {
            splitter.push(&stream[last..p], &mut frames);
            last = p;
        }
        let parsed: Vec<Value> = frames
            .into_iter()
            .map(|f| match f {
                Frame::Value(b) => serde_json::from_slice(&b).unwrap(),
                Frame::Error(e) => panic!("unexpected error frame {e}"),
            })
            .collect();
        prop_assert_eq!(parsed, values);
    }
}
