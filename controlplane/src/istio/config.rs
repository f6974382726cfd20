//! The `--istio-config` file: for each service, the VirtualService route
//! whose weights a rollout moves, and the WasmPlugin that carries the
//! filter config.
//!
//! ```yaml
//! services:
//!   checkout:
//!     namespace: shop
//!     virtual_service: checkout       # networking.istio.io/v1 VirtualService
//!     route: primary                  # the http route's `name`; default: the first
//!     host: checkout.shop.svc.cluster.local
//!     port: 8080                      # for the Envoy cluster names
//!     stable_subset: stable           # DestinationRule subsets
//!     canary_subset: canary
//! wasm_plugin:                        # optional; needed for shadow stages
//!   namespace: shop
//!   name: understudy
//! ```
//!
//! One WasmPlugin for the whole file, not one per service: the filter
//! config is one document (every route of every service), the same one the
//! filter takes over ECDS.
//!
//! Parsed like the rollout spec: private raw types that refuse unknown
//! fields, `serde_path_to_error` for the path of a type error, then
//! validation into [`IstioConfig`], so a config in hand is always valid.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The most services one file may name (the worker reads each one back).
pub const MAX_SERVICES: usize = 256;
/// The largest config file read.
pub const MAX_FILE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

/// A namespaced Kubernetes object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One service's traffic in the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstioService {
    pub virtual_service: ObjectRef,
    /// The http route's `name`; `None`: the first http route.
    pub route: Option<String>,
    pub host: String,
    pub port: u16,
    pub stable_subset: String,
    pub canary_subset: String,
}

impl IstioService {
    /// The route as a sentence names it.
    pub fn route_label(&self) -> String {
        match &self.route {
            Some(name) => format!("http route {name:?}"),
            None => "the first http route".to_owned(),
        }
    }

    /// Istio's name for the Envoy cluster of one subset:
    /// `outbound|<port>|<subset>|<host>`.
    pub fn cluster(&self, subset: &str) -> String {
        format!("outbound|{}|{}|{}", self.port, subset, self.host)
    }
}

/// The validated `--istio-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstioConfig {
    pub services: BTreeMap<String, IstioService>,
    pub wasm_plugin: Option<ObjectRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    services: BTreeMap<String, RawService>,
    #[serde(default)]
    wasm_plugin: Option<RawObject>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    namespace: String,
    virtual_service: String,
    #[serde(default)]
    route: Option<String>,
    host: String,
    port: u32,
    stable_subset: String,
    canary_subset: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawObject {
    namespace: String,
    name: String,
}

impl IstioConfig {
    /// Parses and validates the file's text (YAML, or JSON which is YAML).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        if text.len() > MAX_FILE_BYTES {
            return Err(invalid(
                "",
                format!("the file is larger than {MAX_FILE_BYTES} bytes"),
            ));
        }
        let raw: RawConfig = serde_path_to_error::deserialize(
            serde_norway::Deserializer::from_str(text),
        )
        .map_err(|e| {
            // serde_path_to_error names the document itself ".".
            let path = match e.path().to_string() {
                p if p == "." => String::new(),
                p => p,
            };
            // serde_norway starts a nested error with the path too.
            let message = e.into_inner().to_string();
            let message = match message.strip_prefix(&format!("{path}: ")) {
                Some(rest) if !path.is_empty() => rest.to_owned(),
                _ => message,
            };
            ConfigError::Syntax { path, message }
        })?;
        Self::try_from(raw)
    }

    /// Every service's stable and canary subset clusters: what the Store
    /// accepts as shadow and hedge targets besides its own services'.
    pub fn mesh_clusters(&self) -> crate::model::MeshClusters {
        crate::model::MeshClusters::new(self.services.values().flat_map(|svc| {
            [
                svc.cluster(&svc.stable_subset),
                svc.cluster(&svc.canary_subset),
            ]
        }))
    }

    pub fn read(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Syntax {
            path: String::new(),
            message: format!("reading {}: {e}", path.display()),
        })?;
        Self::parse(&text)
    }
}

fn invalid(field: &str, reason: String) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_owned(),
        reason,
    }
}

/// RFC 1123 label (namespaces, subset names): lower-case alphanumerics and
/// `-`, starting and ending alphanumeric, at most `max` long.
fn check_label(field: &str, value: &str, max: usize) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{value:?} is not a DNS label (lower-case letters, digits and '-', at most {max})"
            ),
        ))
    }
}

/// RFC 1123 subdomain (object names, hosts): dot-separated labels, at most 253.
fn check_subdomain(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.len() > 253 {
        return Err(invalid(
            field,
            format!("{value:?} must be 1 to 253 characters"),
        ));
    }
    for label in value.split('.') {
        check_label(field, label, 63)
            .map_err(|_| invalid(field, format!("{value:?} is not a DNS subdomain")))?;
    }
    Ok(())
}

impl TryFrom<RawConfig> for IstioConfig {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        if raw.services.is_empty() {
            return Err(invalid("services", "at least one service is needed".into()));
        }
        if raw.services.len() > MAX_SERVICES {
            return Err(invalid(
                "services",
                format!("at most {MAX_SERVICES} services"),
            ));
        }
        let mut services = BTreeMap::new();
        for (name, s) in raw.services {
            let at = |f: &str| format!("services.{name}.{f}");
            check_label(&at("namespace"), &s.namespace, 63)?;
            check_subdomain(&at("virtual_service"), &s.virtual_service)?;
            check_subdomain(&at("host"), &s.host)?;
            check_label(&at("stable_subset"), &s.stable_subset, 63)?;
            check_label(&at("canary_subset"), &s.canary_subset, 63)?;
            if let Some(route) = &s.route
                && (route.is_empty() || route.len() > 253)
            {
                return Err(invalid(&at("route"), "must be 1 to 253 characters".into()));
            }
            if s.stable_subset == s.canary_subset {
                return Err(invalid(
                    &at("canary_subset"),
                    format!("the same subset as stable_subset ({:?})", s.stable_subset),
                ));
            }
            let port = u16::try_from(s.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid(&at("port"), format!("{} is not a port", s.port)))?;
            services.insert(
                name,
                IstioService {
                    virtual_service: ObjectRef {
                        namespace: s.namespace,
                        name: s.virtual_service,
                    },
                    route: s.route,
                    host: s.host,
                    port,
                    stable_subset: s.stable_subset,
                    canary_subset: s.canary_subset,
                },
            );
        }
        let wasm_plugin = match raw.wasm_plugin {
            Some(p) => {
                check_label("wasm_plugin.namespace", &p.namespace, 63)?;
                check_subdomain("wasm_plugin.name", &p.name)?;
                Some(ObjectRef {
                    namespace: p.namespace,
                    name: p.name,
                })
            }
            None => None,
        };
        Ok(Self {
            services,
            wasm_plugin,
        })
    }
}

/// A one-service config, shared by this module's tests and the router's.
#[cfg(test)]
pub(crate) const EXAMPLE: &str = r#"
services:
  checkout:
    namespace: shop
    virtual_service: checkout
    route: primary
    host: checkout.shop.svc.cluster.local
    port: 8080
    stable_subset: stable
    canary_subset: canary
wasm_plugin: {namespace: shop, name: understudy}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_config_example_parses() {
        let c = IstioConfig::parse(EXAMPLE).unwrap();
        let s = &c.services["checkout"];
        assert_eq!(s.virtual_service.to_string(), "shop/checkout");
        assert_eq!(
            s.cluster(&s.canary_subset),
            "outbound|8080|canary|checkout.shop.svc.cluster.local"
        );
        assert_eq!(c.wasm_plugin.unwrap().to_string(), "shop/understudy");
    }

    #[test]
    fn istio_config_errors_name_the_field() {
        let e = IstioConfig::parse(&EXAMPLE.replace("port: 8080", "port: 70000")).unwrap_err();
        assert_eq!(e.to_string(), "services.checkout.port: 70000 is not a port");
        let e = IstioConfig::parse(&EXAMPLE.replace("port: 8080", "port: eighty")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("services.checkout.port: invalid type"),
            "{e}"
        );
        let e =
            IstioConfig::parse(&EXAMPLE.replace("route: primary", "rout: primary")).unwrap_err();
        assert!(e.to_string().contains("unknown field `rout`"), "{e}");
        let e =
            IstioConfig::parse(&EXAMPLE.replace("canary_subset: canary", "canary_subset: stable"))
                .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("services.checkout.canary_subset: the same subset")
        );
        let e = IstioConfig::parse(&EXAMPLE.replace("namespace: shop\n", "namespace: Shop_1\n"))
            .unwrap_err();
        assert!(
            e.to_string().starts_with("services.checkout.namespace:"),
            "{e}"
        );
        let e = IstioConfig::parse("services: {}").unwrap_err();
        assert_eq!(e.to_string(), "services: at least one service is needed");
        let big = "#".repeat(MAX_FILE_BYTES + 1);
        assert!(IstioConfig::parse(&big).is_err());
    }
}
