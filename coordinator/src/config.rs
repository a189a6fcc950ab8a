//! The coordinator's configuration file: raw TOML shape, then one validated
//! [`CoordinatorConfig`], every problem reported with the file and key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `coordinator.toml` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Address to listen on, e.g. `127.0.0.1:7443` (port 0 picks a free one).
    listen: String,
    /// Directory for the SQLite database, checkpoints and received updates.
    data_dir: PathBuf,
    tls: RawTls,
    /// Seconds without a heartbeat after which a site counts as offline.
    #[serde(default = "default_idle")]
    idle_timeout_secs: u64,
    /// HTTP/2 receive window per update stream, in KiB: what one site may
    /// have in flight to the coordinator before it is read.
    #[serde(default = "default_window")]
    receive_window_kib: u32,
    #[serde(default)]
    revocation: RawRevocation,
}

fn default_window() -> u32 {
    1024
}

/// Certificates refused even though the CA signed them. The coordinator
/// re-reads this table when the file changes, without a restart.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRevocation {
    /// Site or user names whose every certificate is refused.
    #[serde(default)]
    names: Vec<String>,
    /// SHA-256 fingerprints (hex, of the DER certificate) refused.
    #[serde(default)]
    fingerprints: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    /// The federation CA certificate (PEM).
    ca: PathBuf,
    /// The coordinator's certificate (PEM).
    cert: PathBuf,
    /// The coordinator's private key (PEM).
    key: PathBuf,
}

fn default_idle() -> u64 {
    30
}

/// A validated coordinator configuration; relative paths are resolved
/// against the config file's directory.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// State directory.
    pub data_dir: PathBuf,
    /// CA certificate path.
    pub tls_ca: PathBuf,
    /// Server certificate path.
    pub tls_cert: PathBuf,
    /// Server key path.
    pub tls_key: PathBuf,
    /// Seconds of silence before a site is offline.
    pub idle_timeout_secs: u64,
    /// HTTP/2 receive window per stream and connection, in bytes. Larger
    /// windows move updates faster over long links; smaller ones bound the
    /// memory a burst of many sites' uploads can occupy.
    pub receive_window_bytes: u32,
    /// Names whose certificates are refused.
    pub revoked_names: Vec<String>,
    /// Certificate fingerprints (lowercase hex SHA-256 of the DER) refused.
    pub revoked_fingerprints: Vec<String>,
    /// The file this configuration was read from (re-read for revocations).
    pub source: PathBuf,
}

pub use meridian_spec::config_file::ConfigError;

impl CoordinatorConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<CoordinatorConfig, ConfigError> {
        let text = meridian_spec::config_file::read(path)?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<CoordinatorConfig, ConfigError> {
        let raw: RawConfig = meridian_spec::config_file::parse(text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
        let mut problems = Vec::new();
        let listen = raw.listen.parse::<SocketAddr>().unwrap_or_else(|e| {
            problems.push(format!("listen: \"{}\" is not an address like 127.0.0.1:7443 ({e})", raw.listen));
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        if raw.idle_timeout_secs == 0 {
            problems.push("idle_timeout_secs: must be at least 1".to_string());
        }
        if !(16..=65_536).contains(&raw.receive_window_kib) {
            problems.push(format!("receive_window_kib: must be in 16..=65536, got {}", raw.receive_window_kib));
        }
        let config = CoordinatorConfig {
            listen,
            data_dir: resolve(&raw.data_dir),
            tls_ca: resolve(&raw.tls.ca),
            tls_cert: resolve(&raw.tls.cert),
            tls_key: resolve(&raw.tls.key),
            idle_timeout_secs: raw.idle_timeout_secs,
            receive_window_bytes: raw.receive_window_kib.clamp(16, 65_536) * 1024,
            revoked_names: raw.revocation.names,
            revoked_fingerprints: raw
                .revocation
                .fingerprints
                .iter()
                .map(|f| f.to_lowercase().replace(':', ""))
                .collect(),
            source: path.to_path_buf(),
        };
        for (key, file) in [("tls.ca", &config.tls_ca), ("tls.cert", &config.tls_cert), ("tls.key", &config.tls_key)] {
            if !file.is_file() {
                problems.push(format!("{key}: {} does not exist", file.display()));
            }
        }
        meridian_spec::config_file::check(path, problems)?;
        Ok(config)
    }
}
