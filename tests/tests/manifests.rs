//! The Kubernetes and Istio manifests, rendered and validated offline (no
//! API server can run here; see the README): every object of both overlays
//! against Kubernetes' schemas (strict) or Istio's CRD schemas, the
//! validators shown to refuse bad input, the filter config in the
//! WasmPlugin parsed by the filter's own code, the mesh's stats matcher
//! keeping exactly the stats the judge reads, and the sidecar's Envoy
//! bootstrap through `envoy --mode validate`.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use understudy_e2e::{envoy, k8s, paths};

fn overlay(name: &str) -> PathBuf {
    paths::repo_root().join("envoy/k8s/overlays").join(name)
}

fn istio_dir() -> PathBuf {
    paths::repo_root().join("envoy/istio")
}

/// The control plane's Deployment, Service, PDB, NetworkPolicy, Secret and
/// ServiceAccount in one overlay, with what the issue asks of each.
fn check_control_plane(docs: &[Value]) -> Result<()> {
    let deploy = k8s::find(docs, "Deployment", "understudy")?;
    let pod = &deploy["spec"]["template"]["spec"];
    ensure!(
        pod["securityContext"]["runAsNonRoot"] == true,
        "runs as root"
    );
    let c = &pod["containers"][0];
    ensure!(
        c["securityContext"]["readOnlyRootFilesystem"] == true,
        "writable root filesystem"
    );
    ensure!(
        c["resources"]["requests"]["cpu"].is_string(),
        "no cpu request"
    );
    ensure!(c["readinessProbe"]["httpGet"]["path"] == "/readyz");
    ensure!(c["livenessProbe"]["httpGet"]["path"] == "/healthz");
    let svc = k8s::find(docs, "Service", "understudy")?;
    let ports: Vec<u64> = svc["spec"]["ports"]
        .as_array()
        .context("service ports")?
        .iter()
        .filter_map(|p| p["port"].as_u64())
        .collect();
    ensure!(
        ports.contains(&18000) && ports.contains(&18080),
        "ports {ports:?}"
    );
    for (kind, name) in [
        ("PodDisruptionBudget", "understudy"),
        ("NetworkPolicy", "understudy"),
        ("Secret", "understudy-tokens"),
        ("ServiceAccount", "understudy"),
        ("PersistentVolumeClaim", "understudy-state"),
    ] {
        k8s::find(docs, kind, name)?;
    }
    Ok(())
}

#[test]
fn plain_envoy_overlay_validates() -> Result<()> {
    let docs = k8s::build_and_validate(&overlay("plain-envoy"))?;
    check_control_plane(&docs)?;
    ensure!(
        !docs.iter().any(k8s::is_istio),
        "the plain-Envoy overlay must not need Istio"
    );
    // The sidecar mounts the filter's OCI image (image volume).
    let app = k8s::find(&docs, "Deployment", "reviews-edge")?;
    let volumes = app["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .context("volumes")?;
    ensure!(
        volumes.iter().any(|v| v["image"]["reference"].is_string()),
        "no image volume for the filter"
    );
    Ok(())
}

#[test]
fn istio_overlay_validates() -> Result<()> {
    let docs = k8s::build_and_validate(&overlay("istio"))?;
    check_control_plane(&docs)?;
    let plugin = k8s::find(&docs, "WasmPlugin", "understudy")?;
    let spec = &plugin["spec"];
    ensure!(spec["failStrategy"] == "FAIL_OPEN");
    ensure!(
        spec["url"]
            .as_str()
            .is_some_and(|u| u.starts_with("oci://")),
        "url {}",
        spec["url"]
    );
    ensure!(
        spec["sha256"]
            .as_str()
            .is_some_and(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())),
        "sha256 {}",
        spec["sha256"]
    );
    ensure!(spec["selector"]["matchLabels"].is_object() && spec["match"].is_array());
    ensure!(spec["phase"].is_string());
    // The least RBAC: a namespaced Role, nothing cluster-wide.
    ensure!(
        !docs.iter().any(|d| d["kind"] == "ClusterRole"),
        "Istio mode must not need a ClusterRole"
    );
    let role = k8s::find(&docs, "Role", "understudy-istio")?;
    for rule in role["rules"].as_array().context("rules")? {
        let verbs = rule["verbs"].as_array().context("verbs")?;
        ensure!(
            verbs
                .iter()
                .all(|v| ["get", "list", "watch", "patch"].contains(&v.as_str().unwrap_or(""))),
            "more than read and patch: {rule}"
        );
    }
    // The mesh-wide alternative is valid Istio too.
    let operator = k8s::read_yaml(&istio_dir().join("istio-operator.yaml"))?;
    k8s::validate_istio(&operator)?;
    Ok(())
}

/// The validators are not rubber stamps: each refuses a broken object, and
/// the unbroken one passes in the same run.
#[test]
fn validators_refuse_bad_manifests() -> Result<()> {
    let docs = k8s::build(&overlay("istio"))?;
    let deploy = k8s::find(&docs, "Deployment", "understudy")?.clone();
    k8s::validate_core(std::slice::from_ref(&deploy))?;
    let mut typo = deploy.clone();
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = json!("Always");
    ensure!(
        k8s::validate_core(&[typo]).is_err(),
        "an unknown field passed --strict"
    );
    let mut wrong_type = deploy;
    wrong_type["spec"]["replicas"] = json!("one");
    ensure!(k8s::validate_core(&[wrong_type]).is_err());

    let plugin = k8s::find(&docs, "WasmPlugin", "understudy")?.clone();
    k8s::validate_istio(std::slice::from_ref(&plugin))?;
    let mut bad = plugin;
    bad["spec"]["failStrategy"] = json!("FAIL_SOMETIMES");
    ensure!(k8s::validate_istio(&[bad]).is_err());
    let mut vs = k8s::find(&docs, "VirtualService", "reviews")?.clone();
    vs["spec"]["http"][0]["route"][0]["weight"] = json!("half");
    ensure!(k8s::validate_istio(&[vs]).is_err());
    let unknown = json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualServise",
        "metadata": {"name": "x"}, "spec": {}});
    ensure!(
        k8s::validate_istio(&[unknown]).is_err(),
        "an unknown Istio kind passed"
    );
    Ok(())
}

/// The WasmPlugin's `pluginConfig` is the filter's config, parsed by the
/// filter's own code; its clusters are Istio names of subsets the
/// DestinationRule defines; the VirtualService splits between those subsets.
#[test]
fn istio_objects_agree_with_each_other_and_the_filter() -> Result<()> {
    let docs = k8s::build(&overlay("istio"))?;
    let plugin = k8s::find(&docs, "WasmPlugin", "understudy")?;
    let config = &plugin["spec"]["pluginConfig"];
    understudy_core::config::FilterConfig::from_value(config)
        .map_err(|e| anyhow::anyhow!("the filter refuses the WasmPlugin's pluginConfig: {e}"))?;

    let dr = k8s::find(&docs, "DestinationRule", "reviews")?;
    let host = dr["spec"]["host"].as_str().context("host")?;
    let subsets: Vec<&str> = dr["spec"]["subsets"]
        .as_array()
        .context("subsets")?
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    ensure!(subsets.contains(&"stable") && subsets.contains(&"canary"));

    let vs = k8s::find(&docs, "VirtualService", "reviews")?;
    let routes = vs["spec"]["http"][0]["route"]
        .as_array()
        .context("routes")?;
    let mut total = 0;
    for r in routes {
        ensure!(r["destination"]["host"] == host, "{r}");
        let subset = r["destination"]["subset"].as_str().context("subset")?;
        ensure!(subsets.contains(&subset), "unknown subset {subset}");
        total += r["weight"].as_u64().context("weight")?;
    }
    ensure!(total == 100, "weights add up to {total}");

    // Every cluster the filter names is an Istio outbound cluster of a
    // known subset (or of a port of the control plane's Service).
    let svc = k8s::find(&docs, "Service", "understudy")?;
    let cp_host = format!(
        "{}.{}.svc.cluster.local",
        svc["metadata"]["name"].as_str().context("name")?,
        svc["metadata"]["namespace"].as_str().context("namespace")?
    );
    let mut clusters = Vec::new();
    collect_clusters(config, &mut clusters);
    ensure!(!clusters.is_empty(), "no clusters in the pluginConfig");
    for c in clusters {
        let parts: Vec<&str> = c.split('|').collect();
        ensure!(
            parts.len() == 4 && parts[0] == "outbound",
            "{c} is not an Istio cluster name"
        );
        ensure!(
            (parts[3] == host && subsets.contains(&parts[2]))
                || (parts[3] == cp_host && parts[1] == "18000"),
            "{c} names no known subset or the control plane"
        );
    }
    Ok(())
}

fn collect_clusters(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("cluster", Value::String(s)) => out.push(s.clone()),
                    _ => collect_clusters(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_clusters(v, out)),
        _ => {}
    }
}

/// The per-workload proxy config and the mesh-wide one are the same
/// settings, and Istio's stats matcher keeps the upstream request stats the
/// judge reads (under Istio's cluster names) and the filter's own metrics,
/// while still dropping the rest.
#[test]
fn mesh_settings_keep_the_stats_the_judge_reads() -> Result<()> {
    let app = k8s::read_yaml(&istio_dir().join("demo-app.yaml"))?;
    let page = k8s::find(&app, "Deployment", "productpage")?;
    let annotation = page["spec"]["template"]["metadata"]["annotations"]["proxy.istio.io/config"]
        .as_str()
        .context("productpage has no proxy.istio.io/config")?;
    let per_workload: Value = serde_norway::from_str(annotation)?;
    let operator = k8s::read_yaml(&istio_dir().join("istio-operator.yaml"))?;
    let mesh = &operator[0]["spec"]["meshConfig"]["defaultConfig"];
    ensure!(
        &per_workload == mesh,
        "the annotation and istio-operator.yaml disagree:\n{per_workload}\n{mesh}"
    );
    let regexes: Vec<regex::Regex> = mesh["proxyStatsMatcher"]["inclusionRegexps"]
        .as_array()
        .context("inclusionRegexps")?
        .iter()
        .map(|r| {
            // Envoy matches the whole name (RE2 full match).
            regex::Regex::new(&format!("^(?:{})$", r.as_str().unwrap_or("")))
                .map_err(anyhow::Error::from)
        })
        .collect::<Result<_>>()?;
    let kept = |name: &str| regexes.iter().any(|r| r.is_match(name));
    let cluster = "cluster.outbound|9080|canary|reviews.demo.svc.cluster.local";
    for stat in [
        "upstream_rq_completed",
        "upstream_rq_5xx",
        "upstream_rq_2xx",
        "upstream_rq_503",
        "upstream_rq_time",
    ] {
        let name = format!("{cluster}.{stat}");
        ensure!(kept(&name), "{name} would be dropped");
    }
    ensure!(kept("wasmcustom.understudy.shadow.compared"));
    for dropped in [
        format!("{cluster}.upstream_cx_total"),
        format!("{cluster}.external.upstream_rq_5xx"),
        "listener.0.0.0.0_15006.downstream_cx_total".to_owned(),
    ] {
        ensure!(!kept(&dropped), "{dropped} would be kept");
    }
    let sink = mesh["envoyMetricsService"]["address"]
        .as_str()
        .context("envoyMetricsService.address")?;
    ensure!(
        sink == "understudy.understudy-system.svc.cluster.local:18000",
        "{sink}"
    );
    Ok(())
}

/// The plain-Envoy sidecar's bootstrap, as the ConfigMap carries it, passes
/// `envoy --mode validate` (with real certificate files at its paths).
#[test]
fn sidecar_bootstrap_validates() -> Result<()> {
    let docs = k8s::build(&overlay("plain-envoy"))?;
    let cm = docs
        .iter()
        .find(|d| {
            d["kind"] == "ConfigMap"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("reviews-envoy-bootstrap"))
        })
        .context("no bootstrap ConfigMap")?;
    let bootstrap = cm["data"]["envoy.yaml"].as_str().context("envoy.yaml")?;
    let node: Value = serde_norway::from_str(bootstrap)?;
    let node_id = node["node"]["id"].as_str().context("node.id")?.to_owned();
    let dir = tempfile::tempdir()?;
    let certs = understudy_controlplane::tls::init(
        // Not under a `certs/` directory: `envoy::validate` would take the
        // paths for the repository bootstrap's and rewrite them again.
        &dir.path().join("tls"),
        &[],
        std::slice::from_ref(&node_id),
        std::time::SystemTime::now(),
    )?;
    let rendered = bootstrap
        .replace(
            "/etc/understudy/tls/envoy.pem",
            &certs.envoy_cert(&node_id).display().to_string(),
        )
        .replace(
            "/etc/understudy/tls/envoy-key.pem",
            &certs.envoy_key(&node_id).display().to_string(),
        )
        .replace(
            "/etc/understudy/tls/ca.pem",
            &certs.ca_cert().display().to_string(),
        );
    ensure!(rendered != bootstrap, "no certificate path replaced");
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, rendered)?;
    envoy::validate(&path)?;
    Ok(())
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// `cargo xtask package --wasmplugin-patch` output, dropped into the Istio
/// overlay, pins the WasmPlugin to the packaged image: its `sha256` is the
/// image's manifest digest (what Istio checks for an `oci://` URL), the
/// result still validates, and the committed placeholder has the very
/// shape the command writes.
#[test]
fn wasmplugin_pins_the_packaged_image() -> Result<()> {
    use understudy_e2e::oci;
    let wasm = std::fs::read(paths::filter_wasm()?)?;
    let dir = tempfile::tempdir()?;
    let layout = dir.path().join("layout");
    oci::write_layout(&layout, &wasm, "0.1.0")?;
    let sha = oci::wasmplugin_sha256(&layout)?;
    let url = "oci://registry.test:5000/understudy/filter:0.1.0";
    let patch = oci::wasmplugin_patch(url, &sha);

    let committed = paths::repo_root().join("envoy/k8s/overlays/istio/filter-image.yaml");
    let shape = |docs: Vec<Value>| -> Result<Value> {
        let mut d = docs.into_iter().next().context("empty patch")?;
        d["spec"]["url"] = json!("");
        d["spec"]["sha256"] = json!("");
        Ok(d)
    };
    ensure!(
        shape(k8s::read_yaml(&committed)?)? == shape(k8s::parse_yaml_stream(&patch)?)?,
        "filter-image.yaml and the patch `cargo xtask package` writes differ in shape"
    );

    let tree = dir.path().join("envoy");
    copy_tree(&paths::repo_root().join("envoy"), &tree)?;
    std::fs::write(tree.join("k8s/overlays/istio/filter-image.yaml"), &patch)?;
    let docs = k8s::build_and_validate(&tree.join("k8s/overlays/istio"))?;
    let plugin = k8s::find(&docs, "WasmPlugin", "understudy")?;
    ensure!(plugin["spec"]["url"] == url, "{}", plugin["spec"]["url"]);
    ensure!(plugin["spec"]["sha256"] == sha.as_str());
    ensure!(
        sha != oci::sha256_hex(&wasm),
        "the WasmPlugin must carry the manifest digest, not the module's"
    );
    Ok(())
}

/// What the Istio router writes, built by its own code from the overlay's
/// objects, passes Istio's CRD schemas: the VirtualService merge patch with
/// a step's weights, and the WasmPlugin as its apply body with a shadow
/// stage on leaves it (the Store opened with the mesh's subsets, as `serve`
/// opens it).
#[test]
fn the_istio_routers_writes_validate() -> Result<()> {
    use understudy_controlplane::istio::{IstioConfig, resources};
    use understudy_controlplane::model::Cohort;
    use understudy_controlplane::store::Store;
    use understudy_controlplane::traffic::ShadowTarget;
    let docs = k8s::build(&overlay("istio"))?;
    let config = IstioConfig::read(&overlay("istio").join("services.yaml"))?;
    let mut bodies = Vec::new();
    // A step at weight 30 with two cohort steps before it: a header's
    // value and a cookie's presence.
    let cohorts = [
        Cohort::Header {
            name: "x-user-group".into(),
            value: Some("internal".into()),
        },
        Cohort::Cookie {
            name: "beta".into(),
            value: None,
        },
    ];
    for (name, svc) in &config.services {
        let vs = k8s::find(&docs, "VirtualService", &svc.virtual_service.name)?;
        let http = resources::http_routes(vs).map_err(anyhow::Error::msg)?;
        let http =
            resources::with_split(http, svc, name, 30, &cohorts).map_err(anyhow::Error::msg)?;
        bodies.push(resources::virtual_service_patch(
            &svc.virtual_service,
            "4242",
            &http,
            resources::cohorts_annotation(None, name, &cohorts),
        ));
    }
    let plugin_ref = config
        .wasm_plugin
        .as_ref()
        .context("services.yaml names no WasmPlugin")?;
    let plugin = k8s::find(&docs, "WasmPlugin", &plugin_ref.name)?;
    let mut state = understudy_controlplane::store::first_start_state();
    state.filter.report_cluster =
        "outbound|18000||understudy.understudy-system.svc.cluster.local".into();
    state.filter.config =
        understudy_controlplane::model::FilterDoc::parse(plugin["spec"]["pluginConfig"].clone())?;
    let store = Store::new_in(state, config.mesh_clusters())?;
    let (name, svc) = config.services.iter().next().context("no services")?;
    let route = store.current().filter.config.raw().routes[0].name.clone();
    store.set_shadow_target(
        &route,
        Some(ShadowTarget {
            cluster: svc.cluster(&svc.canary_subset),
            percent: 5.0,
        }),
        false,
    )?;
    let plugin_config = serde_json::to_value(
        understudy_controlplane::xds::resources::per_envoy_config(&store.current().filter, 1),
    )?;
    ensure!(
        plugin_config
            .to_string()
            .contains(&svc.cluster(&svc.canary_subset)),
        "{name}: the shadow stage's subset is in the plugin config: {plugin_config}"
    );
    // A server-side apply body is partial by design (it names only the
    // fields it owns), and the schema requires `url`: what must validate is
    // the object the API server holds after the apply.
    let apply = resources::wasm_plugin_patch(plugin_ref, &plugin_config);
    ensure!(apply["metadata"]["name"] == plugin["metadata"]["name"]);
    ensure!(
        apply["spec"].as_object().map(|m| m.len()) == Some(1),
        "{apply}"
    );
    let mut applied = plugin.clone();
    applied["spec"]["pluginConfig"] = apply["spec"]["pluginConfig"].clone();
    bodies.push(applied);
    let ok = k8s::validate_istio(&bodies)?;
    ensure!(ok.len() >= bodies.len(), "validated {ok:?}");
    Ok(())
}
