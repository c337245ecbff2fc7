//! TLS for both listeners: turns `--tls-cert` / `--tls-key` (or the
//! `--api-tls-*` pair) into a
//! rustls acceptor at start-up (ring crypto, TLS 1.2 and 1.3, no client
//! certificates). The handshake itself runs in the client listener; the
//! session then travels to the shard with the socket
//! ([`crate::connection::transport`]).

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

/// Why the TLS files could not be used.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("--{flag}-cert {path}: {reason}")]
    Cert { flag: &'static str, path: String, reason: String },
    #[error("--{flag}-key {path}: {reason}")]
    Key { flag: &'static str, path: String, reason: String },
    #[error("--{flag}-cert/--{flag}-key do not make a usable TLS configuration: {source}")]
    Config { flag: &'static str, source: rustls::Error },
}

/// Loads the PEM files and builds the acceptor.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    let flag = files.flag;
    let cert_err = |reason: String| TlsError::Cert { flag, path: files.cert.display().to_string(), reason };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no CERTIFICATE block found".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Key {
        flag,
        path: files.key.display().to_string(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config_err = |source| TlsError::Config { flag, source };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(config_err)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
