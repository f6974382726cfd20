//! Translation of the [`DesiredState`] into Envoy resources, grouped by xDS
//! type into a [`Snapshot`].
//!
//! A snapshot is built once per change and shared (behind an `Arc`) by every
//! connected Envoy, so the per-connection cost is only the bookkeeping in
//! [`crate::xds::stream`]. Each type's version is a hash of its content, so an
//! unchanged type keeps its version and is not sent again; each resource is
//! also encoded once here ([`Encoded`]) with its own content version, and
//! state-of-the-world and delta responses alike are written from those bytes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::common::mutation_rules::v3::{
    HeaderMutation as HeaderMutationRule, header_mutation,
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, AsyncDataSource, BackoffStrategy, ConfigSource,
    DataSource, ExtensionConfigSource, HeaderValue, HeaderValueOption, SocketAddress,
    TypedExtensionConfig, address, async_data_source, config_source, data_source,
    header_value_option, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
    WeightedCluster, header_matcher, route, route_action, route_match, weighted_cluster,
};
use envoy_types::pb::envoy::extensions::filters::http::header_mutation::v3::{
    HeaderMutation, Mutations,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::wasm::v3::{
    FailurePolicy, PluginConfig, ReloadConfig, VmConfig, plugin_config,
};
use envoy_types::pb::envoy::service::discovery::v3::Resource;
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Any, BoolValue, StringValue, UInt32Value};
use envoy_types::util::pack_any;
use prost::{Message, Name};
use sha2::{Digest, Sha256};

use understudy_core::ratelimit::RawReport;
use understudy_core::shadow::RawShadowReport;

use crate::model::{
    Backend, Cohort, DesiredState, FLAGS_HEADER, FilterDoc, FilterSettings, FlagHeader, HeaderTest,
    ModelError, PROBE_HEADER, ProbeKey, Service, Sticky, Weight, probe_cluster,
};

/// xDS type URLs, in the order Understudy sends them (make before break):
/// clusters, then their endpoints, then listeners, then routes, then the
/// filter's extension config.
pub mod type_url {
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    pub const EXTENSION_CONFIG: &str =
        "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";

    /// Every type, in send order.
    pub const ORDER: [&str; 5] = [CLUSTER, ENDPOINT, LISTENER, ROUTE, EXTENSION_CONFIG];

    /// Short names used in the API and logs.
    pub fn short(url: &str) -> &'static str {
        match url {
            CLUSTER => "cds",
            ENDPOINT => "eds",
            LISTENER => "lds",
            ROUTE => "rds",
            EXTENSION_CONFIG => "ecds",
            _ => "unknown",
        }
    }
}

/// Names of the fixed resources Understudy manages.
pub const LISTENER_NAME: &str = "understudy_http";
pub const ROUTE_CONFIG_NAME: &str = "understudy_routes";
/// The HTTP filter's name, which is also its ECDS resource name.
pub const FILTER_NAME: &str = "understudy";

/// All resources of one xDS type, with a version derived from their content.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeSnapshot {
    pub version: String,
    pub resources: BTreeMap<String, Any>,
    /// Each resource encoded once, for every stream to share (see [`Encoded`]).
    pub encoded: BTreeMap<String, Encoded>,
}

/// One resource's wire bytes, made once per snapshot. Every stream's
/// responses point at these same bytes (an `Arc`), so a push to N Envoys
/// costs one encoding and N reference counts, not N copies of the config.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// The resource's own version: a hash of its encoded bytes, so it
    /// changes exactly when the resource does (delta xDS sends only these).
    pub version: String,
    /// The `google.protobuf.Any`, as an element of `DiscoveryResponse.resources`.
    pub any: Arc<[u8]>,
    /// The delta `Resource { name, version, resource }`, as an element of
    /// `DeltaDiscoveryResponse.resources`.
    pub delta: Arc<[u8]>,
}

/// The first 8 bytes of a SHA-256, in hex: a version string.
fn short_hash(hash: Sha256) -> String {
    hash.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl TypeSnapshot {
    fn new(resources: BTreeMap<String, Any>) -> Self {
        let mut hash = Sha256::new();
        let mut encoded = BTreeMap::new();
        for (name, any) in &resources {
            hash.update((name.len() as u64).to_le_bytes());
            hash.update(name.as_bytes());
            hash.update((any.value.len() as u64).to_le_bytes());
            hash.update(&any.value);
            let any_bytes = any.encode_to_vec();
            let mut one = Sha256::new();
            one.update(&any_bytes);
            let version = short_hash(one);
            let delta = Resource {
                name: name.clone(),
                version: version.clone(),
                resource: Some(any.clone()),
                ..Default::default()
            }
            .encode_to_vec();
            encoded.insert(
                name.clone(),
                Encoded {
                    version,
                    any: any_bytes.into(),
                    delta: delta.into(),
                },
            );
        }
        Self {
            version: short_hash(hash),
            resources,
            encoded,
        }
    }
}

/// The Envoy resources for one desired state.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Increases with every change; lets the API say which change Envoy has.
    pub generation: u64,
    types: BTreeMap<&'static str, TypeSnapshot>,
}

impl Snapshot {
    pub fn get(&self, type_url: &str) -> Option<&TypeSnapshot> {
        self.types.get(type_url)
    }

    /// Builds every resource for a fleet of `fleet` connected Envoys. The
    /// state must already be validated.
    pub fn build(state: &DesiredState, generation: u64, fleet: usize) -> Self {
        Self::build_with(state, generation, fleet, None)
    }

    /// [`Self::build`], with each service's probe clusters and pin routes
    /// when `probes` is given (the store's key; see "Synthetic probes" in
    /// the README).
    pub fn build_with(
        state: &DesiredState,
        generation: u64,
        fleet: usize,
        probes: Option<&ProbeKey>,
    ) -> Self {
        let mut clusters = BTreeMap::new();
        let mut endpoints = BTreeMap::new();
        for svc in state.services.values() {
            for (name, backend) in [
                (svc.stable_cluster(), &svc.stable),
                (svc.canary_cluster(), &svc.canary),
            ] {
                clusters.insert(name.clone(), pack_any(eds_cluster(&name, "")));
                if probes.is_some() {
                    // Same endpoints (the main cluster's assignment), own stats.
                    let probe = probe_cluster(&name);
                    clusters.insert(probe.clone(), pack_any(eds_cluster(&probe, &name)));
                }
                endpoints.insert(name.clone(), pack_any(load_assignment(&name, backend)));
            }
        }
        let listeners = BTreeMap::from([(LISTENER_NAME.to_owned(), pack_any(listener(state)))]);
        let routes = BTreeMap::from([(
            ROUTE_CONFIG_NAME.to_owned(),
            pack_any(route_configuration(state.services.values(), probes)),
        )]);
        let extension = BTreeMap::from([(
            FILTER_NAME.to_owned(),
            pack_any(TypedExtensionConfig {
                name: FILTER_NAME.to_owned(),
                typed_config: Some(wasm_filter(
                    &state.filter,
                    &per_envoy_config(&state.filter, fleet),
                )),
            }),
        )]);
        let types = BTreeMap::from([
            (type_url::CLUSTER, TypeSnapshot::new(clusters)),
            (type_url::ENDPOINT, TypeSnapshot::new(endpoints)),
            (type_url::LISTENER, TypeSnapshot::new(listeners)),
            (type_url::ROUTE, TypeSnapshot::new(routes)),
            (type_url::EXTENSION_CONFIG, TypeSnapshot::new(extension)),
        ]);
        Self { generation, types }
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn duration(d: Duration) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// An EDS cluster; `assignment` names the load assignment it reads when it
/// is not its own (empty: its own name).
fn eds_cluster(name: &str, assignment: &str) -> Cluster {
    Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: assignment.to_owned(),
        }),
        connect_timeout: Some(duration(Duration::from_secs(1))),
        ..Default::default()
    }
}

fn load_assignment(cluster: &str, backend: &Backend) -> ClusterLoadAssignment {
    let lb_endpoints = backend
        .endpoints
        .iter()
        .map(|ep| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: ep.ip().to_string(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                            ep.port(),
                        ))),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            ..Default::default()
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: cluster.to_owned(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The filter config one Envoy gets: fleet-wide rates (`fleet_rate` on a
/// tenant, `fleet_pool_rate` on a tier) divided by the connected Envoys into
/// `rate` / `pool_rate`, and usage and shadow reports pointed at this
/// control plane unless the config sends them elsewhere.
///
/// A typed edit of the stored document, validated again: what Envoy
/// receives is always a config the filter accepts. If the transform ever
/// produced one it does not (a bug), the stored document goes out as it is
/// (valid, but with fleet-wide shares undivided), and the error is logged.
pub fn per_envoy_config(filter: &FilterSettings, fleet: usize) -> FilterDoc {
    let share = |rate: f64| rate / fleet.max(1) as f64;
    let transformed = filter.config.edited(|raw| {
        if let Some(rl) = raw.rate_limit.as_mut() {
            for tenant in rl.tenants.values_mut() {
                if let Some(fleet_rate) = tenant.fleet_rate {
                    tenant.rate = Some(share(fleet_rate));
                }
            }
            for tier in rl.tiers.values_mut() {
                if let Some(fleet_pool_rate) = tier.fleet_pool_rate {
                    tier.pool_rate = Some(share(fleet_pool_rate));
                }
            }
            rl.report
                .get_or_insert_with(|| RawReport::new(filter.report_cluster.clone()));
        }
        if raw.routes.iter().any(|r| r.shadow.is_some()) {
            raw.shadow_report
                .get_or_insert_with(|| RawShadowReport::new(filter.report_cluster.clone()));
        }
        Ok::<(), ModelError>(())
    });
    transformed.unwrap_or_else(|e| {
        tracing::error!(error = %e, fleet, "the per-Envoy filter config did not validate; sending the stored one");
        filter.config.clone()
    })
}

/// The Wasm filter as Envoy loads it: V8 runtime, the module from the Envoy
/// host's file system, and the JSON config as a `StringValue`.
pub fn wasm_filter(filter: &FilterSettings, config: &FilterDoc) -> Any {
    let plugin = PluginConfig {
        name: FILTER_NAME.to_owned(),
        root_id: FILTER_NAME.to_owned(),
        vm: Some(plugin_config::Vm::VmConfig(VmConfig {
            vm_id: FILTER_NAME.to_owned(),
            runtime: "envoy.wasm.runtime.v8".to_owned(),
            code: Some(AsyncDataSource {
                specifier: Some(async_data_source::Specifier::Local(DataSource {
                    specifier: Some(data_source::Specifier::Filename(filter.wasm_path.clone())),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        configuration: Some(pack_any(StringValue {
            // Serializing plain data (strings, numbers from validated JSON,
            // maps with string keys) cannot fail; an empty string would
            // mean "all defaults" to the filter.
            value: serde_json::to_string(config).unwrap_or_default(),
        })),
        // The filter never panics on traffic (it reads peer bytes as bytes
        // and handles every host status), but if its VM does fail at run
        // time, FAIL_RELOAD makes Envoy start a fresh VM for the next request
        // instead of leaving the filter (rate limits, dedupe, shadowing,
        // hedging) off on that worker until the next config push, as
        // FAIL_OPEN did. Envoy answers 503 for the request that failed, and
        // for every request on that worker until the reload backoff has
        // passed (`wasm.understudy.vm_reload_backoff`): Envoy's default
        // base of 1 s refused about 50 requests in a row on one connection
        // in `tests/tests/failure_policy.rs`, so the backoff starts at
        // 10 ms (a VM that keeps failing still backs off, up to 1 s).
        failure_policy: FailurePolicy::FailReload as i32,
        reload_config: Some(ReloadConfig {
            backoff: Some(BackoffStrategy {
                base_interval: Some(duration(Duration::from_millis(10))),
                max_interval: Some(duration(Duration::from_secs(1))),
            }),
        }),
        // Lets the filter hold request headers while it reads the body
        // (Idempotency-Key fingerprints) instead of Envoy's default, which
        // turns a pause on headers into "stop everything" and never delivers the body.
        allow_on_headers_stop_iteration: Some(BoolValue { value: true }),
        ..Default::default()
    };
    pack_any(Wasm {
        config: Some(plugin),
    })
}

/// What the listener runs until Envoy has accepted the filter: traffic
/// flows (fail open: no limits, no hedging, no shadowing), and the filter's
/// `x-understudy-*` request headers are removed, as the filter itself does,
/// so a client cannot forge them past a missing filter either.
fn fallback_filter() -> Any {
    let strip_internal = HeaderMutationRule {
        action: Some(header_mutation::Action::RemoveOnMatch(
            header_mutation::RemoveOnMatch {
                key_matcher: Some(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Prefix(
                        understudy_core::http::INTERNAL_HEADER_PREFIX.to_owned(),
                    )),
                    ignore_case: true,
                }),
            },
        )),
    };
    pack_any(HeaderMutation {
        mutations: Some(Mutations {
            request_mutations: vec![strip_internal],
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn listener(state: &DesiredState) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: "understudy".to_owned(),
        // Routes (Envoy's and the filter's) match one spelling of a path:
        // `//admin`, `/./admin`, `/%2e/admin` and `/a/../admin` all become
        // `/admin` before any filter runs, and upstreams see that path too.
        normalize_path: Some(BoolValue { value: true }),
        merge_slashes: true,
        // `%2F`/`%5C` are refused (400) rather than unescaped: decoded they
        // would change the path's segments, which backends disagree on
        // (some decode, some do not), and a redirect would make clients
        // resend bodies. Refusing leaves no spelling the proxy and the
        // backend read differently.
        path_with_escaped_slashes_action:
            http_connection_manager::PathWithEscapedSlashesAction::RejectRequest as i32,
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: ROUTE_CONFIG_NAME.to_owned(),
        })),
        http_filters: vec![
            HttpFilter {
                name: FILTER_NAME.to_owned(),
                config_type: Some(http_filter::ConfigType::ConfigDiscovery(
                    ExtensionConfigSource {
                        config_source: Some(ads()),
                        // Without a default, a failed first fetch makes the listener
                        // answer 500. The default must not need the module: the
                        // most common failed first fetch is a module missing on
                        // the node, and a Wasm default would make Envoy reject
                        // the whole listener (tests/tests/failure_policy.rs).
                        default_config: Some(fallback_filter()),
                        apply_default_config_without_warming: false,
                        type_urls: vec![Wasm::type_url(), HeaderMutation::type_url()],
                    },
                )),
                ..Default::default()
            },
            HttpFilter {
                name: "envoy.filters.http.router".to_owned(),
                config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                    Router::default(),
                ))),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    Listener {
        name: LISTENER_NAME.to_owned(),
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: state.listener.address.to_string(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                    state.listener.port,
                ))),
                ..Default::default()
            })),
        }),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".to_owned(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn route_configuration<'a>(
    services: impl Iterator<Item = &'a Service>,
    probes: Option<&ProbeKey>,
) -> RouteConfiguration {
    let virtual_hosts = services
        .map(|svc| {
            let canary = svc.canary_weight.percent();
            // The rollout's flags, as the branch taken serves them: set by
            // the route (after the filter has removed any client-sent
            // `x-understudy-*`), overwriting whatever is there.
            let flags = |canary_branch: bool| flags_header(&svc.flags, canary_branch);
            let weight =
                |name: String, value: u32, canary_branch: bool| weighted_cluster::ClusterWeight {
                    name,
                    weight: Some(UInt32Value { value }),
                    request_headers_to_add: flags(canary_branch),
                    ..Default::default()
                };
            let stable = weight(svc.stable_cluster(), Weight::MAX - canary, false);
            let canary = weight(svc.canary_cluster(), canary, true);
            // Sticky: Envoy picks by the user key's hash, `hash mod 100`
            // against the running sum of weights in list order, so the
            // canary goes first: its users are the hashes below its weight,
            // a set that only grows with the weight (see `model::Sticky`).
            let (clusters, random_value_specifier, hash_policy) = match &svc.sticky {
                None => (vec![stable, canary], None, Vec::new()),
                Some(sticky) => (
                    vec![canary, stable],
                    Some(weighted_cluster::RandomValueSpecifier::UseHashPolicy(
                        BoolValue { value: true },
                    )),
                    vec![sticky_hash_policy(sticky)],
                ),
            };
            // Probe pins first, then cohorts: Envoy takes the first route
            // that matches. A wrong or missing pin matches neither and falls
            // through to the routes every client gets.
            let mut routes: Vec<Route> =
                probes.map(|key| probe_routes(svc, key)).unwrap_or_default();
            routes.extend(svc.canary_cohorts.iter().enumerate().map(|(i, cohort)| {
                header_route(
                    format!("{}-cohort-{i}", svc.name),
                    cohort_matcher(cohort),
                    svc.canary_cluster(),
                    flags(true),
                )
            }));
            routes.push(Route {
                name: svc.name.clone(),
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_owned())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::WeightedClusters(
                        WeightedCluster {
                            clusters,
                            random_value_specifier,
                            ..Default::default()
                        },
                    )),
                    hash_policy,
                    ..Default::default()
                })),
                ..Default::default()
            });
            VirtualHost {
                name: svc.name.clone(),
                domains: svc.domains.clone(),
                routes,
                ..Default::default()
            }
        })
        .collect();
    RouteConfiguration {
        name: ROUTE_CONFIG_NAME.to_owned(),
        virtual_hosts,
        ..Default::default()
    }
}

/// A service's two probe pin routes: [`PROBE_HEADER`] with exactly the
/// side's pin goes to that side's probe cluster, and the header is removed
/// before the request goes upstream (the backend never sees the secret).
/// The side's flags header is set as on its branch of the split.
fn probe_routes(svc: &Service, key: &ProbeKey) -> Vec<Route> {
    [
        ("stable", svc.stable_cluster()),
        ("canary", svc.canary_cluster()),
    ]
    .into_iter()
    .map(|(side, cluster)| Route {
        request_headers_to_remove: vec![PROBE_HEADER.to_owned()],
        // A probe meets the flags of the side it tests, as a user there would.
        ..header_route(
            format!("{}-probe-{side}", svc.name),
            header_matcher(
                PROBE_HEADER.to_owned(),
                HeaderTest::Exact(key.pin(&svc.name, side)),
            ),
            probe_cluster(&cluster),
            flags_header(&svc.flags, side == "canary"),
        )
    })
    .collect()
}

/// A route, ahead of the weighted split, that sends every request matching
/// `matcher` to `cluster` alone, setting `headers`: a cohort's, or a probe
/// pin's.
fn header_route(
    name: String,
    matcher: HeaderMatcher,
    cluster: String,
    headers: Vec<HeaderValueOption>,
) -> Route {
    Route {
        name,
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_owned())),
            headers: vec![matcher],
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster)),
            ..Default::default()
        })),
        request_headers_to_add: headers,
        ..Default::default()
    }
}

/// `x-understudy-flags: <key>=on|off,...` for one branch, replacing any
/// value the request carries; nothing when the service has no flags.
fn flags_header(flags: &FlagHeader, canary_branch: bool) -> Vec<HeaderValueOption> {
    if flags.is_empty() {
        return Vec::new();
    }
    vec![HeaderValueOption {
        header: Some(HeaderValue {
            key: FLAGS_HEADER.to_owned(),
            value: flags.value(canary_branch),
            ..Default::default()
        }),
        append_action: header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }]
}

/// The header matcher of a cohort ([`Cohort::header_test`]).
fn cohort_matcher(cohort: &Cohort) -> HeaderMatcher {
    let (name, test) = cohort.header_test();
    header_matcher(name, test)
}

/// Envoy's matcher for header `name` holding what `test` asks.
fn header_matcher(name: String, test: HeaderTest) -> HeaderMatcher {
    use header_matcher::HeaderMatchSpecifier;
    let string = |m: string_matcher::MatchPattern| {
        HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(m),
            ..Default::default()
        })
    };
    let specifier = match test {
        HeaderTest::Present => HeaderMatchSpecifier::PresentMatch(true),
        HeaderTest::Exact(v) => string(string_matcher::MatchPattern::Exact(v)),
        HeaderTest::Regex(regex) => string(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex,
            ..Default::default()
        })),
    };
    HeaderMatcher {
        name,
        header_match_specifier: Some(specifier),
        ..Default::default()
    }
}

/// The route's hash policy for a sticky service: the user key's header or
/// cookie. A cookie policy without a TTL never sets the cookie: a request
/// without it is split at random, like one without the header.
fn sticky_hash_policy(sticky: &Sticky) -> route_action::HashPolicy {
    use route_action::hash_policy::{Cookie, Header, PolicySpecifier};
    let policy_specifier = match sticky {
        Sticky::Header(name) => PolicySpecifier::Header(Header {
            header_name: name.clone(),
            ..Default::default()
        }),
        Sticky::Cookie(name) => PolicySpecifier::Cookie(Cookie {
            name: name.clone(),
            ..Default::default()
        }),
    };
    route_action::HashPolicy {
        policy_specifier: Some(policy_specifier),
        terminal: false,
    }
}

/// Decodes a resource back (tests and the API's debugging views use it).
pub fn decode<T: Message + Default>(any: &Any) -> Result<T, prost::DecodeError> {
    T::decode(any.value.as_slice())
}

#[cfg(test)]
impl Snapshot {
    /// Lets protocol tests simulate a change to one type alone.
    pub(crate) fn set_version_for_test(&mut self, type_url: &'static str, version: &str) {
        if let Some(t) = self.types.get_mut(type_url) {
            t.version = version.to_owned();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(weight: u32) -> DesiredState {
        crate::model::fixtures::state(weight, 8081, true)
    }

    /// The first service's routes.
    fn routes(snap: &Snapshot) -> Vec<Route> {
        let any = &snap.get(type_url::ROUTE).unwrap().resources[ROUTE_CONFIG_NAME];
        let rc: RouteConfiguration = decode(any).unwrap();
        rc.virtual_hosts[0].routes.clone()
    }

    /// The first service's weighted split: its last route's action and
    /// weighted clusters.
    fn split(snap: &Snapshot) -> (RouteAction, WeightedCluster) {
        let Some(route::Action::Route(action)) = routes(snap).pop().and_then(|r| r.action) else {
            panic!("no route action")
        };
        let Some(route_action::ClusterSpecifier::WeightedClusters(wc)) =
            action.cluster_specifier.clone()
        else {
            panic!("not weighted")
        };
        (action, wc)
    }

    fn weights(snap: &Snapshot) -> Vec<(String, u32)> {
        split(snap)
            .1
            .clusters
            .iter()
            .map(|c| (c.name.clone(), c.weight.unwrap().value))
            .collect()
    }

    #[test]
    fn weights_follow_the_canary_weight() {
        let snap = Snapshot::build(&state(20), 1, 1);
        assert_eq!(
            weights(&snap),
            vec![("shop-stable".into(), 80), ("shop-canary".into(), 20)]
        );
    }

    #[test]
    fn probe_pins_route_ahead_of_everything_to_probe_clusters_sharing_the_endpoints() {
        let key = ProbeKey::from_bytes([7; 32]);
        let mut state = state(20);
        if let Some(svc) = state.services.get_mut("shop") {
            svc.canary_cohorts = vec![Cohort::Header {
                name: "x-group".into(),
                value: None,
            }];
        }
        let snap = Snapshot::build_with(&state, 1, 1, Some(&key));
        let routes = routes(&snap);
        let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "shop-probe-stable",
                "shop-probe-canary",
                "shop-cohort-0",
                "shop"
            ]
        );
        for (route, side) in routes.iter().zip(["stable", "canary"]) {
            let m = route.r#match.as_ref().unwrap();
            let pin = key.pin("shop", side);
            assert!(pin.ends_with(&format!("/{side}")) && pin.len() == 32 + 1 + side.len());
            assert_eq!(m.headers[0].name, PROBE_HEADER);
            assert_eq!(
                m.headers[0].header_match_specifier,
                Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                    StringMatcher {
                        match_pattern: Some(string_matcher::MatchPattern::Exact(pin)),
                        ..Default::default()
                    }
                ))
            );
            assert_eq!(route.request_headers_to_remove, [PROBE_HEADER]);
            let Some(route::Action::Route(action)) = &route.action else {
                panic!("not a route action");
            };
            assert_eq!(
                action.cluster_specifier,
                Some(route_action::ClusterSpecifier::Cluster(format!(
                    "shop-{side}-probe"
                )))
            );
        }
        // Another key, another pin; another service, another pin.
        assert_ne!(
            key.pin("shop", "canary"),
            ProbeKey::from_bytes([8; 32]).pin("shop", "canary")
        );
        assert_ne!(key.pin("shop", "canary"), key.pin("shoe", "canary"));
        // The probe clusters read the main clusters' endpoints; no
        // assignment is duplicated.
        let clusters = snap.get(type_url::CLUSTER).unwrap();
        let probe: Cluster = decode(&clusters.resources["shop-canary-probe"]).unwrap();
        assert_eq!(
            probe.eds_cluster_config.unwrap().service_name,
            "shop-canary"
        );
        assert_eq!(snap.get(type_url::ENDPOINT).unwrap().resources.len(), 2);
        // Without a key (Istio's bootstrap, older tests): no pins at all.
        let plain = Snapshot::build(&state, 1, 1);
        assert_eq!(routes_of(&plain).len(), 2);
    }

    fn routes_of(snap: &Snapshot) -> Vec<Route> {
        routes(snap)
    }

    #[test]
    fn a_sticky_service_routes_by_the_users_hash_with_the_canary_first() {
        for (sticky, want) in [
            (
                Sticky::Header("x-user-id".into()),
                route_action::hash_policy::PolicySpecifier::Header(
                    route_action::hash_policy::Header {
                        header_name: "x-user-id".into(),
                        ..Default::default()
                    },
                ),
            ),
            (
                Sticky::Cookie("uid".into()),
                route_action::hash_policy::PolicySpecifier::Cookie(
                    route_action::hash_policy::Cookie {
                        name: "uid".into(),
                        ..Default::default()
                    },
                ),
            ),
        ] {
            let mut s = state(20);
            if let Some(svc) = s.services.get_mut("shop") {
                svc.sticky = Some(sticky);
            }
            let snap = Snapshot::build(&s, 1, 1);
            assert_eq!(
                weights(&snap),
                vec![("shop-canary".into(), 20), ("shop-stable".into(), 80)]
            );
            let (action, wc) = split(&snap);
            assert_eq!(action.hash_policy.len(), 1);
            assert_eq!(action.hash_policy[0].policy_specifier, Some(want));
            assert_eq!(
                wc.random_value_specifier,
                Some(weighted_cluster::RandomValueSpecifier::UseHashPolicy(
                    BoolValue { value: true }
                ))
            );
        }
        // Not sticky: stable first, a random pick, no hash policy.
        let snap = Snapshot::build(&state(20), 1, 1);
        assert!(split(&snap).0.hash_policy.is_empty());
    }

    #[test]
    fn flags_are_set_on_each_branch_as_it_serves_them_and_overwrite_the_clients() {
        type Added = Vec<(String, String, i32)>;
        let header = |opts: &[HeaderValueOption]| -> Added {
            opts.iter()
                .map(|o| {
                    let h = o.header.clone().unwrap();
                    (h.key, h.value, o.append_action)
                })
                .collect()
        };
        let overwrite = header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32;
        // No flags: no header anywhere.
        let snap = Snapshot::build(&state(20), 1, 1);
        assert!(
            split(&snap)
                .1
                .clusters
                .iter()
                .all(|c| c.request_headers_to_add.is_empty())
        );
        let mut s = state(20);
        if let Some(svc) = s.services.get_mut("shop") {
            svc.flags = FlagHeader {
                keys: vec!["new-checkout".into(), "tax-v2".into()],
                canary: true,
                stable: false,
            };
            svc.canary_cohorts = vec![Cohort::Header {
                name: "x-user-group".into(),
                value: Some("internal".into()),
            }];
        }
        let snap = Snapshot::build(&s, 1, 1);
        let by_cluster: Vec<(String, Added)> = split(&snap)
            .1
            .clusters
            .iter()
            .map(|c| (c.name.clone(), header(&c.request_headers_to_add)))
            .collect();
        let on = "new-checkout=on,tax-v2=on".to_owned();
        let off = "new-checkout=off,tax-v2=off".to_owned();
        assert_eq!(
            by_cluster,
            vec![
                (
                    "shop-stable".into(),
                    vec![(FLAGS_HEADER.into(), off, overwrite)]
                ),
                (
                    "shop-canary".into(),
                    vec![(FLAGS_HEADER.into(), on.clone(), overwrite)]
                ),
            ]
        );
        // The cohort's route goes to the canary: on.
        assert_eq!(
            header(&routes(&snap)[0].request_headers_to_add),
            vec![(FLAGS_HEADER.into(), on, overwrite)]
        );
        // An invalid key never reaches a route.
        if let Some(svc) = s.services.get_mut("shop") {
            svc.flags.keys = vec!["a=b".into()];
        }
        assert!(s.validate().is_err());
    }

    #[test]
    fn cohorts_are_routes_to_the_canary_ahead_of_the_split() {
        let mut s = state(0);
        if let Some(svc) = s.services.get_mut("shop") {
            svc.canary_cohorts = vec![
                Cohort::Header {
                    name: "x-user-group".into(),
                    value: Some("internal".into()),
                },
                Cohort::Header {
                    name: "x-beta".into(),
                    value: None,
                },
                Cohort::Cookie {
                    name: "beta".into(),
                    value: Some("a.b".into()),
                },
            ];
        }
        let snap = Snapshot::build(&s, 1, 1);
        let routes = routes(&snap);
        assert_eq!(routes.len(), 4);
        let matchers: Vec<(String, Option<header_matcher::HeaderMatchSpecifier>)> = routes[..3]
            .iter()
            .map(|r| {
                let m = &r.r#match.as_ref().unwrap().headers[0];
                (m.name.clone(), m.header_match_specifier.clone())
            })
            .collect();
        let string = |p| {
            Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                StringMatcher {
                    match_pattern: Some(p),
                    ..Default::default()
                },
            ))
        };
        assert_eq!(
            matchers,
            vec![
                (
                    "x-user-group".into(),
                    string(string_matcher::MatchPattern::Exact("internal".into()))
                ),
                (
                    "x-beta".into(),
                    Some(header_matcher::HeaderMatchSpecifier::PresentMatch(true))
                ),
                (
                    "cookie".into(),
                    string(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                        regex: r"(^|.*[;,]\s*)beta=a\.b\s*([;,].*)?$".into(),
                        ..Default::default()
                    }))
                ),
            ]
        );
        for r in &routes[..3] {
            let Some(route::Action::Route(a)) = &r.action else {
                panic!("no action")
            };
            assert_eq!(
                a.cluster_specifier,
                Some(route_action::ClusterSpecifier::Cluster(
                    "shop-canary".into()
                ))
            );
        }
        // The split still follows, last.
        assert_eq!(routes[3].name, "shop");
    }

    #[test]
    fn the_cookie_regex_matches_the_pair_and_only_it() {
        let cohort = |value: Option<&str>| Cohort::Cookie {
            name: "beta".into(),
            value: value.map(str::to_owned),
        };
        let regex = |c: &Cohort| match cohort_matcher(c).header_match_specifier {
            Some(header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::SafeRegex(r)),
                ..
            })) => regex::Regex::new(&format!("^(?:{})$", r.regex)).unwrap(),
            other => panic!("{other:?}"),
        };
        let exact = regex(&cohort(Some("1")));
        for yes in [
            "beta=1",
            "a=2; beta=1",
            "beta=1; a=2",
            "a=2,beta=1",
            "x=1;beta=1 ;y",
        ] {
            assert!(exact.is_match(yes), "{yes}");
        }
        for no in [
            "beta=12",
            "xbeta=1",
            "a=beta=1",
            "beta=2",
            "",
            "abeta=1; b=2",
        ] {
            assert!(!exact.is_match(no), "{no}");
        }
        let present = regex(&cohort(None));
        assert!(present.is_match("a=1; beta=anything"));
        assert!(!present.is_match("betamax=1"));
    }

    #[test]
    fn a_weight_change_only_changes_the_route_version() {
        let a = Snapshot::build(&state(0), 1, 1);
        let b = Snapshot::build(&state(50), 2, 1);
        for t in type_url::ORDER {
            let same = a.get(t).unwrap().version == b.get(t).unwrap().version;
            assert_eq!(same, t != type_url::ROUTE, "{}", type_url::short(t));
        }
        // Content-derived: rebuilding the same state gives the same versions.
        assert_eq!(
            Snapshot::build(&state(50), 9, 1).get(type_url::ROUTE),
            b.get(type_url::ROUTE)
        );
    }

    #[test]
    fn every_cluster_has_an_assignment() {
        let snap = Snapshot::build(&state(0), 1, 1);
        let clusters: Vec<_> = snap
            .get(type_url::CLUSTER)
            .unwrap()
            .resources
            .keys()
            .collect();
        let eds: Vec<_> = snap
            .get(type_url::ENDPOINT)
            .unwrap()
            .resources
            .keys()
            .collect();
        assert_eq!(clusters, eds);
        assert_eq!(clusters, vec!["shop-canary", "shop-stable"]);
    }

    fn doc(value: serde_json::Value) -> FilterDoc {
        serde_json::from_value(value).unwrap()
    }

    /// The config one Envoy gets, as JSON, after checking that it is one
    /// the filter accepts (parsed from its wire text by the filter's code).
    fn sent(filter: &FilterSettings, fleet: usize) -> serde_json::Value {
        let text = serde_json::to_string(&per_envoy_config(filter, fleet)).unwrap();
        understudy_core::FilterConfig::from_json(text.as_bytes()).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn fleet_rates_are_divided_among_connected_envoys() {
        let mut s = state(0);
        s.filter.config = doc(serde_json::json!({"rate_limit": {
            "identity": {"header": "x-tenant-id"},
            "tiers": {"standard": {"initial": 1, "min": 1, "max": 1, "fleet_pool_rate": 90},
                      "anonymous": {"initial": 1, "min": 1, "max": 1}},
            "tenants": {"big": {"fleet_rate": 60}, "small": {"rate": 5}}
        }}));
        let c = sent(&s.filter, 3);
        assert_eq!(c["rate_limit"]["tenants"]["big"]["rate"], 20.0);
        assert_eq!(
            c["rate_limit"]["tenants"]["small"]["rate"], 5.0,
            "plain rates stay as they are"
        );
        assert_eq!(c["rate_limit"]["tiers"]["standard"]["pool_rate"], 30.0);
        assert_eq!(c["rate_limit"]["report"]["cluster"], "understudy_xds");
        assert_eq!(
            sent(&s.filter, 0)["rate_limit"]["tenants"]["big"]["rate"],
            60.0
        );
        // The stored document keeps the fleet-wide figure only.
        assert_eq!(
            s.filter.config.raw().rate_limit.as_ref().unwrap().tenants["big"].rate,
            None
        );
        // No rate limits: nothing is added.
        assert_eq!(sent(&state(0).filter, 3), serde_json::json!({}));
    }

    #[test]
    fn shadow_reports_go_to_the_control_plane_by_default() {
        let mut s = state(0);
        s.filter.config = doc(serde_json::json!({"routes": [
            {"name": "a", "path_prefix": "/a"},
            {"name": "b", "shadow": {"cluster": "shop-canary"}}
        ]}));
        let c = sent(&s.filter, 1);
        assert_eq!(c["shadow_report"]["cluster"], "understudy_xds");
        // An explicit shadow_report is kept as written.
        s.filter.config = doc(serde_json::json!({"routes": [
            {"name": "b", "shadow": {"cluster": "shop-canary"}}
        ], "shadow_report": {"cluster": "elsewhere", "interval_ms": 500}}));
        let c = sent(&s.filter, 1);
        assert_eq!(c["shadow_report"]["cluster"], "elsewhere");
        assert_eq!(c["shadow_report"]["interval_ms"], 500);
        // No route shadows: nothing is added.
        s.filter.config = doc(serde_json::json!({"routes": [{"name": "a"}]}));
        assert!(sent(&s.filter, 1).get("shadow_report").is_none());
    }

    proptest::proptest! {
        /// Whatever the fleet size and the fleet-wide figures, what each
        /// Envoy receives is a config the filter accepts, with the shares
        /// divided as documented.
        #[test]
        fn every_envoys_config_validates(
            fleet in 0usize..100_000,
            fleet_rate in 0.001f64..1e9,
            fleet_pool_rate in 0.001f64..1e9,
            shadowed in proptest::bool::ANY,
        ) {
            let mut s = state(0);
            let mut config = serde_json::json!({"rate_limit": {
                "identity": {"header": "x-tenant-id"},
                "tiers": {"standard": {"initial": 1, "min": 1, "max": 1, "fleet_pool_rate": fleet_pool_rate},
                          "anonymous": {"initial": 1, "min": 1, "max": 1}},
                "tenants": {"big": {"fleet_rate": fleet_rate}}
            }});
            if shadowed {
                config["routes"] = serde_json::json!([{"name": "b", "shadow": {"cluster": "shop-canary"}}]);
            }
            s.filter.config = doc(config);
            let transformed = per_envoy_config(&s.filter, fleet);
            let rl = transformed.config().rate_limit().unwrap();
            let raw = transformed.raw().rate_limit.as_ref().unwrap();
            proptest::prop_assert_eq!(raw.tenants["big"].rate, Some(fleet_rate / fleet.max(1) as f64));
            proptest::prop_assert!(rl.report.is_some());
            proptest::prop_assert_eq!(transformed.config().shadow_report().is_some(), shadowed);
            // And the wire text is what the filter parses to the same config.
            let text = serde_json::to_string(&transformed).unwrap();
            let parsed = understudy_core::FilterConfig::from_json(text.as_bytes()).unwrap();
            proptest::prop_assert_eq!(&parsed, transformed.config());
        }
    }

    #[test]
    fn the_filter_config_travels_as_json() {
        let mut s = state(0);
        s.filter.config = doc(serde_json::json!({"routes": [{"name": "all"}]}));
        let snap = Snapshot::build(&s, 1, 1);
        let ext: TypedExtensionConfig =
            decode(&snap.get(type_url::EXTENSION_CONFIG).unwrap().resources[FILTER_NAME]).unwrap();
        let wasm: Wasm = decode(ext.typed_config.as_ref().unwrap()).unwrap();
        let plugin = wasm.config.unwrap();
        let json: StringValue = decode(plugin.configuration.as_ref().unwrap()).unwrap();
        assert_eq!(
            json.value,
            r#"{"routes":[{"name":"all","path_prefix":"/"}]}"#
        );
        assert_eq!(plugin.failure_policy, FailurePolicy::FailReload as i32);
    }

    /// The listener's HTTP connection manager.
    fn hcm_of(snap: &Snapshot) -> HttpConnectionManager {
        let listener: Listener =
            decode(&snap.get(type_url::LISTENER).unwrap().resources[LISTENER_NAME]).unwrap();
        let Some(filter::ConfigType::TypedConfig(any)) =
            &listener.filter_chains[0].filters[0].config_type
        else {
            panic!("the listener has no typed HCM config");
        };
        decode(any).unwrap()
    }

    #[test]
    fn the_listener_normalizes_paths() {
        let snap = Snapshot::build(&state(0), 1, 1);
        let hcm = hcm_of(&snap);
        assert_eq!(hcm.normalize_path, Some(BoolValue { value: true }));
        assert!(hcm.merge_slashes);
        assert_eq!(
            hcm.path_with_escaped_slashes_action,
            http_connection_manager::PathWithEscapedSlashesAction::RejectRequest as i32
        );
    }

    /// Until Envoy accepts the filter, the listener runs a filter that needs
    /// no module (a missing module must not take the listener down) and
    /// removes the filter's internal headers; the filter itself reloads a
    /// failed VM after 10 ms, not Envoy's default 1 s.
    #[test]
    fn the_fallback_needs_no_module_and_a_failed_vm_reloads_quickly() {
        let snap = Snapshot::build(&state(0), 1, 1);
        let hcm = hcm_of(&snap);
        let Some(http_filter::ConfigType::ConfigDiscovery(ecds)) = &hcm.http_filters[0].config_type
        else {
            panic!("the filter is not discovered over ECDS");
        };
        let default = ecds.default_config.as_ref().unwrap();
        assert_eq!(default.type_url, HeaderMutation::type_url());
        assert!(ecds.type_urls.contains(&default.type_url));
        let fallback: HeaderMutation = decode(default).unwrap();
        let rule = &fallback.mutations.unwrap().request_mutations[0];
        let Some(header_mutation::Action::RemoveOnMatch(m)) = &rule.action else {
            panic!("the fallback does not remove headers: {rule:?}");
        };
        assert_eq!(
            m.key_matcher.as_ref().unwrap().match_pattern,
            Some(string_matcher::MatchPattern::Prefix("x-understudy-".into()))
        );

        let ext: TypedExtensionConfig =
            decode(&snap.get(type_url::EXTENSION_CONFIG).unwrap().resources[FILTER_NAME]).unwrap();
        let wasm: Wasm = decode(ext.typed_config.as_ref().unwrap()).unwrap();
        let backoff = wasm.config.unwrap().reload_config.unwrap().backoff.unwrap();
        assert_eq!(
            backoff.base_interval,
            Some(duration(Duration::from_millis(10)))
        );
    }
}
