//! Certificates the CA signed but the federation no longer trusts. The list
//! lives in `coordinator.toml` (`[revocation] names`, `fingerprints`) and is
//! re-read when the file changes, checked at most once a second, so a
//! revocation takes effect without restarting the coordinator.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::config::CoordinatorConfig;

struct Lists {
    names: HashSet<String>,
    fingerprints: HashSet<String>,
    modified: Option<SystemTime>,
    checked: Instant,
}

/// Why [`Revocations::check`] refuses a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Revoked {
    /// Every certificate of this name is revoked.
    #[error("the certificates of {name} are revoked")]
    Name {
        /// The certificate's CN.
        name: String,
    },
    /// This one certificate is revoked, by its fingerprint.
    #[error("certificate {fingerprint} of {name} is revoked")]
    Fingerprint {
        /// The certificate's SHA-256 fingerprint, in hex.
        fingerprint: String,
        /// The certificate's CN.
        name: String,
    },
}

/// The live revocation lists.
pub struct Revocations {
    source: PathBuf,
    lists: Mutex<Lists>,
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Revocations {
    /// The lists of a loaded configuration.
    pub fn new(config: &CoordinatorConfig) -> Revocations {
        Revocations {
            source: config.source.clone(),
            lists: Mutex::new(Lists {
                names: config.revoked_names.iter().cloned().collect(),
                fingerprints: config.revoked_fingerprints.iter().cloned().collect(),
                modified: modified(&config.source),
                checked: Instant::now(),
            }),
        }
    }

    /// Refuses a revoked certificate, naming why.
    pub fn check(&self, name: &str, der: &[u8]) -> Result<(), Revoked> {
        let mut lists = meridian_sys::sync::lock(&self.lists);
        if lists.checked.elapsed() >= Duration::from_secs(1) {
            lists.checked = Instant::now();
            let now = modified(&self.source);
            if now != lists.modified {
                lists.modified = now;
                match CoordinatorConfig::load(&self.source) {
                    Ok(c) => {
                        lists.names = c.revoked_names.into_iter().collect();
                        lists.fingerprints = c.revoked_fingerprints.into_iter().collect();
                        info!(
                            names = lists.names.len(),
                            fingerprints = lists.fingerprints.len(),
                            "revocation list reloaded"
                        );
                    }
                    Err(e) => warn!(error = %e, "cannot reload the revocation list; keeping the previous one"),
                }
            }
        }
        if lists.names.contains(name) {
            return Err(Revoked::Name { name: name.to_string() });
        }
        let fingerprint = hex::encode(Sha256::digest(der));
        if lists.fingerprints.contains(&fingerprint) {
            return Err(Revoked::Fingerprint { fingerprint, name: name.to_string() });
        }
        Ok(())
    }
}
