//! Protocol logic of one connection, independent of sockets: request checks, negotiation,
//! argument validation and dispatch.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::error::{ErrorClass, QmpError};
use crate::framing::Frame;
use crate::types::VersionInfo;
use crate::wire::{empty_return, to_wire};

/// Commands the crate answers itself.
pub const BUILTIN_COMMANDS: [&str; 3] = ["qmp_capabilities", "query-commands", "query-version"];

/// What the VMM implements. Called on the client's own thread; several clients may call it at
/// the same time.
pub trait QmpHandler: Send + Sync {
    /// The commands this handler executes (besides [`BUILTIN_COMMANDS`]), with their arguments.
    /// Read once when a server starts; `query-commands` lists them.
    fn commands(&self) -> Vec<CommandSpec>;

    /// Executes `command` with arguments already checked against its [`CommandSpec`].
    /// Return `Ok(empty_return())` for commands without a result.
    fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError>;

    /// Called on the same thread after the reply to a successful `command` has been queued for
    /// the client, before the next request is read. QEMU acts on `quit`, `system_reset` and
    /// `system_powerdown` only after replying (so SHUTDOWN/RESET/POWERDOWN follow the reply);
    /// start those actions here to keep that order. The default does nothing.
    fn after_reply(&self, command: &str) {
        let _ = command;
    }
}

/// Type of a command argument, named in errors with QEMU's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgType {
    Str,
    Bool,
    /// A JSON integer (signed 64-bit).
    Int,
    /// A non-negative JSON integer (uint64).
    Uint,
    Number,
    Object,
    Array,
    /// Anything: no check.
    Any,
}

/// One argument of a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgSpec {
    pub name: String,
    pub ty: ArgType,
    pub optional: bool,
}

/// A command's name and arguments. Arguments not listed are refused with
/// `Parameter 'X' is unexpected`, missing ones with `Parameter 'X' is missing`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandSpec {
    pub name: String,
    pub args: Vec<ArgSpec>,
}

impl CommandSpec {
    /// A command taking no arguments.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            args: Vec::new(),
        }
    }

    /// Adds a required argument.
    pub fn arg(mut self, name: impl Into<String>, ty: ArgType) -> Self {
        self.args.push(ArgSpec {
            name: name.into(),
            ty,
            optional: false,
        });
        self
    }

    /// Adds an optional argument.
    pub fn optional_arg(mut self, name: impl Into<String>, ty: ArgType) -> Self {
        self.args.push(ArgSpec {
            name: name.into(),
            ty,
            optional: true,
        });
        self
    }

    /// Checks `args` against this spec, with QEMU's error texts.
    pub fn check(&self, args: &Map<String, Value>) -> Result<(), QmpError> {
        for spec in &self.args {
            let Some(value) = args.get(&spec.name) else {
                if spec.optional {
                    continue;
                }
                return Err(QmpError::missing_parameter(&spec.name));
            };
            let expected = match spec.ty {
                ArgType::Str if !value.is_string() => Some("string"),
                ArgType::Bool if !value.is_boolean() => Some("boolean"),
                ArgType::Int if !value.is_i64() => Some("integer"),
                ArgType::Uint if value.is_i64() && !value.is_u64() => {
                    return Err(QmpError::invalid_parameter_value(&spec.name, "uint64"));
                }
                ArgType::Uint if !value.is_u64() => Some("integer"),
                ArgType::Number if !value.is_number() => Some("number"),
                ArgType::Object if !value.is_object() => Some("object"),
                ArgType::Array if !value.is_array() => Some("array"),
                _ => None,
            };
            if let Some(expected) = expected {
                return Err(QmpError::invalid_parameter_type(&spec.name, expected));
            }
        }
        if let Some(extra) = args
            .keys()
            .find(|k| !self.args.iter().any(|a| &a.name == *k))
        {
            return Err(QmpError::unexpected_parameter(extra));
        }
        Ok(())
    }
}

/// The commands of one server: the built-ins plus the handler's. Shared by all its sessions.
pub struct Dispatcher {
    handler: Arc<dyn QmpHandler>,
    commands: Vec<CommandSpec>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("commands", &self.commands)
            .finish()
    }
}

impl Dispatcher {
    /// Reads the handler's command list once. Handler entries that reuse a built-in name, or
    /// repeat a name, are ignored with a warning.
    pub fn new(handler: Arc<dyn QmpHandler>) -> Self {
        let mut commands = vec![
            CommandSpec::new("qmp_capabilities").optional_arg("enable", ArgType::Array),
            CommandSpec::new("query-commands"),
            CommandSpec::new("query-version"),
        ];
        for spec in handler.commands() {
            if commands.iter().any(|c| c.name == spec.name) {
                tracing::warn!(command = %spec.name, "qmp: duplicate or built-in command ignored");
                continue;
            }
            commands.push(spec);
        }
        Self { handler, commands }
    }

    /// Names of every command, built-ins first.
    pub fn command_names(&self) -> impl Iterator<Item = &str> {
        self.commands.iter().map(|c| c.name.as_str())
    }

    fn spec(&self, name: &str) -> Option<&CommandSpec> {
        self.commands.iter().find(|c| c.name == name)
    }
}

/// The greeting line (with its `\r\n`).
pub fn greeting() -> String {
    #[derive(Serialize)]
    struct Inner {
        version: VersionInfo,
        capabilities: [&'static str; 0],
    }
    #[derive(Serialize)]
    struct Greeting {
        #[serde(rename = "QMP")]
        qmp: Inner,
    }
    to_wire(&Greeting {
        qmp: Inner {
            version: VersionInfo::current(),
            capabilities: [],
        },
    })
}

/// State of one connection.
#[derive(Debug)]
pub struct Session {
    dispatcher: Arc<Dispatcher>,
    negotiated: bool,
    pending_after: Option<String>,
}

/// Success reply: `{"return": ..., "id": ...}` (members in QEMU's order).
#[derive(Serialize)]
struct ReturnReply<'a> {
    #[serde(rename = "return")]
    ret: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

/// Error reply: `{"error": {"class": ..., "desc": ...}, "id": ...}`.
#[derive(Serialize)]
struct ErrorReply<'a> {
    error: &'a QmpError,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

fn error_reply(err: &QmpError, id: Option<&Value>) -> String {
    to_wire(&ErrorReply { error: err, id })
}

fn parse_error(detail: &str) -> QmpError {
    QmpError::generic(format!("JSON parse error, {detail}"))
}

impl Session {
    /// A session in capabilities-negotiation mode.
    pub fn new(dispatcher: Arc<Dispatcher>) -> Self {
        Self {
            dispatcher,
            negotiated: false,
            pending_after: None,
        }
    }

    /// Whether `qmp_capabilities` has succeeded (events are only sent after that).
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Handles one frame and returns the reply line (with `\r\n`).
    pub fn handle_frame(&mut self, frame: Frame) -> String {
        self.handle_frame_ex(frame).0
    }

    /// Like [`Session::handle_frame`], also returning the name of the handler command that
    /// succeeded (for [`QmpHandler::after_reply`]).
    pub fn handle_frame_ex(&mut self, frame: Frame) -> (String, Option<String>) {
        self.pending_after = None;
        let line = match frame {
            Frame::Error(desc) => error_reply(&QmpError::generic(desc), None),
            Frame::Value(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(value) => self.handle_value(value),
                Err(e) => error_reply(&parse_error(&e.to_string()), None),
            },
        };
        (line, self.pending_after.take())
    }

    /// Runs the handler's [`QmpHandler::after_reply`] for `command` (a panic in it is logged
    /// and otherwise ignored).
    pub fn after_reply(&self, command: &str) {
        let handler = &self.dispatcher.handler;
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            handler.after_reply(command)
        }))
        .is_err()
        {
            tracing::error!(command, "qmp: after_reply handler panicked");
        }
    }

    /// Handles one parsed request and returns the reply line (with `\r\n`).
    pub fn handle_value(&mut self, request: Value) -> String {
        let Value::Object(obj) = request else {
            return error_reply(&QmpError::generic("QMP input must be a JSON object"), None);
        };
        let id = obj.get("id");
        match self.run(&obj) {
            Ok(ret) => to_wire(&ReturnReply { ret: &ret, id }),
            Err(err) => error_reply(&err, id),
        }
    }

    fn run(&mut self, obj: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut command = None;
        let mut args = None;
        for (key, value) in obj {
            match key.as_str() {
                "execute" => match value {
                    Value::String(s) => command = Some(s.as_str()),
                    _ => {
                        return Err(QmpError::generic(
                            "QMP input member 'execute' must be a string",
                        ))
                    }
                },
                "arguments" => match value {
                    Value::Object(m) => args = Some(m),
                    _ => {
                        return Err(QmpError::generic(
                            "QMP input member 'arguments' must be an object",
                        ))
                    }
                },
                "id" => {}
                other => {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{other}' is unexpected"
                    )))
                }
            }
        }
        let Some(command) = command else {
            return Err(QmpError::generic("QMP input lacks member 'execute'"));
        };
        let empty = Map::new();
        let args = args.unwrap_or(&empty);

        if !self.negotiated && command != "qmp_capabilities" {
            return Err(QmpError {
                class: ErrorClass::CommandNotFound,
                desc: "Expecting capabilities negotiation with 'qmp_capabilities'".to_string(),
            });
        }
        let Some(spec) = self.dispatcher.spec(command) else {
            return Err(QmpError::command_not_found(command));
        };
        spec.check(args)?;
        match command {
            "qmp_capabilities" => self.qmp_capabilities(args),
            "query-commands" => Ok(Value::Array(
                self.dispatcher
                    .command_names()
                    .map(|name| json!({ "name": name }))
                    .collect(),
            )),
            "query-version" => Ok(json!(VersionInfo::current())),
            _ => {
                // A panicking handler must not take the connection (or its threads) down.
                let handler = &self.dispatcher.handler;
                let ret = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    handler.execute(command, args)
                }))
                .unwrap_or_else(|_| {
                    tracing::error!(command, "qmp: command handler panicked");
                    Err(QmpError::generic(format!(
                        "internal error: command '{command}' failed unexpectedly"
                    )))
                })?;
                self.pending_after = Some(command.to_string());
                Ok(ret)
            }
        }
    }

    fn qmp_capabilities(&mut self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        if self.negotiated {
            return Err(QmpError {
                class: ErrorClass::CommandNotFound,
                desc: "Capabilities negotiation is already complete, command ignored".to_string(),
            });
        }
        if let Some(Value::Array(caps)) = args.get("enable") {
            // Like QEMU: first every element must be a known capability name, then each must
            // be offered. QEMU knows only `oob`, and enlighten does not offer it.
            for (i, cap) in caps.iter().enumerate() {
                match cap.as_str() {
                    Some("oob") => {}
                    Some(other) => {
                        return Err(QmpError::generic(format!(
                            "Parameter 'enable[{i}]' does not accept value '{other}'"
                        )))
                    }
                    None => {
                        return Err(QmpError::invalid_parameter_type(
                            &format!("enable[{i}]"),
                            "string",
                        ))
                    }
                }
            }
            if !caps.is_empty() {
                return Err(QmpError::generic("Capability 'oob' not available"));
            }
        }
        self.negotiated = true;
        Ok(empty_return())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake;
    impl QmpHandler for Fake {
        fn commands(&self) -> Vec<CommandSpec> {
            vec![
                CommandSpec::new("stop"),
                CommandSpec::new("echo")
                    .arg("s", ArgType::Str)
                    .optional_arg("n", ArgType::Int)
                    .optional_arg("u", ArgType::Uint)
                    .optional_arg("b", ArgType::Bool)
                    .optional_arg("o", ArgType::Object)
                    .optional_arg("a", ArgType::Array)
                    .optional_arg("f", ArgType::Number),
                CommandSpec::new("fail"),
                CommandSpec::new("boom"),
                CommandSpec::new("query-version"), // ignored: built-in
            ]
        }
        fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
            match command {
                "stop" => Ok(empty_return()),
                "echo" => Ok(Value::Object(args.clone())),
                "fail" => Err(QmpError::generic("it failed")),
                "boom" => panic!("handler bug"),
                other => Err(QmpError::command_not_found(other)),
            }
        }
    }

    fn session() -> Session {
        Session::new(Arc::new(Dispatcher::new(Arc::new(Fake))))
    }

    fn ask(s: &mut Session, request: &str) -> Value {
        let line = s.handle_frame(Frame::Value(request.as_bytes().to_vec()));
        assert!(line.ends_with("\r\n"));
        assert_eq!(line.matches("\r\n").count(), 1);
        serde_json::from_str(line.trim_end()).unwrap()
    }

    fn err(class: &str, desc: &str) -> Value {
        json!({"error": {"class": class, "desc": desc}})
    }

    #[test]
    fn greeting_shape() {
        assert_eq!(
            greeting(),
            format!(
                "{{\"QMP\": {{\"version\": {{\"qemu\": {{\"major\": 7, \"minor\": 2, \"micro\": 0}}, \
                 \"package\": \"enlighten {}\"}}, \"capabilities\": []}}}}\r\n",
                env!("CARGO_PKG_VERSION")
            )
        );
        let g: Value = serde_json::from_str(greeting().trim_end()).unwrap();
        assert_eq!(
            g,
            json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                   "package": format!("enlighten {}", env!("CARGO_PKG_VERSION"))},
                   "capabilities": []}})
        );
    }

    #[test]
    fn negotiation() {
        let mut s = session();
        let expecting = "Expecting capabilities negotiation with 'qmp_capabilities'";
        assert_eq!(
            ask(&mut s, r#"{"execute":"stop"}"#),
            err("CommandNotFound", expecting)
        );
        assert_eq!(
            ask(&mut s, r#"{"execute":"nonexistent","id":1}"#),
            json!({"error": {"class": "CommandNotFound", "desc": expecting}, "id": 1})
        );
        assert_eq!(
            ask(&mut s, r#"{"execute":"query-version"}"#),
            err("CommandNotFound", expecting)
        );
        assert!(!s.negotiated());
        assert_eq!(
            ask(
                &mut s,
                r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#
            ),
            err("GenericError", "Capability 'oob' not available")
        );
        assert_eq!(
            ask(
                &mut s,
                r#"{"execute":"qmp_capabilities","arguments":{"enable":["x"]}}"#
            ),
            err(
                "GenericError",
                "Parameter 'enable[0]' does not accept value 'x'"
            )
        );
        assert!(!s.negotiated());
        assert_eq!(
            ask(&mut s, r#"{"execute":"qmp_capabilities","arguments":{}}"#),
            json!({"return": {}})
        );
        assert!(s.negotiated());
        assert_eq!(
            ask(&mut s, r#"{"execute":"qmp_capabilities"}"#),
            err(
                "CommandNotFound",
                "Capabilities negotiation is already complete, command ignored"
            )
        );
        assert_eq!(ask(&mut s, r#"{"execute":"stop"}"#), json!({"return": {}}));
    }

    #[test]
    fn id_echo_of_every_json_type() {
        let mut s = session();
        ask(&mut s, r#"{"execute":"qmp_capabilities"}"#);
        // Exact bytes: `return`/`error` first, then `id`, QEMU's separators.
        assert_eq!(
            s.handle_frame(Frame::Value(br#"{"id":[1,"x"],"execute":"stop"}"#.to_vec())),
            "{\"return\": {}, \"id\": [1, \"x\"]}\r\n"
        );
        assert_eq!(
            s.handle_frame(Frame::Value(br#"{"id":2,"execute":"nope"}"#.to_vec())),
            "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}, \"id\": 2}\r\n"
        );
        for id in [
            json!("__qmp#00000"),
            json!(7),
            json!(-1.5),
            json!(null),
            json!(true),
            json!([1, "a", {"b": null}]),
            json!({"nested": {"x": [1]}}),
        ] {
            let req = json!({"execute": "stop", "id": id});
            assert_eq!(
                ask(&mut s, &req.to_string()),
                json!({"return": {}, "id": id})
            );
            let req = json!({"execute": "nope", "id": id});
            assert_eq!(ask(&mut s, &req.to_string())["id"], id);
        }
    }

    #[test]
    fn request_errors() {
        let mut s = session();
        ask(&mut s, r#"{"execute":"qmp_capabilities"}"#);
        let cases = [
            ("[]", err("GenericError", "QMP input must be a JSON object")),
            (
                "\"x\"",
                err("GenericError", "QMP input must be a JSON object"),
            ),
            ("42", err("GenericError", "QMP input must be a JSON object")),
            (
                "{}",
                err("GenericError", "QMP input lacks member 'execute'"),
            ),
            (
                r#"{"execute":1}"#,
                err(
                    "GenericError",
                    "QMP input member 'execute' must be a string",
                ),
            ),
            (
                r#"{"execute":"stop","arguments":[]}"#,
                err(
                    "GenericError",
                    "QMP input member 'arguments' must be an object",
                ),
            ),
            (
                r#"{"execute":"stop","foo":1}"#,
                err("GenericError", "QMP input member 'foo' is unexpected"),
            ),
            (
                r#"{"exec-oob":"stop"}"#,
                err("GenericError", "QMP input member 'exec-oob' is unexpected"),
            ),
            (
                r#"{"execute":"nope"}"#,
                err("CommandNotFound", "The command nope has not been found"),
            ),
            (r#"{"execute":"fail"}"#, err("GenericError", "it failed")),
            (
                r#"{"execute":"boom"}"#,
                err(
                    "GenericError",
                    "internal error: command 'boom' failed unexpectedly",
                ),
            ),
            (
                r#"{"execute":"stop","arguments":{"x":1}}"#,
                err("GenericError", "Parameter 'x' is unexpected"),
            ),
            (
                r#"{"execute":"echo"}"#,
                err("GenericError", "Parameter 's' is missing"),
            ),
            (
                r#"{"execute":"echo","arguments":{"s":1}}"#,
                err(
                    "GenericError",
                    "Invalid parameter type for 's', expected: string",
                ),
            ),
            (
                r#"{"execute":"echo","arguments":{"s":"","n":1.5}}"#,
                err(
                    "GenericError",
                    "Invalid parameter type for 'n', expected: integer",
                ),
            ),
            (
                r#"{"execute":"echo","arguments":{"s":"","u":-1}}"#,
                err("GenericError", "Parameter 'u' expects uint64"),
            ),
            (
                r#"{"execute":"echo","arguments":{"s":"","b":"yes"}}"#,
                err(
                    "GenericError",
                    "Invalid parameter type for 'b', expected: boolean",
                ),
            ),
            (
                r#"{"execute":"echo","arguments":{"s":"","o":[]}}"#,
                err(
                    "GenericError",
                    "Invalid parameter type for 'o', expected: object",
                ),
            ),
            (
                r#"{"execute":"echo","arguments":{"s":"","a":{}}}"#,
                err(
                    "GenericError",
                    "Invalid parameter type for 'a', expected: array",
                ),
            ),
            (
                r#"{"execute":"echo","arguments":{"s":"","f":"1"}}"#,
                err(
                    "GenericError",
                    "Invalid parameter type for 'f', expected: number",
                ),
            ),
            (
                r#"{"execute":"echo","arguments":{"s":"x","n":-3,"u":3,"b":true,"o":{},"a":[],"f":0.5}}"#,
                json!({"return": {"s":"x","n":-3,"u":3,"b":true,"o":{},"a":[],"f":0.5}}),
            ),
            (
                r#"{"execute":"query-commands"}"#,
                json!({"return": [{"name": "qmp_capabilities"}, {"name": "query-commands"},
                       {"name": "query-version"}, {"name": "stop"}, {"name": "echo"},
                       {"name": "fail"}, {"name": "boom"}]}),
            ),
            (
                r#"{"execute":"query-version","arguments":{"x":1}}"#,
                err("GenericError", "Parameter 'x' is unexpected"),
            ),
        ];
        for (request, expected) in cases {
            assert_eq!(ask(&mut s, request), expected, "request {request}");
        }
    }

    #[test]
    fn malformed_json() {
        let mut s = session();
        let line = s.handle_frame(Frame::Value(b"{\"execute\": }".to_vec()));
        let v: Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["error"]["class"], "GenericError");
        let desc = v["error"]["desc"].as_str().unwrap();
        assert!(desc.starts_with("JSON parse error, "), "{desc}");
        let line = s.handle_frame(Frame::Error("JSON parse error, stray '}'".into()));
        assert_eq!(
            serde_json::from_str::<Value>(line.trim_end()).unwrap(),
            err("GenericError", "JSON parse error, stray '}'")
        );
    }
}
