//! TLS for `cairn serve --http` (`--tls-cert`, `--tls-key`): rustls with the ring provider, through
//! axum-server. The key must be private to its user, as the secrets key is.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use axum::Router;
use axum_server::tls_rustls::RustlsConfig;

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Tls {
    /// Reads both files and checks that they make a server configuration: each error names the
    /// file and the flag it came from.
    pub async fn load(&self) -> Result<RustlsConfig, String> {
        let cert = read(&self.cert, "--tls-cert")?;
        let meta = std::fs::metadata(&self.key)
            .map_err(|e| format!("`--tls-key {}`: {e}", self.key.display()))?;
        if meta.mode() & 0o077 != 0 {
            return Err(format!(
                "`--tls-key {}` may be read by others (mode {:04o}): make it private with `chmod 600 {}`",
                self.key.display(),
                meta.mode() & 0o7777,
                self.key.display()
            ));
        }
        let key = read(&self.key, "--tls-key")?;
        RustlsConfig::from_pem(cert, key).await.map_err(|e| {
            format!(
                "`--tls-cert {}` and `--tls-key {}` do not make a TLS server: {e} (PEM files: the \
                 certificate chain, then its private key)",
                self.cert.display(),
                self.key.display()
            )
        })
    }
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("`{flag} {}`: {e}", path.display()))
}

/// Serves `router` over TLS on `listener` until the process ends.
pub async fn serve_tls(
    listener: std::net::TcpListener,
    router: Router,
    config: RustlsConfig,
) -> std::io::Result<()> {
    axum_server::from_tcp_rustls(listener, config)?
        .serve(router.into_make_service())
        .await
}
