//! Output encoding: JSON laid out like QEMU's (`{"a": 1, "b": [1, 2]}`), one message per line,
//! each ending in `\r\n`.

use std::io;

use serde::Serialize;
use serde_json::ser::Formatter;
use serde_json::Value;

/// serde_json formatter that puts `": "` between key and value and `", "` between members,
/// as QEMU's `qobject_to_json` does.
struct QemuFormatter;

impl Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }
}

/// Appends `value` to `out` in QEMU's layout (no line ending).
pub(crate) fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let mut ser = serde_json::Serializer::with_formatter(&mut *out, QemuFormatter);
    if let Err(e) = value.serialize(&mut ser) {
        // Only a failing Serialize impl can get here (writing to a Vec cannot fail); emit a
        // valid JSON null rather than half a message.
        tracing::error!("qmp: cannot serialise a message: {e}");
        out.extend_from_slice(b"null");
    }
}

/// Encodes one outgoing message: QEMU-style JSON followed by `\r\n`.
pub fn to_wire<T: Serialize + ?Sized>(value: &T) -> String {
    let mut out = Vec::with_capacity(64);
    write_json(&mut out, value);
    out.extend_from_slice(b"\r\n");
    // serde_json only produces UTF-8.
    String::from_utf8_lossy(&out).into_owned()
}

/// The `{}` that commands without a result return.
pub fn empty_return() -> Value {
    Value::Object(serde_json::Map::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn qemu_layout() {
        let cases = [
            (json!({}), "{}\r\n"),
            (json!({"return": {}}), "{\"return\": {}}\r\n"),
            (json!([1, 2, [3]]), "[1, 2, [3]]\r\n"),
            (
                json!({"a": 1, "b": {"c": "x,y: z"}}),
                "{\"a\": 1, \"b\": {\"c\": \"x,y: z\"}}\r\n",
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(to_wire(&value), expected);
            let back: Value = serde_json::from_str(expected.trim_end()).unwrap();
            assert_eq!(back, value);
        }
    }
}
