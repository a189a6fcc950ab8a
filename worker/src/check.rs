//! `meridian worker --check`: everything that can be checked before the
//! daemon runs, each problem reported, none stopping the others: every row
//! of every dataset against the columns its configuration declares (bad
//! cells counted per column, shown here only), the TLS identity (the key is
//! the certificate's, the certificate chains to the CA, names a hospital and
//! is not about to expire), the budgets, and the state directory. With
//! `--connect` it also opens a mutual-TLS connection to the coordinator,
//! says who the coordinator's certificate names, and asks it to accept the
//! site's own.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use meridian_wire::identity::{IdentityFiles, Role};

use crate::config::{DatasetConfig, WorkerConfig};
use crate::dataset::{self, ColumnKind};

/// Days of validity under which a certificate is worth a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// What a check found.
#[derive(Debug, Default)]
pub struct Report {
    /// What was found to be fine, for the record.
    pub notes: Vec<String>,
    /// What will bite soon.
    pub warnings: Vec<String>,
    /// What stops the daemon from working.
    pub problems: Vec<String>,
}

impl Report {
    /// The report as the command prints it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for n in &self.notes {
            let _ = writeln!(out, "ok       {n}");
        }
        for w in &self.warnings {
            let _ = writeln!(out, "warning  {w}");
        }
        for p in &self.problems {
            let _ = writeln!(out, "problem  {p}");
        }
        let _ = writeln!(
            out,
            "{}",
            if self.problems.is_empty() {
                "configuration ok".to_string()
            } else {
                format!("{} problem(s)", self.problems.len())
            }
        );
        out
    }
}

/// Checks `config` offline.
pub fn check(config: &WorkerConfig) -> Report {
    let mut report = Report::default();
    identity(config, &mut report);
    state_dir(config, &mut report);
    for d in &config.datasets {
        budgets(d, &mut report);
        rows(d, &mut report);
    }
    report
}

fn identity(config: &WorkerConfig, report: &mut Report) {
    let files = match IdentityFiles::from_paths(&config.tls_ca, &config.tls_cert, &config.tls_key) {
        Ok(files) => files,
        Err(e) => return report.problems.push(e.to_string()),
    };
    match meridian_wire::identity::check_identity(&files, Role::Hospital) {
        Err(problems) => report.problems.extend(problems),
        Ok(id) => {
            report.notes.push(format!(
                "tls: {} (role hospital), key matches, signed by the CA in {}, {} days left",
                id.principal.name,
                config.tls_ca.display(),
                id.days_left
            ));
            if id.days_left < EXPIRY_WARNING_DAYS {
                report.warnings.push(format!(
                    "tls.cert: {} expires in {} days; renew it with `meridian provision renew {}`",
                    config.tls_cert.display(),
                    id.days_left,
                    id.principal.name
                ));
            }
        }
    }
}

fn state_dir(config: &WorkerConfig, report: &mut Report) {
    let dir = &config.data_dir;
    let probe = dir.join(".meridian-check");
    let written = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&probe, b"ok"));
    let _ = std::fs::remove_file(&probe);
    match written {
        Ok(()) => report.notes.push(format!("data_dir: {} is writable", dir.display())),
        Err(e) => report.problems.push(format!("data_dir: cannot write in {}: {e}", dir.display())),
    }
}

fn budgets(d: &DatasetConfig, report: &mut Report) {
    if d.job_epsilon_cap > d.budget_epsilon {
        report.problems.push(format!(
            "datasets \"{}\": job_epsilon_cap {} is more than budget_epsilon {}: no job could spend its cap",
            d.name, d.job_epsilon_cap, d.budget_epsilon
        ));
    }
}

fn rows(d: &DatasetConfig, report: &mut Report) {
    let survey = match dataset::survey(&d.path, &d.label, &d.numeric, &d.categorical) {
        Ok(s) => s,
        Err(e) => return report.problems.push(format!("datasets \"{}\": {e}", d.name)),
    };
    let name = &d.name;
    for column in &survey.missing {
        report.problems.push(format!("datasets \"{name}\": column \"{column}\" is not in {}", d.path.display()));
    }
    if survey.bad_width > 0 {
        report.problems.push(format!(
            "datasets \"{name}\": {} of {} rows have another number of fields than the header",
            survey.bad_width, survey.rows
        ));
    }
    for c in &survey.columns {
        if c.empty > 0 {
            report.problems.push(format!(
                "datasets \"{name}\": column \"{}\" ({}): {} of {} cells are empty (a job reading it is refused with missing_values)",
                c.name, c.kind, c.empty, survey.rows
            ));
        }
        if c.not_numeric > 0 {
            report.problems.push(format!(
                "datasets \"{name}\": column \"{}\" (numeric): {} of {} cells are not finite numbers",
                c.name, c.not_numeric, survey.rows
            ));
        }
        if c.kind == ColumnKind::Label {
            let values: Vec<String> = c.values.iter().map(|(v, n)| format!("{v:?} {n}")).collect();
            report.notes.push(format!("datasets \"{name}\": label \"{}\" takes {}", c.name, values.join(", ")));
        }
    }
    let split = dataset::SplitOptions { test_fraction: d.test_fraction, seed: d.split_seed };
    if let Ok(sizes) = dataset::count_split(&d.path, &split) {
        report.notes.push(format!(
            "datasets \"{name}\": {} rows in {}, {} for training and {} held out (exact: shown here only)",
            survey.rows,
            d.path.display(),
            sizes.train,
            sizes.test
        ));
    }
}

/// Opens a mutual-TLS connection to the coordinator, reports who its
/// certificate names, and asks the coordinator to accept the site's
/// certificate (a heartbeat).
pub async fn connect(config: &WorkerConfig, report: &mut Report) {
    match handshake(config).await {
        Ok(name) => report.notes.push(format!("coordinator: {} presents {name}", config.coordinator)),
        Err(e) => return report.problems.push(format!("coordinator: {}: {e}", config.coordinator)),
    }
    match heartbeat(config).await {
        Ok(()) => report.notes.push("coordinator: accepts this site's certificate".to_string()),
        Err(e) => report.problems.push(format!("coordinator: refuses this site: {e}")),
    }
}

/// Why `--connect` could not reach the coordinator or was refused by it.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The site's TLS files are unreadable.
    #[error(transparent)]
    Identity(#[from] meridian_wire::identity::IdentityError),
    /// A PEM file holds no certificate or key.
    #[error(transparent)]
    Pem(#[from] rustls::pki_types::pem::Error),
    /// rustls refused the CA, the certificate or the key.
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    /// The coordinator's name for TLS is not a valid server name.
    #[error(transparent)]
    ServerName(#[from] rustls::pki_types::InvalidDnsNameError),
    /// No TCP connection within the timeout.
    #[error("no connection within 5 s")]
    ConnectTimeout,
    /// The TCP connection failed.
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    /// No TLS handshake within the timeout.
    #[error("no TLS handshake within 5 s")]
    HandshakeTimeout,
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    /// The coordinator presented no certificate.
    #[error("the coordinator presented no certificate")]
    NoCertificate,
    /// The coordinator's certificate names no principal.
    #[error(transparent)]
    Certificate(meridian_wire::identity::CertificateError),
    /// The gRPC endpoint or its connection failed.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    /// The coordinator refused the call.
    #[error("{}", .0.message())]
    Refused(tonic::Status),
}

/// The mutual-TLS handshake alone; who the coordinator's certificate names.
async fn handshake(config: &WorkerConfig) -> Result<String, ConnectError> {
    use rustls::pki_types::{CertificateDer, ServerName};
    let files = IdentityFiles::from_paths(&config.tls_ca, &config.tls_cert, &config.tls_key)?;
    let tls = Arc::new(client_config(&files)?);
    let address = config.coordinator.trim_start_matches("https://").trim_end_matches('/');
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(address))
        .await
        .map_err(|_| ConnectError::ConnectTimeout)?
        .map_err(ConnectError::Connect)?;
    let name = ServerName::try_from(meridian_wire::identity::COORDINATOR_SERVER_NAME)?;
    let stream = tokio::time::timeout(Duration::from_secs(5), tokio_rustls::TlsConnector::from(tls).connect(name, tcp))
        .await
        .map_err(|_| ConnectError::HandshakeTimeout)?
        .map_err(ConnectError::Handshake)?;
    let (_, session) = stream.get_ref();
    let presented: &CertificateDer<'_> =
        session.peer_certificates().and_then(|c| c.first()).ok_or(ConnectError::NoCertificate)?;
    let principal = meridian_wire::identity::principal_from_der(presented).map_err(ConnectError::Certificate)?;
    Ok(format!("{} (role {}), signed by this site's CA", principal.name, principal.role))
}

/// A rustls client that trusts the site's CA and presents the site's certificate.
fn client_config(files: &IdentityFiles) -> Result<rustls::ClientConfig, ConnectError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(&files.ca_pem)?)?;
    let cert = CertificateDer::from_pem_slice(&files.cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(&files.key_pem)?;
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert], key)?)
}

/// A heartbeat over gRPC: whether the coordinator accepts the site's certificate.
async fn heartbeat(config: &WorkerConfig) -> Result<(), ConnectError> {
    let files = IdentityFiles::from_paths(&config.tls_ca, &config.tls_cert, &config.tls_key)?;
    let channel = tonic::transport::Endpoint::from_shared(config.coordinator.clone())?
        .tls_config(files.client_tls())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    meridian_wire::pb::worker_service_client::WorkerServiceClient::new(channel)
        .heartbeat(meridian_wire::pb::HeartbeatRequest {})
        .await
        .map(|_| ())
        .map_err(ConnectError::Refused)
}
