//! The worker's configuration: where the coordinator is, the site's TLS
//! identity, and the dataset registry with each dataset's schema and
//! privacy budget. Parsed once into [`WorkerConfig`]; every problem is
//! reported with the file and key that causes it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `worker.toml` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Coordinator URL, `https://host:port`.
    coordinator: String,
    /// Directory for the ledger database and the outbox of sent updates.
    data_dir: PathBuf,
    /// `cpu` (Burn's flex backend) or `gpu` (needs a build with the `wgpu` feature).
    #[serde(default = "default_device")]
    device: String,
    /// Most threads one training step computes gradients on (CPU only);
    /// unset: one per core the process may run on.
    cpu_threads: Option<usize>,
    tls: RawTls,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    datasets: Vec<RawDataset>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    /// Most megabytes per second the worker's uploads may use; unset is unlimited.
    upload_limit_mb_per_sec: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    /// Model kinds a job may use; empty allows all.
    #[serde(default)]
    allowed_models: Vec<String>,
    /// `auto`: accept every offer within policy and budget; `manual`: also
    /// wait for `meridian site approve`.
    #[serde(default = "default_approval")]
    approval: String,
    /// Fewest released training rows a dataset needs to take part in a job.
    #[serde(default = "default_min_training_rows")]
    min_training_rows: u64,
    /// Fewest released test rows a dataset needs to take part in a job.
    #[serde(default = "default_min_test_rows")]
    min_test_rows: u64,
    /// Also send exact metrics beside the noised ones: unprotected
    /// statistics of the site's records, so never the default.
    #[serde(default)]
    release_exact_metrics: bool,
    /// The stewards (certificate names) whose decisions on data-use
    /// applications this site honours; empty: none.
    #[serde(default)]
    stewards: Vec<String>,
}

fn default_approval() -> String {
    "auto".to_string()
}

/// Below this, DP-SGD on a site's rows is noise (and the update says little).
pub const DEFAULT_MIN_TRAINING_ROWS: u64 = 50;
/// Below this, a noised evaluation histogram of a site's test split is noise.
pub const DEFAULT_MIN_TEST_ROWS: u64 = 20;
/// The lowest floor a policy may set: DataSHIELD's disclosure threshold.
pub const LOWEST_MIN_ROWS: u64 = 3;

fn default_min_training_rows() -> u64 {
    DEFAULT_MIN_TRAINING_ROWS
}
fn default_min_test_rows() -> u64 {
    DEFAULT_MIN_TEST_ROWS
}
fn default_size_noise_scale() -> f64 {
    10.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    name: String,
    path: PathBuf,
    label: String,
    #[serde(default)]
    numeric: Vec<String>,
    #[serde(default)]
    categorical: Vec<String>,
    budget_epsilon: f64,
    #[serde(default = "default_delta")]
    budget_delta: f64,
    job_epsilon_cap: f64,
    #[serde(default = "default_test_fraction")]
    test_fraction: f64,
    #[serde(default)]
    split_seed: u64,
    #[serde(default = "default_size_noise_scale")]
    size_noise_scale: f64,
}

impl Default for RawPolicy {
    fn default() -> Self {
        RawPolicy {
            allowed_models: Vec::new(),
            approval: default_approval(),
            min_training_rows: default_min_training_rows(),
            min_test_rows: default_min_test_rows(),
            release_exact_metrics: false,
            stewards: Vec::new(),
        }
    }
}

fn default_device() -> String {
    "cpu".to_string()
}
fn default_delta() -> f64 {
    1e-5
}
fn default_test_fraction() -> f64 {
    0.2
}

/// Where training runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainingDevice {
    /// Burn's `flex` CPU backend.
    Cpu,
    /// The first discrete GPU through `wgpu`.
    Gpu,
}

/// One dataset the site serves, with its schema and budget.
#[derive(Clone, Debug)]
pub struct DatasetConfig {
    /// Name jobs refer to.
    pub name: String,
    /// CSV or gzip-compressed CSV file.
    pub path: PathBuf,
    /// Label column.
    pub label: String,
    /// Columns that hold numbers.
    pub numeric: Vec<String>,
    /// Columns that hold categories.
    pub categorical: Vec<String>,
    /// Total ε this dataset may ever spend, at `budget_delta`.
    pub budget_epsilon: f64,
    /// δ of the budget.
    pub budget_delta: f64,
    /// Most ε one job may spend.
    pub job_epsilon_cap: f64,
    /// Share of rows held out for evaluation.
    pub test_fraction: f64,
    /// Key of the hash that assigns each record to the train or test split.
    pub split_seed: u64,
    /// Standard deviation of the discrete Gaussian noise on the dataset's
    /// released training and test sizes.
    pub size_noise_scale: f64,
}

/// A validated worker configuration; relative paths resolve against the file's directory.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Coordinator URL.
    pub coordinator: String,
    /// State directory.
    pub data_dir: PathBuf,
    /// Training device.
    pub device: TrainingDevice,
    /// Most threads a training step computes gradients on (`cpu_threads`);
    /// `None`: one per core the process may run on.
    pub cpu_threads: Option<std::num::NonZeroUsize>,
    /// Cap on the upload rate, in bytes per second (`network.upload_limit_mb_per_sec`).
    pub upload_limit_bytes_per_sec: Option<f64>,
    /// CA certificate.
    pub tls_ca: PathBuf,
    /// Site certificate.
    pub tls_cert: PathBuf,
    /// Site key.
    pub tls_key: PathBuf,
    /// Model kinds jobs may use (empty: all).
    pub allowed_models: Vec<String>,
    /// Whether offers also need a person's approval.
    pub manual_approval: bool,
    /// Fewest released training rows a dataset needs (`policy.min_training_rows`).
    pub min_training_rows: u64,
    /// Fewest released test rows a dataset needs (`policy.min_test_rows`).
    pub min_test_rows: u64,
    /// Whether exact metrics go with the noised ones (`policy.release_exact_metrics`).
    pub release_exact_metrics: bool,
    /// The stewards whose decisions on applications the site honours (`policy.stewards`).
    pub stewards: Vec<String>,
    /// Datasets served.
    pub datasets: Vec<DatasetConfig>,
}

pub use meridian_spec::config_file::ConfigError;

impl WorkerConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<WorkerConfig, ConfigError> {
        let text = meridian_spec::config_file::read(path)?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` names it and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<WorkerConfig, ConfigError> {
        let raw: RawConfig = meridian_spec::config_file::parse(text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut problems = Vec::new();
        if !raw.coordinator.starts_with("https://") {
            problems.push(format!(
                "coordinator: \"{}\" must be an https:// URL (Meridian has no plaintext mode)",
                raw.coordinator
            ));
        }
        let device = training_device(&raw.device, &mut problems);
        let cpu_threads = cpu_threads(raw.cpu_threads, &mut problems);
        if let Some(limit) = raw.network.upload_limit_mb_per_sec
            && !(limit.is_finite() && limit >= 0.001)
        {
            problems.push(format!("network.upload_limit_mb_per_sec: must be finite and >= 0.001, got {limit}"));
        }
        let manual_approval = check_policy(&raw.policy, &mut problems);
        check_stewards(&raw.policy.stewards, &mut problems);
        let datasets = datasets(raw.datasets, base, &mut problems);
        let config = WorkerConfig {
            coordinator: raw.coordinator,
            data_dir: resolve(base, &raw.data_dir),
            device,
            cpu_threads,
            upload_limit_bytes_per_sec: raw.network.upload_limit_mb_per_sec.map(|mb| mb * 1e6),
            tls_ca: resolve(base, &raw.tls.ca),
            tls_cert: resolve(base, &raw.tls.cert),
            tls_key: resolve(base, &raw.tls.key),
            allowed_models: raw.policy.allowed_models,
            manual_approval,
            min_training_rows: raw.policy.min_training_rows,
            min_test_rows: raw.policy.min_test_rows,
            release_exact_metrics: raw.policy.release_exact_metrics,
            stewards: raw.policy.stewards,
            datasets,
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

/// `p`, or `base` joined with it when it is relative.
fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

/// The `device` key as a [`TrainingDevice`]; a problem for an unknown one,
/// or for `gpu` in a build without it.
fn training_device(device: &str, problems: &mut Vec<String>) -> TrainingDevice {
    match device {
        "cpu" => TrainingDevice::Cpu,
        "gpu" => {
            if !cfg!(feature = "wgpu") {
                problems.push("device: \"gpu\" needs a meridian built with --features wgpu".to_string());
            }
            TrainingDevice::Gpu
        }
        other => {
            problems.push(format!("device: \"{other}\" is not cpu or gpu"));
            TrainingDevice::Cpu
        }
    }
}

/// The `cpu_threads` key; a problem for 0.
fn cpu_threads(threads: Option<usize>, problems: &mut Vec<String>) -> Option<std::num::NonZeroUsize> {
    let n = threads?;
    let threads = std::num::NonZeroUsize::new(n);
    if threads.is_none() {
        problems.push("cpu_threads: must be at least 1, got 0 (leave it out for one per core)".to_string());
    }
    threads
}

/// Checks `policy.stewards`: certificate names, each once.
fn check_stewards(stewards: &[String], problems: &mut Vec<String>) {
    let mut seen = std::collections::BTreeSet::new();
    for name in stewards {
        if let Err(e) = meridian_wire::identity::validate_name(name) {
            problems.push(format!("policy.stewards: {e}"));
        } else if !seen.insert(name) {
            problems.push(format!("policy.stewards: \"{name}\" is named twice"));
        }
    }
}

/// Checks the `[policy]` table; whether offers need a person's approval.
fn check_policy(policy: &RawPolicy, problems: &mut Vec<String>) -> bool {
    let manual_approval = match policy.approval.as_str() {
        "auto" => false,
        "manual" => true,
        other => {
            problems.push(format!("policy.approval: \"{other}\" is not auto or manual"));
            false
        }
    };
    for (key, value) in
        [("policy.min_training_rows", policy.min_training_rows), ("policy.min_test_rows", policy.min_test_rows)]
    {
        if value < LOWEST_MIN_ROWS {
            problems.push(format!(
                "{key}: must be at least {LOWEST_MIN_ROWS} (DataSHIELD's disclosure floor), got {value}"
            ));
        }
    }
    for (i, m) in policy.allowed_models.iter().enumerate() {
        if !["logistic_regression", "mlp", "cnn"].contains(&m.as_str()) {
            problems.push(format!("policy.allowed_models[{i}]: unknown model \"{m}\""));
        }
    }
    manual_approval
}

/// The `[[datasets]]` tables, paths resolved against `base`, each checked.
fn datasets(raw: Vec<RawDataset>, base: &Path, problems: &mut Vec<String>) -> Vec<DatasetConfig> {
    let mut datasets: Vec<DatasetConfig> = Vec::new();
    for (i, d) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("datasets[{i}].{field}");
        if let Err(e) = meridian_wire::identity::validate_name(&d.name) {
            problems.push(format!("{}: {e}", key("name")));
        }
        if datasets.iter().any(|other| other.name == d.name) {
            problems.push(format!("{}: dataset \"{}\" is defined twice", key("name"), d.name));
        }
        let file = resolve(base, &d.path);
        if !file.is_file() {
            problems.push(format!("{}: {} does not exist", key("path"), file.display()));
        }
        check_dataset_numbers(&d, &key, problems);
        datasets.push(DatasetConfig {
            name: d.name,
            path: file,
            label: d.label,
            numeric: d.numeric,
            categorical: d.categorical,
            budget_epsilon: d.budget_epsilon,
            budget_delta: d.budget_delta,
            job_epsilon_cap: d.job_epsilon_cap,
            test_fraction: d.test_fraction,
            split_seed: d.split_seed,
            size_noise_scale: d.size_noise_scale,
        });
    }
    datasets
}

/// Checks a dataset's budget, cap, split and size noise; `key` names a field.
fn check_dataset_numbers(d: &RawDataset, key: &dyn Fn(&str) -> String, problems: &mut Vec<String>) {
    if !(d.budget_epsilon.is_finite() && d.budget_epsilon > 0.0) {
        problems.push(format!("{}: must be finite and > 0, got {}", key("budget_epsilon"), d.budget_epsilon));
    }
    if !(d.budget_delta > 0.0 && d.budget_delta < 1e-2) {
        problems.push(format!("{}: must be in (0, 0.01), got {}", key("budget_delta"), d.budget_delta));
    }
    if !(d.job_epsilon_cap.is_finite() && d.job_epsilon_cap > 0.0) {
        problems.push(format!("{}: must be finite and > 0, got {}", key("job_epsilon_cap"), d.job_epsilon_cap));
    }
    if !(d.test_fraction > 0.0 && d.test_fraction < 1.0) {
        problems.push(format!("{}: must be in (0, 1), got {}", key("test_fraction"), d.test_fraction));
    }
    if !(d.size_noise_scale.is_finite() && d.size_noise_scale >= 1.0) {
        problems.push(format!("{}: must be finite and >= 1, got {}", key("size_noise_scale"), d.size_noise_scale));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn honoured_stewards_are_certificate_names_each_named_once() {
        let text = "coordinator = \"https://127.0.0.1:1\"\ndata_dir = \"state\"\n\
                    [tls]\nca = \"ca.pem\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
                    [policy]\nstewards = [\"sam\", \"a b\", \"sam\"]\n";
        let err = WorkerConfig::parse(text, Path::new("/nonexistent/worker.toml")).unwrap_err().to_string();
        assert!(err.contains("policy.stewards: name \"a b\" contains ' '"), "{err}");
        assert!(err.contains("policy.stewards: \"sam\" is named twice"), "{err}");
        let example = include_str!("../../examples/config/worker.toml");
        let raw: RawConfig = meridian_spec::config_file::parse(example, Path::new("worker.toml")).unwrap();
        assert!(raw.policy.stewards.is_empty());
    }
}
