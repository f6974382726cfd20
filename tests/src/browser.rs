//! A real browser for the dashboard's e2e tests and its benchmark: headless
//! Chromium driven over WebDriver by `chromedriver`, both from the Debian
//! packages `chromium` and `chromium-driver` (`cargo xtask setup` installs
//! them). Nothing here is mocked: the pages are the control plane's own,
//! loaded over loopback, their scripts run, their live updates arrive.
//!
//! [`Browser::start`] runs `chromedriver` on a free port in a process group
//! of its own (so Chromium, its child, goes with it however the test ends),
//! waits until it says it is ready, and opens one session with a fresh
//! profile. Waits poll the page with a deadline ([`wait`]), never sleep.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::paths::{self, SETUP_COMMAND};
use crate::process::ChildGuard;
use crate::stack::{Stack, free_port};
use crate::wait;

/// Overrides where Chromium is (else `chromium` on `PATH`).
pub const CHROMIUM_ENV: &str = "CHROMIUM_BIN";
/// Overrides where chromedriver is (else `chromedriver` on `PATH`).
pub const CHROMEDRIVER_ENV: &str = "CHROMEDRIVER_BIN";

/// How long chromedriver may take to answer `/status` and Chromium to open
/// a session; both start in well under a second on an idle machine, far
/// slower while the machine compiles.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// How often the page is polled in a wait: each poll is one WebDriver
/// round trip into the page (a few ms), so this stays cheap.
const PAGE_POLL: Duration = Duration::from_millis(25);

/// The window size screenshots are taken at.
const WINDOW: (u32, u32) = (1280, 900);

/// `env` if set (it must exist), else the first of `names` on `PATH`.
/// Fails naming the setup command; never lets a test skip.
fn tool(env: &str, names: &[&str], package: &str) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(env) {
        let bin = PathBuf::from(bin);
        if bin.is_file() {
            return Ok(bin);
        }
        bail!(
            "{env}={} does not exist. Unset it and run `{SETUP_COMMAND}` (it installs the Debian package {package})",
            bin.display()
        );
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "{} is not installed. Run `{SETUP_COMMAND}` (it installs the Debian packages chromium and chromium-driver) or set {env}",
        names.first().copied().unwrap_or(package)
    )
}

/// Chromium: `CHROMIUM_BIN`, else `chromium` (Debian) on `PATH`.
pub fn chromium_binary() -> Result<PathBuf> {
    tool(
        CHROMIUM_ENV,
        &["chromium", "chromium-browser", "google-chrome"],
        "chromium",
    )
}

/// chromedriver: `CHROMEDRIVER_BIN`, else `chromedriver` on `PATH`.
pub fn chromedriver_binary() -> Result<PathBuf> {
    tool(CHROMEDRIVER_ENV, &["chromedriver"], "chromium-driver")
}

/// Where screenshots go: `target/ui/`.
pub fn screenshot_dir() -> PathBuf {
    paths::repo_root().join("target/ui")
}

/// What a page transferred, from the Performance API.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// The sum over the document and every resource it loaded of the bytes
    /// that crossed the network (`transferSize`: headers and the body as
    /// sent, so compressed when served compressed), or, for a resource the
    /// cache answered (whose `transferSize` is 0), its `encodedBodySize`:
    /// what a first visit with an empty cache would have transferred.
    pub bytes: u64,
    /// Each entry: URL and the bytes counted for it.
    pub entries: Vec<(String, u64)>,
}

impl Transfer {
    pub fn kb(&self) -> f64 {
        self.bytes as f64 / 1024.0
    }
}

/// One headless Chromium session and the chromedriver serving it.
pub struct Browser {
    client: Client,
    /// `http://127.0.0.1:<api port>`: the control plane the pages come from.
    base: String,
    /// chromedriver's process group (its pid): Chromium and its helpers are
    /// in it, and are killed with it.
    group: rustix::process::Pid,
    _driver: ChildGuard,
    log: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session with a fresh
    /// profile, for pages under `base` (`http://127.0.0.1:<port>`).
    pub async fn start(base: &str) -> Result<Self> {
        let chromium = chromium_binary()?;
        let driver = chromedriver_binary()?;
        let profile = tempfile::Builder::new()
            .prefix("understudy-chromium-")
            .tempdir()?;
        let log = profile.path().join("chromedriver.log");
        let port = free_port()?;
        let child = Command::new(&driver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: dropping the browser kills chromedriver
            // and every Chromium process it started, even when the test
            // fails before it could end the session.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", driver.display()))?;
        let group = rustix::process::Pid::from_child(&child);
        let mut guard = GroupGuard {
            group,
            driver: Some(ChildGuard::new(child)),
        };
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        wait::until("chromedriver to be ready", START_DEADLINE, || async {
            let Ok(r) = http.get(format!("{url}/status")).send().await else {
                return Ok(None);
            };
            let status: Value = r.json().await?;
            Ok((status["value"]["ready"] == true).then_some(()))
        })
        .await
        .with_context(|| log_tail(&log))?;
        let user_data = profile.path().join("profile");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium.display().to_string(),
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-extensions",
                    "--disable-background-networking",
                    format!("--window-size={},{}", WINDOW.0, WINDOW.1),
                    format!("--user-data-dir={}", user_data.display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = tokio::time::timeout(
            START_DEADLINE,
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&url),
        )
        .await
        .with_context(|| format!("Chromium did not open a session within {START_DEADLINE:?}"))?
        .with_context(|| format!("opening a Chromium session; {}", log_tail(&log)))?;
        let driver = guard.driver.take().context("the driver guard")?;
        Ok(Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
            group,
            _driver: driver,
            log,
            _profile: profile,
        })
    }

    /// The WebDriver client, for what these helpers do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The absolute URL of `path` on the control plane.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Opens `path` (e.g. `/ui/`) and waits for it to load.
    pub async fn goto(&self, path: &str) -> Result<()> {
        self.client
            .goto(&self.url(path))
            .await
            .with_context(|| format!("loading {path}"))
    }

    /// The path (and query) of the page now shown.
    pub async fn path(&self) -> Result<String> {
        let url = self.client.current_url().await?;
        Ok(match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        })
    }

    /// Waits until the page shown is `path` (after a redirect or a form).
    pub async fn wait_path(&self, path: &str, deadline: Duration) -> Result<()> {
        // The last path seen, for the error message.
        let last = std::sync::Mutex::new(String::new());
        let waited = wait::until_every(
            &format!("the browser to show {path}"),
            deadline,
            PAGE_POLL,
            || async {
                let got = self.path().await?;
                let done = got == path;
                *last.lock().unwrap_or_else(|p| p.into_inner()) = got;
                Ok(done.then_some(()))
            },
        )
        .await;
        let last = last.into_inner().unwrap_or_else(|p| p.into_inner());
        waited.with_context(|| format!("the browser shows {last}"))
    }

    /// Logs in on `/ui/login` with `token` and waits until the login page
    /// is left for the Rollouts page.
    pub async fn login(&self, token: &str) -> Result<()> {
        self.submit_login(token).await?;
        if let Err(e) = self.wait_path("/ui/", Duration::from_secs(15)).await {
            // What the page said instead (a refusal names its reason).
            let text = match self.client.find(Locator::Css("main")).await {
                Ok(main) => main.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            return Err(e.context(format!("logging in; the page says: {text}")));
        }
        Ok(())
    }

    /// Types `token` into the login form and submits it (whatever the
    /// answer: a bad token stays on the login page with an error).
    pub async fn submit_login(&self, token: &str) -> Result<()> {
        self.goto("/ui/login").await?;
        let input = self
            .wait_for("input#token", Duration::from_secs(10))
            .await?;
        input.send_keys(token).await?;
        self.find("button[type=submit]").await?.click().await?;
        Ok(())
    }

    /// The element `css` matches now (the first), or an error naming it.
    pub async fn find(&self, css: &str) -> Result<Element> {
        self.client
            .find(Locator::Css(css))
            .await
            .with_context(|| format!("no element matches {css} on {}", self.page()))
    }

    /// How many elements match `css` now.
    pub async fn count(&self, css: &str) -> Result<usize> {
        Ok(self.client.find_all(Locator::Css(css)).await?.len())
    }

    /// The visible text of the element `css` matches.
    pub async fn text(&self, css: &str) -> Result<String> {
        Ok(self.find(css).await?.text().await?)
    }

    /// Attribute `name` of the element `css` matches.
    pub async fn attr(&self, css: &str, name: &str) -> Result<Option<String>> {
        Ok(self.find(css).await?.attr(name).await?)
    }

    /// Waits until an element matches `css`; returns it.
    pub async fn wait_for(&self, css: &str, deadline: Duration) -> Result<Element> {
        wait::until_every(
            &format!("an element matching {css}"),
            deadline,
            PAGE_POLL,
            || async {
                let mut found = self.client.find_all(Locator::Css(css)).await?;
                Ok((!found.is_empty()).then(|| found.swap_remove(0)))
            },
        )
        .await
        .with_context(|| format!("on {}", self.page()))
    }

    /// Runs `script` (a function body: `return ...;`) in the page with
    /// `args` (`arguments[0]`, ...); its JSON result.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        self.client
            .execute(script, args)
            .await
            .with_context(|| format!("running in the page: {script}"))
    }

    /// Waits until the JavaScript expression `condition` is truthy in the
    /// page; returns its value then (`what` names it in a timeout).
    pub async fn wait_js(&self, what: &str, condition: &str, deadline: Duration) -> Result<Value> {
        let script = format!("return ({condition});");
        wait::until_every(what, deadline, PAGE_POLL, || async {
            let v = self.js(&script, vec![]).await?;
            let truthy = match &v {
                Value::Null | Value::Bool(false) => false,
                Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            Ok(truthy.then_some(v))
        })
        .await
        .with_context(|| format!("on {}", self.page()))
    }

    /// Starts watching the page for the element `css` to have attribute
    /// `attr` equal to `value`: a `MutationObserver` records the page's
    /// clock (`Date.now()`, the same clock as the test's on one machine)
    /// the moment it first does. Read it with [`Browser::watched_at_ms`].
    /// This times an update to the millisecond, without the WebDriver
    /// round trips a poll would add.
    pub async fn watch_attr(&self, css: &str, attr: &str, value: &str) -> Result<()> {
        self.js(
            r#"
            const [css, attr, value] = arguments;
            window.__understudyWatch = null;
            const check = () => {
                const el = document.querySelector(css);
                if (window.__understudyWatch === null && el && el.getAttribute(attr) === value) {
                    window.__understudyWatch = Date.now();
                }
            };
            new MutationObserver(check).observe(document.documentElement,
                {subtree: true, childList: true, attributes: true, characterData: true});
            check();
            return true;
            "#,
            vec![json!(css), json!(attr), json!(value)],
        )
        .await?;
        Ok(())
    }

    /// Waits for the watch [`Browser::watch_attr`] set to fire; the Unix
    /// time in ms (the page's clock) when it did.
    pub async fn watched_at_ms(&self, deadline: Duration) -> Result<u64> {
        let v = self
            .wait_js(
                "the watched change to reach the page",
                "window.__understudyWatch",
                deadline,
            )
            .await?;
        v.as_f64()
            .map(|ms| ms as u64)
            .with_context(|| format!("the watch recorded {v}"))
    }

    /// Saves a screenshot of the window as `target/ui/<name>.png`.
    pub async fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let png = self.client.screenshot().await?;
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// What the page shown has transferred so far, by the Performance API
    /// (see [`Transfer`]). A request still open (the live-update stream)
    /// is not counted: it has no entry until it ends.
    pub async fn transferred(&self) -> Result<Transfer> {
        let v = self
            .js(
                r#"
                const all = performance.getEntriesByType('navigation')
                    .concat(performance.getEntriesByType('resource'));
                return all.map(e => [e.name, Math.max(e.transferSize || 0, e.encodedBodySize || 0)]);
                "#,
                vec![],
            )
            .await?;
        let entries: Vec<(String, u64)> = serde_json::from_value(v.clone())
            .or_else(|_| {
                // Sizes arrive as JSON numbers that may be floats.
                let raw: Vec<(String, f64)> = serde_json::from_value(v)?;
                anyhow::Ok(raw.into_iter().map(|(n, b)| (n, b as u64)).collect())
            })
            .context("reading the Performance API's entries")?;
        let bytes = entries.iter().map(|(_, b)| *b).sum();
        Ok(Transfer { bytes, entries })
    }

    /// What the page shown transferred once its wasm module is among it
    /// (a `.wasm` entry): the shadow page's first-load figure. A page that
    /// fetches the module only when first needed is asked for a preview
    /// (`window.understudyPreview`), so the module counts either way.
    pub async fn transferred_with_wasm(&self) -> Result<Transfer> {
        let has_wasm = |t: &Transfer| t.entries.iter().any(|(url, _)| url.contains(".wasm"));
        let t = self.transferred().await?;
        if has_wasm(&t) {
            return Ok(t);
        }
        self.js(
            r#"return Promise.resolve(window.understudyPreview('{}', '{"samples": []}')).then(() => 1);"#,
            vec![],
        )
        .await?;
        let t = self.transferred().await?;
        if !has_wasm(&t) {
            bail!("the page loaded no .wasm module: {:?}", t.entries);
        }
        Ok(t)
    }

    /// How long an API abort of rollout `id` takes to show on this
    /// browser's open rollout page (`#phase[data-phase=aborted]`): from
    /// just before the request is sent to the page's own clock when the
    /// attribute changed, so the API call's time counts against it.
    pub async fn abort_latency(&self, stack: &Stack, id: &str) -> Result<Duration> {
        self.watch_attr("#phase", "data-phase", "aborted").await?;
        let sent_ms = now_unix_ms();
        let r = stack
            .api
            .post(stack.cp.api_url(&format!("/v1/rollouts/{id}/abort")))
            .send()
            .await?;
        let status = r.status();
        if status != 200 {
            bail!("aborting {id} answered {status}: {}", r.text().await?);
        }
        let seen_ms = self.watched_at_ms(Duration::from_secs(10)).await?;
        Ok(Duration::from_millis(seen_ms.saturating_sub(sent_ms)))
    }

    /// Ends the session (Chromium quits), then chromedriver.
    pub async fn close(self) -> Result<()> {
        let client = self.client.clone();
        let closed = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
        drop(self);
        match closed {
            Ok(r) => Ok(r?),
            Err(_) => bail!("the WebDriver session did not end within 10 s"),
        }
    }

    /// Where to look when a page did not do what a test waited for.
    fn page(&self) -> String {
        format!("the page (chromedriver log: {})", self.log.display())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(self.group);
    }
}

/// The test's clock in the page's unit (`Date.now()`): Unix ms.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Kills chromedriver's process group if the start fails half way.
struct GroupGuard {
    group: rustix::process::Pid,
    driver: Option<ChildGuard>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.driver.is_some() {
            kill_group(self.group);
        }
    }
}

fn kill_group(group: rustix::process::Pid) {
    // Already gone is fine: the session may have ended them.
    let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
}

/// The last lines of chromedriver's log, for an error message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    format!("chromedriver log ({}):\n{tail}", log.display())
}
