//! How a certificate names its holder: the subject's common name (CN) is the
//! site or user name and its organizational unit (OU) is the [`Role`]. A
//! steward's certificate also names the one site it decides for, as the
//! URI subject alternative name `urn:meridian:site:NAME` ([`site_uri`]):
//! the binding is signed by the federation's CA like the rest, so a steward
//! cannot speak for another hospital.
//!
//! Provisioning writes these fields and the coordinator reads them back on
//! every call, so both sides share this one definition.

use std::fmt;
use std::str::FromStr;

/// What the holder of a certificate may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A hospital's worker daemon: may call the worker service only.
    Hospital,
    /// A data scientist: submits, watches and cancels jobs, pulls models, reads budgets.
    Scientist,
    /// A privacy reviewer: reads jobs, budgets and ledgers; submits nothing.
    Reviewer,
    /// An administrator: everything a scientist and a reviewer may do.
    Admin,
    /// A hospital's data steward: decides, for the one site its certificate
    /// names, on the data-use applications that ask that site.
    Steward,
    /// The coordinator's own server certificate; it calls no RPC.
    Coordinator,
}

impl Role {
    /// Every role, in a fixed order (for help texts and matrix tests).
    pub const ALL: [Role; 6] =
        [Role::Hospital, Role::Scientist, Role::Reviewer, Role::Admin, Role::Steward, Role::Coordinator];

    /// The string stored in the certificate's OU.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Hospital => "hospital",
            Role::Scientist => "scientist",
            Role::Reviewer => "reviewer",
            Role::Admin => "admin",
            Role::Steward => "steward",
            Role::Coordinator => "coordinator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of [`Role::ALL`].
#[derive(Debug, thiserror::Error)]
#[error("unknown role \"{0}\" (expected hospital, scientist, reviewer, admin, steward or coordinator)")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| UnknownRole(s.to_string()))
    }
}

/// A site or user name that [`validate_name`] refuses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty, or longer than 64 characters.
    #[error("name \"{name}\" must have 1 to 64 characters")]
    Length {
        /// The name.
        name: String,
    },
    /// A character outside `[A-Za-z0-9._-]`.
    #[error("name \"{name}\" contains '{character}'; use letters, digits, '.', '_' and '-'")]
    Character {
        /// The name.
        name: String,
        /// The first character it may not contain.
        character: char,
    },
}

/// Checks a site or user name: 1–64 characters of `[A-Za-z0-9._-]`, so it is
/// safe as a file name, a certificate CN and a SQL key alike.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > 64 {
        return Err(NameError::Length { name: name.to_string() });
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(NameError::Character { name: name.to_string(), character: c });
    }
    Ok(())
}

/// The PEM files that make up one party's TLS identity: the federation's CA
/// certificate, the party's certificate and its private key. Provisioning
/// writes them as `ca.pem`, `cert.pem` and `key.pem` in one directory.
#[derive(Clone, Debug)]
pub struct IdentityFiles {
    /// CA certificate (PEM) every peer must be signed by.
    pub ca_pem: Vec<u8>,
    /// This party's certificate (PEM).
    pub cert_pem: Vec<u8>,
    /// This party's private key (PEM).
    pub key_pem: Vec<u8>,
}

/// A missing or unreadable identity file.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct IdentityError {
    /// The file.
    pub path: std::path::PathBuf,
    /// Why.
    pub source: std::io::Error,
}

impl IdentityFiles {
    /// Reads `ca.pem`, `cert.pem` and `key.pem` from `dir`.
    pub fn from_dir(dir: &std::path::Path) -> Result<IdentityFiles, IdentityError> {
        Self::from_paths(&dir.join("ca.pem"), &dir.join("cert.pem"), &dir.join("key.pem"))
    }

    /// Reads the three files from explicit paths.
    pub fn from_paths(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<IdentityFiles, IdentityError> {
        let read =
            |p: &std::path::Path| std::fs::read(p).map_err(|source| IdentityError { path: p.to_path_buf(), source });
        Ok(IdentityFiles { ca_pem: read(ca)?, cert_pem: read(cert)?, key_pem: read(key)? })
    }

    /// TLS settings for a client that presents this identity and trusts only
    /// the federation's CA.
    pub fn client_tls(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(COORDINATOR_SERVER_NAME)
    }

    /// TLS settings for the coordinator: presents this identity and requires
    /// every client to present a certificate signed by the CA.
    pub fn server_tls(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca_pem))
    }
}

/// The name every coordinator certificate carries as a DNS subject
/// alternative name; clients verify it whatever address they dial.
pub const COORDINATOR_SERVER_NAME: &str = "meridian-coordinator";

/// The URI subject alternative names of a steward's certificate start
/// with this, followed by the site's name.
pub const SITE_URI_PREFIX: &str = "urn:meridian:site:";

/// The URI a steward's certificate carries for `site`.
pub fn site_uri(site: &str) -> String {
    format!("{SITE_URI_PREFIX}{site}")
}

/// Who a peer certificate says its holder is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The subject's CN: a site or user name.
    pub name: String,
    /// The subject's OU.
    pub role: Role,
    /// For a steward, the one site it decides for; `None` for every other
    /// role.
    pub site: Option<String>,
}

/// Why a certificate names no [`Principal`].
///
/// A parser's error is part of the message, not a `source`: an error
/// chain printed with `{:#}` would show it twice.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The DER bytes are not an X.509 certificate.
    #[error("unreadable peer certificate: {0}")]
    Unreadable(x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// The PEM text holds no readable certificate.
    #[error("unreadable PEM certificate: {0}")]
    UnreadablePem(x509_parser::nom::Err<x509_parser::error::PEMError>),
    /// The subject has no common name (CN).
    #[error("peer certificate has no common name")]
    NoCommonName,
    /// The subject has no organizational unit (OU), which holds the role.
    #[error("peer certificate has no organizational unit (role)")]
    NoRole,
    /// The OU is not a [`Role`].
    #[error(transparent)]
    Role(#[from] UnknownRole),
    /// The CN is not a valid name ([`validate_name`]).
    #[error(transparent)]
    Name(#[from] NameError),
    /// A steward's certificate names no site, or more than one.
    #[error("steward certificate of {name} must name exactly one site ({SITE_URI_PREFIX}NAME), it names {count}")]
    StewardSite {
        /// The steward.
        name: String,
        /// How many sites it names.
        count: usize,
    },
}

/// Reads the CN and OU of a DER certificate.
pub fn principal_from_der(der: &[u8]) -> Result<Principal, CertificateError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(CertificateError::Unreadable)?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(CertificateError::NoCommonName)?
        .to_string();
    let role =
        subject.iter_organizational_unit().next().and_then(|ou| ou.as_str().ok()).ok_or(CertificateError::NoRole)?;
    let role: Role = role.parse()?;
    validate_name(&name)?;
    let site = if role == Role::Steward { Some(steward_site(&cert, &name)?) } else { None };
    Ok(Principal { name, role, site })
}

/// The one site a steward's certificate names.
fn steward_site(cert: &x509_parser::certificate::X509Certificate<'_>, name: &str) -> Result<String, CertificateError> {
    let sites: Vec<&str> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(uri) => uri.strip_prefix(SITE_URI_PREFIX),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match sites.as_slice() {
        [site] => {
            validate_name(site)?;
            Ok((*site).to_string())
        }
        _ => Err(CertificateError::StewardSite { name: name.to_string(), count: sites.len() }),
    }
}

/// Reads the CN and OU of the first certificate in a PEM file's contents.
pub fn principal_from_pem(pem: &[u8]) -> Result<Principal, CertificateError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(CertificateError::UnreadablePem)?;
    principal_from_der(&pem.contents)
}

/// What checking an identity's files found: who the certificate names and
/// how long it stays valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityCheck {
    /// Who the certificate names.
    pub principal: Principal,
    /// Whole days until the certificate expires (negative once it has).
    pub days_left: i64,
}

/// Checks the three files of a TLS identity before anyone relies on them:
/// each parses, the key is the certificate's, the certificate is signed by
/// the CA and valid now for client authentication, and it names `role`.
/// Every problem is returned, each naming the file it is about.
pub fn check_identity(files: &IdentityFiles, role: Role) -> Result<IdentityCheck, Vec<String>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut problems = Vec::new();
    let cert = CertificateDer::from_pem_slice(&files.cert_pem)
        .map_err(|e| problems.push(format!("tls.cert: not a PEM certificate ({e})")))
        .ok();
    let key = PrivateKeyDer::from_pem_slice(&files.key_pem)
        .map_err(|e| problems.push(format!("tls.key: not a PEM private key ({e})")))
        .ok();
    let ca = CertificateDer::from_pem_slice(&files.ca_pem)
        .map_err(|e| problems.push(format!("tls.ca: not a PEM certificate ({e})")))
        .ok();
    let Some(cert) = cert else { return Err(problems) };
    let principal = principal_from_der(&cert).map_err(|e| problems.push(format!("tls.cert: {e}"))).ok();
    if let Some(p) = &principal
        && p.role != role
    {
        problems.push(format!("tls.cert: the certificate of {} has role {}, this needs role {role}", p.name, p.role));
    }
    if let Some(key) = key {
        match rustls::crypto::ring::sign::any_supported_type(&key) {
            Err(e) => problems.push(format!("tls.key: unusable key ({e})")),
            Ok(signing) => {
                let pair = rustls::sign::CertifiedKey::new(vec![cert.clone().into_owned()], signing);
                if let Err(e) = pair.keys_match() {
                    problems.push(format!("tls.key: the key is not the certificate's ({e})"));
                }
            }
        }
    }
    if let Some(ca) = ca
        && let Err(e) = verify_chain(&cert, ca.into_owned())
    {
        problems.push(format!("tls.cert: not valid with this CA now: {e}"));
    }
    let days_left = days_left(&cert).map_err(|e| problems.push(format!("tls.cert: {e}"))).ok();
    match (principal, days_left) {
        (Some(principal), Some(days_left)) if problems.is_empty() => Ok(IdentityCheck { principal, days_left }),
        _ => Err(problems),
    }
}

/// Why [`verify_chain`] found a certificate not valid with a CA now.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChainError {
    /// rustls cannot use the CA certificate as a root.
    #[error("the CA certificate is unusable ({0})")]
    Ca(rustls::Error),
    /// No client verifier could be built on the CA.
    #[error(transparent)]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The verifier refused the certificate.
    #[error(transparent)]
    Refused(rustls::Error),
}

/// Whether `cert` chains to `ca` and is valid now for client authentication.
pub(crate) fn verify_chain(
    cert: &rustls::pki_types::CertificateDer<'_>,
    ca: rustls::pki_types::CertificateDer<'static>,
) -> Result<(), ChainError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).map_err(ChainError::Ca)?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(std::sync::Arc::new(roots), provider).build()?;
    verifier.verify_client_cert(cert, &[], rustls::pki_types::UnixTime::now()).map(|_| ()).map_err(ChainError::Refused)
}

/// A certificate [`days_left`] cannot read.
#[derive(Debug, thiserror::Error)]
#[error("unreadable certificate: {0}")]
struct Unparsable(x509_parser::nom::Err<x509_parser::error::X509Error>);

/// Whole days from now until `cert` expires.
fn days_left(cert: &[u8]) -> Result<i64, Unparsable> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(Unparsable)?;
    let not_after = parsed.validity().not_after.timestamp();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    Ok((not_after - now).div_euclid(86_400))
}
