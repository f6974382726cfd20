//! A real Prometheus for the tests: the Debian package's `prometheus`
//! binary (unpacked by `cargo xtask setup`, see [`paths::prometheus_tool`])
//! on a free loopback port, scraping the targets a test gives it every
//! second, with a temporary data directory, killed on drop. Queries go
//! through its HTTP API ([`Prometheus::query`]), as a dashboard's or a
//! rollout judge's would. Also [`promtool_check_metrics`], the linter CI
//! runs on the control plane's `/metrics`.
//!
//! ```ignore
//! let prom = Prometheus::start(&[
//!     Target::new("understudy", cp.api).path("/metrics").bearer(VIEWER_TOKEN),
//!     Target::new("envoy", envoy.admin).path("/stats/prometheus"),
//! ]).await?;
//! prom.wait_for("one Envoy", "understudy_xds_connected_envoys", DEADLINE, |s| ...).await?;
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::process::ChildGuard;
use crate::{paths, stack, wait};

/// How often Prometheus scrapes every target.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);
/// How long Prometheus may take to start and report ready.
pub const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long one query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Something for Prometheus to scrape.
#[derive(Debug, Clone)]
pub struct Target {
    /// The `job` label of its series.
    pub job: String,
    pub address: SocketAddr,
    pub metrics_path: String,
    /// Sent as `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
}

impl Target {
    /// `address` scraped at `/metrics`, as `job`, without a token.
    pub fn new(job: &str, address: SocketAddr) -> Self {
        Self {
            job: job.to_owned(),
            address,
            metrics_path: "/metrics".to_owned(),
            bearer_token: None,
        }
    }

    pub fn path(mut self, path: &str) -> Self {
        self.metrics_path = path.to_owned();
        self
    }

    pub fn bearer(mut self, token: &str) -> Self {
        self.bearer_token = Some(token.to_owned());
        self
    }
}

/// One series of an instant query's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

pub struct Prometheus {
    /// Its web and API address on loopback.
    pub addr: SocketAddr,
    http: reqwest::Client,
    log: PathBuf,
    // Dropped in this order: the process first, then its data directory.
    _child: ChildGuard,
    dir: tempfile::TempDir,
}

/// The scrape config for `targets` (tokens are written to files in `dir`,
/// as an operator would, rather than into the config).
fn config(targets: &[Target], dir: &std::path::Path) -> Result<String> {
    let interval = format!("{}s", SCRAPE_INTERVAL.as_secs());
    let mut yaml = format!(
        "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  evaluation_interval: {interval}\nscrape_configs:\n"
    );
    for (i, t) in targets.iter().enumerate() {
        // Job names and paths are the test's own words; quoted as JSON
        // strings, which YAML reads as they are.
        yaml.push_str(&format!(
            "  - job_name: {}\n    metrics_path: {}\n    static_configs:\n      - targets: [{}]\n",
            serde_json::to_string(&t.job)?,
            serde_json::to_string(&t.metrics_path)?,
            serde_json::to_string(&t.address.to_string())?,
        ));
        if let Some(token) = &t.bearer_token {
            let file = dir.join(format!("token-{i}"));
            std::fs::write(&file, token)?;
            yaml.push_str(&format!(
                "    authorization:\n      type: Bearer\n      credentials_file: {}\n",
                serde_json::to_string(&file.display().to_string())?
            ));
        }
    }
    Ok(yaml)
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` every [`SCRAPE_INTERVAL`] and
    /// waits until it is ready (`/-/ready`), failing with its log after
    /// [`START_DEADLINE`].
    pub async fn start(targets: &[Target]) -> Result<Self> {
        let bin = paths::prometheus_tool("prometheus")?;
        let dir = tempfile::tempdir()?;
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config(targets, dir.path())?)?;
        let log = dir.path().join("prometheus.log");
        let out = std::fs::File::create(&log)?;
        let port = stack::free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let prom = Self {
            addr,
            http: reqwest::Client::builder()
                .connect_timeout(QUERY_TIMEOUT)
                .timeout(QUERY_TIMEOUT)
                .build()?,
            log,
            _child: ChildGuard::new(child),
            dir,
        };
        let ready = prom.url("/-/ready");
        let http = prom.http.clone();
        wait::until("Prometheus to be ready", START_DEADLINE, || {
            let (http, ready) = (http.clone(), ready.clone());
            async move {
                Ok(http
                    .get(&ready)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
                    .then_some(()))
            }
        })
        .await
        .with_context(|| format!("Prometheus log:\n{}", prom.log()))?;
        Ok(prom)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// What Prometheus logged so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The data directory (it goes when `self` does).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// An instant query (`/api/v1/query`): each series of the vector with
    /// its labels and value. A scalar answer is one sample without labels.
    pub async fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let r = self
            .http
            .get(self.url("/api/v1/query"))
            .query(&[("query", promql)])
            .send()
            .await
            .with_context(|| format!("querying Prometheus: {promql}"))?;
        let status = r.status();
        let body: Value = r.json().await?;
        if !status.is_success() || body["status"] != "success" {
            bail!("query {promql} failed ({status}): {body}");
        }
        parse_result(&body["data"]).with_context(|| format!("the answer to {promql}: {body}"))
    }

    /// Queries `promql` until `ok` holds for its answer, failing after
    /// `deadline` with the last answer and Prometheus' view of its targets.
    pub async fn wait_for(
        &self,
        what: &str,
        promql: &str,
        deadline: Duration,
        ok: impl Fn(&[Sample]) -> bool,
    ) -> Result<Vec<Sample>> {
        let last = std::sync::Mutex::new(Vec::new());
        let ok = &ok;
        let last_ref = &last;
        let got = wait::until_every(what, deadline, Duration::from_millis(250), || async move {
            let samples = self.query(promql).await?;
            if ok(&samples) {
                return Ok(Some(samples));
            }
            *last_ref.lock().unwrap_or_else(|p| p.into_inner()) = samples;
            Ok(None)
        })
        .await;
        match got {
            Ok(s) => Ok(s),
            Err(e) => {
                let last = last.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let targets = self.targets().await.unwrap_or_default();
                Err(e.context(format!(
                    "{promql} last answered {last:?}; targets: {targets}"
                )))
            }
        }
    }

    /// Each target's scrape health (`/api/v1/targets`): job, health, last error.
    pub async fn targets(&self) -> Result<String> {
        let body: Value = self
            .http
            .get(self.url("/api/v1/targets"))
            .send()
            .await?
            .json()
            .await?;
        let lines: Vec<String> = body["data"]["activeTargets"]
            .as_array()
            .map(|ts| {
                ts.iter()
                    .map(|t| {
                        format!(
                            "{} {} {} {}",
                            t["labels"]["job"], t["scrapeUrl"], t["health"], t["lastError"]
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(lines.join("; "))
    }
}

fn parse_result(data: &Value) -> Result<Vec<Sample>> {
    let value = |v: &Value| -> Result<f64> {
        let text = v
            .get(1)
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("no [time, \"value\"] pair: {v}"))?;
        // Prometheus writes "NaN", "+Inf" and "-Inf" as Go does.
        match text {
            "+Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            t => Ok(t.parse()?),
        }
    };
    match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .ok_or_else(|| anyhow!("no result array"))?
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(Sample {
                    labels,
                    value: value(&s["value"])?,
                })
            })
            .collect(),
        Some("scalar") => Ok(vec![Sample {
            labels: BTreeMap::new(),
            value: value(&data["result"])?,
        }]),
        other => bail!("unexpected result type {other:?}"),
    }
}

/// Runs `promtool check metrics` on `exposition` (a scrape's body) and
/// fails with every complaint it prints: a clean scrape passes silently.
pub fn promtool_check_metrics(exposition: &str) -> Result<()> {
    let bin = paths::prometheus_tool("promtool")?;
    let mut child = Command::new(&bin)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {} check metrics", bin.display()))?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow!("promtool has no stdin"))?
        .write_all(exposition.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.trim().is_empty() {
        bail!(
            "promtool check metrics ({}) complained:\n{said}",
            out.status
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vectors_and_scalars_parse() {
        let v = parse_result(&json!({"resultType": "vector", "result": [
            {"metric": {"__name__": "up", "job": "cp"}, "value": [1.5, "1"]},
            {"metric": {"job": "envoy"}, "value": [1.5, "+Inf"]}
        ]}))
        .unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].label("job"), Some("cp"));
        assert_eq!(v[0].value, 1.0);
        assert!(v[1].value.is_infinite());
        let s = parse_result(&json!({"resultType": "scalar", "result": [1.5, "2.25"]})).unwrap();
        assert_eq!(s[0].value, 2.25);
        assert!(parse_result(&json!({"resultType": "matrix", "result": []})).is_err());
    }

    #[test]
    fn the_config_names_every_target_and_keeps_tokens_in_files() {
        let dir = tempfile::tempdir().unwrap();
        let targets = [
            Target::new("cp", "127.0.0.1:1".parse().unwrap()).bearer("secret-token"),
            Target::new("envoy", "127.0.0.1:2".parse().unwrap()).path("/stats/prometheus"),
        ];
        let yaml = config(&targets, dir.path()).unwrap();
        assert!(yaml.contains("job_name: \"cp\""), "{yaml}");
        assert!(
            yaml.contains("metrics_path: \"/stats/prometheus\""),
            "{yaml}"
        );
        assert!(yaml.contains("targets: [\"127.0.0.1:2\"]"), "{yaml}");
        assert!(!yaml.contains("secret-token"), "{yaml}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("token-0")).unwrap(),
            "secret-token"
        );
    }
}
