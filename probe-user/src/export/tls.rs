//! TLS settings for the probe's gRPC channels (collector, OTLP), from PEM files (rustls).

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is https:// but no CA certificate is given (collector.tls.ca / --collector-ca)")]
    NoCa(String),
}

fn read(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The channel's TLS settings: `None` for a plain `http://` endpoint without TLS settings.
pub fn client_tls(
    endpoint: &str,
    tls: Option<&TlsConfig>,
) -> Result<Option<ClientTlsConfig>, TlsError> {
    let Some(t) = tls else {
        return if endpoint.starts_with("https://") {
            Err(TlsError::NoCa(endpoint.to_string()))
        } else {
            Ok(None)
        };
    };
    let ca =
        t.ca.as_ref()
            .ok_or_else(|| TlsError::NoCa(endpoint.to_string()))?;
    let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("CA", ca)?));
    if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
        c = c.identity(Identity::from_pem(
            read("client certificate", cert)?,
            read("client key", key)?,
        ));
    }
    if let Some(d) = &t.domain {
        c = c.domain_name(d.clone());
    }
    Ok(Some(c))
}
