//! HTTPS for `--ssl-keyfile` / `--ssl-certfile` (what uvicorn does under vLLM), with client
//! certificates as `--ssl-ca-certs` / `--ssl-cert-reqs` define them (Python's ssl numbering:
//! 0 none asked for, 1 optional but verified when sent, 2 required). rustls with the ring
//! provider, the same TLS stack the hub client already builds (no OpenSSL in the image).
//! Files are read once, at start-up.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::cli::UsageError;

/// The TLS flags of `serve`.
pub struct TlsFiles<'a> {
    pub keyfile: &'a Path,
    pub certfile: &'a Path,
    pub ca_certs: Option<&'a Path>,
    pub cert_reqs: u8,
}

fn read_certs(path: &Path, flag: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("{flag} {}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{flag} {}: no PEM certificate in the file", path.display());
    }
    Ok(certs)
}

/// The acceptor every connection goes through; errors name the flag and file.
pub fn acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let certs = read_certs(files.certfile, "--ssl-certfile")?;
    let key = PrivateKeyDer::from_pem_file(files.keyfile)
        .with_context(|| format!("--ssl-keyfile {}", files.keyfile.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match (files.cert_reqs, files.ca_certs) {
        (0, _) => builder.with_no_client_auth(),
        (reqs, None) => {
            // Python's ssl would then fail every client certificate (no trust anchors).
            return Err(UsageError(format!(
                "--ssl-cert-reqs {reqs} needs --ssl-ca-certs (the CAs client certificates are \
                 verified against)"
            ))
            .into());
        }
        (reqs, Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca, "--ssl-ca-certs")? {
                roots
                    .add(c)
                    .with_context(|| format!("--ssl-ca-certs {}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if reqs == 1 {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .context("--ssl-ca-certs: client certificate verifier")?,
            )
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("--ssl-certfile / --ssl-keyfile do not form a usable pair")?;
    // The server speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
