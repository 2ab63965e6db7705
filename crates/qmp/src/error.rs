//! QMP error replies: `{"error": {"class": ..., "desc": ...}}`.

use serde::Serialize;

/// QEMU's `QapiErrorClass`. Almost every error is `GenericError`; unknown commands are
/// `CommandNotFound`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KVMMissingCap,
}

/// An error a command returns. The server turns it into
/// `{"error": {"class": CLASS, "desc": DESC}, "id": ID}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    /// A `GenericError` with the given text.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// `CommandNotFound`: `The command NAME has not been found` (QEMU's text).
    pub fn command_not_found(command: &str) -> Self {
        Self {
            class: ErrorClass::CommandNotFound,
            desc: format!("The command {command} has not been found"),
        }
    }

    /// `Parameter 'NAME' is missing`.
    pub fn missing_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is missing"))
    }

    /// `Parameter 'NAME' is unexpected`.
    pub fn unexpected_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is unexpected"))
    }

    /// `Invalid parameter type for 'NAME', expected: EXPECTED` (EXPECTED is QEMU's type word:
    /// `string`, `boolean`, `integer`, `number`, `object`, `array`).
    pub fn invalid_parameter_type(name: &str, expected: &str) -> Self {
        Self::generic(format!(
            "Invalid parameter type for '{name}', expected: {expected}"
        ))
    }

    /// `Parameter 'NAME' expects WHAT` (QEMU's invalid-value text, e.g. WHAT = `uint64`).
    pub fn invalid_parameter_value(name: &str, what: &str) -> Self {
        Self::generic(format!("Parameter '{name}' expects {what}"))
    }

    /// `Resetting the Virtual Machine is required`: QEMU's answer to `cont` in the `shutdown` or
    /// `internal-error` run states.
    pub fn reset_required() -> Self {
        Self::generic("Resetting the Virtual Machine is required")
    }

    /// The JSON object that goes under `"error"`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "class": self.class, "desc": self.desc })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_and_classes() {
        let cases = [
            (
                QmpError::command_not_found("foo"),
                "CommandNotFound",
                "The command foo has not been found",
            ),
            (
                QmpError::missing_parameter("uri"),
                "GenericError",
                "Parameter 'uri' is missing",
            ),
            (
                QmpError::unexpected_parameter("x"),
                "GenericError",
                "Parameter 'x' is unexpected",
            ),
            (
                QmpError::invalid_parameter_type("a", "integer"),
                "GenericError",
                "Invalid parameter type for 'a', expected: integer",
            ),
            (
                QmpError::invalid_parameter_value("a", "uint64"),
                "GenericError",
                "Parameter 'a' expects uint64",
            ),
            (
                QmpError::reset_required(),
                "GenericError",
                "Resetting the Virtual Machine is required",
            ),
        ];
        for (err, class, desc) in cases {
            assert_eq!(
                err.to_json(),
                serde_json::json!({"class": class, "desc": desc})
            );
            assert_eq!(err.to_string(), desc);
        }
    }
}
