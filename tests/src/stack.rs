//! The whole path, assembled: two upstreams (stable `v1`, canary `v2`), the
//! control plane, and an Envoy bootstrapped from `envoy/bootstrap.yaml` whose
//! listener, routes, clusters and filter all arrive over ADS.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use understudy_controlplane::model::{
    Backend, DesiredState, FilterSettings, ListenerSettings, Service, Weight,
};

use crate::controlplane::{ControlPlane, OPERATOR_TOKEN};
use crate::envoy::{self, Envoy, XdsProtocol};
use crate::upstream::{Behavior, UpstreamHandle};
use crate::{paths, traffic, wait};

pub const SERVICE: &str = "demo";
pub const NODE_ID: &str = "e2e-envoy";

/// A free loopback port (the OS picks it; it is released for Envoy to bind).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// How long one API call may take before the harness gives up on it. The
/// control plane answers in milliseconds; a wedged one (accepting, never
/// answering) must fail the test in seconds, not hang CI.
pub const API_TIMEOUT: Duration = Duration::from_secs(5);

/// An API client that sends `token` as its bearer token, with a request
/// timeout ([`API_TIMEOUT`]) on every call.
pub fn api_client(token: &str) -> Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))?;
    value.set_sensitive(true);
    headers.insert(reqwest::header::AUTHORIZATION, value);
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(API_TIMEOUT)
        .timeout(API_TIMEOUT)
        .build()?)
}

/// The filter config the stack starts with.
pub fn default_filter_config() -> Value {
    json!({"routes": [{"name": "all", "path_prefix": "/"}]})
}

/// An Envoy bootstrapped from `envoy/bootstrap.yaml` against `cp`, as
/// `node`, with `node`'s client certificate from `cp`'s CA, ready.
async fn start_envoy(cp: &ControlPlane, node: &str, protocol: XdsProtocol) -> Result<Envoy> {
    cp.envoy_cert(node)?;
    start_envoy_with(cp.xds.port(), &cp.certs, node, protocol).await
}

/// An Envoy bootstrapped from `envoy/bootstrap.yaml` against the control
/// plane on loopback port `xds_port`, as `node`, with `node`'s client
/// certificate in `certs` (which must exist), ready.
pub async fn start_envoy_at(
    xds_port: u16,
    certs: &understudy_controlplane::tls::CertDir,
    node: &str,
) -> Result<Envoy> {
    start_envoy_with(xds_port, certs, node, XdsProtocol::StateOfTheWorld).await
}

/// [`start_envoy_at`], speaking `protocol` over ADS.
pub async fn start_envoy_with(
    xds_port: u16,
    certs: &understudy_controlplane::tls::CertDir,
    node: &str,
    protocol: XdsProtocol,
) -> Result<Envoy> {
    let mut replacements = vec![
        ("port_value: 9901", "port_value: 0".to_owned()),
        ("port_value: 18000", format!("port_value: {xds_port}")),
        ("id: envoy-1", format!("id: {node}")),
    ];
    replacements.extend(envoy::bootstrap_cert_replacements(certs, node));
    replacements.extend(protocol.bootstrap_replacements());
    let config = envoy::render("bootstrap.yaml", &replacements)?;
    let envoy = Envoy::start(&config, &[]).await?;
    envoy.wait_ready().await?;
    Ok(envoy)
}

/// The desired state the stack starts from: the listener on loopback
/// `listener_port`, the filter with [`default_filter_config`], and the
/// service [`SERVICE`] with its stable and canary endpoints at weight 0.
pub fn desired_state(
    listener_port: u16,
    stable: std::net::SocketAddr,
    canary: std::net::SocketAddr,
) -> Result<DesiredState> {
    Ok(DesiredState {
        listener: ListenerSettings {
            address: "127.0.0.1".parse()?,
            port: listener_port,
        },
        filter: FilterSettings {
            wasm_path: paths::filter_wasm()?.display().to_string(),
            config: understudy_controlplane::model::FilterDoc::parse(default_filter_config())?,
            report_cluster: "understudy_xds".into(),
        },
        services: [(
            SERVICE.to_owned(),
            Service {
                name: SERVICE.to_owned(),
                domains: vec!["*".to_owned()],
                stable: Backend {
                    endpoints: vec![stable],
                },
                canary: Backend {
                    endpoints: vec![canary],
                },
                canary_weight: Weight::ZERO,
                sticky: None,
                canary_cohorts: Vec::new(),
                flags: Default::default(),
            },
        )]
        .into_iter()
        .collect(),
    })
}

/// Waits until Envoy's listener at `url` answers 200.
pub async fn wait_listener(http: &reqwest::Client, url: &str) -> Result<()> {
    wait::until(
        "the listener to answer 200",
        // V8 compiles the filter on each worker first; slow when the machine is busy.
        Duration::from_secs(30),
        || async move {
            Ok(http
                .get(url)
                .send()
                .await?
                .status()
                .is_success()
                .then_some(()))
        },
    )
    .await
}

pub struct Stack {
    pub stable: UpstreamHandle,
    pub canary: UpstreamHandle,
    pub cp: ControlPlane,
    pub envoy: Envoy,
    /// `http://127.0.0.1:<listener>` : traffic enters Envoy here.
    pub url: String,
    pub http: reqwest::Client,
    /// A client for the control plane's API, carrying the operator token.
    pub api: reqwest::Client,
    /// The ADS flavour this stack's Envoys speak.
    pub protocol: XdsProtocol,
}

impl Stack {
    pub async fn start() -> Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// [`Stack::start`] from the default desired state as `edit` leaves it
    /// (another wasm path, another first filter config).
    pub async fn start_with(edit: impl FnOnce(&mut DesiredState)) -> Result<Self> {
        Self::start_speaking(XdsProtocol::StateOfTheWorld, edit).await
    }

    /// [`Stack::start_with`], its Envoy speaking `protocol` over ADS.
    pub async fn start_speaking(
        protocol: XdsProtocol,
        edit: impl FnOnce(&mut DesiredState),
    ) -> Result<Self> {
        let stable = UpstreamHandle::start("v1", Behavior::default()).await?;
        let canary = UpstreamHandle::start("v2", Behavior::default()).await?;
        let listener_port = free_port()?;
        let mut state = desired_state(listener_port, stable.addr, canary.addr)?;
        edit(&mut state);
        let cp = ControlPlane::start(&state).await?;
        let envoy = start_envoy(&cp, NODE_ID, protocol).await?;
        let stack = Self {
            stable,
            canary,
            cp,
            envoy,
            url: format!("http://127.0.0.1:{listener_port}/"),
            http: traffic::client(),
            api: api_client(OPERATOR_TOKEN)?,
            protocol,
        };
        wait_listener(&stack.http, &stack.url).await?;
        Ok(stack)
    }

    /// Another Envoy on the same control plane (its listener shares the port
    /// through SO_REUSEPORT, which Envoy sets by default).
    pub async fn another_envoy(&self, node: &str) -> Result<Envoy> {
        start_envoy(&self.cp, node, self.protocol).await
    }

    /// `PUT /v1/services/demo/canary-weight`; returns the HTTP status and body.
    pub async fn set_weight(&self, weight: Value) -> Result<(u16, Value)> {
        let r = self
            .api
            .put(
                self.cp
                    .api_url(&format!("/v1/services/{SERVICE}/canary-weight")),
            )
            .json(&json!({ "weight": weight }))
            .send()
            .await
            .context("calling the control plane API")?;
        Ok((r.status().as_u16(), r.json().await?))
    }

    pub async fn api_get(&self, path: &str) -> Result<Value> {
        Ok(self
            .api
            .get(self.cp.api_url(path))
            .send()
            .await?
            .json()
            .await?)
    }

    pub async fn api_put(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        let r = self
            .api
            .put(self.cp.api_url(path))
            .json(body)
            .send()
            .await?;
        Ok((r.status().as_u16(), r.json().await?))
    }

    /// The canary weight Envoy has applied (0 when its route has none).
    pub async fn canary_weight(&self) -> Result<u64> {
        let canary = format!("{SERVICE}-canary");
        Ok(self
            .envoy
            .route_weights()
            .await?
            .into_iter()
            .find(|(c, _)| *c == canary)
            .map_or(0, |(_, w)| w))
    }

    /// The filter config Envoy lists in its ECDS config dump (the JSON
    /// inside the Wasm plugin's `configuration`), `None` before it has one.
    /// Envoy 1.40 lists a config whose `on_configure` refused it (a NACK)
    /// here too; a config it could not load at all (a missing module) it
    /// does not. Where a NACK is possible, read the filter's stats instead.
    pub async fn applied_filter_config(&self) -> Result<Option<Value>> {
        let dump = self.envoy.config_dump("ecds_filters").await?;
        let Some(text) = envoy::find_key(&dump, "configuration")
            .and_then(|c| c.get("value"))
            .and_then(Value::as_str)
        else {
            return Ok(None);
        };
        Ok(Some(
            serde_json::from_str(text).context("the applied filter config")?,
        ))
    }

    /// Waits until Envoy's applied route weights are `(stable, canary)`.
    pub async fn wait_weights(&self, stable: u64, canary: u64, deadline: Duration) -> Result<()> {
        // Sorted: a sticky service lists the canary first.
        let want = vec![
            (format!("{SERVICE}-canary"), canary),
            (format!("{SERVICE}-stable"), stable),
        ];
        wait::until(
            &format!("Envoy to apply weights {want:?}"),
            deadline,
            || {
                let got = self.envoy.route_weights();
                let want = want.clone();
                async move {
                    let mut got = got.await?;
                    got.sort();
                    Ok((got == want).then_some(()))
                }
            },
        )
        .await
    }

    /// Pushes a new filter config through the API and waits until Envoy has
    /// ACKed it over ECDS (a NACK fails with Envoy's error).
    pub async fn put_filter_config(&self, config: Value) -> Result<()> {
        let sent = |s: &Option<Value>| {
            s.as_ref()
                .and_then(|s| s["types"]["ecds"]["responses_sent"].as_u64())
                .unwrap_or(0)
        };
        let before = sent(&self.envoy_status().await?);
        let body =
            json!({"wasm_path": paths::filter_wasm()?.display().to_string(), "config": config});
        let (status, answer) = self.api_put("/v1/filter", &body).await?;
        anyhow::ensure!(status == 200, "PUT /v1/filter answered {status}: {answer}");
        wait::until(
            "Envoy to ACK the new filter config",
            Duration::from_secs(15),
            || async {
                let s = self.envoy_status().await?;
                let ecds = s
                    .as_ref()
                    .map(|s| s["types"]["ecds"].clone())
                    .unwrap_or_default();
                if sent(&s) > before
                    && !ecds["last_nack"].is_null()
                    && ecds["last_nack"]["version"] == ecds["sent_version"]
                {
                    anyhow::bail!(
                        "Envoy rejected the filter config: {}",
                        ecds["last_nack"]["error"]
                    );
                }
                Ok((sent(&s) > before
                    && !ecds["awaiting_reply"].as_bool().unwrap_or(true)
                    && ecds["acked_version"] == ecds["sent_version"])
                    .then_some(()))
            },
        )
        .await
    }

    /// This Envoy's entry in `GET /v1/envoys`, once it has one.
    pub async fn envoy_status(&self) -> Result<Option<Value>> {
        let all = self.api_get("/v1/envoys").await?;
        Ok(all["envoys"]
            .as_array()
            .and_then(|list| list.iter().find(|e| e["node_id"] == NODE_ID))
            .cloned())
    }
}
