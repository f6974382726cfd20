//! The filter as an OCI image, the way Istio's `WasmPlugin` pulls it
//! (`cargo xtask package`): an OCI image layout on disk, a push to a
//! registry over the distribution API, a pull back, and Istio's rules for
//! finding the module in an image.
//!
//! # What Istio does with an `oci://` WasmPlugin URL
//! Read from istio/istio `pkg/wasm/imagefetcher.go` and `pkg/wasm/cache.go`:
//! - `PrepareFetch` fetches the manifest and returns its digest
//!   (`img.Digest()`, the sha256 of the manifest bytes) as the "actual
//!   digest"; `LocalFileCache.Get` compares the WasmPlugin's `sha256` with
//!   exactly that (`dChecksum != key.checksum`), as hex without the
//!   `sha256:` prefix. So for an OCI image the WasmPlugin's `sha256` is the
//!   **manifest digest**, not the sha256 of the `.wasm` bytes (that is only
//!   so for `http(s)://` URLs). [`wasmplugin_sha256`] gives it.
//! - Variants, tried in order: a manifest whose `mediaType` is Docker's
//!   schema 2 takes the *last* layer, which must be
//!   `application/vnd.docker.image.rootfs.diff.tar.gzip`; otherwise the
//!   "compat" variant: the *last* layer must be
//!   `application/vnd.oci.image.layer.v1.tar+gzip`; otherwise the "oci"
//!   variant: exactly two layers, one of them
//!   `application/vnd.module.wasm.content.layer.v1+wasm` holding the raw
//!   module. Earlier layers of the compat variants are never read.
//! - In a compat layer (`extractWasmPluginBinary`) it gunzips, walks the tar
//!   and takes the first entry whose base name (`filepath.Base`) is
//!   `plugin.wasm`; none is an error.
//! - Finally the bytes must start with the wasm magic `\0asm` and be at
//!   least 8 bytes long (`isValidWasmBinary`).
//!
//! We write the compat variant with OCI media types: one layer, a
//! deterministic tar+gzip holding only `plugin.wasm`, so the same `.wasm`
//! always gives the same manifest digest. [`istio_extract_wasm`] is those
//! rules as a pure function, which the registry test applies to what it
//! pulled back.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The file name Istio looks for in a compat layer.
pub const WASM_FILE: &str = "plugin.wasm";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Docker's manifest and layer types, which Istio also accepts.
pub const DOCKER_MANIFEST_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LAYER_MEDIA_TYPE: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// The raw-module layer of the (solo.io) "oci" variant.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/vnd.module.wasm.content.layer.v1+wasm";

/// Where `cargo xtask package` writes the layout (relative to the repository root).
pub const DEFAULT_LAYOUT_DIR: &str = "target/oci/understudy-filter";
/// The file in the layout naming its digests (for the manifests to use).
pub const DIGESTS_FILE: &str = "digests.json";

/// The largest manifest or config we read from a registry or a layout.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// The largest module (and layer) we accept: the filter is about 1 MB; the
/// cap keeps a hostile layer (a gzip bomb) from filling memory.
pub const MAX_WASM_BYTES: u64 = 64 << 20;
/// How long one registry request may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

/// The lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// The three blobs of the image, as written and pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub manifest: Vec<u8>,
    pub config: Vec<u8>,
    /// The tar+gzip layer holding only `plugin.wasm`.
    pub layer: Vec<u8>,
}

impl Image {
    /// The compat-variant image of `wasm`: the same bytes always give the
    /// same blobs (fixed mtime, owner and mode in the tar, no timestamp or
    /// OS byte in the gzip header, sorted JSON keys, no `created` date).
    pub fn build(wasm: &[u8]) -> Result<Self> {
        let tar = layer_tar(wasm)?;
        let mut gz = flate2::GzBuilder::new()
            .mtime(0)
            // 255: "unknown", so the header does not depend on the build host.
            .operating_system(255)
            .write(Vec::new(), flate2::Compression::best());
        gz.write_all(&tar)?;
        let layer = gz.finish()?;
        // A minimal valid image config (image-spec config.md: architecture,
        // os, rootfs are required). The module is wasm for WASI preview 1,
        // and those are the GOARCH/GOOS names for it, so the config says so
        // rather than naming whichever host built it. diff_ids are the
        // digests of the *uncompressed* layers.
        let config = serde_json::to_vec(&json!({
            "architecture": "wasm",
            "os": "wasip1",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [digest(&tar)]},
        }))?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": descriptor(CONFIG_MEDIA_TYPE, &config),
            "layers": [descriptor(LAYER_MEDIA_TYPE, &layer)],
        }))?;
        Ok(Self {
            manifest,
            config,
            layer,
        })
    }

    pub fn manifest_digest(&self) -> String {
        digest(&self.manifest)
    }

    /// Every blob but the manifest, with its digest: what a push uploads
    /// before the manifest.
    pub fn blobs(&self) -> [(String, &[u8]); 2] {
        [
            (digest(&self.config), &self.config),
            (digest(&self.layer), &self.layer),
        ]
    }
}

/// An OCI content descriptor of `bytes`.
fn descriptor(media_type: &str, bytes: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": digest(bytes), "size": bytes.len()})
}

/// The uncompressed layer: a tar with the single regular file
/// `plugin.wasm`, mode 0644, owned by 0:0, mtime 0.
pub fn layer_tar(wasm: &[u8]) -> Result<Vec<u8>> {
    let mut header = tar::Header::new_ustar();
    header.set_path(WASM_FILE)?;
    header.set_size(u64::try_from(wasm.len())?);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&header, wasm)?;
    Ok(builder.into_inner()?)
}

/// What [`write_layout`] wrote: the names the manifests and the operator need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packaged {
    pub layout: PathBuf,
    /// `sha256:<hex>` of the manifest: the image's digest in a registry.
    pub manifest_digest: String,
    /// Hex sha256 of the `.wasm` itself (what an `http(s)://` URL would check).
    pub wasm_sha256: String,
    pub wasm_size: u64,
    /// The tag recorded in `index.json` (`org.opencontainers.image.ref.name`).
    pub tag: String,
}

impl Packaged {
    /// The WasmPlugin's `sha256` for this image: the manifest digest's hex.
    pub fn wasmplugin_sha256(&self) -> &str {
        self.manifest_digest
            .strip_prefix("sha256:")
            .unwrap_or(&self.manifest_digest)
    }
}

/// Builds the image of `wasm` and writes it as an OCI image layout in `dir`
/// (`oci-layout`, `index.json`, `blobs/sha256/*`) with `tag` as its
/// reference name, plus [`DIGESTS_FILE`]. Blobs of an earlier package in
/// the same layout are removed, so the layout holds exactly this image.
pub fn write_layout(dir: &Path, wasm: &[u8], tag: &str) -> Result<Packaged> {
    validate_tag(tag)?;
    let image = Image::build(wasm)?;
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let mut keep = Vec::new();
    for (d, bytes) in image
        .blobs()
        .into_iter()
        .chain([(image.manifest_digest(), image.manifest.as_slice())])
    {
        let hex = d.trim_start_matches("sha256:").to_owned();
        std::fs::write(blobs.join(&hex), bytes)?;
        keep.push(hex);
    }
    // Only files named like digests are ours to remove.
    for entry in std::fs::read_dir(&blobs)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_sha256_hex(&name) && !keep.contains(&name) {
            std::fs::remove_file(entry.path())?;
        }
    }
    std::fs::write(
        dir.join("oci-layout"),
        serde_json::to_vec(&json!({"imageLayoutVersion": "1.0.0"}))?,
    )?;
    let mut manifest_desc = descriptor(MANIFEST_MEDIA_TYPE, &image.manifest);
    manifest_desc["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": [manifest_desc],
        }))?,
    )?;
    let packaged = Packaged {
        layout: dir.to_path_buf(),
        manifest_digest: image.manifest_digest(),
        wasm_sha256: sha256_hex(wasm),
        wasm_size: u64::try_from(wasm.len())?,
        tag: tag.to_owned(),
    };
    std::fs::write(
        dir.join(DIGESTS_FILE),
        serde_json::to_vec_pretty(&json!({
            "manifest_digest": packaged.manifest_digest,
            "wasmplugin_sha256": packaged.wasmplugin_sha256(),
            "wasm_sha256": packaged.wasm_sha256,
            "wasm_size": packaged.wasm_size,
            "tag": tag,
        }))?,
    )?;
    Ok(packaged)
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The image a layout holds: the one manifest `index.json` names, and the
/// blobs it names, each checked against its digest.
pub fn read_layout(dir: &Path) -> Result<Image> {
    let index: Value = serde_json::from_slice(&read_capped(&dir.join("index.json"))?)
        .with_context(|| format!("{}/index.json is not JSON", dir.display()))?;
    let manifests = index["manifests"].as_array().map(Vec::as_slice);
    let [desc] = manifests.unwrap_or_default() else {
        bail!(
            "{}/index.json must name exactly one manifest (run `cargo xtask package`)",
            dir.display()
        );
    };
    let manifest = read_blob(dir, desc)?;
    let parsed: Value = serde_json::from_slice(&manifest)?;
    let config = read_blob(dir, &parsed["config"])?;
    let layers = parsed["layers"].as_array().map(Vec::as_slice);
    let [layer] = layers.unwrap_or_default() else {
        bail!(
            "the manifest in {} must have exactly one layer",
            dir.display()
        );
    };
    let layer = read_blob(dir, layer)?;
    Ok(Image {
        manifest,
        config,
        layer,
    })
}

/// The WasmPlugin `sha256` for the image in the layout `dir`: the hex of its
/// manifest digest (see the module doc for why not the `.wasm`'s sha256).
/// The manifest blob is re-hashed, so a layout edited by hand is caught.
pub fn wasmplugin_sha256(layout_dir: &Path) -> Result<String> {
    let image = read_layout(layout_dir)?;
    Ok(sha256_hex(&image.manifest))
}

/// The Istio overlay's `filter-image.yaml` for an image pushed as `url`
/// (`oci://host/repo:tag`) with manifest `sha256` (hex): a patch of the
/// WasmPlugin `understudy` in `demo` setting exactly those two fields
/// (`cargo xtask package --wasmplugin-patch`).
pub fn wasmplugin_patch(url: &str, sha256: &str) -> String {
    format!(
        "# Written by `cargo xtask package --push ... --wasmplugin-patch ...`:\n\
         # the filter image it pushed, and that image's manifest digest, which\n\
         # Istio compares with what it pulls.\n\
         apiVersion: extensions.istio.io/v1alpha1\n\
         kind: WasmPlugin\n\
         metadata:\n  name: understudy\n  namespace: demo\n\
         spec:\n  url: {url}\n  sha256: \"{sha256}\"\n"
    )
}

fn read_capped(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_WASM_BYTES + 1).read_to_end(&mut bytes)?;
    ensure!(
        u64::try_from(bytes.len())? <= MAX_WASM_BYTES,
        "{} is larger than {MAX_WASM_BYTES} bytes",
        path.display()
    );
    Ok(bytes)
}

fn read_blob(dir: &Path, desc: &Value) -> Result<Vec<u8>> {
    let d = desc["digest"]
        .as_str()
        .with_context(|| format!("a descriptor without a digest: {desc}"))?;
    let hex = d
        .strip_prefix("sha256:")
        .filter(|h| is_sha256_hex(h))
        .with_context(|| format!("not a sha256 digest: {d}"))?;
    let bytes = read_capped(&dir.join("blobs/sha256").join(hex))?;
    ensure!(
        digest(&bytes) == d,
        "blob {d} in {} does not match its digest",
        dir.display()
    );
    ensure!(
        desc["size"].as_u64() == Some(u64::try_from(bytes.len())?),
        "blob {d} is not the size its descriptor says"
    );
    Ok(bytes)
}

// === Istio's extraction rules ===

/// Why Istio would refuse an image (each maps to an error of
/// `imagefetcher.go` or `cache.go`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExtractError {
    /// The manifest does not parse, or has no `layers` list.
    #[error("the manifest is not valid JSON with a layers list: {0}")]
    Manifest(String),
    /// "number of layers must be greater than zero".
    #[error("the image has no layers")]
    NoLayers,
    /// The last layer is not the tar+gzip type the variant needs.
    #[error("the last layer has media type {found:?}, not {want}")]
    LastLayerType { found: String, want: &'static str },
    /// A layer the rules need is not among the pulled blobs.
    #[error("blob {0} was not pulled")]
    MissingBlob(String),
    /// "failed to parse layer as tar.gz", or a broken tar entry.
    #[error("the layer is not a tar+gzip: {0}")]
    Archive(String),
    /// "plugin.wasm not found in the archive".
    #[error("no {} in the last layer", WASM_FILE)]
    NoPluginWasm,
    #[error(
        "the oci variant needs exactly 2 layers, one of them {}",
        WASM_LAYER_MEDIA_TYPE
    )]
    OciVariant,
    /// Our cap, not Istio's: a hostile layer must not fill memory.
    #[error("{} is larger than {} bytes", WASM_FILE, MAX_WASM_BYTES)]
    TooLarge,
    /// `isValidWasmBinary` failed.
    #[error("the module is not wasm (no \\0asm magic, or shorter than 8 bytes)")]
    NotWasm,
}

/// Istio's rules (module doc) over a pulled image: `manifest` is the
/// manifest's bytes, `blob` gives a blob's bytes by digest. Returns the
/// module Istio would hand to Envoy.
pub fn istio_extract_wasm<'a>(
    manifest: &[u8],
    blob: impl Fn(&str) -> Option<&'a [u8]>,
) -> Result<Vec<u8>, ExtractError> {
    let parsed: Value =
        serde_json::from_slice(manifest).map_err(|e| ExtractError::Manifest(e.to_string()))?;
    let layers = parsed["layers"]
        .as_array()
        .ok_or_else(|| ExtractError::Manifest("no layers list".to_owned()))?;
    let media = |l: &Value| l["mediaType"].as_str().unwrap_or_default().to_owned();
    let fetch = |l: &Value| {
        let d = l["digest"].as_str().unwrap_or_default();
        blob(d).ok_or_else(|| ExtractError::MissingBlob(d.to_owned()))
    };
    let wasm = if parsed["mediaType"].as_str() == Some(DOCKER_MANIFEST_MEDIA_TYPE) {
        let last = layers.last().ok_or(ExtractError::NoLayers)?;
        if media(last) != DOCKER_LAYER_MEDIA_TYPE {
            return Err(ExtractError::LastLayerType {
                found: media(last),
                want: DOCKER_LAYER_MEDIA_TYPE,
            });
        }
        plugin_wasm_in(fetch(last)?)?
    } else {
        let compat = match layers.last() {
            None => Err(ExtractError::NoLayers),
            Some(last) if media(last) != LAYER_MEDIA_TYPE => Err(ExtractError::LastLayerType {
                found: media(last),
                want: LAYER_MEDIA_TYPE,
            }),
            Some(last) => fetch(last).and_then(plugin_wasm_in),
        };
        match compat {
            Ok(wasm) => wasm,
            // Istio then tries the oci variant; if that fails too, its error
            // names both. The compat error is the one that says what is wrong
            // with an image meant to be compat, so that is the one we return.
            Err(compat_err) => {
                let wasm_layer = layers.iter().find(|l| media(l) == WASM_LAYER_MEDIA_TYPE);
                match (layers.len(), wasm_layer) {
                    (2, Some(l)) => {
                        let bytes = fetch(l)?;
                        if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_WASM_BYTES {
                            return Err(ExtractError::TooLarge);
                        }
                        bytes.to_vec()
                    }
                    _ => return Err(compat_err),
                }
            }
        }
    };
    if wasm.len() < 8 || !wasm.starts_with(b"\0asm") {
        return Err(ExtractError::NotWasm);
    }
    Ok(wasm)
}

/// `extractWasmPluginBinary`: the first tar entry whose base name is
/// `plugin.wasm`, read to its end (capped at [`MAX_WASM_BYTES`]).
fn plugin_wasm_in(layer: &[u8]) -> Result<Vec<u8>, ExtractError> {
    let archive_err = |e: std::io::Error| ExtractError::Archive(e.to_string());
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(layer));
    for entry in archive.entries().map_err(archive_err)? {
        let entry = entry.map_err(archive_err)?;
        let path = entry.path().map_err(archive_err)?;
        // Go's filepath.Base: the last element, trailing slashes dropped.
        let base = path.file_name().and_then(|n| n.to_str());
        if base != Some(WASM_FILE) {
            continue;
        }
        let mut bytes = Vec::new();
        entry
            .take(MAX_WASM_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(archive_err)?;
        if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_WASM_BYTES {
            return Err(ExtractError::TooLarge);
        }
        return Ok(bytes);
    }
    Err(ExtractError::NoPluginWasm)
}

// === The distribution API ===

/// `registry/repository:tag`, as `cargo xtask package --push` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host` or `host:port`.
    pub registry: String,
    pub repository: String,
    pub tag: String,
}

impl Reference {
    /// Parses `host[:port]/repo[/more][:tag]`; `default_tag` when no tag is
    /// given. The registry part is required (no implicit docker.io): a push
    /// should never go somewhere the operator did not name.
    pub fn parse(s: &str, default_tag: &str) -> Result<Self> {
        let (registry, rest) = s
            .split_once('/')
            .with_context(|| format!("{s:?}: expected host[:port]/repository[:tag]"))?;
        ensure!(
            registry.contains('.') || registry.contains(':') || registry == "localhost",
            "{s:?}: the first part must be a registry host (with a dot or a port, or localhost)"
        );
        ensure!(
            !registry.is_empty()
                && registry
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)),
            "{s:?}: bad registry host {registry:?}"
        );
        ensure!(!rest.contains('@'), "{s:?}: push by tag, not by digest");
        let (repository, tag) = match rest.rsplit_once(':') {
            Some((repo, tag)) => (repo, tag),
            None => (rest, default_tag),
        };
        validate_repository(repository).with_context(|| format!("in {s:?}"))?;
        validate_tag(tag).with_context(|| format!("in {s:?}"))?;
        Ok(Self {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag: tag.to_owned(),
        })
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}:{}", self.registry, self.repository, self.tag)
    }
}

/// The distribution spec's repository name grammar: lowercase components
/// `[a-z0-9]+([._-][a-z0-9]+)*` joined by `/`.
fn validate_repository(repo: &str) -> Result<()> {
    let ok = !repo.is_empty()
        && repo.len() <= 255
        && repo.split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && c.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
        });
    ensure!(
        ok,
        "bad repository name {repo:?} (lowercase a-z0-9 with . _ - and /)"
    );
    Ok(())
}

/// The distribution spec's tag grammar: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn validate_tag(tag: &str) -> Result<()> {
    let ok = tag.len() <= 128
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    ensure!(ok, "bad tag {tag:?} ([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})");
    Ok(())
}

/// A distribution-API client for one registry: `http://` with `insecure`
/// (a plain-HTTP registry on loopback), else `https://`. No authentication:
/// a registry that asks for it gets a clear error.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    base: reqwest::Url,
    http: reqwest::Client,
}

impl RegistryClient {
    pub fn new(host: &str, insecure: bool) -> Result<Self> {
        let scheme = if insecure { "http" } else { "https" };
        Ok(Self {
            base: reqwest::Url::parse(&format!("{scheme}://{host}/"))?,
            http: reqwest::Client::builder()
                .connect_timeout(HTTP_TIMEOUT)
                .timeout(HTTP_TIMEOUT)
                .build()?,
        })
    }

    fn url(&self, path: &str) -> Result<reqwest::Url> {
        Ok(self.base.join(path)?)
    }

    /// Pushes the image in the layout `dir` as `reference`: each blob the
    /// registry lacks by a monolithic upload (POST, then PUT with the
    /// digest), then the manifest by tag. Returns the digest the registry
    /// answered with (`Docker-Content-Digest`), checked against ours.
    pub async fn push(&self, dir: &Path, reference: &Reference) -> Result<String> {
        let image = read_layout(dir)?;
        let repo = &reference.repository;
        for (d, bytes) in image.blobs() {
            let head = self
                .http
                .head(self.url(&format!("v2/{repo}/blobs/{d}"))?)
                .send()
                .await
                .with_context(|| format!("asking {} for blob {d}", self.base))?;
            if head.status().is_success() {
                continue;
            }
            let start = self
                .http
                .post(self.url(&format!("v2/{repo}/blobs/uploads/"))?)
                .send()
                .await?;
            let start =
                expect_status(start, reqwest::StatusCode::ACCEPTED, "starting an upload").await?;
            let location = start
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .context("the registry started an upload without a Location")?;
            // Location may be absolute or relative, and usually carries a query of its own.
            let mut put = self.base.join(location)?;
            ensure!(
                put.host_str() == self.base.host_str() && put.port() == self.base.port(),
                "the registry sent the upload elsewhere ({put}); refusing"
            );
            put.query_pairs_mut().append_pair("digest", &d);
            let done = self
                .http
                .put(put)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(bytes.to_vec())
                .send()
                .await?;
            expect_status(
                done,
                reqwest::StatusCode::CREATED,
                &format!("uploading blob {d}"),
            )
            .await?;
        }
        let put = self
            .http
            .put(self.url(&format!("v2/{repo}/manifests/{}", reference.tag))?)
            .header(reqwest::header::CONTENT_TYPE, MANIFEST_MEDIA_TYPE)
            .body(image.manifest.clone())
            .send()
            .await?;
        let put = expect_status(put, reqwest::StatusCode::CREATED, "putting the manifest").await?;
        let answered = content_digest(&put)?;
        ensure!(
            answered == image.manifest_digest(),
            "the registry stored the manifest as {answered}, not {}",
            image.manifest_digest()
        );
        Ok(answered)
    }

    /// Pulls `reference` (a tag or a `sha256:` digest) of `repo`: the
    /// manifest (asking for the OCI type), the registry's digest for it, and
    /// every blob it names, each checked against its digest and size.
    pub async fn pull(&self, repo: &str, reference: &str) -> Result<Pulled> {
        let r = self
            .http
            .get(self.url(&format!("v2/{repo}/manifests/{reference}"))?)
            .header(reqwest::header::ACCEPT, MANIFEST_MEDIA_TYPE)
            .send()
            .await?;
        let r = expect_status(r, reqwest::StatusCode::OK, "getting the manifest").await?;
        let content_type = r
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let registry_digest = content_digest(&r)?;
        let manifest = read_body(r, MAX_MANIFEST_BYTES).await?;
        let parsed: Value =
            serde_json::from_slice(&manifest).context("the manifest is not JSON")?;
        let mut blobs = BTreeMap::new();
        let descs = std::iter::once(&parsed["config"])
            .chain(parsed["layers"].as_array().into_iter().flatten());
        for desc in descs {
            let d = desc["digest"]
                .as_str()
                .filter(|d| d.strip_prefix("sha256:").is_some_and(is_sha256_hex))
                .with_context(|| format!("a descriptor without a sha256 digest: {desc}"))?;
            let r = self
                .http
                .get(self.url(&format!("v2/{repo}/blobs/{d}"))?)
                .send()
                .await?;
            let r = expect_status(r, reqwest::StatusCode::OK, &format!("getting blob {d}")).await?;
            let bytes = read_body(r, MAX_WASM_BYTES).await?;
            ensure!(
                digest(&bytes) == d,
                "blob {d} came back with another digest"
            );
            ensure!(
                desc["size"].as_u64() == Some(u64::try_from(bytes.len())?),
                "blob {d} came back with another size"
            );
            blobs.insert(d.to_owned(), bytes);
        }
        Ok(Pulled {
            manifest,
            content_type,
            registry_digest,
            blobs,
        })
    }
}

/// An image as pulled back from a registry.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub manifest: Vec<u8>,
    /// The manifest's `Content-Type`.
    pub content_type: String,
    /// The registry's `Docker-Content-Digest` for the manifest.
    pub registry_digest: String,
    /// Config and layers by digest.
    pub blobs: BTreeMap<String, Vec<u8>>,
}

impl Pulled {
    /// Istio's rules over this image.
    pub fn istio_extract_wasm(&self) -> Result<Vec<u8>, ExtractError> {
        istio_extract_wasm(&self.manifest, |d| self.blobs.get(d).map(Vec::as_slice))
    }
}

fn content_digest(r: &reqwest::Response) -> Result<String> {
    Ok(r.headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .context("the registry answered without a Docker-Content-Digest")?
        .to_owned())
}

/// `r` if it has status `want`, else an error with the status and the
/// start of the registry's answer (a 401 says authentication is not supported).
async fn expect_status(
    r: reqwest::Response,
    want: reqwest::StatusCode,
    what: &str,
) -> Result<reqwest::Response> {
    let status = r.status();
    if status == want {
        return Ok(r);
    }
    let body = read_body(r, 1024).await.unwrap_or_default();
    let body = String::from_utf8_lossy(&body);
    if status == reqwest::StatusCode::UNAUTHORIZED {
        bail!(
            "{what}: the registry wants authentication ({status}), which this push does not do; \
             push the layout with a registry client (oras, crane, skopeo) instead: {body}"
        );
    }
    bail!("{what}: {status}, expected {want}: {body}")
}

/// The body of `r`, at most `cap` bytes (more is an error).
async fn read_body(mut r: reqwest::Response, cap: u64) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    while let Some(chunk) = r.chunk().await? {
        bytes.extend_from_slice(&chunk);
        ensure!(
            u64::try_from(bytes.len())? <= cap,
            "the registry's answer is larger than {cap} bytes"
        );
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny valid-looking module: the magic and version, then a byte.
    const WASM: &[u8] = b"\0asm\x01\0\0\0\x00";

    fn blobs_of(image: &Image) -> BTreeMap<String, Vec<u8>> {
        image
            .blobs()
            .into_iter()
            .map(|(d, b)| (d, b.to_vec()))
            .collect()
    }

    fn extract(
        manifest: &[u8],
        blobs: &BTreeMap<String, Vec<u8>>,
    ) -> Result<Vec<u8>, ExtractError> {
        istio_extract_wasm(manifest, |d| blobs.get(d).map(Vec::as_slice))
    }

    /// A gzipped tar of `files` (name, bytes).
    fn targz(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, bytes) in files {
            let mut h = tar::Header::new_ustar();
            h.set_path(name).unwrap();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            builder.append(&h, *bytes).unwrap();
        }
        let tar = builder.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        gz.finish().unwrap()
    }

    /// An OCI manifest over `layers` (media type, bytes), and its blobs.
    fn manifest_of(layers: &[(&str, Vec<u8>)]) -> (Vec<u8>, BTreeMap<String, Vec<u8>>) {
        let config = b"{}".to_vec();
        let mut blobs = BTreeMap::from([(digest(&config), config.clone())]);
        let descs: Vec<Value> = layers
            .iter()
            .map(|(mt, b)| {
                blobs.insert(digest(b), b.clone());
                descriptor(mt, b)
            })
            .collect();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
            "config": descriptor(CONFIG_MEDIA_TYPE, &config), "layers": descs,
        }))
        .unwrap();
        (manifest, blobs)
    }

    #[test]
    fn the_image_is_compat_and_istio_finds_the_module() {
        let image = Image::build(WASM).unwrap();
        let m: Value = serde_json::from_slice(&image.manifest).unwrap();
        assert_eq!(m["schemaVersion"], 2);
        assert_eq!(m["mediaType"], MANIFEST_MEDIA_TYPE);
        assert_eq!(m["config"]["mediaType"], CONFIG_MEDIA_TYPE);
        assert_eq!(m["config"]["digest"], digest(&image.config));
        assert_eq!(m["layers"].as_array().unwrap().len(), 1);
        assert_eq!(m["layers"][0]["mediaType"], LAYER_MEDIA_TYPE);
        assert_eq!(m["layers"][0]["size"], image.layer.len());
        assert_eq!(extract(&image.manifest, &blobs_of(&image)).unwrap(), WASM);
    }

    #[test]
    fn the_config_names_the_uncompressed_layer() {
        let image = Image::build(WASM).unwrap();
        let config: Value = serde_json::from_slice(&image.config).unwrap();
        assert_eq!(config["rootfs"]["type"], "layers");
        assert_eq!(
            config["rootfs"]["diff_ids"],
            json!([digest(&layer_tar(WASM).unwrap())])
        );
        // The diff_id is of the tar, not of the gzip the manifest names.
        assert_ne!(config["rootfs"]["diff_ids"][0], digest(&image.layer));
        assert!(config["architecture"].is_string() && config["os"].is_string());
    }

    #[test]
    fn the_layer_holds_only_plugin_wasm_owned_by_root_at_mtime_zero() {
        let image = Image::build(WASM).unwrap();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(image.layer.as_slice()));
        let entries: Vec<_> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let h = e.header().clone();
                let mut bytes = Vec::new();
                e.read_to_end(&mut bytes).unwrap();
                (e.path().unwrap().into_owned(), h, bytes)
            })
            .collect();
        assert_eq!(entries.len(), 1);
        let (path, h, bytes) = &entries[0];
        assert_eq!(path, Path::new(WASM_FILE));
        assert_eq!(bytes, WASM);
        assert_eq!(
            (
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap(),
                h.mtime().unwrap()
            ),
            (0o644, 0, 0, 0)
        );
    }

    #[test]
    fn the_same_module_gives_the_same_digest_and_another_module_another() {
        let a = Image::build(WASM).unwrap();
        let b = Image::build(WASM).unwrap();
        assert_eq!(a, b);
        let other = Image::build(b"\0asm\x01\0\0\0\x01").unwrap();
        assert_ne!(a.manifest_digest(), other.manifest_digest());
    }

    #[test]
    fn a_layout_round_trips_and_names_the_manifest_digest() {
        let dir = tempfile::tempdir().unwrap();
        // A stale blob of an earlier package goes; a file not named like a digest stays.
        std::fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
        let stale = dir.path().join("blobs/sha256").join("ab".repeat(32));
        std::fs::write(&stale, b"old").unwrap();
        std::fs::write(dir.path().join("blobs/sha256/README"), b"mine").unwrap();
        let p = write_layout(dir.path(), WASM, "v1").unwrap();
        assert!(!stale.exists());
        assert!(dir.path().join("blobs/sha256/README").exists());
        let image = read_layout(dir.path()).unwrap();
        assert_eq!(image, Image::build(WASM).unwrap());
        assert_eq!(p.manifest_digest, image.manifest_digest());
        assert_eq!(p.wasm_sha256, sha256_hex(WASM));
        assert_ne!(p.wasmplugin_sha256(), p.wasm_sha256);
        assert_eq!(
            wasmplugin_sha256(dir.path()).unwrap(),
            p.wasmplugin_sha256()
        );
        let index: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["digest"], p.manifest_digest);
        assert_eq!(
            index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
            "v1"
        );
        let layout: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("oci-layout")).unwrap()).unwrap();
        assert_eq!(layout["imageLayoutVersion"], "1.0.0");
        let digests: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(DIGESTS_FILE)).unwrap()).unwrap();
        assert_eq!(digests["manifest_digest"], p.manifest_digest);
        assert_eq!(digests["wasmplugin_sha256"], p.wasmplugin_sha256());
    }

    #[test]
    fn a_tampered_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_layout(dir.path(), WASM, "v1").unwrap();
        let hex = p.wasmplugin_sha256().to_owned();
        std::fs::write(dir.path().join("blobs/sha256").join(&hex), b"{}").unwrap();
        let err = wasmplugin_sha256(dir.path()).unwrap_err().to_string();
        assert!(err.contains("does not match its digest"), "{err}");
    }

    #[test]
    fn istio_rejects_an_image_without_plugin_wasm() {
        let (m, blobs) = manifest_of(&[(LAYER_MEDIA_TYPE, targz(&[("filter.wasm", WASM)]))]);
        assert_eq!(extract(&m, &blobs), Err(ExtractError::NoPluginWasm));
    }

    #[test]
    fn istio_reads_only_the_last_layer() {
        // Two layers, plugin.wasm only in the first: refused.
        let (m, blobs) = manifest_of(&[
            (LAYER_MEDIA_TYPE, targz(&[(WASM_FILE, WASM)])),
            (LAYER_MEDIA_TYPE, targz(&[("etc/passwd", b"root:x:0:0")])),
        ]);
        assert_eq!(extract(&m, &blobs), Err(ExtractError::NoPluginWasm));
        // The same with the module last: found, in a subdirectory too (filepath.Base).
        let (m, blobs) = manifest_of(&[
            (LAYER_MEDIA_TYPE, targz(&[("etc/passwd", b"root:x:0:0")])),
            (
                LAYER_MEDIA_TYPE,
                targz(&[("a/b", b"x"), ("./x/plugin.wasm", WASM)]),
            ),
        ]);
        assert_eq!(extract(&m, &blobs).unwrap(), WASM);
    }

    #[test]
    fn istio_rejects_a_last_layer_of_another_type_or_no_layers_or_not_wasm() {
        let (m, blobs) = manifest_of(&[("application/vnd.oci.image.layer.v1.tar", b"x".to_vec())]);
        assert!(matches!(
            extract(&m, &blobs),
            Err(ExtractError::LastLayerType { .. })
        ));
        let (m, blobs) = manifest_of(&[]);
        assert_eq!(extract(&m, &blobs), Err(ExtractError::NoLayers));
        let (m, blobs) = manifest_of(&[(
            LAYER_MEDIA_TYPE,
            targz(&[(WASM_FILE, b"#!/bin/sh\necho hi\n")]),
        )]);
        assert_eq!(extract(&m, &blobs), Err(ExtractError::NotWasm));
        let (m, blobs) = manifest_of(&[(LAYER_MEDIA_TYPE, b"not gzip".to_vec())]);
        assert!(matches!(extract(&m, &blobs), Err(ExtractError::Archive(_))));
        assert!(matches!(
            extract(b"[", &blobs),
            Err(ExtractError::Manifest(_))
        ));
    }

    #[test]
    fn istio_accepts_docker_media_types_and_the_oci_variant() {
        let layer = targz(&[(WASM_FILE, WASM)]);
        let (m, blobs) = manifest_of(&[(DOCKER_LAYER_MEDIA_TYPE, layer)]);
        let mut docker: Value = serde_json::from_slice(&m).unwrap();
        docker["mediaType"] = json!(DOCKER_MANIFEST_MEDIA_TYPE);
        assert_eq!(
            extract(&serde_json::to_vec(&docker).unwrap(), &blobs).unwrap(),
            WASM
        );
        let (m, blobs) = manifest_of(&[
            ("application/vnd.module.wasm.config.v1+json", b"{}".to_vec()),
            (WASM_LAYER_MEDIA_TYPE, WASM.to_vec()),
        ]);
        assert_eq!(extract(&m, &blobs).unwrap(), WASM);
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_cap() {
        // 65 MiB of zeros compress to about 64 KiB.
        let big = vec![0u8; (MAX_WASM_BYTES + (1 << 20)) as usize];
        let (m, blobs) = manifest_of(&[(LAYER_MEDIA_TYPE, targz(&[(WASM_FILE, &big)]))]);
        assert_eq!(extract(&m, &blobs), Err(ExtractError::TooLarge));
    }

    #[test]
    fn references_parse_strictly() {
        let r = Reference::parse("127.0.0.1:5000/understudy/filter:v1", "latest").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_str()),
            ("127.0.0.1:5000", "understudy/filter", "v1")
        );
        assert_eq!(r.to_string(), "127.0.0.1:5000/understudy/filter:v1");
        let r = Reference::parse("ghcr.io/acme/understudy-filter", "0.1.0").unwrap();
        assert_eq!(r.tag, "0.1.0");
        for bad in [
            "understudy/filter:v1",         // no registry: never docker.io by accident
            "localhost:5000/Understudy:v1", // uppercase repository
            "localhost:5000/a//b:v1",
            "localhost:5000/filter:-v1",
            "localhost:5000/filter@sha256:00",
            "localhost:5000/filter:v1/x",
            "localhost:5000/",
        ] {
            assert!(Reference::parse(bad, "latest").is_err(), "{bad} parsed");
        }
    }
}
