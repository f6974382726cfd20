//! The filter as an OCI image through a real registry: package the built
//! `.wasm` as `cargo xtask package` does, push it to Debian's
//! `docker-registry` on loopback, pull it back over the distribution API,
//! and check it the way Istio's agent would (`tests/src/oci.rs` cites the
//! rules): the registry's digest is the one we printed and the WasmPlugin's
//! `sha256` carries, and `plugin.wasm` in the last layer is the filter,
//! byte for byte.

use anyhow::{Context, Result};
use understudy_e2e::oci::{self, MANIFEST_MEDIA_TYPE, Reference};
use understudy_e2e::paths;
use understudy_e2e::registry::Registry;

const REPO: &str = "understudy/filter";

#[tokio::test]
async fn the_packaged_filter_survives_a_registry_round_trip_as_istio_reads_it() -> Result<()> {
    let wasm_path = paths::filter_wasm()?;
    let wasm = std::fs::read(&wasm_path)?;
    let registry = Registry::start().await?;
    let layout = tempfile::tempdir()?;
    let packaged = oci::write_layout(layout.path(), &wasm, "e2e")?;

    let client = oci::RegistryClient::new(&registry.host(), true)?;
    let reference = Reference::parse(&format!("{}/{REPO}:e2e", registry.host()), "latest")?;
    let pushed = client
        .push(layout.path(), &reference)
        .await
        .with_context(|| format!("registry log:\n{}", registry.log()))?;
    assert_eq!(pushed, packaged.manifest_digest);

    // By tag, as a WasmPlugin `url: oci://host/repo:tag` is fetched.
    let pulled = client.pull(REPO, "e2e").await?;
    assert_eq!(pulled.registry_digest, packaged.manifest_digest);
    assert_eq!(oci::digest(&pulled.manifest), packaged.manifest_digest);
    assert_eq!(pulled.content_type, MANIFEST_MEDIA_TYPE);
    let found = pulled.istio_extract_wasm()?;
    assert!(
        found == wasm,
        "plugin.wasm in the pulled image ({} bytes) is not {} ({} bytes)",
        found.len(),
        wasm_path.display(),
        wasm.len()
    );
    assert_eq!(oci::sha256_hex(&found), packaged.wasm_sha256);

    // The WasmPlugin's sha256 is what Istio compares with the manifest digest it pulled.
    let wasmplugin_sha256 = oci::wasmplugin_sha256(layout.path())?;
    assert_eq!(
        format!("sha256:{wasmplugin_sha256}"),
        pulled.registry_digest
    );
    assert_ne!(
        wasmplugin_sha256, packaged.wasm_sha256,
        "for an OCI image Istio checks the manifest digest, not the module's"
    );

    // By digest, as `url: oci://host/repo@sha256:...` is fetched: the same image.
    let by_digest = client.pull(REPO, &packaged.manifest_digest).await?;
    assert_eq!(by_digest.manifest, pulled.manifest);
    assert_eq!(by_digest.istio_extract_wasm()?, wasm);

    // Packaging the same module again gives the same digest, and pushing it
    // again (every blob already there) stores the same manifest.
    let again = tempfile::tempdir()?;
    let repackaged = oci::write_layout(again.path(), &wasm, "e2e")?;
    assert_eq!(repackaged.manifest_digest, packaged.manifest_digest);
    assert_eq!(client.push(again.path(), &reference).await?, pushed);
    Ok(())
}

/// A registry without the tag answers 404, and the pull says so rather than
/// finding something else.
#[tokio::test]
async fn pulling_a_missing_tag_fails() -> Result<()> {
    let registry = Registry::start().await?;
    let client = oci::RegistryClient::new(&registry.host(), true)?;
    let err = client.pull(REPO, "nope").await.unwrap_err().to_string();
    assert!(err.contains("404"), "{err}");
    Ok(())
}
