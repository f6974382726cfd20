//! Mutual TLS on the xDS port (ADS, the filters' reports, Envoy's stats
//! stream) and TLS on the API.
//!
//! # Certificates
//! [`init`] creates a private CA in a directory, a server certificate for the
//! control plane and one client certificate per Envoy; [`issue_envoy`] adds
//! one later (`understudy certs init` / `understudy certs issue`). Files, all
//! PEM, keys written `0600`:
//!
//! | file | what |
//! | --- | --- |
//! | `ca.pem`, `ca-key.pem` | the CA; only `ca.pem` leaves this directory |
//! | `server.pem`, `server-key.pem` | the control plane's xDS (and API) certificate |
//! | `envoy-<node-id>.pem`, `envoy-<node-id>-key.pem` | one Envoy's client certificate |
//!
//! # Identity
//! An Envoy's identity is the single URI SAN `spiffe://understudy/envoy/<node-id>`
//! of its client certificate ([`IDENTITY_PREFIX`]). Node ids are 1 to
//! [`MAX_NODE_ID_LEN`] characters of `A-Z a-z 0-9 . _ -`, so the URI needs no
//! escaping and reads back unambiguously. The ADS stream's `node.id`, the stats
//! stream's `identifier.node.id` and the `node_id` of every filter report must
//! equal it ([`authorize`]); anything else is refused with `PermissionDenied`.
//!
//! With `serve --istio-trust-domain`, an Istio workload certificate
//! (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`) is accepted too, and speaks
//! only for the Istio node id of its own pod ([`workload`]).
//!
//! # Serving and rotation
//! The xDS port's TLS is [`acceptor`]: the server certificate is read again
//! when its files change (Istio rotates workload certificates daily).
//!
//! # How handlers learn the peer
//! The xDS server runs every request through [`peer_interceptor`], which puts
//! a [`Peer`] into the request's extensions: the identity read from the
//! verified client certificate, or [`Peer::Plaintext`] when the operator chose
//! `--insecure-plaintext-xds`. A request without a [`Peer`] is refused, so a
//! service wired up without the interceptor fails closed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub mod acceptor;
#[doc(hidden)]
pub mod test_ca;
pub mod workload;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tonic::{Request, Status};

use workload::{TrustDomain, Workload};

/// The URI SAN prefix that names an Envoy: `spiffe://understudy/envoy/<node-id>`.
pub const IDENTITY_PREFIX: &str = "spiffe://understudy/envoy/";
/// The DNS name every server certificate carries; the bootstrap template
/// checks the control plane's certificate against it.
pub const SERVER_NAME: &str = "understudy-controlplane";
/// Longest node id a certificate may bind (Envoy node ids are short names).
pub const MAX_NODE_ID_LEN: usize = 128;
/// How long issued certificates are valid.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(825 * 24 * 3600);
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} already exists; refusing to overwrite it", .0.display())]
    Exists(PathBuf),
    #[error(
        "invalid node id {0:?}: 1 to {MAX_NODE_ID_LEN} characters of A-Z a-z 0-9 . _ - are allowed"
    )]
    InvalidNodeId(String),
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("not a usable certificate: {0}")]
    Certificate(String),
    #[error("the certificate names no Envoy (no URI SAN starting with {IDENTITY_PREFIX})")]
    NoIdentity,
    #[error("the certificate names more than one Envoy")]
    AmbiguousIdentity,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Checks that `id` can be bound in a certificate (see the module doc).
pub fn validate_node_id(id: &str) -> Result<(), TlsError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_NODE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(TlsError::InvalidNodeId(id.to_owned()))
    }
}

/// The URI SAN that binds `node_id`.
pub fn identity_uri(node_id: &str) -> String {
    format!("{IDENTITY_PREFIX}{node_id}")
}

/// The files of a certificate directory (see the module doc for the layout).
#[derive(Debug, Clone)]
pub struct CertDir {
    pub dir: PathBuf,
}

impl CertDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join(CA_KEY)
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join(SERVER_CERT)
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join(SERVER_KEY)
    }
    /// Envoy `node_id`'s certificate (the id is checked by [`issue_envoy`]).
    pub fn envoy_cert(&self, node_id: &str) -> PathBuf {
        self.dir.join(format!("envoy-{node_id}.pem"))
    }
    pub fn envoy_key(&self, node_id: &str) -> PathBuf {
        self.dir.join(format!("envoy-{node_id}-key.pem"))
    }
}

/// Creates `dir` (0700) with a new CA, a server certificate for
/// [`SERVER_NAME`], `localhost`, `127.0.0.1` and `server_names`, and a client
/// certificate per entry of `envoys`. Refuses to overwrite an existing CA.
pub fn init(
    dir: &Path,
    server_names: &[String],
    envoys: &[String],
    now: SystemTime,
) -> Result<CertDir, TlsError> {
    for node in envoys {
        validate_node_id(node)?;
    }
    create_private_dir(dir)?;
    let files = CertDir::new(dir);
    if files.ca_cert().exists() || files.ca_key().exists() {
        return Err(TlsError::Exists(files.ca_cert()));
    }
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = name("Understudy CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca, now, CA_VALIDITY);
    let ca_cert = ca.self_signed(&ca_key)?;
    write_private(&files.ca_key(), ca_key.serialize_pem().as_bytes())?;
    write_public(&files.ca_cert(), ca_cert.pem().as_bytes())?;
    let issuer = Issuer::new(ca, &ca_key);

    let mut names = vec![
        SERVER_NAME.to_owned(),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
    ];
    for n in server_names {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let mut server = CertificateParams::new(names)?;
    server.distinguished_name = name(SERVER_NAME);
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf(&mut server, now);
    let server_key = KeyPair::generate()?;
    let server_cert = server.signed_by(&server_key, &issuer)?;
    write_private(&files.server_key(), server_key.serialize_pem().as_bytes())?;
    write_public(&files.server_cert(), server_cert.pem().as_bytes())?;

    for node in envoys {
        issue_with(&files, &issuer, node, now)?;
    }
    Ok(files)
}

/// Issues a client certificate for Envoy `node_id` from the CA in `dir`.
/// Returns (certificate, key) paths. Refuses to overwrite an existing one.
pub fn issue_envoy(
    dir: &Path,
    node_id: &str,
    now: SystemTime,
) -> Result<(PathBuf, PathBuf), TlsError> {
    validate_node_id(node_id)?;
    let files = CertDir::new(dir);
    let ca_pem = read_text(&files.ca_cert())?;
    let key = KeyPair::from_pem(&read_text(&files.ca_key())?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)?;
    issue_with(&files, &issuer, node_id, now)
}

fn issue_with(
    files: &CertDir,
    issuer: &Issuer<'_, impl rcgen::SigningKey>,
    node_id: &str,
    now: SystemTime,
) -> Result<(PathBuf, PathBuf), TlsError> {
    let (cert_path, key_path) = (files.envoy_cert(node_id), files.envoy_key(node_id));
    if cert_path.exists() || key_path.exists() {
        return Err(TlsError::Exists(cert_path));
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = name(node_id);
    params.subject_alt_names = vec![SanType::URI(identity_uri(node_id).try_into()?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    leaf(&mut params, now);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    Ok((cert_path, key_path))
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Understudy");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn leaf(params: &mut CertificateParams, now: SystemTime) {
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    validity(params, now, LEAF_VALIDITY);
}

/// Valid from an hour before `now` (clocks differ a little) for `length`.
fn validity(params: &mut CertificateParams, now: SystemTime, length: Duration) {
    let from = now
        .checked_sub(Duration::from_secs(3600))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    params.not_before = time::OffsetDateTime::from(from);
    params.not_after = time::OffsetDateTime::from(now.checked_add(length).unwrap_or(now));
}

fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// Writes a new file readable by its owner only; never replaces one.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    write_new(path, bytes, 0o600)
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    write_new(path, bytes, 0o644)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => TlsError::Exists(path.to_owned()),
            _ => io(path)(e),
        })?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn read_text(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(io(path))
}

/// The Envoy node id a DER client certificate binds: its one URI SAN under
/// [`IDENTITY_PREFIX`], checked with [`validate_node_id`].
pub fn identity_from_der(der: &[u8]) -> Result<String, TlsError> {
    let id = one_uri_san(der, |uri| {
        uri.strip_prefix(IDENTITY_PREFIX).map(str::to_owned)
    })?;
    validate_node_id(&id)?;
    Ok(id)
}

/// What `read` makes of the certificate's one URI SAN it recognizes:
/// `NoIdentity` when it recognizes none, `AmbiguousIdentity` for two.
fn one_uri_san<T>(der: &[u8], read: impl Fn(&str) -> Option<T>) -> Result<T, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    let mut found = None;
    for general in san.iter().flat_map(|s| s.value.general_names.iter()) {
        if let x509_parser::extensions::GeneralName::URI(uri) = general
            && let Some(value) = read(uri)
        {
            if found.is_some() {
                return Err(TlsError::AmbiguousIdentity);
            }
            found = Some(value);
        }
    }
    found.ok_or(TlsError::NoIdentity)
}

// === serving ===

/// PEM material for the mTLS xDS server.
#[derive(Clone)]
pub struct XdsTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// The CA whose client certificates are accepted.
    pub client_ca_pem: Vec<u8>,
    /// Where the certificate and key were read from: the server reads
    /// them again when they change ([`acceptor`]).
    pub files: Option<(PathBuf, PathBuf)>,
    /// Also accept Istio workload certificates of this trust domain
    /// ([`workload`]).
    pub istio_trust_domain: Option<TrustDomain>,
}

impl std::fmt::Debug for XdsTls {
    // Never print a private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsTls").finish_non_exhaustive()
    }
}

impl XdsTls {
    pub fn from_files(cert: &Path, key: &Path, client_ca: &Path) -> Result<Self, TlsError> {
        let read = |p: &Path| std::fs::read(p).map_err(io(p));
        Ok(Self {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: read(client_ca)?,
            files: Some((cert.to_owned(), key.to_owned())),
            istio_trust_domain: None,
        })
    }

    /// Also accept Istio workload certificates of `trust_domain`.
    pub fn accepting_istio_workloads(mut self, trust_domain: TrustDomain) -> Self {
        self.istio_trust_domain = Some(trust_domain);
        self
    }

    /// The server certificate and CA of a [`init`] directory.
    pub fn from_dir(dir: &Path) -> Result<Self, TlsError> {
        let d = CertDir::new(dir);
        Self::from_files(&d.server_cert(), &d.server_key(), &d.ca_cert())
    }
}

/// How the xDS port is secured.
#[derive(Debug, Clone)]
pub enum XdsSecurity {
    /// Mutual TLS: only Envoys with a certificate from the CA connect, and
    /// each speaks only for the node id its certificate binds.
    Mtls(XdsTls),
    /// No TLS, no identity: anyone who reaches the port is trusted
    /// (`--insecure-plaintext-xds`; for in-process tests and local trials).
    InsecurePlaintext,
}

/// Certificate and key for serving the API over TLS (rustls).
#[derive(Clone)]
pub struct ApiTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ApiTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTls").finish_non_exhaustive()
    }
}

impl ApiTls {
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |p: &Path| std::fs::read(p).map_err(io(p));
        Ok(Self {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        })
    }
}

/// Who is on the other end of an xDS-port request, put into its extensions
/// by [`peer_interceptor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A client certificate from our CA binding this node id.
    Verified(String),
    /// An Istio workload certificate, on a connection from `addr`.
    Workload {
        identity: Workload,
        addr: Option<std::net::IpAddr>,
    },
    /// The xDS port runs without TLS (`--insecure-plaintext-xds`): unknown.
    Plaintext,
}

impl Peer {
    /// The identity the peer's certificate proves, if any: our node id, or
    /// an Istio workload's SPIFFE URI. Evidence books mark what carries one
    /// as "origin verified"; stream caps count per identity.
    pub fn verified(&self) -> Option<&str> {
        match self {
            Peer::Verified(id) => Some(id),
            Peer::Workload { identity, .. } => Some(&identity.uri),
            Peer::Plaintext => None,
        }
    }
}

/// The peer a verified client certificate makes: our node id if it binds
/// one, else (with `workloads`) an Istio workload identity.
pub fn peer_from_der(
    der: &[u8],
    workloads: Option<&TrustDomain>,
    addr: Option<std::net::IpAddr>,
) -> Result<Peer, TlsError> {
    match (identity_from_der(der), workloads) {
        (Ok(id), _) => Ok(Peer::Verified(id)),
        (Err(TlsError::NoIdentity), Some(td)) => {
            let identity = one_uri_san(der, |uri| workload::workload_from_uri(uri, td))?;
            Ok(Peer::Workload { identity, addr })
        }
        (Err(e), _) => Err(e),
    }
}

/// The interceptor every xDS-port service runs behind: with mTLS, reads the
/// identity from the peer's (already verified) certificate ([`peer_from_der`];
/// Istio workloads of `workloads`' trust domain too) and refuses a
/// certificate that binds none; in plaintext mode marks the peer unknown.
pub fn peer_interceptor(
    mtls: bool,
    workloads: Option<TrustDomain>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        let peer = if mtls {
            let certs = request.peer_certs().ok_or_else(|| {
                tracing::warn!(peer = ?request.remote_addr(), "xDS request without a client certificate refused");
                Status::unauthenticated("a client certificate is required")
            })?;
            let leaf = certs
                .first()
                .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
            let addr = request.remote_addr().map(|a| a.ip());
            peer_from_der(leaf, workloads.as_ref(), addr).map_err(|e| {
                tracing::warn!(peer = ?request.remote_addr(), error = %e, "xDS client certificate refused");
                Status::permission_denied(format!("client certificate refused: {e}"))
            })?
        } else {
            Peer::Plaintext
        };
        request.extensions_mut().insert(peer);
        Ok(request)
    }
}

/// The [`Peer`] of a request that passed [`peer_interceptor`];
/// `PermissionDenied` when there is none (fail closed).
pub fn peer(extensions: &tonic::Extensions) -> Result<Peer, Status> {
    extensions.get::<Peer>().cloned().ok_or_else(|| {
        tracing::error!("xDS-port request without a peer identity (interceptor missing)");
        Status::permission_denied("peer identity unknown")
    })
}

/// Allows `what` claiming node id `claimed` only if the peer's certificate
/// binds that id (any id in plaintext mode). A mismatch is logged and
/// refused with `PermissionDenied`.
pub fn authorize(peer: &Peer, claimed: &str, what: &str) -> Result<(), Status> {
    match peer {
        Peer::Plaintext => Ok(()),
        Peer::Verified(id) if id == claimed => Ok(()),
        Peer::Workload { identity, addr } => {
            workload::authorize(identity, *addr, claimed).map_err(|reason| {
                tracing::warn!(
                    certificate = %identity.uri,
                    peer = ?addr,
                    claimed = %claimed.chars().take(MAX_NODE_ID_LEN).collect::<String>(),
                    what,
                    %reason,
                    "refused: the workload certificate does not cover this node id"
                );
                Status::permission_denied(format!("{what}: {reason}"))
            })
        }
        Peer::Verified(id) => {
            tracing::warn!(
                certificate = %id,
                claimed = %claimed.chars().take(MAX_NODE_ID_LEN).collect::<String>(),
                what,
                "refused: the node id does not match the client certificate"
            );
            Err(Status::permission_denied(format!(
                "{what}: node id does not match the client certificate ({id})"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use x509_parser::pem::parse_x509_pem;

    fn der(path: &Path) -> Vec<u8> {
        let bytes = std::fs::read(path).unwrap();
        parse_x509_pem(&bytes).unwrap().1.contents
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Whether `ca` signed `leaf` (x509-parser checks the signature with ring).
    fn signed_by(leaf: &[u8], ca: &[u8]) -> bool {
        let (_, leaf) = x509_parser::parse_x509_certificate(leaf).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(ca).unwrap();
        leaf.verify_signature(Some(ca.public_key())).is_ok() && leaf.issuer() == ca.subject()
    }

    #[test]
    fn init_issues_certificates_the_ca_verifies_with_the_node_bound() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        let now = SystemTime::now();
        let files = init(&dir, &["cp.example".into()], &["envoy-1".into()], now).unwrap();
        let ca = der(&files.ca_cert());
        assert!(signed_by(&der(&files.server_cert()), &ca));
        let client = der(&files.envoy_cert("envoy-1"));
        assert!(signed_by(&client, &ca));
        assert_eq!(identity_from_der(&client).unwrap(), "envoy-1");
        // The server certificate names no Envoy.
        assert!(matches!(
            identity_from_der(&der(&files.server_cert())),
            Err(TlsError::NoIdentity)
        ));
        // Private keys and the directory are the owner's only.
        for key in [
            files.ca_key(),
            files.server_key(),
            files.envoy_key("envoy-1"),
        ] {
            assert_eq!(mode(&key), 0o600, "{}", key.display());
        }
        assert_eq!(mode(&dir), 0o700);

        // Issued later from the stored CA: the same CA verifies it.
        let (cert, key) = issue_envoy(&dir, "envoy-2", now).unwrap();
        assert!(signed_by(&der(&cert), &ca));
        assert_eq!(identity_from_der(&der(&cert)).unwrap(), "envoy-2");
        assert_eq!(mode(&key), 0o600);

        // Nothing is overwritten, and bad ids are refused before any file is written.
        assert!(matches!(
            init(&dir, &[], &[], now),
            Err(TlsError::Exists(_))
        ));
        assert!(matches!(
            issue_envoy(&dir, "envoy-2", now),
            Err(TlsError::Exists(_))
        ));
        assert!(matches!(
            issue_envoy(&dir, "../evil", now),
            Err(TlsError::InvalidNodeId(_))
        ));
        assert!(!files.envoy_cert("../evil").exists());

        // Another CA's certificate does not verify against this one.
        let other = init(&tmp.path().join("other"), &[], &["envoy-1".into()], now).unwrap();
        assert!(!signed_by(&der(&other.envoy_cert("envoy-1")), &ca));
        assert!(identity_from_der(b"not a certificate").is_err());
    }

    #[test]
    fn node_ids_are_plain_names() {
        let longest = "x".repeat(MAX_NODE_ID_LEN);
        for ok in ["envoy-1", "e2e.envoy_2", "A", longest.as_str()] {
            validate_node_id(ok).unwrap();
        }
        let too_long = "x".repeat(MAX_NODE_ID_LEN + 1);
        for bad in ["", "a/b", "a b", "é", "a%2F", too_long.as_str()] {
            assert!(validate_node_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_verified_peer_speaks_only_for_its_own_node() {
        let peer = Peer::Verified("envoy-1".into());
        assert!(authorize(&peer, "envoy-1", "test").is_ok());
        let refused = authorize(&peer, "envoy-2", "test").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(authorize(&Peer::Plaintext, "anything", "test").is_ok());
        assert_eq!(
            super::peer(&tonic::Extensions::new()).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn istio_workload_certificates_are_peers_only_when_their_trust_domain_is_accepted() {
        let ca = test_ca::TestCa::new("istio");
        let reviews = ca.leaf(&["spiffe://cluster.local/ns/default/sa/bookinfo-reviews"]);
        let td: TrustDomain = "cluster.local".parse().unwrap();
        let pod: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        // Not accepted unless asked for.
        assert!(matches!(
            peer_from_der(&reviews.der, None, Some(pod)),
            Err(TlsError::NoIdentity)
        ));
        let peer = peer_from_der(&reviews.der, Some(&td), Some(pod)).unwrap();
        assert_eq!(
            peer.verified(),
            Some("spiffe://cluster.local/ns/default/sa/bookinfo-reviews")
        );
        let node = "sidecar~10.1.2.3~reviews-v1-abc.default~default.svc.cluster.local";
        authorize(&peer, node, "usage report").unwrap();
        let sibling = "sidecar~10.1.2.4~reviews-v1-def.default~default.svc.cluster.local";
        let err = authorize(&peer, sibling, "usage report").unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(authorize(&peer, "envoy-1", "usage report").is_err());

        // Another trust domain, or two workload URIs: refused.
        let foreign = ca.leaf(&["spiffe://other.mesh/ns/default/sa/bookinfo-reviews"]);
        assert!(peer_from_der(&foreign.der, Some(&td), Some(pod)).is_err());
        let two = ca.leaf(&[
            "spiffe://cluster.local/ns/default/sa/a",
            "spiffe://cluster.local/ns/default/sa/b",
        ]);
        assert!(matches!(
            peer_from_der(&two.der, Some(&td), Some(pod)),
            Err(TlsError::AmbiguousIdentity)
        ));
        // Our own identity still binds exactly one node id.
        let ours = ca.leaf(&["spiffe://understudy/envoy/envoy-1"]);
        assert_eq!(
            peer_from_der(&ours.der, Some(&td), Some(pod)).unwrap(),
            Peer::Verified("envoy-1".into())
        );
    }
}
