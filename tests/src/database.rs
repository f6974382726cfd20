//! A real PostgreSQL server for the replica tests: Debian's binaries
//! (`postgresql-15`, installed by `cargo xtask setup` when missing), a new
//! cluster made with `initdb` in a temporary directory, listening on a free
//! loopback port, stopped and removed on drop.
//!
//! PostgreSQL refuses to run as root; as root (CI) the server runs as the
//! `postgres` user that Debian's package creates, on a directory it owns.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::stack::free_port;
use crate::wait;

/// The command that installs the server when it is missing.
pub const SETUP: &str = "cargo xtask setup (installs Debian's postgresql)";

/// How long a start may take before the test fails.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    /// Run as this user (uid, gid) when we are root.
    user: Option<(u32, u32)>,
}

/// The newest installed server's `bin` directory (`/usr/lib/postgresql/<v>/bin`).
pub fn server_bin() -> Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .with_context(|| format!("no PostgreSQL server under /usr/lib/postgresql. Run `{SETUP}`"))
}

impl Postgres {
    /// A new cluster on a free port, started, accepting connections.
    pub async fn start() -> Result<Self> {
        let bin = server_bin()?;
        let dir = tempfile::tempdir()?;
        let user = if rustix::process::getuid().is_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        if let Some((uid, gid)) = user {
            chown_all(dir.path(), uid, gid)?;
        }
        let mut pg = Self {
            bin,
            dir,
            port: free_port()?,
            child: None,
            user,
        };
        let data = pg.data_dir();
        let out = pg
            .command("initdb")
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-instructions",
            ])
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        pg.spawn()?;
        pg.wait_ready().await?;
        Ok(pg)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(tool));
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(self.dir.path());
        cmd
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))?;
        let data = self.data_dir();
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", "max_connections=200"])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the server answers a query.
    pub async fn wait_ready(&mut self) -> Result<()> {
        let url = self.url();
        let log = self.dir.path().join("postgres.log");
        let child = &mut self.child;
        wait::until("PostgreSQL to accept connections", START_DEADLINE, || {
            let exited = child.as_mut().map(|c| c.try_wait());
            let url = url.clone();
            let log = log.clone();
            async move {
                if let Some(Ok(Some(status))) = exited {
                    bail!(
                        "postgres exited ({status}): {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                let ok = tokio::task::spawn_blocking(move || {
                    postgres::Client::connect(&url, postgres::NoTls)
                        .and_then(|mut c| c.simple_query("SELECT 1"))
                        .is_ok()
                })
                .await?;
                Ok(ok.then_some(()))
            }
        })
        .await
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A client for the test's own checks.
    pub fn client(&self) -> Result<postgres::Client> {
        Ok(postgres::Client::connect(&self.url(), postgres::NoTls)?)
    }

    /// Stops the server (SIGINT: a fast shutdown, connections cut) and
    /// waits until it has exited.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let pid =
                rustix::process::Pid::from_raw(i32::try_from(child.id())?).context("pid 0")?;
            rustix::process::kill_process(pid, rustix::process::Signal::INT)?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the stopped server again on the same port and data.
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("restart: the server still runs");
        }
        self.spawn()?;
        self.wait_ready().await
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn postgres_user() -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.first() == Some(&"postgres") && f.len() > 3 {
            return Ok((f[2].parse()?, f[3].parse()?));
        }
    }
    bail!("running as root, and there is no `postgres` user to run the server as. Run `{SETUP}`")
}

fn chown_all(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))
}
