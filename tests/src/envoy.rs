//! A real Envoy process: started from a committed config (with ports and
//! paths rewritten), watched through its admin API, killed on drop.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::paths;
use crate::wait;

/// How long Envoy may take to start (V8 compiles the filter on every worker).
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// Reads a config from `envoy/` and applies `replacements` (each `from` must
/// occur, so a config edit that breaks the harness fails loudly, not silently).
pub fn render(name: &str, replacements: &[(&str, String)]) -> Result<String> {
    let path = paths::envoy_config(name);
    let mut text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    for (from, to) in replacements {
        if !text.contains(from) {
            bail!("{}: expected to find {from:?} to replace", path.display());
        }
        text = text.replace(from, to);
    }
    Ok(text)
}

/// Which ADS flavour an Envoy bootstrapped from `envoy/bootstrap.yaml`
/// speaks. The control plane serves both on the same port; the bootstrap's
/// `ads_config.api_type` alone chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XdsProtocol {
    /// `api_type: GRPC`, as committed.
    #[default]
    StateOfTheWorld,
    /// `api_type: DELTA_GRPC`: incremental xDS.
    Delta,
}

impl XdsProtocol {
    /// The bootstrap's `api_type` line for this protocol.
    pub fn api_type_line(self) -> &'static str {
        match self {
            Self::StateOfTheWorld => "api_type: GRPC",
            Self::Delta => "api_type: DELTA_GRPC",
        }
    }

    /// Replacements turning the committed bootstrap into this protocol's.
    pub fn bootstrap_replacements(self) -> Vec<(&'static str, String)> {
        match self {
            Self::StateOfTheWorld => vec![],
            Self::Delta => vec![(
                Self::StateOfTheWorld.api_type_line(),
                self.api_type_line().to_owned(),
            )],
        }
    }
}

/// The certificate paths `envoy/bootstrap.yaml` is committed with (what
/// `understudy certs init --dir certs --envoy envoy-1` writes).
pub const BOOTSTRAP_CERT: &str = "certs/envoy-envoy-1.pem";
pub const BOOTSTRAP_KEY: &str = "certs/envoy-envoy-1-key.pem";
pub const BOOTSTRAP_CA: &str = "certs/ca.pem";

/// Replacements pointing the bootstrap's `understudy_xds` transport socket
/// at `node`'s client certificate in `certs` (which must exist).
pub fn bootstrap_cert_replacements(
    certs: &understudy_controlplane::tls::CertDir,
    node: &str,
) -> Vec<(&'static str, String)> {
    vec![
        (BOOTSTRAP_CERT, certs.envoy_cert(node).display().to_string()),
        (BOOTSTRAP_KEY, certs.envoy_key(node).display().to_string()),
        (BOOTSTRAP_CA, certs.ca_cert().display().to_string()),
    ]
}

/// The inline filter config `envoy/static-filter.yaml` is committed with.
pub const STATIC_FILTER_CONFIG: &str = r#"{"routes":[{"name":"all","path_prefix":"/"}]}"#;

/// `envoy/static-filter.yaml` rendered for this machine: free ports for its
/// two listeners (returned: with the filter, plain), the upstream's port, the
/// absolute `.wasm` path, and `filter_json` as the filter's config.
pub fn render_static_filter(upstream_port: u16, filter_json: &str) -> Result<(String, u16, u16)> {
    let (with, plain) = (crate::stack::free_port()?, crate::stack::free_port()?);
    let text = render(
        "static-filter.yaml",
        &[
            ("port_value: 9901", "port_value: 0".into()),
            ("port_value: 10000", format!("port_value: {with}")),
            ("port_value: 10001", format!("port_value: {plain}")),
            ("port_value: 8081", format!("port_value: {upstream_port}")),
            (
                "filename: target/wasm32-wasip1/release/understudy_filter.wasm",
                format!("filename: {}", paths::filter_wasm()?.display()),
            ),
            (
                &format!("value: '{STATIC_FILTER_CONFIG}'"),
                format!("value: '{filter_json}'"),
            ),
        ],
    )?;
    Ok((text, with, plain))
}

pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    log_path: PathBuf,
    /// Print the end of the log on drop (tests: shown only if they fail).
    print_log_on_drop: bool,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// The Envoy process's id (its CPU time is read from `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts Envoy with `config` (YAML text) and `--concurrency 2`, and waits
    /// until its admin API is up. Its admin port must be 0 in `config`; the
    /// real one is read from `--admin-address-path`.
    pub async fn start(config: &str, extra_args: &[&str]) -> Result<Self> {
        let bin = paths::envoy_binary()?;
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, config)?;
        let admin_path = dir.path().join("admin_address");
        let log_path = dir.path().join("envoy.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(&bin)
            .current_dir(paths::repo_root())
            .arg("-c")
            .arg(&config_path)
            .args([
                "--concurrency",
                "2",
                "--disable-hot-restart",
                "--log-level",
                "info",
            ])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(extra_args)
            // Own process group, so a Ctrl-C meant for the harness does not
            // stop Envoy under traffic; the harness kills it on drop.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut envoy = Self {
            child,
            admin: "127.0.0.1:0".parse()?,
            log_path,
            print_log_on_drop: true,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            _dir: dir,
        };
        let admin = wait::until("Envoy's admin address", START_DEADLINE, || {
            let exited = envoy.child.try_wait();
            let text = std::fs::read_to_string(&admin_path).unwrap_or_default();
            async move {
                if let Ok(Some(status)) = exited {
                    bail!("Envoy exited during startup ({status})");
                }
                Ok(text.trim().parse::<SocketAddr>().ok())
            }
        })
        .await
        .with_context(|| envoy.log_tail(60))?;
        envoy.admin = admin;
        Ok(envoy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Waits for `/ready` (all initial xDS fetches done, listeners warm).
    pub async fn wait_ready(&self) -> Result<()> {
        let http = self.http.clone();
        let url = self.admin_url("/ready");
        wait::until("Envoy /ready", START_DEADLINE, || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let r = http.get(&url).send().await?;
                Ok(r.status().is_success().then_some(()))
            }
        })
        .await
        .with_context(|| self.log_tail(60))
    }

    /// All stats, as `name -> value` text.
    pub async fn stats(&self) -> Result<BTreeMap<String, String>> {
        let text = self
            .http
            .get(self.admin_url("/stats"))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }

    /// A counter or gauge, or `None` if Envoy does not have it (yet).
    pub async fn stat(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.stats().await?.get(name).and_then(|v| v.parse().ok()))
    }

    pub async fn config_dump(&self, resource: &str) -> Result<Value> {
        let url = self.admin_url(&format!("/config_dump?resource={resource}"));
        Ok(self.http.get(url).send().await?.json().await?)
    }

    /// `service`'s applied weights, `(stable, canary)` (clusters
    /// `<service>-stable` and `<service>-canary` of [`Envoy::route_weights`]).
    pub async fn service_weights(&self, service: &str) -> Result<(u64, u64)> {
        let mut w = (0, 0);
        for (cluster, weight) in self.route_weights().await? {
            if cluster == format!("{service}-stable") {
                w.0 = weight;
            } else if cluster == format!("{service}-canary") {
                w.1 = weight;
            }
        }
        Ok(w)
    }

    /// `(cluster, weight)` of the first weighted route in the dynamic route configs.
    pub async fn route_weights(&self) -> Result<Vec<(String, u64)>> {
        let dump = self.config_dump("dynamic_route_configs").await?;
        Ok(find_key(&dump, "weighted_clusters")
            .and_then(|wc| wc.get("clusters"))
            .and_then(Value::as_array)
            .map(|clusters| {
                clusters
                    .iter()
                    .map(|c| {
                        let name = c["name"].as_str().unwrap_or_default().to_owned();
                        (name, c["weight"].as_u64().unwrap_or(0))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Waits for Envoy to exit by itself (a rejected static config, say).
    pub async fn wait_exit(&mut self, deadline: Duration) -> Result<ExitStatus> {
        let child = &mut self.child;
        let mut status = None;
        wait::until("Envoy to exit", deadline, || {
            let polled = child.try_wait();
            if let Ok(Some(s)) = polled {
                status = Some(s);
            }
            let done = status;
            async move { Ok(done) }
        })
        .await
    }

    /// Keeps the log out of the terminal on drop (the demo prints its path instead).
    pub fn quiet(mut self) -> Self {
        self.print_log_on_drop = false;
        self
    }

    /// Kills Envoy now (it is also killed on drop).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn log_tail(&self, lines: usize) -> String {
        tail(&self.log(), lines)
    }
}

impl Drop for Envoy {
    /// Kills Envoy and prints the end of its log. The test runner captures
    /// output and shows it only for failing tests (panics and `Err` returns
    /// alike), so a failure always comes with Envoy's side of the story.
    fn drop(&mut self) {
        self.kill();
        if !self.print_log_on_drop {
            return;
        }
        eprintln!(
            "----- Envoy log ({}) -----\n{}\n----- end of Envoy log -----",
            self.log_path.display(),
            self.log_tail(150)
        );
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Depth-first search for the first object member called `key`.
pub fn find_key<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Object(map) => map
            .get(key)
            .or_else(|| map.values().find_map(|child| find_key(child, key))),
        Value::Array(items) => items.iter().find_map(|child| find_key(child, key)),
        _ => None,
    }
}

/// Runs `envoy --mode validate` on a config file, from the repository root
/// (so relative paths in committed configs resolve as documented). A config
/// that names the bootstrap's (or a mesh sidecar's) certificate files is
/// validated with freshly generated ones in their place (Envoy reads them
/// at load).
pub fn validate(config: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    if text.contains(crate::mesh::ROOT_CERT) {
        let mesh = crate::mesh::MeshCerts::new()?;
        let mut rendered = text;
        for (from, to) in mesh.sidecar_replacements(&mesh.workload("default", "validate")) {
            rendered = rendered.replace(from, &to);
        }
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(config.file_name().unwrap_or_default());
        std::fs::write(&path, rendered)?;
        return validate_file(&path).with_context(|| format!("validating {}", config.display()));
    }
    if text.contains(BOOTSTRAP_CA) {
        let dir = tempfile::tempdir()?;
        let certs = understudy_controlplane::tls::init(
            &dir.path().join("certs"),
            &[],
            &["envoy-1".to_owned()],
            std::time::SystemTime::now(),
        )?;
        let mut rendered = text;
        for (from, to) in bootstrap_cert_replacements(&certs, "envoy-1") {
            rendered = rendered.replace(from, &to);
        }
        let path = dir.path().join(config.file_name().unwrap_or_default());
        std::fs::write(&path, rendered)?;
        return validate_file(&path).with_context(|| format!("validating {}", config.display()));
    }
    validate_file(config)
}

fn validate_file(config: &Path) -> Result<String> {
    let bin = paths::envoy_binary()?;
    let out = Command::new(&bin)
        .current_dir(paths::repo_root())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(config)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "{} does not validate:\n{}",
            config.display(),
            tail(&text, 30)
        );
    }
    Ok(text)
}
