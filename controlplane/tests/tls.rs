//! In-process tests of TLS on both ports: the API served over rustls with a
//! certificate from `certs init`, and mutual TLS on the xDS port binding each
//! client's node id to its certificate.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::SystemTime;

use serde_json::json;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use understudy_controlplane::Options;
use understudy_controlplane::model::{DesiredState, FilterSettings, ListenerSettings};
use understudy_controlplane::store::Store;
use understudy_controlplane::tls::{self, ApiTls, CertDir, XdsSecurity, XdsTls};
use understudy_proto::v1::report_service_client::ReportServiceClient;
use understudy_proto::v1::{TenantUsage, UsageReport};

fn state() -> DesiredState {
    DesiredState {
        listener: ListenerSettings {
            address: "127.0.0.1".parse().unwrap(),
            port: 10000,
        },
        filter: FilterSettings {
            wasm_path: "/etc/envoy/understudy.wasm".into(),
            config: understudy_controlplane::model::FilterDoc::parse(
                json!({"routes": [{"name": "api", "path_prefix": "/api"}]}),
            )
            .unwrap(),
            report_cluster: "understudy_xds".into(),
        },
        services: Default::default(),
    }
}

/// A control plane with mTLS xDS and a TLS API from `certs`; (xds, api) addresses.
async fn start(certs: &CertDir) -> (SocketAddr, SocketAddr) {
    start_with(Options {
        xds_security: XdsSecurity::Mtls(XdsTls::from_dir(&certs.dir).unwrap()),
        api_tls: Some(ApiTls::from_files(&certs.server_cert(), &certs.server_key()).unwrap()),
        ..Options::default()
    })
    .await
}

async fn start_with(options: Options) -> (SocketAddr, SocketAddr) {
    let xds = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addrs = (xds.local_addr().unwrap(), api.local_addr().unwrap());
    tokio::spawn(understudy_controlplane::run_with(
        Store::new(state()).unwrap(),
        options,
        xds,
        api,
        std::future::pending(),
    ));
    addrs
}

#[tokio::test]
async fn the_api_serves_tls_that_the_cli_trusts_with_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tls::init(tmp.path(), &[], &[], SystemTime::now()).unwrap();
    let (_, api) = start(&certs).await;
    let url = format!("https://localhost:{}/healthz", api.port());
    let trusted =
        understudy_controlplane::cli::http_client_with_ca(None, Some(&certs.ca_cert())).unwrap();
    // The CLI's client has no timeout of its own: bound each call here.
    let answer = trusted
        .get(&url)
        .timeout(common::TIMEOUT)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.json::<serde_json::Value>().await.unwrap()["status"],
        "ok"
    );
    // Without the CA the certificate is not trusted; plain HTTP gets no answer.
    let untrusted = understudy_controlplane::cli::http_client(None).unwrap();
    assert!(
        untrusted
            .get(&url)
            .timeout(common::TIMEOUT)
            .send()
            .await
            .is_err()
    );
    let plain = format!("http://localhost:{}/healthz", api.port());
    assert!(
        trusted
            .get(&plain)
            .timeout(common::TIMEOUT)
            .send()
            .await
            .is_err()
    );
}

async fn channel(addr: SocketAddr, ca: &Path, identity: Option<(&Path, &Path)>) -> Option<Channel> {
    channel_to(addr, tls::SERVER_NAME, ca, identity).await
}

/// A TLS channel to `addr`, checking the server's certificate for `domain`
/// against `ca`, with a client certificate if given; `None` if it fails.
async fn channel_to(
    addr: SocketAddr,
    domain: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Option<Channel> {
    let mut config = ClientTlsConfig::new()
        .domain_name(domain)
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(common::TIMEOUT)
        .timeout(common::TIMEOUT)
        .tls_config(config)
        .unwrap()
        .connect()
        .await
        .ok()
}

/// Pushes a one-tenant usage report as `node`; the entries accepted.
async fn accepted(client: &mut ReportServiceClient<Channel>, node: &str) -> u64 {
    client
        .push_usage(usage(node))
        .await
        .unwrap()
        .into_inner()
        .accepted
}

fn usage(node: &str) -> UsageReport {
    UsageReport {
        node_id: node.into(),
        dropped: 0,
        tenants: vec![TenantUsage {
            tenant: "t".into(),
            tier: "standard".into(),
            allowed: 1,
            limited: 0,
            limit_rps: 1.0,
        }],
    }
}

#[tokio::test]
async fn xds_reports_count_only_for_the_node_the_certificate_names() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tls::init(tmp.path(), &[], &["envoy-1".into()], SystemTime::now()).unwrap();
    let (xds, _) = start(&certs).await;
    let ca = certs.ca_cert();
    let (cert, key) = (certs.envoy_cert("envoy-1"), certs.envoy_key("envoy-1"));

    let mut own = ReportServiceClient::new(channel(xds, &ca, Some((&cert, &key))).await.unwrap());
    assert_eq!(accepted(&mut own, "envoy-1").await, 1);
    let refused = own.push_usage(usage("envoy-2")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");

    // No client certificate: the handshake or the first call fails.
    let anonymous = match channel(xds, &ca, None).await {
        None => None,
        Some(ch) => ReportServiceClient::new(ch)
            .push_usage(usage("envoy-1"))
            .await
            .ok(),
    };
    assert!(
        anonymous.is_none(),
        "a client without a certificate was served"
    );

    // The legitimate client still works afterwards.
    assert_eq!(accepted(&mut own, "envoy-1").await, 1);
}

/// Istio mode (`--istio-trust-domain`): the control plane serves the mesh's
/// workload certificate and takes the sidecars' own. A workload speaks only
/// for the Istio node id of its own pod (namespace and IP); nothing else
/// gets in, and the legitimate sidecar keeps working.
#[tokio::test]
async fn istio_workload_certificates_report_only_for_their_own_pod() {
    use understudy_controlplane::tls::test_ca::TestCa;
    let tmp = tempfile::tempdir().unwrap();
    let mesh = TestCa::new("istiod");
    let root = tmp.path().join("root-cert.pem");
    std::fs::write(&root, &mesh.cert_pem).unwrap();
    let (cert, key) = mesh
        .leaf(&["spiffe://cluster.local/ns/understudy-system/sa/understudy"])
        .write(tmp.path(), "cert-chain");
    let tls = XdsTls::from_files(&cert, &key, &root)
        .unwrap()
        .accepting_istio_workloads("cluster.local".parse().unwrap());
    let (addr, _) = start_with(Options {
        xds_security: XdsSecurity::Mtls(tls),
        ..Options::default()
    })
    .await;
    let client = |leaf: understudy_controlplane::tls::test_ca::Leaf, name: &str| {
        let (c, k) = leaf.write(tmp.path(), name);
        let root = root.clone();
        async move {
            let channel = channel_to(addr, "localhost", &root, Some((&c, &k)))
                .await
                .expect("a workload of the mesh connects");
            ReportServiceClient::new(channel)
        }
    };
    let own_node = "sidecar~127.0.0.1~reviews-v1-abc.default~default.svc.cluster.local";
    let mut reviews = client(
        mesh.leaf(&["spiffe://cluster.local/ns/default/sa/bookinfo-reviews"]),
        "reviews",
    )
    .await;
    assert_eq!(accepted(&mut reviews, own_node).await, 1);
    // A sibling pod (another IP), another namespace, our own node-id form:
    // all refused.
    for claimed in [
        "sidecar~10.9.9.9~reviews-v1-def.default~default.svc.cluster.local",
        "sidecar~127.0.0.1~payments-1.payments~payments.svc.cluster.local",
        "envoy-1",
    ] {
        let refused = reviews.push_usage(usage(claimed)).await.unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::PermissionDenied,
            "{claimed}: {refused}"
        );
    }
    // A workload of another namespace cannot speak for this one's pod.
    let mut payments = client(
        mesh.leaf(&["spiffe://cluster.local/ns/payments/sa/payments"]),
        "payments",
    )
    .await;
    let refused = payments.push_usage(usage(own_node)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    // Signed by the mesh's root but in another trust domain: no identity.
    let mut foreign = client(
        mesh.leaf(&["spiffe://other.mesh/ns/default/sa/bookinfo-reviews"]),
        "foreign",
    )
    .await;
    let refused = foreign.push_usage(usage(own_node)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    // The legitimate sidecar still works.
    assert_eq!(accepted(&mut reviews, own_node).await, 1);
}
