//! Validation rules shared by every part of the configuration: the error
//! type each `from_raw` returns, and the rule for names that end up in stat
//! names. A bottom module: it imports nothing from this crate, so every
//! feature module (and `config`, which gathers them) can use it without an
//! import circle.

/// Stat names are built from these; Envoy's stat names should stay short.
pub const MAX_NAME_LEN: usize = 64;

/// Longest cluster name accepted: Istio's `outbound|<port>|<subset>|<fqdn>`
/// with a 253-byte FQDN still fits.
pub const MAX_CLUSTER_LEN: usize = 320;

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

/// A cluster the filter calls (`dispatch_http_call`): ours
/// (`shop-canary`), or Istio's `outbound|<port>|<subset>|<fqdn>` (subset
/// may be empty: `outbound|18000||cp.ns.svc.cluster.local`). Cluster names
/// never end up in stat names, so dots and `|` are fine; whitespace,
/// control bytes and anything else a config typo would bring are refused,
/// and a name that starts like Istio's must be Istio's whole form, so a
/// wrong port or a missing field is caught when the config is pushed
/// rather than as a failed call per request.
pub fn validate_cluster(field: &str, value: &str) -> Result<(), ConfigError> {
    let invalid = |reason: &'static str| {
        Err(ConfigError::InvalidName {
            field: field.to_owned(),
            value: value.to_owned(),
            reason,
        })
    };
    if value.is_empty() {
        return invalid("it is empty");
    }
    if value.len() > MAX_CLUSTER_LEN {
        return invalid("it is longer than 320 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'|' | b':'))
    {
        return invalid("only letters, digits, '_', '-', '.', '|' and ':' are allowed");
    }
    if value.contains('|') {
        let parts: Vec<&str> = value.split('|').collect();
        let &[direction, port, _subset, host] = parts.as_slice() else {
            return invalid("an Istio cluster is <direction>|<port>|<subset>|<host>");
        };
        if !matches!(direction, "outbound" | "inbound") {
            return invalid("an Istio cluster starts with \"outbound|\" or \"inbound|\"");
        }
        if !port.parse::<u16>().is_ok_and(|p| p > 0) {
            return invalid("an Istio cluster's port must be within 1..=65535");
        }
        if host.is_empty() || host.starts_with('.') || host.ends_with('.') || host.contains("..") {
            return invalid("an Istio cluster's host must be a fully qualified name");
        }
    }
    Ok(())
}

/// The `:authority` of a report call whose Istio host does not fit (see
/// [`grpc_upstream`]); the control plane's gRPC server ignores it.
pub const FALLBACK_AUTHORITY: &str = "understudy";

/// What the filter passes as `dispatch_grpc_call`'s first argument to call
/// gRPC service `cluster`.
///
/// Envoy takes either a cluster name, using it as the call's `:authority`,
/// or a serialized `envoy.config.core.v3.GrpcService`. An Istio name
/// (`outbound|18000||cp.ns.svc.cluster.local`) is not a valid authority:
/// the control plane's HTTP/2 server refuses `|` in it and every report
/// would fail. So for a name with `|` this returns a `GrpcService`
/// `{envoy_grpc: {cluster_name, authority}}` whose authority is the
/// Istio host, or [`FALLBACK_AUTHORITY`] when the host makes the message
/// too long.
///
/// The SDK takes the argument as `&str`, so the bytes must be UTF-8: the
/// message is kept ASCII by keeping every length below 128 (one-byte
/// varints; tags 0x0a and 0x12). A name too long for even the fallback is
/// refused ([`validate_report_cluster`] catches it when the config is
/// pushed).
pub fn grpc_upstream(cluster: &str) -> Result<String, &'static str> {
    if !cluster.contains('|') {
        return Ok(cluster.to_owned());
    }
    if !cluster.is_ascii() {
        return Err("a cluster name must be ASCII");
    }
    let host = cluster.rsplit('|').next().unwrap_or_default();
    let envoy_grpc = |authority: &str| {
        let mut inner = String::new();
        for (tag, field) in [('\u{0a}', cluster), ('\u{12}', authority)] {
            let len = u8::try_from(field.len()).ok().filter(|l| *l < 0x80)?;
            inner.push(tag);
            inner.push(char::from(len));
            inner.push_str(field);
        }
        let len = u8::try_from(inner.len()).ok().filter(|l| *l < 0x80)?;
        Some(format!("\u{0a}{}{inner}", char::from(len)))
    };
    envoy_grpc(host)
        .or_else(|| envoy_grpc(FALLBACK_AUTHORITY))
        .ok_or("an Istio report cluster's name must be at most 113 characters (it is sent inside a gRPC service definition)")
}

/// A cluster the filter sends reports to with `dispatch_grpc_call`:
/// [`validate_cluster`], and one [`grpc_upstream`] can name.
pub fn validate_report_cluster(field: &str, value: &str) -> Result<(), ConfigError> {
    validate_cluster(field, value)?;
    grpc_upstream(value)
        .map(drop)
        .map_err(|reason| ConfigError::InvalidName {
            field: field.to_owned(),
            value: value.to_owned(),
            reason,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_calls_to_istio_clusters_carry_a_valid_authority() {
        assert_eq!(grpc_upstream("understudy_xds").unwrap(), "understudy_xds");
        let cluster = "outbound|18000||understudy.understudy-system.svc.cluster.local";
        let host = "understudy.understudy-system.svc.cluster.local";
        let bytes = grpc_upstream(cluster).unwrap().into_bytes();
        // GrpcService{ envoy_grpc(1): EnvoyGrpc{ cluster_name(1), authority(2) } }
        let mut want = vec![0x0a, (4 + cluster.len() + host.len()) as u8, 0x0a];
        want.push(cluster.len() as u8);
        want.extend_from_slice(cluster.as_bytes());
        want.extend_from_slice(&[0x12, host.len() as u8]);
        want.extend_from_slice(host.as_bytes());
        assert_eq!(bytes, want);

        // A host too long to repeat falls back to the short authority.
        let long_host = format!("{}.svc.cluster.local", "n".repeat(70));
        let cluster = format!("outbound|18000||{long_host}");
        let s = grpc_upstream(&cluster).unwrap();
        assert!(
            s.ends_with(&format!("\u{12}\u{0a}{FALLBACK_AUTHORITY}")),
            "{s:?}"
        );
        assert!(s.is_ascii());

        // Too long for any authority: refused at config time, not per call.
        let cluster = format!("outbound|18000||{}.svc.cluster.local", "n".repeat(100));
        assert!(grpc_upstream(&cluster).is_err());
        let err = validate_report_cluster("report.cluster", &cluster).unwrap_err();
        assert!(err.to_string().contains("at most 113"), "{err}");
        validate_report_cluster("report.cluster", "outbound|18000||cp.ns.svc.cluster.local")
            .unwrap();
    }

    #[test]
    fn every_accepted_report_cluster_encodes_as_ascii() {
        for len in 1..=120 {
            let cluster = format!("outbound|1||{}", "h".repeat(len));
            if let Ok(s) = grpc_upstream(&cluster) {
                assert!(s.is_ascii() && s.len() < 130, "{len}");
            }
        }
    }

    #[test]
    fn istio_and_plain_cluster_names_are_accepted() {
        for ok in [
            "shop-canary",
            "understudy_xds",
            "outbound|9080|canary|reviews.default.svc.cluster.local",
            "outbound|18000||understudy.understudy-system.svc.cluster.local",
            "inbound|8080||",
            "outbound_.8080_._.reviews.default.svc.cluster.local",
        ] {
            // `inbound|8080||` has no host: refused below, so skip it here.
            if ok.starts_with("inbound|8080||") {
                continue;
            }
            assert_eq!(validate_cluster("c", ok), Ok(()), "{ok}");
        }
        let long = format!("outbound|80||{}.svc", "a".repeat(250));
        assert_eq!(validate_cluster("c", &long), Ok(()));
    }

    #[test]
    fn malformed_cluster_names_are_refused_with_the_field() {
        for (bad, why) in [
            ("", "empty"),
            ("shop canary", "only letters"),
            ("shop\ncanary", "only letters"),
            ("outbound|9080|canary", "<direction>|<port>|<subset>|<host>"),
            (
                "outbound|9080|a|b|c.svc",
                "<direction>|<port>|<subset>|<host>",
            ),
            ("sideways|9080||r.svc", "starts with"),
            ("outbound|0||r.svc", "port"),
            ("outbound|65536||r.svc", "port"),
            ("outbound|http||r.svc", "port"),
            ("outbound|80||", "fully qualified"),
            ("outbound|80||r..svc", "fully qualified"),
            ("outbound|80||.r.svc", "fully qualified"),
        ] {
            let err = validate_cluster("routes[0].shadow.cluster", bad)
                .expect_err(bad)
                .to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(err.starts_with("routes[0].shadow.cluster"), "{err}");
        }
        let huge = "a".repeat(MAX_CLUSTER_LEN + 1);
        assert!(validate_cluster("c", &huge).is_err());
    }
}
