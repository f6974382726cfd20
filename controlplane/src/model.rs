//! The desired state the operator edits: services with a stable and a canary
//! backend, the data-plane listener, and the filter. Everything here is
//! validated on the way in ([`DesiredState::validate`]), so the xDS
//! translation in [`crate::xds::resources`] never sees an impossible state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use understudy_core::config::RawFilterConfig;
use understudy_core::{ConfigError, FilterConfig};

/// A canary weight in percent: the share of a service's traffic that goes to
/// the canary backend. Always within `0..=100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "u32")]
pub struct Weight(u32);

impl Weight {
    pub const ZERO: Weight = Weight(0);
    pub const MAX: u32 = 100;

    pub fn percent(self) -> u32 {
        self.0
    }
}

impl TryFrom<i64> for Weight {
    type Error = ModelError;

    fn try_from(value: i64) -> Result<Self, Self::Error> {
        match u32::try_from(value) {
            Ok(v) if v <= Self::MAX => Ok(Weight(v)),
            _ => Err(ModelError::WeightOutOfRange(value)),
        }
    }
}

impl From<Weight> for u32 {
    fn from(w: Weight) -> u32 {
        w.0
    }
}

/// One version of a service: the endpoints that serve it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// `ip:port` pairs. Envoy's EDS needs IP addresses, not host names.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
}

/// A service whose traffic is split between a stable and a canary backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    /// Host names (`Host`/`:authority`) this service answers to. `"*"` matches any.
    pub domains: Vec<String>,
    pub stable: Backend,
    #[serde(default)]
    pub canary: Backend,
    #[serde(default = "zero_weight")]
    pub canary_weight: Weight,
    /// Keep each user on one version: requests with the same user key go to
    /// the same backend on every request and every Envoy, and raising the
    /// weight moves users from stable to canary only, never back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
    /// Requests that go to the canary whatever the weight (a rollout's
    /// cohort steps): each is a route matched ahead of the weighted split.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub canary_cohorts: Vec<Cohort>,
    /// The flags of the service's latest rollout as its routes tell the
    /// app (`x-understudy-flags`). Written only by the rollout engine, with
    /// the weight and cohorts (one change); derived from the rollout's
    /// phase ([`crate::rollout::machine::flag_header`]).
    #[serde(default, skip_serializing_if = "FlagHeader::is_empty")]
    pub flags: FlagHeader,
}

/// The request header that carries a rollout's flags to the app.
pub const FLAGS_HEADER: &str = "x-understudy-flags";
/// Most flags one rollout may declare (and one service's header carry).
pub const MAX_FLAGS: usize = 16;
/// Longest flag key.
pub const MAX_FLAG_KEY: usize = 128;

/// Whether `key` is a valid flag key: `[A-Za-z0-9._-]`, 1 to
/// [`MAX_FLAG_KEY`] characters, safe in a URL path segment, an OFREP body
/// and a header value without escaping.
pub fn is_flag_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_FLAG_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Flags as a service's routes render them: `keys`, on or off on each
/// branch. The canary branch and the cohort routes say `canary`, the
/// stable branch `stable`, so the header always agrees with the version
/// that serves the request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagHeader {
    pub keys: Vec<String>,
    #[serde(default)]
    pub canary: bool,
    #[serde(default)]
    pub stable: bool,
}

impl FlagHeader {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The header's value on one branch: `new-checkout=on,tax-v2=on`.
    pub fn value(&self, canary_branch: bool) -> String {
        let on = if canary_branch {
            self.canary
        } else {
            self.stable
        };
        let state = if on { "on" } else { "off" };
        let items: Vec<String> = self.keys.iter().map(|k| format!("{k}={state}")).collect();
        items.join(",")
    }

    fn validate(&self) -> Result<(), String> {
        if self.keys.len() > MAX_FLAGS {
            return Err(format!(
                "flags.keys: at most {MAX_FLAGS}, got {}",
                self.keys.len()
            ));
        }
        for (i, k) in self.keys.iter().enumerate() {
            if !is_flag_key(k) {
                return Err(format!(
                    "flags.keys[{i}]: must be 1 to {MAX_FLAG_KEY} characters of A-Z a-z 0-9 . _ -"
                ));
            }
        }
        Ok(())
    }
}

fn zero_weight() -> Weight {
    Weight::ZERO
}

/// At most this many cohorts route to a service's canary at once.
pub const MAX_COHORTS: usize = 8;

/// Requests that belong to a cohort: `{"header": {"name": "x-user-group",
/// "value": "internal"}}`, or without `value` every request that carries
/// the header; `{"cookie": {"name": "beta", "value": "1"}}` likewise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawCohort", into = "RawCohort")]
pub enum Cohort {
    Header { name: String, value: Option<String> },
    Cookie { name: String, value: Option<String> },
}

/// [`Cohort`] as written: a map with exactly one of `header` and `cookie`
/// (YAML reads an enum's variant from a tag, not a key, so the map goes
/// through this shape in both YAML and JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCohort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    header: Option<RawCohortMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cookie: Option<RawCohortMatch>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCohortMatch {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
}

impl TryFrom<RawCohort> for Cohort {
    type Error = String;

    fn try_from(raw: RawCohort) -> Result<Self, String> {
        match (raw.header, raw.cookie) {
            (Some(RawCohortMatch { name, value }), None) => Ok(Cohort::Header { name, value }),
            (None, Some(RawCohortMatch { name, value })) => Ok(Cohort::Cookie { name, value }),
            _ => Err("a cohort is exactly one of `header` and `cookie`".to_owned()),
        }
    }
}

impl From<Cohort> for RawCohort {
    fn from(c: Cohort) -> Self {
        match c {
            Cohort::Header { name, value } => RawCohort {
                header: Some(RawCohortMatch { name, value }),
                cookie: None,
            },
            Cohort::Cookie { name, value } => RawCohort {
                header: None,
                cookie: Some(RawCohortMatch { name, value }),
            },
        }
    }
}

impl std::fmt::Display for Cohort {
    /// `x-user-group: internal`, `x-beta present`, `cookie beta=1`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cohort::Header {
                name,
                value: Some(v),
            } => write!(f, "{name}: {v}"),
            Cohort::Header { name, value: None } => write!(f, "{name} present"),
            Cohort::Cookie {
                name,
                value: Some(v),
            } => write!(f, "cookie {name}={v}"),
            Cohort::Cookie { name, value: None } => write!(f, "cookie {name} present"),
        }
    }
}

/// A header name as HTTP/2 carries it (a lower-case token, so no
/// pseudo-header) or a cookie name (a token): why not, if it is not one.
/// A header name a spec may use: a lower-case HTTP token of 1 to 128
/// characters (the rule cohorts and sticky keys follow).
pub fn check_header_name(name: &str) -> Result<(), String> {
    check_key_name(name, true)
}

fn check_key_name(name: &str, header: bool) -> Result<(), String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || name.len() > 128 || !name.chars().all(token) {
        return Err(format!(
            "{name:?} must be 1 to 128 characters of an HTTP token"
        ));
    }
    if header && name.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!("{name:?} must be lower-case"));
    }
    Ok(())
}

/// What a request's header must hold to match a cohort, whatever renders
/// it (Envoy's route or an Istio VirtualService match).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderTest {
    Exact(String),
    Present,
    /// An RE2 regex over the whole value (both Envoy's `safe_regex` and
    /// Istio's `regex` match the full value).
    Regex(String),
}

impl Cohort {
    /// The header a cohort is matched on, and the test of its value: the
    /// header's exact value or presence; for a cookie, a regex over the
    /// `cookie` header (Envoy joins repeated cookie headers with `,`, so a
    /// pair may follow `;` or `,`).
    pub fn header_test(&self) -> (String, HeaderTest) {
        match self {
            Cohort::Header { name, value: None } => (name.clone(), HeaderTest::Present),
            Cohort::Header {
                name,
                value: Some(v),
            } => (name.clone(), HeaderTest::Exact(v.clone())),
            Cohort::Cookie { name, value } => {
                let value = value
                    .as_deref()
                    .map_or_else(|| "[^;,]*".to_owned(), re2_escape);
                let regex = format!("(^|.*[;,]\\s*){}={value}\\s*([;,].*)?$", re2_escape(name));
                ("cookie".to_owned(), HeaderTest::Regex(regex))
            }
        }
    }

    /// Names are HTTP tokens (header names lower-case, no pseudo-headers);
    /// a header value is visible ASCII and spaces, a cookie value RFC 6265
    /// cookie-octets. An error is the field (`header.name`) and the reason.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let (kind, name, value) = match self {
            Cohort::Header { name, value } => ("header", name, value),
            Cohort::Cookie { name, value } => ("cookie", name, value),
        };
        check_key_name(name, kind == "header").map_err(|why| (format!("{kind}.name"), why))?;
        if let Some(v) = value {
            let ok = match self {
                Cohort::Header { .. } => v.chars().all(|c| c == ' ' || c.is_ascii_graphic()),
                Cohort::Cookie { .. } => v
                    .chars()
                    .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | ',' | ';' | '\\')),
            };
            if v.is_empty() || v.len() > 256 || !ok {
                return Err((
                    format!("{kind}.value"),
                    format!("{v:?} must be 1 to 256 characters that a {kind} value may hold"),
                ));
            }
        }
        Ok(())
    }
}

/// `text` as an RE2 literal.
fn re2_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$-".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// What identifies a user for sticky assignment: `{"header": "x-user-id"}`
/// or `{"cookie": "uid"}`. A request without it is split at random.
///
/// Envoy hashes the value (the route's hash policy) and the weighted
/// clusters pick by that hash instead of a random number
/// (`use_hash_policy`): `hash mod 100` below the canary weight goes to the
/// canary, which is listed first. So a user's version is a function of its
/// key and the weight alone, the same on every Envoy, and a user on the
/// canary at weight `w` is on it at every weight above `w`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Sticky {
    Header(String),
    Cookie(String),
}

impl Sticky {
    /// A header name as HTTP/2 carries it (lower-case token, no
    /// pseudo-header), or a cookie name (an RFC 6265 token).
    fn validate(&self) -> Result<(), String> {
        let (what, name) = match self {
            Sticky::Header(h) => ("sticky.header", h),
            Sticky::Cookie(c) => ("sticky.cookie", c),
        };
        check_key_name(name, matches!(self, Sticky::Header(_)))
            .map_err(|why| format!("{what}: {why}"))
    }
}

/// Clusters the data plane has besides the services' own
/// (`<service>-stable`/`-canary`), which a route may hedge or shadow to: in
/// Istio mode, the `outbound|<port>|<subset>|<host>` clusters of the
/// subsets `--istio-config` names (the router's config owns them; the Store
/// is told at start).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshClusters(BTreeSet<String>);

impl MeshClusters {
    pub fn new(clusters: impl IntoIterator<Item = String>) -> Self {
        Self(clusters.into_iter().collect())
    }

    pub fn contains(&self, cluster: &str) -> bool {
        self.0.contains(cluster)
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

/// The Envoy clusters a service's two backends are served as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNames {
    pub stable: String,
    pub canary: String,
}

impl ClusterNames {
    pub fn of(service: &str) -> Self {
        Self {
            stable: format!("{service}-stable"),
            canary: format!("{service}-canary"),
        }
    }

    /// The clusters an Istio sidecar calls a service's two DestinationRule
    /// subsets: `outbound|<port>|<subset>|<host>`, e.g.
    /// `outbound|9080|canary|reviews.default.svc.cluster.local`. `host` is
    /// the service's fully qualified name as Istio writes it.
    pub fn istio(host: &str, port: u16, stable_subset: &str, canary_subset: &str) -> Self {
        Self {
            stable: format!("outbound|{port}|{stable_subset}|{host}"),
            canary: format!("outbound|{port}|{canary_subset}|{host}"),
        }
    }
}

/// The request header a synthetic probe is pinned to one backend by
/// (`<token>/stable` or `<token>/canary`). Not `x-understudy-*`: the filter
/// strips those from every client request before routing. The filter owns
/// the name: it never shadows a request that carries it.
pub use understudy_core::shadow::PROBE_HEADER;

/// The two sides a probe can be pinned to.
pub const PROBE_SIDES: [&str; 2] = ["stable", "canary"];

/// The control plane's probe key: 256 random bits from which each
/// service's probe token is derived ([`ProbeKey::pin`]), so the pin routes
/// match a value no client can guess. Never part of [`DesiredState`] (which
/// viewers read); the store keeps it in a private file beside the state
/// file, so the routes stay the same across restarts.
#[derive(Clone, PartialEq, Eq)]
pub struct ProbeKey([u8; 32]);

impl std::fmt::Debug for ProbeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProbeKey(..)")
    }
}

impl ProbeKey {
    pub fn random() -> Self {
        Self(rand::random())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The [`PROBE_HEADER`] value that pins a probe of `service` to `side`:
    /// 128 bits of HMAC-SHA256(key, service) in hex, then `/side`. Derived,
    /// never stored: the routes and the probe runner compute the same value.
    pub fn pin(&self, service: &str, side: &str) -> String {
        use hmac::{Hmac, Mac};
        use std::fmt::Write;
        let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(&self.0) else {
            // HMAC takes keys of any length; unreachable, and a pin no one
            // sends is the safe answer.
            return format!("unusable/{side}");
        };
        mac.update(b"understudy-probe\0");
        mac.update(service.as_bytes());
        let tag = mac.finalize().into_bytes();
        let mut out = String::with_capacity(40);
        for b in tag.iter().take(16) {
            let _ = write!(out, "{b:02x}");
        }
        out.push('/');
        out.push_str(side);
        out
    }
}

/// The clusters a service's probes go to: `<service>-stable-probe` and
/// `<service>-canary-probe`, with the main clusters' endpoints (EDS
/// `service_name`) but stats of their own, so probe traffic never counts as
/// live evidence (which is read under `<service>-stable`/`-canary`).
pub fn probe_cluster(main_cluster: &str) -> String {
    format!("{main_cluster}-probe")
}

impl Service {
    pub fn stable_cluster(&self) -> String {
        ClusterNames::of(&self.name).stable
    }

    pub fn canary_cluster(&self) -> String {
        ClusterNames::of(&self.name).canary
    }

    /// Checks what can be checked about one service on its own.
    pub fn validate(&self) -> Result<(), ModelError> {
        understudy_core::config::validate_name("name", &self.name).map_err(|e| {
            ModelError::InvalidService {
                service: self.name.clone(),
                reason: e.to_string(),
            }
        })?;
        let invalid = |reason: String| ModelError::InvalidService {
            service: self.name.clone(),
            reason,
        };
        if self.domains.is_empty() {
            return Err(invalid("domains: at least one domain is required".into()));
        }
        let mut seen = BTreeSet::new();
        for (i, d) in self.domains.iter().enumerate() {
            validate_domain(d).map_err(|r| invalid(format!("domains[{i}]: {d:?} {r}")))?;
            if !seen.insert(d.to_ascii_lowercase()) {
                return Err(invalid(format!("domains[{i}]: {d:?} is listed twice")));
            }
        }
        for (which, backend) in [("stable", &self.stable), ("canary", &self.canary)] {
            for (i, ep) in backend.endpoints.iter().enumerate() {
                if ep.port() == 0 {
                    return Err(invalid(format!(
                        "{which}.endpoints[{i}]: port 0 is not a valid endpoint port"
                    )));
                }
            }
        }
        if let Some(sticky) = &self.sticky {
            sticky.validate().map_err(invalid)?;
        }
        self.flags.validate().map_err(invalid)?;
        if self.canary_cohorts.len() > MAX_COHORTS {
            return Err(invalid(format!(
                "canary_cohorts: at most {MAX_COHORTS} are allowed, got {}",
                self.canary_cohorts.len()
            )));
        }
        for (i, c) in self.canary_cohorts.iter().enumerate() {
            c.validate()
                .map_err(|(at, why)| invalid(format!("canary_cohorts[{i}].{at}: {why}")))?;
        }
        if !self.canary_cohorts.is_empty() && self.canary.endpoints.is_empty() {
            return Err(invalid(
                "canary_cohorts: the canary has no endpoints to send a cohort to".into(),
            ));
        }
        let w = self.canary_weight.percent();
        if w > 0 && self.canary.endpoints.is_empty() {
            return Err(ModelError::NoCanaryEndpoints {
                service: self.name.clone(),
                weight: w,
            });
        }
        if w < Weight::MAX && self.stable.endpoints.is_empty() {
            return Err(invalid(format!(
                "stable.endpoints: empty, but {}% of traffic would go to stable",
                Weight::MAX - w
            )));
        }
        Ok(())
    }
}

/// Envoy's rules for virtual-host domains: no whitespace, and a wildcard only
/// as the whole domain or as a leading `*.`/`*-` style prefix or a trailing suffix.
fn validate_domain(d: &str) -> Result<(), &'static str> {
    if d.is_empty() {
        return Err("is empty");
    }
    if d.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace");
    }
    let stars = d.matches('*').count();
    if stars > 1 || (stars == 1 && !d.starts_with('*') && !d.ends_with('*')) {
        return Err("may only have one wildcard, at the start or the end");
    }
    Ok(())
}

/// Where Envoy listens for the traffic Understudy manages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSettings {
    pub address: IpAddr,
    pub port: u16,
}

/// The Understudy filter as Envoy should load it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSettings {
    /// Path of the `.wasm` module on the Envoy host. The control plane cannot
    /// see Envoy's file system, so a wrong path shows up as an ECDS NACK.
    pub wasm_path: String,
    /// The filter's configuration, validated with `understudy-core` (the
    /// same code the filter runs) when it is parsed or edited.
    #[serde(default)]
    pub config: FilterDoc,
    /// The Envoy cluster (HTTP/2) through which the filter reaches this
    /// control plane's gRPC port for usage reports; the bootstrap's xDS cluster.
    #[serde(default = "default_report_cluster")]
    pub report_cluster: String,
}

fn default_report_cluster() -> String {
    "understudy_xds".to_owned()
}

impl FilterSettings {
    /// Parses an API body: any error, in the config or around it, is an
    /// `invalid_filter` that names the field.
    pub fn from_json(value: serde_json::Value) -> Result<Self, ModelError> {
        serde_json::from_value(value).map_err(|e| ModelError::InvalidFilter(e.to_string()))
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        if self.wasm_path.trim().is_empty() {
            return Err(ModelError::InvalidFilter(
                "wasm_path: must not be empty".into(),
            ));
        }
        // The filter's reports go there unless the config names a cluster
        // itself: a name the filter can call (an Istio one in a mesh).
        understudy_core::rules::validate_report_cluster("report_cluster", &self.report_cluster)
            .map_err(|e| ModelError::InvalidFilter(e.to_string()))?;
        // The config validated when it was built (`FilterDoc`).
        Ok(())
    }
}

/// The filter's configuration as the control plane keeps it: the document
/// as written (what the API shows, the state file keeps and, after the
/// per-Envoy transform, Envoy receives) together with the validated form
/// the control plane reads. [`FilterDoc::new`] builds both at once (so does
/// deserializing), so a document that the filter would reject cannot exist
/// here, and nothing edits untyped JSON after validation: an edit changes
/// the typed document and validates it again ([`FilterDoc::edited`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FilterDoc {
    raw: RawFilterConfig,
    valid: FilterConfig,
}

impl FilterDoc {
    pub fn new(raw: RawFilterConfig) -> Result<Self, ConfigError> {
        let valid = FilterConfig::try_from(raw.clone())?;
        Ok(Self { raw, valid })
    }

    /// Parses and validates a config written as JSON.
    pub fn parse(value: serde_json::Value) -> Result<Self, ModelError> {
        serde_json::from_value(value).map_err(|e| ModelError::InvalidFilter(format!("config: {e}")))
    }

    /// The document as written.
    pub fn raw(&self) -> &RawFilterConfig {
        &self.raw
    }

    /// The validated configuration (what the filter runs).
    pub fn config(&self) -> &FilterConfig {
        &self.valid
    }

    /// A copy with `edit` applied to the document, validated again.
    pub fn edited<E: From<ModelError>>(
        &self,
        edit: impl FnOnce(&mut RawFilterConfig) -> Result<(), E>,
    ) -> Result<Self, E> {
        let mut raw = self.raw.clone();
        edit(&mut raw)?;
        Self::new(raw).map_err(|e| ModelError::InvalidFilter(format!("config: {e}")).into())
    }
}

/// No routes, no limits: what a config of `{}` means.
impl Default for FilterDoc {
    fn default() -> Self {
        Self {
            raw: RawFilterConfig::default(),
            valid: FilterConfig::default(),
        }
    }
}

impl Serialize for FilterDoc {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for FilterDoc {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawFilterConfig::deserialize(d)?;
        Self::new(raw).map_err(serde::de::Error::custom)
    }
}

/// Everything the control plane wants Envoy to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    pub listener: ListenerSettings,
    pub filter: FilterSettings,
    #[serde(default, with = "services_as_list")]
    pub services: BTreeMap<String, Service>,
}

impl DesiredState {
    /// Validates every service, the filter, and the rules that span services
    /// (Envoy rejects a route configuration in which two virtual hosts share a domain).
    pub fn validate(&self) -> Result<(), ModelError> {
        self.validate_in(&MeshClusters::default())
    }

    /// [`Self::validate`] for a data plane that also has `mesh`'s clusters.
    pub fn validate_in(&self, mesh: &MeshClusters) -> Result<(), ModelError> {
        self.filter.validate()?;
        self.validate_route_clusters(mesh)?;
        let mut owners: BTreeMap<String, &str> = BTreeMap::new();
        for (key, svc) in &self.services {
            if key != &svc.name {
                return Err(ModelError::InvalidService {
                    service: svc.name.clone(),
                    reason: format!("stored under the name {key:?}"),
                });
            }
            svc.validate()?;
            for d in &svc.domains {
                if let Some(other) = owners.insert(d.to_ascii_lowercase(), &svc.name) {
                    return Err(ModelError::DomainConflict {
                        domain: d.clone(),
                        first: other.to_owned(),
                        second: svc.name.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

impl DesiredState {
    /// A hedge or shadow copy sent to a cluster Envoy does not have would
    /// fail on every request; catch it here rather than in production traffic.
    fn validate_route_clusters(&self, mesh: &MeshClusters) -> Result<(), ModelError> {
        let config = self.filter.config.config();
        let known: Vec<String> = self
            .services
            .values()
            .flat_map(|s| [s.stable_cluster(), s.canary_cluster()])
            .chain(mesh.iter().map(str::to_owned))
            .collect();
        for (i, route) in config.routes().iter().enumerate() {
            let targets = [
                ("hedge", route.hedge.as_ref().map(|h| &h.cluster)),
                ("shadow", route.shadow.as_ref().map(|s| &s.cluster)),
            ];
            for (section, cluster) in targets {
                if let Some(cluster) = cluster
                    && !known.contains(cluster)
                {
                    return Err(ModelError::InvalidFilter(format!(
                        "config: routes[{i}].{section}.cluster: {cluster:?} is not a cluster of any service (known: {})",
                        known.join(", ")
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Services are written as a list in files and the API, kept as a map by name.
mod services_as_list {
    use super::Service;
    use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<String, Service>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        map.values().collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Service>, D::Error> {
        let list = Vec::<Service>::deserialize(d)?;
        let mut map = BTreeMap::new();
        for svc in list {
            let name = svc.name.clone();
            if map.insert(name.clone(), svc).is_some() {
                return Err(D::Error::custom(format!(
                    "service {name:?} is defined twice"
                )));
            }
        }
        Ok(map)
    }
}

/// What is wrong with a requested change. Each message names the service or
/// field at fault; the API returns it verbatim with status 400 (or 404).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The weight is not an integer percentage.
    #[error("canary weight must be an integer from 0 to 100, got {0}")]
    WeightOutOfRange(i64),
    /// A weight above zero would send traffic nowhere.
    #[error("service {service:?}: canary weight {weight} needs at least one canary endpoint")]
    NoCanaryEndpoints { service: String, weight: u32 },
    /// A field of one service is invalid.
    #[error("service {service:?}: {reason}")]
    InvalidService { service: String, reason: String },
    /// Two services claim the same domain; Envoy would reject the routes.
    #[error("domain {domain:?} is used by both service {first:?} and service {second:?}")]
    DomainConflict {
        domain: String,
        first: String,
        second: String,
    },
    /// The filter settings are invalid.
    #[error("filter {0}")]
    InvalidFilter(String),
    /// The named service does not exist.
    #[error("no service named {0:?}")]
    UnknownService(String),
}

/// Fixtures shared by the crate's unit tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// One service `shop` (domain `*`) with a stable endpoint on
    /// `stable_port`, a canary endpoint on 8082 unless `canary` is false,
    /// and the given canary weight.
    pub fn state(weight: u32, stable_port: u16, canary: bool) -> DesiredState {
        let svc = Service {
            name: "shop".into(),
            domains: vec!["*".into()],
            stable: Backend {
                endpoints: vec![SocketAddr::from(([127, 0, 0, 1], stable_port))],
            },
            canary: Backend {
                endpoints: if canary {
                    vec![SocketAddr::from(([127, 0, 0, 1], 8082))]
                } else {
                    vec![]
                },
            },
            canary_weight: Weight::try_from(i64::from(weight)).unwrap(),
            sticky: None,
            canary_cohorts: Vec::new(),
            flags: FlagHeader::default(),
        };
        DesiredState {
            listener: ListenerSettings {
                address: "127.0.0.1".parse().unwrap(),
                port: 10000,
            },
            filter: FilterSettings {
                wasm_path: "/f.wasm".into(),
                config: FilterDoc::parse(serde_json::json!({})).unwrap(),
                report_cluster: "understudy_xds".into(),
            },
            services: [("shop".to_string(), svc)].into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(weight: u32) -> Service {
        Service {
            name: "checkout".into(),
            domains: vec!["*".into()],
            stable: Backend {
                endpoints: vec!["127.0.0.1:8081".parse().unwrap()],
            },
            canary: Backend {
                endpoints: vec!["127.0.0.1:8082".parse().unwrap()],
            },
            canary_weight: Weight::try_from(i64::from(weight)).unwrap(),
            sticky: None,
            canary_cohorts: Vec::new(),
            flags: FlagHeader::default(),
        }
    }

    #[test]
    fn sticky_keys_are_validated_and_read_as_the_api_writes_them() {
        let mut s = service(20);
        for (sticky, ok) in [
            (json!({"header": "x-user-id"}), true),
            (json!({"cookie": "uid"}), true),
            (json!({"header": "X-User-Id"}), false),
            (json!({"header": ":authority"}), false),
            (json!({"header": ""}), false),
            (json!({"cookie": "a b"}), false),
            (json!({"cookie": "x".repeat(129)}), false),
        ] {
            s.sticky = Some(serde_json::from_value(sticky.clone()).unwrap());
            assert_eq!(s.validate().is_ok(), ok, "{sticky}: {:?}", s.validate());
        }
        for bad in [
            json!({"header": "a", "cookie": "b"}),
            json!({"query": "u"}),
            json!("x"),
        ] {
            assert!(
                serde_json::from_value::<Sticky>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        // Absent means not sticky, and is left out when written back.
        let plain: Service = serde_json::from_value(json!({
            "name": "a", "domains": ["*"], "stable": {"endpoints": ["127.0.0.1:1"]}
        }))
        .unwrap();
        assert_eq!(plain.sticky, None);
        assert!(
            serde_json::to_value(&plain)
                .unwrap()
                .get("sticky")
                .is_none()
        );
    }

    #[test]
    fn weight_bounds() {
        assert!(Weight::try_from(0).is_ok());
        assert!(Weight::try_from(100).is_ok());
        assert_eq!(
            Weight::try_from(101),
            Err(ModelError::WeightOutOfRange(101))
        );
        assert_eq!(Weight::try_from(-1), Err(ModelError::WeightOutOfRange(-1)));
        let err = serde_json::from_value::<Weight>(json!(50.5)).unwrap_err();
        assert!(err.to_string().contains("invalid type"), "{err}");
    }

    #[test]
    fn canary_weight_needs_canary_endpoints() {
        let mut s = service(10);
        s.canary.endpoints.clear();
        assert!(matches!(
            s.validate(),
            Err(ModelError::NoCanaryEndpoints { weight: 10, .. })
        ));
        s.canary_weight = Weight::ZERO;
        s.validate().unwrap();
    }

    #[test]
    fn stable_needed_unless_all_canary() {
        let mut s = service(100);
        s.stable.endpoints.clear();
        s.validate().unwrap();
        s.canary_weight = Weight::try_from(99).unwrap();
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("stable.endpoints"), "{err}");
    }

    #[test]
    fn domains_are_checked() {
        for (domains, needle) in [
            (vec![], "at least one domain"),
            (vec!["a b".to_string()], "whitespace"),
            (vec!["a.*.com".to_string()], "one wildcard"),
            (
                vec!["x.com".to_string(), "X.com".to_string()],
                "listed twice",
            ),
        ] {
            let mut s = service(0);
            s.domains = domains;
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn two_services_cannot_share_a_domain() {
        let mut other = service(0);
        other.name = "other".into();
        let state = DesiredState {
            listener: ListenerSettings {
                address: "127.0.0.1".parse().unwrap(),
                port: 10000,
            },
            filter: FilterSettings {
                wasm_path: "f.wasm".into(),
                config: FilterDoc::parse(json!({})).unwrap(),
                report_cluster: "understudy_xds".into(),
            },
            services: [
                ("checkout".to_string(), service(0)),
                ("other".to_string(), other),
            ]
            .into_iter()
            .collect(),
        };
        let err = state.validate().unwrap_err();
        assert!(matches!(err, ModelError::DomainConflict { .. }), "{err}");
    }

    #[test]
    fn filter_config_is_validated_by_the_filter_logic() {
        // Parsing is validating: a config the filter rejects is never built.
        let err = FilterDoc::parse(json!({"routes": [{"name": "a", "path_prefix": "nope"}]}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("routes[0].path_prefix"), "{err}");
        let err = FilterSettings::from_json(
            json!({"wasm_path": "f.wasm", "config": {"routes": [{"name": "a", "path_prefix": "nope"}]}}),
        )
        .unwrap_err();
        assert!(matches!(err, ModelError::InvalidFilter(_)), "{err}");
        // So does an edit.
        let doc = FilterDoc::parse(json!({"routes": [{"name": "a"}]})).unwrap();
        let err = doc
            .edited(|raw| {
                raw.routes[0].path_prefix = "nope".into();
                Ok::<(), ModelError>(())
            })
            .unwrap_err();
        assert!(err.to_string().contains("routes[0].path_prefix"), "{err}");
        assert_eq!(
            doc.raw().routes[0].path_prefix,
            "/",
            "the original is unchanged"
        );
    }

    #[test]
    fn hedges_must_go_to_a_known_cluster() {
        let mut state = fixtures::state(0, 8081, true);
        state.filter.config = FilterDoc::parse(
            json!({"routes": [{"name": "all", "hedge": {"cluster": "shop-stable"}}]}),
        )
        .unwrap();
        state.validate().unwrap();
        state.filter.config =
            FilterDoc::parse(json!({"routes": [{"name": "all", "hedge": {"cluster": "nope"}}]}))
                .unwrap();
        let err = state.validate().unwrap_err().to_string();
        assert!(
            err.contains("routes[0].hedge.cluster: \"nope\" is not a cluster"),
            "{err}"
        );
        assert!(err.contains("shop-stable, shop-canary"), "{err}");
    }

    #[test]
    fn a_mesh_s_subsets_are_targets_and_its_report_cluster_is_valid() {
        let canary = "outbound|9080|canary|reviews.demo.svc.cluster.local";
        let mut state = fixtures::state(0, 8081, true);
        state.filter.config =
            FilterDoc::parse(json!({"routes": [{"name": "all", "shadow": {"cluster": canary}}]}))
                .unwrap();
        assert!(state.validate().is_err(), "not a cluster of our ADS");
        let mesh = MeshClusters::new([canary.to_owned()]);
        state.validate_in(&mesh).unwrap();

        state.filter.report_cluster =
            "outbound|18000||understudy.understudy-system.svc.cluster.local".into();
        state.validate_in(&mesh).unwrap();
        for bad in ["has space", "outbound|18000|", ""] {
            state.filter.report_cluster = bad.into();
            let err = state.validate_in(&mesh).unwrap_err().to_string();
            assert!(err.contains("report_cluster"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn shadows_must_go_to_a_known_cluster() {
        let mut state = fixtures::state(0, 8081, true);
        state.filter.config = FilterDoc::parse(
            json!({"routes": [{"name": "all", "shadow": {"cluster": "shop-canary"}}]}),
        )
        .unwrap();
        state.validate().unwrap();
        state.filter.config = FilterDoc::parse(json!({"routes": [
            {"name": "a", "path_prefix": "/a", "hedge": {"cluster": "shop-stable"}},
            {"name": "b", "shadow": {"cluster": "shop-v3"}}
        ]}))
        .unwrap();
        let err = state.validate().unwrap_err().to_string();
        assert!(
            err.contains("routes[1].shadow.cluster: \"shop-v3\" is not a cluster"),
            "{err}"
        );
        assert!(err.contains("shop-stable, shop-canary"), "{err}");
    }

    #[test]
    fn services_file_form_rejects_duplicates() {
        let doc = json!({
            "listener": {"address": "127.0.0.1", "port": 10000},
            "filter": {"wasm_path": "f.wasm"},
            "services": [
                {"name": "a", "domains": ["a"], "stable": {"endpoints": ["127.0.0.1:1"]}},
                {"name": "a", "domains": ["b"], "stable": {"endpoints": ["127.0.0.1:2"]}}
            ]
        });
        let err = serde_json::from_value::<DesiredState>(doc).unwrap_err();
        assert!(err.to_string().contains("defined twice"), "{err}");
    }

    /// Every filter config the README shows validates, and the document
    /// survives the round trip the state file and the API put it through:
    /// written out and read back, it is the same document and the same
    /// validated config.
    #[test]
    fn the_readme_filter_configs_validate_and_round_trip() {
        let readme = include_str!("../../README.md");
        let keys = ["stat_prefix", "routes", "rate_limit", "shadow_report"];
        let mut seen = 0;
        for block in readme.split("```json").skip(1) {
            let Some((text, _)) = block.split_once("```") else {
                continue;
            };
            let Ok(serde_json::Value::Object(obj)) = serde_json::from_str(text) else {
                continue;
            };
            if obj.is_empty() || !obj.keys().all(|k| keys.contains(&k.as_str())) {
                continue;
            }
            let doc = FilterDoc::parse(serde_json::Value::Object(obj))
                .unwrap_or_else(|e| panic!("README config does not validate: {e}\n{text}"));
            let written = serde_json::to_string(&doc).unwrap();
            let back: FilterDoc = serde_json::from_str(&written).unwrap();
            assert_eq!(back, doc, "{written}");
            seen += 1;
        }
        assert!(seen >= 4, "found only {seen} filter configs in the README");
    }
}
