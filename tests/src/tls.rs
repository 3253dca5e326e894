//! Throw-away PKI for TLS tests: a CA, a server certificate for `localhost`/127.0.0.1 and a
//! client certificate, written as PEM files (rcgen).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A client certificate from a CA the server does not trust.
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

fn ca(name: &str) -> Result<(String, Issuer<'static, KeyPair>)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

fn leaf(names: &[&str], issuer: &Issuer<'_, KeyPair>) -> Result<(String, String)> {
    let params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl Pki {
    pub fn create(dir: &Path) -> Result<Self> {
        let (ca_pem, issuer) = ca("bakeoff test CA")?;
        let (server_cert, server_key) = leaf(&["localhost", "127.0.0.1"], &issuer)?;
        let (client_cert, client_key) = leaf(&["probe.bakeoff.test"], &issuer)?;
        let (_, rogue_issuer) = ca("rogue CA")?;
        let (rogue_cert, rogue_key) = leaf(&["rogue.bakeoff.test"], &rogue_issuer)?;
        let write = |name: &str, pem: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, pem)?;
            Ok(p)
        };
        Ok(Self {
            ca: write("ca.pem", &ca_pem)?,
            server_cert: write("server.pem", &server_cert)?,
            server_key: write("server.key", &server_key)?,
            client_cert: write("client.pem", &client_cert)?,
            client_key: write("client.key", &client_key)?,
            rogue_cert: write("rogue.pem", &rogue_cert)?,
            rogue_key: write("rogue.key", &rogue_key)?,
        })
    }
}

impl Pki {
    /// An HTTPS client trusting only the test CA, presenting `identity` (certificate, key) if
    /// given.
    pub fn agent(&self, identity: Option<(&Path, &Path)>) -> Result<ureq::Agent> {
        use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("read {}", p.display()));
        let ca = Certificate::from_pem(&read(&self.ca)?)?;
        let mut tls = TlsConfig::builder().root_certs(RootCerts::new_with_certs(&[ca]));
        if let Some((cert, key)) = identity {
            tls = tls.client_cert(Some(ClientCert::new_with_certs(
                &[Certificate::from_pem(&read(cert)?)?],
                PrivateKey::from_pem(&read(key)?)?,
            )));
        }
        Ok(ureq::Agent::config_builder()
            .tls_config(tls.build())
            .http_status_as_error(false)
            .build()
            .new_agent())
    }
}
