//! The real `understudy serve` binary as a process of its own, for the
//! promises an in-process control plane cannot test: a SIGKILL runs no
//! destructor and flushes nothing (the in-process kill drops a runtime, so
//! destructors do run), and a SIGSTOPped server accepts connections and
//! never answers (a wedged control plane).

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use rustix::process::{Pid, Signal, kill_process};
use serde_json::Value;
use understudy_controlplane::model::DesiredState;
use understudy_controlplane::tls::CertDir;

use crate::controlplane::{OPERATOR, OPERATOR_TOKEN};
use crate::stack::{api_client, free_port};
use crate::{paths, wait};

/// How long the binary may take to serve its API after it starts.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

pub struct ControlPlaneProcess {
    child: Option<Child>,
    bin: PathBuf,
    pub xds: SocketAddr,
    pub api: SocketAddr,
    /// The CA, the server certificate and the Envoys' client certificates.
    pub certs: CertDir,
    pub state_file: PathBuf,
    pub rollouts_file: PathBuf,
    tokens_file: PathBuf,
    log_path: PathBuf,
    /// An operator's API client (with the harness's request timeout).
    pub http: reqwest::Client,
    /// More `serve` arguments (a replica's `--database`, say).
    args: Vec<String>,
    _dir: tempfile::TempDir,
}

impl ControlPlaneProcess {
    /// Writes `state`, certificates for `nodes` and an operator token file,
    /// starts `understudy serve` on free loopback ports and waits for its API.
    pub async fn start(state: &DesiredState, nodes: &[&str]) -> Result<Self> {
        Self::start_with(state, nodes, &[], None).await
    }

    /// [`Self::start`] with more `serve` arguments and, for replicas that
    /// must trust the same Envoys, the certificates of another process
    /// (`None`: new ones for `nodes`).
    pub async fn start_with(
        state: &DesiredState,
        nodes: &[&str],
        args: &[String],
        certs: Option<&CertDir>,
    ) -> Result<Self> {
        let bin = paths::controlplane_binary()?;
        let dir = tempfile::tempdir()?;
        let state_file = dir.path().join("state.json");
        std::fs::write(&state_file, serde_json::to_vec_pretty(state)?)?;
        let tokens_file = dir.path().join("tokens.txt");
        write_private(
            &tokens_file,
            format!("{OPERATOR}:operator:{OPERATOR_TOKEN}\n").as_bytes(),
        )?;
        let nodes: Vec<String> = nodes.iter().map(|n| (*n).to_owned()).collect();
        let certs = match certs {
            Some(c) => c.clone(),
            None => understudy_controlplane::tls::init(
                &dir.path().join("certs"),
                &[],
                &nodes,
                SystemTime::now(),
            )?,
        };
        let mut cp = Self {
            child: None,
            bin,
            xds: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            api: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            certs,
            rollouts_file: dir.path().join("rollouts.redb"),
            state_file,
            tokens_file,
            log_path: dir.path().join("controlplane.log"),
            http: api_client(OPERATOR_TOKEN)?,
            args: args.to_vec(),
            _dir: dir,
        };
        cp.spawn()?;
        cp.wait_ready().await?;
        Ok(cp)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg("--state")
            .arg(&self.state_file)
            .arg("--rollouts")
            .arg(&self.rollouts_file)
            .arg("--tokens")
            .arg(&self.tokens_file)
            .arg("--tls-dir")
            .arg(&self.certs.dir)
            .arg("--xds-addr")
            .arg(self.xds.to_string())
            .arg("--api-addr")
            .arg(self.api.to_string())
            .args(&self.args)
            .env("RUST_LOG", "info")
            // Own process group: a Ctrl-C meant for the harness does not reach it.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until `/healthz` answers 200; fails at once if the process exits.
    pub async fn wait_ready(&mut self) -> Result<()> {
        let url = self.api_url("/healthz");
        let http = self.http.clone();
        let child = &mut self.child;
        let log_path = &self.log_path;
        wait::until("the control plane's /healthz", START_DEADLINE, || {
            let exited = child.as_mut().map(|c| c.try_wait());
            let (http, url) = (http.clone(), url.clone());
            async move {
                if let Some(Ok(Some(status))) = exited {
                    bail!(
                        "the control plane exited ({status}):\n{}",
                        tail(&std::fs::read_to_string(log_path).unwrap_or_default(), 30)
                    );
                }
                let r = http.get(&url).send().await?;
                Ok(r.status().is_success().then_some(()))
            }
        })
        .await
    }

    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, and reap it: nothing runs after this signal, in the
    /// process or on its behalf.
    pub fn sigkill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // `Child::kill` is SIGKILL on Unix.
            child.kill().context("SIGKILL")?;
            child.wait()?;
        }
        Ok(())
    }

    /// Waits up to `deadline` for the process to exit by itself (after a
    /// SIGTERM, say), reaps it, and gives its exit status.
    pub async fn wait_exit(
        &mut self,
        deadline: std::time::Duration,
    ) -> Result<std::process::ExitStatus> {
        let child = self
            .child
            .as_mut()
            .context("the control plane is not running")?;
        let status = crate::wait::until("the control plane to exit", deadline, || {
            let exited = child.try_wait().map_err(anyhow::Error::from);
            async move { exited }
        })
        .await?;
        self.child = None;
        Ok(status)
    }

    /// Sends `signal` (SIGSTOP to wedge it, SIGCONT to let it go on).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.pid().context("the control plane is not running")?;
        let pid = Pid::from_raw(i32::try_from(pid)?).context("pid 0")?;
        kill_process(pid, signal).with_context(|| format!("sending {signal:?}"))?;
        if signal == Signal::STOP {
            // Delivery is asynchronous: a request sent at once can still be
            // answered. Wait until the kernel shows the process stopped.
            let stat = format!("/proc/{pid}/stat");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                let text = std::fs::read_to_string(&stat).unwrap_or_default();
                let state = text
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next());
                if state == Some("T") {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    bail!("the control plane did not stop within 5 s: {text}");
                }
                std::thread::yield_now();
            }
        }
        Ok(())
    }

    /// Starts the binary again on the same ports, from the same files, and
    /// waits for its API (the old process must be gone: [`Self::sigkill`]).
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("restart after sigkill: the old process still runs");
        }
        self.spawn()?;
        self.wait_ready().await
    }

    /// Whether one of its threads is blocked opening a FIFO with no reader
    /// (Linux: `/proc/<pid>/task/*/wchan`). A test that puts a FIFO where
    /// the control plane writes holds it exactly at that write.
    pub fn blocked_on_fifo(&self) -> Result<bool> {
        let pid = self.pid().context("the control plane is not running")?;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let wchan = std::fs::read_to_string(task?.path().join("wchan")).unwrap_or_default();
            if wchan.trim() == "wait_for_partner" {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        let r = self.http.get(self.api_url(path)).send().await?;
        let status = r.status();
        let body: Value = r.json().await?;
        anyhow::ensure!(status.is_success(), "GET {path} answered {status}: {body}");
        Ok(body)
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        let r = self
            .http
            .post(self.api_url(path))
            .body(body.to_string())
            .send()
            .await?;
        Ok((r.status().as_u16(), r.json().await?))
    }

    pub async fn put(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        let r = self
            .http
            .put(self.api_url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        Ok((r.status().as_u16(), r.json().await.unwrap_or(Value::Null)))
    }

    /// The status of `DELETE path`, with the body if it has one.
    pub async fn delete(&self, path: &str) -> Result<(u16, Value)> {
        let r = self.http.delete(self.api_url(path)).send().await?;
        Ok((r.status().as_u16(), r.json().await.unwrap_or(Value::Null)))
    }

    /// The desired state as the file on disk has it now.
    pub fn state_on_disk(&self) -> Result<Value> {
        let text = std::fs::read(&self.state_file)
            .with_context(|| format!("reading {}", self.state_file.display()))?;
        Ok(serde_json::from_slice(&text)?)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for ControlPlaneProcess {
    /// Kills the process and prints the end of its log (shown only for
    /// failing tests, which is when it is wanted).
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        eprintln!(
            "----- control plane log ({}) -----\n{}\n----- end of control plane log -----",
            self.log_path.display(),
            tail(&self.log(), 80)
        );
    }
}

/// Writes `bytes` to a new file readable by its owner only (the binary
/// refuses a token file others may read).
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
