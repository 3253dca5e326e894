//! TLS for the HTTP API (`--http-tls-cert/--http-tls-key`, optionally `--http-client-ca`): a
//! rustls acceptor in front of axum, reporting per connection whether the client presented a
//! certificate the client CA signed (such a client counts as `full`, see `auth`).
//!
//! Client certificates are optional at the TLS layer even with a client CA: kubelet probes and
//! Prometheus reach `/healthz` and `/metrics` without one, and token holders need none. A
//! certificate that is presented but not signed by the client CA fails the handshake.

use std::{io, net::SocketAddr, path::Path, path::PathBuf, sync::Arc, time::Duration};

use axum::{extract::connect_info::Connected, serve::IncomingStream};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// A handshake not done by then is dropped, so a silent client cannot hold a slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in flight at once; further connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path}: no certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: bad client CA: {reason}")]
    ClientCa { path: PathBuf, reason: String },
    #[error("bad HTTP API certificate or key: {0}")]
    Config(#[from] rustls::Error),
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The HTTP API's rustls configuration from PEM files: the certificate chain, its key, and the
/// CA that signs client certificates (mutual TLS), if any.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Read {
        path: key.to_path_buf(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca)? {
                roots.add(c).map_err(|e| TlsError::ClientCa {
                    path: ca.to_path_buf(),
                    reason: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::ClientCa {
                    path: ca.to_path_buf(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key)?;
    // axum is served as HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Who is on the other end of an HTTP API connection (axum's `ConnectInfo`).
#[derive(Clone, Debug)]
pub struct TlsPeer {
    pub addr: SocketAddr,
    /// The client presented a certificate, and the client CA verified it.
    pub client_cert: bool,
    /// That certificate's name (`cert_name`), for the audit log.
    pub client_name: Option<Arc<str>>,
}

impl Connected<IncomingStream<'_, TlsListener>> for TlsPeer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// A client certificate's name (DER): its subject's common name, else its first subject
/// alternative name (DNS, e-mail, URI or IP address), else `sha256:` and 16 hex digits of its
/// fingerprint. Control characters become `?`, so a name cannot forge lines in a log.
pub fn cert_name(der: &[u8]) -> String {
    let name = der::common_name(der).or_else(|| der::first_san(der));
    match name {
        Some(n) if !n.is_empty() => n
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect(),
        _ => {
            let d = ring::digest::digest(&ring::digest::SHA256, der);
            let hex: String = d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
            format!("sha256:{hex}")
        }
    }
}

/// Just enough DER to find the subject's common name and the subject alternative names of a
/// certificate that rustls already verified (no X.509 crate in the collector for this).
mod der {
    /// OID 2.5.4.3 (commonName), content bytes.
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    /// OID 2.5.29.17 (subjectAltName), content bytes.
    const SAN: &[u8] = &[0x55, 0x1d, 0x11];

    /// The first element of `b`: its tag, its content, and what follows it.
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = b.split_first()?;
        let (&len0, rest) = rest.split_first()?;
        let (len, rest) = if len0 < 0x80 {
            (usize::from(len0), rest)
        } else {
            let n = usize::from(len0 & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        Some((tag, &rest[..len], &rest[len..]))
    }

    /// The elements of a constructed value's content.
    fn items(mut b: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
        std::iter::from_fn(move || {
            let (tag, content, rest) = tlv(b)?;
            b = rest;
            Some((tag, content))
        })
    }

    /// The TBSCertificate's fields: version?, serial, signature, issuer, validity, subject,
    /// subjectPublicKeyInfo, then the optional unique ids and extensions.
    fn tbs(cert: &[u8]) -> Option<Vec<(u8, &[u8])>> {
        let (_, cert, _) = tlv(cert)?;
        let (tag, tbs, _) = tlv(cert)?;
        (tag == 0x30).then(|| items(tbs).collect())
    }

    fn string(tag: u8, b: &[u8]) -> Option<String> {
        match tag {
            // UTF8String, PrintableString, IA5String, and T61String used as Latin-1 in practice.
            0x0c | 0x13 | 0x16 => std::str::from_utf8(b).ok().map(str::to_string),
            0x14 => Some(b.iter().map(|&c| char::from(c)).collect()),
            // BMPString: UTF-16BE.
            0x1e => char::decode_utf16(b.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])))
                .collect::<Result<String, _>>()
                .ok(),
            _ => None,
        }
    }

    pub(super) fn common_name(cert: &[u8]) -> Option<String> {
        let fields = tbs(cert)?;
        // The subject is the sixth field, the fifth without the (optional) [0] version.
        let skip = usize::from(fields.first()?.0 == 0xa0);
        let (tag, subject) = *fields.get(skip + 4)?;
        if tag != 0x30 {
            return None;
        }
        // The most specific CN comes last in the RDN sequence.
        let mut cn = None;
        for (_, set) in items(subject) {
            for (_, attr) in items(set) {
                let mut parts = items(attr);
                if let (Some((0x06, oid)), Some((tag, value))) = (parts.next(), parts.next())
                    && oid == CN
                {
                    cn = string(tag, value).or(cn);
                }
            }
        }
        cn
    }

    pub(super) fn first_san(cert: &[u8]) -> Option<String> {
        let fields = tbs(cert)?;
        let (_, extensions) = fields.iter().find(|(tag, _)| *tag == 0xa3)?;
        let (_, extensions, _) = tlv(extensions)?;
        for (_, ext) in items(extensions) {
            let mut parts = items(ext);
            let Some((0x06, oid)) = parts.next() else {
                continue;
            };
            if oid != SAN {
                continue;
            }
            let value = parts.find(|(tag, _)| *tag == 0x04)?.1;
            let (_, names, _) = tlv(value)?;
            return items(names).find_map(|(tag, n)| match tag {
                // rfc822Name, dNSName, uniformResourceIdentifier.
                0x81 | 0x82 | 0x86 => std::str::from_utf8(n).ok().map(str::to_string),
                // iPAddress.
                0x87 => match n.len() {
                    4 => <[u8; 4]>::try_from(n)
                        .ok()
                        .map(|a| std::net::Ipv4Addr::from(a).to_string()),
                    16 => <[u8; 16]>::try_from(n)
                        .ok()
                        .map(|a| std::net::Ipv6Addr::from(a).to_string()),
                    _ => None,
                },
                _ => None,
            });
        }
        None
    }
}

/// Accepts TCP connections and yields them once their TLS handshake is done. Handshakes run in
/// their own tasks so one slow client does not hold up the others.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, TlsPeer)>,
    local: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `tcp` (inside a Tokio runtime).
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (stream, addr) = match tcp.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        accept_error(e).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            // Only certificates the client CA verified get this far.
                            let client_name = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| Arc::<str>::from(cert_name(c)));
                            let peer = TlsPeer {
                                addr,
                                client_cert: client_name.is_some(),
                                client_name,
                            };
                            let _ = tx.send((tls, peer)).await;
                        }
                        // Port scans, plain HTTP, untrusted client certificates: the client
                        // sees the failure; a warning per connection would flood the log.
                        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            ready,
            local,
            accept_task,
        })
    }
}

/// As axum's own listener: resets are the client's business; anything else (out of file
/// descriptors) is logged and retried after a pause instead of spinning.
async fn accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "HTTP API: accept failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = TlsPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task ended (only when aborted): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(TlsPeer {
            addr: self.local,
            client_cert: false,
            client_name: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DER element.
    fn el(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if content.len() < 0x80 {
            out.push(content.len() as u8);
        } else {
            out.push(0x82);
            out.extend_from_slice(&(content.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(content);
        out
    }

    fn seq(parts: &[Vec<u8>]) -> Vec<u8> {
        el(0x30, &parts.concat())
    }

    /// A certificate's structure (signature not valid: only the names are read).
    fn cert(subject: &[(&[u8], u8, &str)], san: &[(u8, &[u8])], version: bool) -> Vec<u8> {
        let rdns: Vec<Vec<u8>> = subject
            .iter()
            .map(|(oid, tag, v)| el(0x31, &seq(&[el(0x06, oid), el(*tag, v.as_bytes())])))
            .collect();
        let mut tbs = Vec::new();
        if version {
            tbs.push(el(0xa0, &el(0x02, &[2])));
        }
        tbs.extend([
            el(0x02, &[1]),
            seq(&[]),
            seq(&[]),
            seq(&[]),
            seq(&rdns),
            seq(&[el(0x03, &[0; 300])]),
        ]);
        if !san.is_empty() {
            let names: Vec<Vec<u8>> = san.iter().map(|(tag, v)| el(*tag, v)).collect();
            let ext = seq(&[el(0x06, &[0x55, 0x1d, 0x11]), el(0x04, &seq(&names))]);
            let other = seq(&[el(0x06, &[0x55, 0x1d, 0x13]), el(0x04, &seq(&[]))]);
            tbs.push(el(0xa3, &seq(&[other, ext])));
        }
        seq(&[seq(&tbs), seq(&[]), el(0x03, &[0; 64])])
    }

    const CN: &[u8] = &[0x55, 0x04, 0x03];
    const O: &[u8] = &[0x55, 0x04, 0x0a];

    #[test]
    fn a_certificate_is_named_by_its_cn_else_its_first_san_else_its_digest() {
        let both = cert(
            &[(O, 0x13, "Example"), (CN, 0x0c, "alice")],
            &[(0x82, b"alice.example")],
            true,
        );
        assert_eq!(cert_name(&both), "alice");
        let san_only = cert(
            &[(O, 0x13, "Example")],
            &[(0x87, &[10, 0, 0, 7]), (0x82, b"b.example")],
            true,
        );
        assert_eq!(cert_name(&san_only), "10.0.0.7");
        let dns = cert(&[], &[(0x82, b"probe-3.example")], false);
        assert_eq!(cert_name(&dns), "probe-3.example");
        let control = cert(&[(CN, 0x0c, "eve\nforged")], &[], true);
        assert_eq!(cert_name(&control), "eve?forged");
        let nameless = cert(&[], &[], true);
        let name = cert_name(&nameless);
        assert!(
            name.starts_with("sha256:") && name.len() == 7 + 16,
            "{name}"
        );
        // Not DER at all: still a name, never a panic.
        assert!(cert_name(b"\x30\x84\xff\xff\xff\xff").starts_with("sha256:"));
        assert!(cert_name(b"").starts_with("sha256:"));
    }

    /// A real certificate (rcgen, as the TLS tests make them): subject CN and SAN as issued.
    #[test]
    fn the_test_pki_client_certificate_has_its_name() {
        let dir = std::env::temp_dir().join(format!("bakeoff-tls-name-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pki = bakeoff_testkit::tls::Pki::create(&dir).expect("pki");
        let der = CertificateDer::from_pem_file(&pki.client_cert).expect("pem");
        assert_eq!(der::first_san(&der).as_deref(), Some("probe.bakeoff.test"));
        // rcgen's default subject.
        assert_eq!(cert_name(&der), "rcgen self signed cert");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
