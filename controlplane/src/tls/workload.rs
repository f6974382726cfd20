//! Istio workload identities on the xDS port (`serve --istio-trust-domain`).
//!
//! In a mesh the sidecars already hold a certificate: istiod's CA signs one
//! per workload with the single URI SAN
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, and the
//! sidecar presents it on every `ISTIO_MUTUAL` connection (the filter's
//! reports, and `envoyMetricsService`'s stats stream). Our own certificates
//! bind one node id each; Istio's bind a service account, shared by every
//! pod that runs under it, and Istio names its proxies
//! `sidecar~<pod-ip>~<pod>.<namespace>~<namespace>.svc.<cluster-domain>`.
//!
//! So a workload certificate may speak for a node id only when
//! ([`authorize`]):
//! - the node id is Istio's (`sidecar~` or `router~`, four `~`-separated
//!   parts) and names the certificate's namespace in both places;
//! - and the node id's IP is the address the connection comes from. Pods
//!   talk to each other without NAT, and the control plane serves this port
//!   itself (its own sidecar does not capture it), so a workload can report
//!   only as the pod it is. One compromised pod cannot speak for its
//!   siblings, and no workload can speak for another namespace.
//!
//! The trust domain is the mesh's (`cluster.local` unless the mesh config
//! says otherwise); a certificate from any other trust domain is refused.

use std::net::IpAddr;

/// The longest node id read as Istio's.
pub const MAX_ISTIO_NODE_ID_LEN: usize = 512;

/// A SPIFFE trust domain: lowercase letters, digits, `.`, `-`, `_`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for TrustDomain {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "invalid trust domain {s:?}: 1 to 255 characters of a-z 0-9 . - _"
            ))
        }
    }
}

/// What an Istio workload certificate proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// The whole URI SAN, as logged and as evidence records its origin.
    pub uri: String,
    pub namespace: String,
    pub service_account: String,
}

/// Reads a URI SAN as a workload identity of `trust_domain`: `None` when
/// it is not one (another trust domain, another shape).
pub fn workload_from_uri(uri: &str, trust_domain: &TrustDomain) -> Option<Workload> {
    let rest = uri
        .strip_prefix("spiffe://")?
        .strip_prefix(trust_domain.as_str())?
        .strip_prefix("/ns/")?;
    let (namespace, rest) = rest.split_once('/')?;
    let service_account = rest.strip_prefix("sa/")?;
    (is_dns_label(namespace) && is_dns_subdomain(service_account)).then(|| Workload {
        uri: uri.to_owned(),
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
    })
}

/// A node id in Istio's form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstioNode {
    pub ip: IpAddr,
    pub pod: String,
    pub namespace: String,
}

/// Parses `sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>`
/// (`router~` for gateways); `None` for anything else, including a node id
/// whose two namespaces differ.
pub fn parse_istio_node_id(id: &str) -> Option<IstioNode> {
    if id.len() > MAX_ISTIO_NODE_ID_LEN {
        return None;
    }
    let parts: Vec<&str> = id.split('~').collect();
    let &[kind, ip, pod_ns, domain] = parts.as_slice() else {
        return None;
    };
    if !matches!(kind, "sidecar" | "router") {
        return None;
    }
    let ip: IpAddr = ip.parse().ok()?;
    // Pod names may hold dots; namespaces never do.
    let (pod, namespace) = pod_ns.rsplit_once('.')?;
    let (domain_ns, _) = domain.split_once(".svc.")?;
    (is_dns_subdomain(pod) && is_dns_label(namespace) && domain_ns == namespace).then(|| {
        IstioNode {
            ip: ip.to_canonical(),
            pod: pod.to_owned(),
            namespace: namespace.to_owned(),
        }
    })
}

/// Whether `workload`, connected from `addr`, may speak for node `claimed`
/// (see the module doc); `Err` says why not.
pub fn authorize(workload: &Workload, addr: Option<IpAddr>, claimed: &str) -> Result<(), String> {
    let node = parse_istio_node_id(claimed).ok_or_else(|| {
        "a workload certificate speaks only for an Istio node id \
         (sidecar~<pod-ip>~<pod>.<namespace>~<namespace>.svc.<domain>)"
            .to_owned()
    })?;
    if node.namespace != workload.namespace {
        return Err(format!(
            "the node id is in namespace {:?}, the certificate in {:?}",
            node.namespace, workload.namespace
        ));
    }
    match addr.map(|a| a.to_canonical()) {
        Some(a) if a == node.ip => Ok(()),
        Some(a) => Err(format!(
            "the node id names pod IP {}, the connection comes from {a}",
            node.ip
        )),
        None => Err("the connection's address is unknown".to_owned()),
    }
}

/// A Kubernetes namespace: an RFC 1123 label.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A pod or service account name: an RFC 1123 subdomain.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        "cluster.local".parse().unwrap()
    }

    fn reviews() -> Workload {
        workload_from_uri(
            "spiffe://cluster.local/ns/default/sa/bookinfo-reviews",
            &td(),
        )
        .unwrap()
    }

    const NODE: &str = "sidecar~10.1.2.3~reviews-v1-7d9f-abc.default~default.svc.cluster.local";

    #[test]
    fn workload_uris_of_the_trust_domain_are_read() {
        let w = reviews();
        assert_eq!(
            (w.namespace.as_str(), w.service_account.as_str()),
            ("default", "bookinfo-reviews")
        );
        for other in [
            "spiffe://evil.local/ns/default/sa/x",
            "spiffe://cluster.localx/ns/default/sa/x",
            "spiffe://cluster.local/ns/Default/sa/x",
            "spiffe://cluster.local/ns//sa/x",
            "spiffe://cluster.local/ns/default/sa/",
            "spiffe://cluster.local/ns/default/sa/x/y",
            "spiffe://cluster.local/ns/default",
            "spiffe://understudy/envoy/x",
            "https://cluster.local/ns/default/sa/x",
        ] {
            assert_eq!(workload_from_uri(other, &td()), None, "{other}");
        }
        assert!("Cluster.Local".parse::<TrustDomain>().is_err());
        assert!("".parse::<TrustDomain>().is_err());
    }

    #[test]
    fn istio_node_ids_are_parsed_strictly() {
        let n = parse_istio_node_id(NODE).unwrap();
        assert_eq!(n.ip, "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(
            (n.pod.as_str(), n.namespace.as_str()),
            ("reviews-v1-7d9f-abc", "default")
        );
        let v6 =
            parse_istio_node_id("router~fd00::1~gw.istio-system~istio-system.svc.cluster.local")
                .unwrap();
        assert_eq!(v6.namespace, "istio-system");
        for bad in [
            "reviews-v1-abc.default",
            "sidecar~10.1.2.3~reviews.default~other.svc.cluster.local",
            "sidecar~10.1.2.3~reviews.default",
            "sidecar~not-an-ip~reviews.default~default.svc.cluster.local",
            "waypoint~10.1.2.3~reviews.default~default.svc.cluster.local",
            "sidecar~10.1.2.3~reviews~default.svc.cluster.local",
            "sidecar~10.1.2.3~reviews.default~default.svc.cluster.local~x",
            "sidecar~10.1.2.3~Reviews.default~default.svc.cluster.local",
        ] {
            assert_eq!(parse_istio_node_id(bad), None, "{bad}");
        }
        let huge = format!(
            "sidecar~10.1.2.3~{}.default~default.svc.cluster.local",
            "a".repeat(600)
        );
        assert_eq!(parse_istio_node_id(&huge), None);
    }

    #[test]
    fn a_workload_speaks_only_for_its_own_pod_in_its_own_namespace() {
        let w = reviews();
        let pod: IpAddr = "10.1.2.3".parse().unwrap();
        authorize(&w, Some(pod), NODE).unwrap();
        // IPv4 seen through an IPv6 socket.
        authorize(&w, Some("::ffff:10.1.2.3".parse().unwrap()), NODE).unwrap();

        let sibling = authorize(&w, Some("10.1.2.4".parse().unwrap()), NODE).unwrap_err();
        assert!(sibling.contains("pod IP 10.1.2.3"), "{sibling}");
        let other_ns = "sidecar~10.1.2.3~payments-1.payments~payments.svc.cluster.local";
        let err = authorize(&w, Some(pod), other_ns).unwrap_err();
        assert!(err.contains("namespace \"payments\""), "{err}");
        let ours = authorize(&w, Some(pod), "envoy-1").unwrap_err();
        assert!(ours.contains("Istio node id"), "{ours}");
        assert!(authorize(&w, None, NODE).is_err());
    }
}
