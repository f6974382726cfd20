//! The xDS port's TLS server: rustls with client certificates required,
//! and a server certificate read again from its files when they change.
//!
//! Why not tonic's built-in TLS: it takes the certificate once, at start.
//! Istio rotates workload certificates (24 h by default, renewed at half
//! life, written in place by istio-agent's `OUTPUT_CERTS`), and a control
//! plane serving an expired certificate loses every sidecar. Our own
//! `understudy certs` leaves can be renewed the same way: replace the two
//! files and new connections get the new certificate (existing streams keep
//! theirs). A pair that does not parse or whose key does not match (a
//! rotation caught between two writes) is logged and the previous pair kept.
//!
//! The client CA is read once; changing it needs a restart.
//!
//! Handshakes run in their own tasks with a deadline and a cap on how many
//! run at once, so a peer that connects and says nothing holds one slot
//! for at most [`HANDSHAKE_TIMEOUT`] and never blocks the accept loop.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use super::{TlsError, XdsTls};

/// The longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections wait to be accepted.
pub const MAX_HANDSHAKES: usize = 256;

/// Builds the xDS port's rustls server config from `tls`.
pub fn server_config(tls: &XdsTls) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&tls.client_ca_pem) {
        let cert = cert.map_err(|e| TlsError::Certificate(format!("client CA: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| TlsError::Certificate(format!("client CA: {e}")))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Certificate(format!("client CA: {e}")))?;
    let resolver = Reloading::new(tls, &provider)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Certificate(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The TLS connections of `listener`, handshakes done, for tonic's
/// `serve_with_incoming`. Failed handshakes are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    config: rustls::ServerConfig,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (tcp, addr) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving.
                    tracing::warn!(error = %e, "xDS port: accept failed");
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(peer = %addr, error = %e, "xDS port: TLS handshake failed")
                    }
                    Err(_) => tracing::info!(peer = %addr, "xDS port: TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// What the certificate files held when last read. Their bytes, not their
/// mtimes: a rotation within one timestamp tick must not be missed, and two
/// small files per handshake cost nothing next to the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    cert: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
}

impl Stamp {
    fn of(cert: &Path, key: &Path) -> Self {
        Self {
            cert: std::fs::read(cert).ok(),
            key: std::fs::read(key).ok(),
        }
    }
}

/// The server certificate, re-read when its files change.
#[derive(Debug)]
struct Reloading {
    files: Option<(PathBuf, PathBuf)>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: Mutex<(Stamp, Arc<CertifiedKey>)>,
}

impl Reloading {
    fn new(tls: &XdsTls, provider: &Arc<rustls::crypto::CryptoProvider>) -> Result<Self, TlsError> {
        // The bytes actually served, not a second read of the files: a
        // rotation between the two reads would otherwise never be picked up.
        let stamp = Stamp {
            cert: Some(tls.cert_pem.clone()),
            key: Some(tls.key_pem.clone()),
        };
        let key = certified_key(provider, &tls.cert_pem, &tls.key_pem)?;
        Ok(Self {
            files: tls.files.clone(),
            provider: Arc::clone(provider),
            current: Mutex::new((stamp, Arc::new(key))),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cert, key)) = &self.files {
            let stamp = Stamp::of(cert, key);
            if stamp != current.0 {
                // Recorded even when unusable, so a bad pair is logged once,
                // not on every handshake, and a later write is read again.
                let read = match (&stamp.cert, &stamp.key) {
                    (Some(c), Some(k)) => certified_key(&self.provider, c, k),
                    _ => Err(TlsError::Certificate(format!(
                        "{} or {} cannot be read",
                        cert.display(),
                        key.display()
                    ))),
                };
                current.0 = stamp;
                match read {
                    Ok(fresh) => {
                        tracing::info!(cert = %cert.display(), "xDS port: server certificate reloaded");
                        current.1 = Arc::new(fresh);
                    }
                    Err(e) => tracing::warn!(
                        cert = %cert.display(),
                        error = %e,
                        "xDS port: the changed server certificate is unusable; keeping the previous one"
                    ),
                }
            }
        }
        Arc::clone(&current.1)
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A certificate chain and its private key, checked to belong together.
fn certified_key(
    provider: &rustls::crypto::CryptoProvider,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate(format!("server certificate: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError::Certificate(
            "server certificate: no certificate in the file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError::Certificate(format!("server key: {e}")))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Certificate(format!("server key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| TlsError::Certificate(format!("server certificate and key: {e}")))?;
    Ok(certified)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_ca::{Leaf, TestCa};
    use tokio_stream::StreamExt;

    fn write(dir: &Path, leaf: &Leaf) {
        std::fs::write(dir.join("cert.pem"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.join("key.pem"), &leaf.key_pem).unwrap();
    }

    /// Connects with `client` (certificate and key PEM, or none) and returns
    /// the server's leaf DER, or the handshake error.
    async fn handshake(
        addr: std::net::SocketAddr,
        ca: &TestCa,
        client: Option<&Leaf>,
    ) -> std::io::Result<Vec<u8>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match client {
            Some(leaf) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await?;
        // TLS 1.3 reports a refused client certificate after the handshake:
        // read until the server's first bytes or its alert.
        let mut buf = [0u8; 1];
        if let Ok(read) = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::io::AsyncReadExt::read(&mut tls, &mut buf),
        )
        .await
        {
            read?;
        }
        let (_, session) = tls.get_ref();
        Ok(session.peer_certificates().unwrap()[0].to_vec())
    }

    #[tokio::test]
    async fn a_rotated_certificate_is_served_to_new_connections_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("mesh");
        let first = ca.leaf(&["spiffe://cluster.local/ns/understudy/sa/understudy"]);
        write(dir.path(), &first);
        std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).unwrap();
        let tls = XdsTls::from_files(
            &dir.path().join("cert.pem"),
            &dir.path().join("key.pem"),
            &dir.path().join("ca.pem"),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = incoming(listener, server_config(&tls).unwrap());
        // Accepted connections stay open, so a client's read waits.
        tokio::spawn(async move {
            let mut open = Vec::new();
            while let Some(conn) = accepted.next().await {
                open.push(conn);
            }
        });
        let client = ca.leaf(&["spiffe://cluster.local/ns/default/sa/reviews"]);

        assert_eq!(
            handshake(addr, &ca, Some(&client)).await.unwrap(),
            first.der
        );
        // No client certificate: refused.
        assert!(handshake(addr, &ca, None).await.is_err());

        // Rotation: the files are replaced; the next connection sees it.
        let second = ca.leaf(&["spiffe://cluster.local/ns/understudy/sa/understudy"]);
        write(dir.path(), &second);
        assert_eq!(
            handshake(addr, &ca, Some(&client)).await.unwrap(),
            second.der
        );

        // Caught between two writes (new certificate, old key): the last
        // good pair stays.
        let third = ca.leaf(&["spiffe://cluster.local/ns/understudy/sa/understudy"]);
        std::fs::write(dir.path().join("cert.pem"), &third.cert_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), &second.key_pem).unwrap();
        assert_eq!(
            handshake(addr, &ca, Some(&client)).await.unwrap(),
            second.der
        );
        // The key arrives: served.
        std::fs::write(dir.path().join("key.pem"), &third.key_pem).unwrap();
        assert_eq!(
            handshake(addr, &ca, Some(&client)).await.unwrap(),
            third.der
        );
    }

    #[test]
    fn a_key_that_does_not_match_its_certificate_is_refused_at_start() {
        let ca = TestCa::new("mesh");
        let (a, b) = (ca.leaf(&[]), ca.leaf(&[]));
        let tls = XdsTls {
            cert_pem: a.cert_pem.into_bytes(),
            key_pem: b.key_pem.into_bytes(),
            client_ca_pem: ca.cert_pem.clone().into_bytes(),
            files: None,
            istio_trust_domain: None,
        };
        let err = server_config(&tls).unwrap_err().to_string();
        assert!(err.contains("server certificate and key"), "{err}");
    }
}
