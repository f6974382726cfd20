//! Validation rules shared by every part of the configuration: the error
//! type each `from_raw` returns, and the rule for names that end up in stat
//! names. A bottom module: it imports nothing from this crate, so every
//! feature module (and `config`, which gathers them) can use it without an
//! import circle.

/// Stat names are built from these; Envoy's stat names should stay short.
pub const MAX_NAME_LEN: usize = 64;

/// Everything that can be wrong with a filter configuration. Each message
/// names the field at fault so an operator can fix it without reading code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The bytes are not a JSON document of the expected shape (this includes
    /// unknown fields and wrong types; serde's message names them).
    #[error("filter config is not valid: {0}")]
    Syntax(String),
    /// A name used in stat names has characters Envoy's stat tags cannot carry.
    #[error("{field}: {value:?} is not a valid name: {reason}")]
    InvalidName {
        field: String,
        value: String,
        reason: &'static str,
    },
    /// A path prefix that can never match a request path.
    #[error("{field}: {value:?} must start with '/'")]
    InvalidPathPrefix { field: String, value: String },
    /// Two routes with one name would share (and confuse) their stats.
    #[error("routes[{second}].name: {name:?} is already used by routes[{first}]")]
    DuplicateRoute {
        name: String,
        first: usize,
        second: usize,
    },
    /// More routes than the filter is willing to scan per request.
    #[error("routes: {count} routes configured, at most {max} are allowed")]
    TooManyRoutes { count: usize, max: usize },
    /// A setting out of its range, or settings that contradict each other.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

/// Names end up inside stat names such as `wasmcustom.understudy.route.<name>.requests`,
/// so dots (the tag separator) and anything outside `[A-Za-z0-9_-]` are refused.
pub fn validate_name(field: &str, value: &str) -> Result<(), ConfigError> {
    let reason = if value.is_empty() {
        Some("it is empty")
    } else if value.len() > MAX_NAME_LEN {
        Some("it is longer than 64 characters")
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Some("only letters, digits, '_' and '-' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ConfigError::InvalidName {
            field: field.to_owned(),
            value: value.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}
