//! The job spec: what a data scientist asks the federation to train.
//!
//! A job is written in TOML, parsed into loosely typed raw structs, then
//! converted once into [`JobSpec`], collecting every problem with the field
//! that causes it (`training.rounds: must be at least 1, got 0`). The
//! coordinator re-validates every submission with this same code; sites
//! receive the canonical JSON of the validated spec and bind their approval
//! and ledger entries to its SHA-256 ([`JobSpec::hash`]).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A validated job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// A human-readable name.
    pub name: String,
    /// The dataset name every participating site must hold.
    pub dataset: String,
    /// Which network to train.
    pub model: ModelSpec,
    /// How rows become model inputs; identical at every site.
    pub features: FeatureSpec,
    /// Optimisation settings.
    pub training: TrainingSpec,
    /// DP-SGD settings, enforced at each site.
    pub privacy: PrivacySpec,
    /// When a round may close and what happens when sites are missing.
    pub policy: RoundPolicy,
}

/// The network to train, chosen by name (`model.kind`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelSpec {
    /// Linear layer to two logits: logistic regression with a softmax head.
    LogisticRegression,
    /// Fully connected ReLU network with the given hidden sizes.
    Mlp {
        /// Width of each hidden layer.
        hidden: Vec<usize>,
    },
    /// Small CNN for single-channel square images: conv5(16) → pool → conv5(32)
    /// → pool → fc(128) → 2 logits.
    Cnn {
        /// Image side in pixels; the features are its pixels, row-major.
        image_side: usize,
    },
}

impl ModelSpec {
    /// The name used in `model.kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            ModelSpec::LogisticRegression => "logistic_regression",
            ModelSpec::Mlp { .. } => "mlp",
            ModelSpec::Cnn { .. } => "cnn",
        }
    }
}

/// How a site turns rows of its CSV into model inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeatureSpec {
    /// The label column.
    pub label: String,
    /// The label value that means class 1.
    pub positive_label: String,
    /// The label values that mean class 0; any other value is a row error.
    pub negative_labels: Vec<String>,
    /// Numeric columns, standardised with statistics fitted locally.
    pub numeric: Vec<String>,
    /// Categorical columns, one-hot encoded with fixed levels.
    pub categorical: Vec<CategoricalFeature>,
}

/// A categorical column and its levels, in encoding order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CategoricalFeature {
    /// The column name.
    pub column: String,
    /// Every value the column may take.
    pub levels: Vec<String>,
}

impl FeatureSpec {
    /// Width of an encoded row.
    pub fn input_dim(&self) -> usize {
        self.numeric.len() + self.categorical.iter().map(|c| c.levels.len()).sum::<usize>()
    }

    /// Names of the encoded inputs: `BMI`, `Sex=Female`, ...
    pub fn encoded_names(&self) -> Vec<String> {
        let mut names = self.numeric.clone();
        for c in &self.categorical {
            names.extend(c.levels.iter().map(|l| format!("{}={l}", c.column)));
        }
        names
    }

    /// Every column the spec reads, label first.
    pub fn columns(&self) -> Vec<&str> {
        let mut cols = vec![self.label.as_str()];
        cols.extend(self.numeric.iter().map(String::as_str));
        cols.extend(self.categorical.iter().map(|c| c.column.as_str()));
        cols
    }

    /// Checks the spec on its own, collecting every problem with its field.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.label.trim().is_empty() {
            problems.push("features.label: must name a column".to_string());
        }
        if self.positive_label.is_empty() {
            problems.push("features.positive_label: must not be empty".to_string());
        }
        if self.negative_labels.is_empty() {
            problems.push("features.negative_labels: must list at least one value".to_string());
        }
        if self.negative_labels.contains(&self.positive_label) {
            problems.push(format!(
                "features.negative_labels: contains the positive label \"{}\"",
                self.positive_label
            ));
        }
        if self.numeric.is_empty() && self.categorical.is_empty() {
            problems.push("features: no numeric or categorical columns".to_string());
        }
        let mut seen = std::collections::HashSet::new();
        seen.insert(self.label.as_str());
        for (i, col) in self.numeric.iter().enumerate() {
            if !seen.insert(col.as_str()) {
                problems.push(format!(
                    "features.numeric[{i}]: column \"{col}\" is used twice or is the label"
                ));
            }
        }
        for (i, cat) in self.categorical.iter().enumerate() {
            if !seen.insert(cat.column.as_str()) {
                problems.push(format!(
                    "features.categorical[{i}].column: column \"{}\" is used twice or is the label",
                    cat.column
                ));
            }
            if cat.levels.is_empty() {
                problems.push(format!(
                    "features.categorical[{i}].levels: column \"{}\" needs at least one level",
                    cat.column
                ));
            }
            let mut levels = std::collections::HashSet::new();
            for level in &cat.levels {
                if !levels.insert(level.as_str()) {
                    problems.push(format!(
                        "features.categorical[{i}].levels: level \"{level}\" is listed twice"
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// Local optimisation settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingSpec {
    /// Federated rounds.
    pub rounds: u32,
    /// Passes over the local training set per round (in expectation, under
    /// Poisson sampling): steps per round = ceil(local_epochs · N / batch_size).
    pub local_epochs: f64,
    /// Expected batch size; each site's sample rate is batch_size / N.
    pub batch_size: usize,
    /// SGD learning rate.
    pub learning_rate: f64,
    /// Server learning rate applied to the averaged update.
    pub server_learning_rate: f64,
}

/// DP-SGD settings; every site enforces them and accounts for them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySpec {
    /// Gaussian noise standard deviation in units of the clip norm (σ).
    pub noise_multiplier: f64,
    /// Per-example gradient L2 clip norm (C).
    pub clip_norm: f64,
    /// The δ at which ε is reported and budgets are charged.
    pub delta: f64,
}

/// When a round closes and what happens when sites are missing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundPolicy {
    /// Fewest accepted sites and fewest updates a round needs.
    pub min_sites: u32,
    /// Seconds to wait for the updates of a round (and for offers to be answered).
    pub round_deadline_secs: u64,
    /// Times a round is tried before the job fails.
    pub max_round_attempts: u32,
}

impl JobSpec {
    /// Parses and validates TOML text; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<JobSpec, SpecError> {
        let raw: RawJobSpec = toml::from_str(text).map_err(|e| SpecError::from_toml(&e, text, origin))?;
        JobSpec::try_from(raw).map_err(|problems| SpecError::Invalid {
            origin: origin.to_string(),
            problems,
        })
    }

    /// The canonical JSON every party hashes and stores.
    pub fn canonical_json(&self) -> String {
        // Serializing plain structs of strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// SHA-256 of [`JobSpec::canonical_json`], hex.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_json().as_bytes()))
    }

    /// Parses the canonical JSON sent to sites.
    pub fn from_canonical_json(json: &str) -> Result<JobSpec, SpecError> {
        let spec: JobSpec = serde_json::from_str(json).map_err(|e| SpecError::Invalid {
            origin: "job offer".to_string(),
            problems: vec![e.to_string()],
        })?;
        spec.validate().map_err(|problems| SpecError::Invalid {
            origin: "job offer".to_string(),
            problems,
        })?;
        Ok(spec)
    }

    /// Checks every field, collecting all problems.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        if self.name.trim().is_empty() {
            p.push("name: must not be empty".to_string());
        }
        if self.dataset.trim().is_empty() {
            p.push("dataset: must name a dataset".to_string());
        }
        match &self.model {
            ModelSpec::LogisticRegression => {}
            ModelSpec::Mlp { hidden } => {
                if hidden.is_empty() {
                    p.push("model.hidden: an mlp needs at least one hidden layer".to_string());
                }
                for (i, h) in hidden.iter().enumerate() {
                    if *h == 0 || *h > 65_536 {
                        p.push(format!("model.hidden[{i}]: must be in 1..=65536, got {h}"));
                    }
                }
            }
            ModelSpec::Cnn { image_side } => {
                if !(16..=256).contains(image_side) {
                    p.push(format!("model.image_side: must be in 16..=256, got {image_side}"));
                } else if self.features.input_dim() != image_side * image_side {
                    p.push(format!(
                        "model.image_side: a {image_side}x{image_side} image needs {} input features, the features give {}",
                        image_side * image_side,
                        self.features.input_dim()
                    ));
                }
            }
        }
        if let Err(mut f) = self.features.validate() {
            p.append(&mut f);
        }
        let t = &self.training;
        if t.rounds == 0 || t.rounds > 10_000 {
            p.push(format!("training.rounds: must be in 1..=10000, got {}", t.rounds));
        }
        if !(t.local_epochs.is_finite() && t.local_epochs > 0.0 && t.local_epochs <= 1000.0) {
            p.push(format!("training.local_epochs: must be in (0, 1000], got {}", t.local_epochs));
        }
        if t.batch_size == 0 {
            p.push("training.batch_size: must be at least 1".to_string());
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            p.push(format!("training.learning_rate: must be finite and > 0, got {}", t.learning_rate));
        }
        if !(t.server_learning_rate.is_finite() && t.server_learning_rate > 0.0) {
            p.push(format!(
                "training.server_learning_rate: must be finite and > 0, got {}",
                t.server_learning_rate
            ));
        }
        let d = &self.privacy;
        if !(d.noise_multiplier.is_finite() && d.noise_multiplier > 0.0) {
            p.push(format!(
                "privacy.noise_multiplier: must be finite and > 0 (training without noise is not private), got {}",
                d.noise_multiplier
            ));
        }
        if !(d.clip_norm.is_finite() && d.clip_norm > 0.0) {
            p.push(format!("privacy.clip_norm: must be finite and > 0, got {}", d.clip_norm));
        }
        if !(d.delta.is_finite() && d.delta > 0.0 && d.delta < 1e-2) {
            p.push(format!("privacy.delta: must be in (0, 0.01), got {}", d.delta));
        }
        let r = &self.policy;
        if r.min_sites == 0 {
            p.push("policy.min_sites: must be at least 1".to_string());
        }
        if r.round_deadline_secs == 0 || r.round_deadline_secs > 7 * 24 * 3600 {
            p.push(format!(
                "policy.round_deadline_secs: must be in 1..=604800, got {}",
                r.round_deadline_secs
            ));
        }
        if r.max_round_attempts == 0 {
            p.push("policy.max_round_attempts: must be at least 1".to_string());
        }
        if p.is_empty() { Ok(()) } else { Err(p) }
    }
}

/// Why a job spec was refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The text is not well-formed TOML or a value has the wrong type.
    #[error("{origin}:{line}:{column}: {message}")]
    Syntax {
        /// The file or source the text came from.
        origin: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, naming the key where it can be found.
        message: String,
    },
    /// Well-formed, but some fields are invalid.
    #[error("{origin}: {}", problems.join("; "))]
    Invalid {
        /// The file or source the text came from.
        origin: String,
        /// Every problem, each naming its field.
        problems: Vec<String>,
    },
}

impl SpecError {
    fn from_toml(err: &toml::de::Error, text: &str, origin: &str) -> SpecError {
        let (line, column) = err
            .span()
            .map(|span| line_column(text, span.start))
            .unwrap_or((1, 1));
        let message = err.message().lines().next().unwrap_or("invalid TOML").to_string();
        let key = key_at(text, line);
        let message = match key {
            Some(key) if !message.contains(&key) => format!("{key}: {message}"),
            _ => message,
        };
        SpecError::Syntax {
            origin: origin.to_string(),
            line,
            column,
            message,
        }
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The dotted key defined on `line` (1-based), prefixed by the table it is in.
fn key_at(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let here = lines.get(line.checked_sub(1)?)?.trim();
    let key = here.split_once('=').map(|(k, _)| k.trim().trim_matches('"').to_string());
    let table = lines[..line - 1].iter().rev().find_map(|l| {
        let l = l.trim();
        l.strip_prefix("[[")
            .and_then(|r| r.strip_suffix("]]"))
            .or_else(|| l.strip_prefix('[').and_then(|r| r.strip_suffix(']')))
            .map(|t| t.trim().to_string())
    });
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k),
        (Some(t), None) if here.starts_with('[') => Some(t),
        _ => None,
    }
}

// ---- raw TOML shape ---------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJobSpec {
    name: String,
    dataset: String,
    model: RawModel,
    features: FeatureSpecRaw,
    training: RawTraining,
    privacy: PrivacySpec,
    #[serde(default)]
    policy: RawPolicy,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    kind: String,
    #[serde(default)]
    hidden: Option<Vec<usize>>,
    #[serde(default)]
    image_side: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeatureSpecRaw {
    label: String,
    positive_label: String,
    negative_labels: Vec<String>,
    #[serde(default)]
    numeric: Vec<String>,
    #[serde(default)]
    categorical: Vec<RawCategorical>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCategorical {
    column: String,
    levels: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTraining {
    rounds: u32,
    #[serde(default = "default_local_epochs")]
    local_epochs: f64,
    batch_size: usize,
    learning_rate: f64,
    #[serde(default = "default_server_lr")]
    server_learning_rate: f64,
}

fn default_local_epochs() -> f64 {
    1.0
}

fn default_server_lr() -> f64 {
    1.0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default = "default_min_sites")]
    min_sites: u32,
    #[serde(default = "default_deadline")]
    round_deadline_secs: u64,
    #[serde(default = "default_attempts")]
    max_round_attempts: u32,
}

impl Default for RawPolicy {
    fn default() -> Self {
        RawPolicy {
            min_sites: default_min_sites(),
            round_deadline_secs: default_deadline(),
            max_round_attempts: default_attempts(),
        }
    }
}

fn default_min_sites() -> u32 {
    1
}
fn default_deadline() -> u64 {
    600
}
fn default_attempts() -> u32 {
    3
}

impl TryFrom<RawJobSpec> for JobSpec {
    type Error = Vec<String>;

    fn try_from(raw: RawJobSpec) -> Result<Self, Self::Error> {
        let mut problems = Vec::new();
        let m = raw.model;
        let model = match m.kind.as_str() {
            "logistic_regression" => {
                if m.hidden.is_some() {
                    problems.push("model.hidden: only an mlp has hidden layers".to_string());
                }
                ModelSpec::LogisticRegression
            }
            "mlp" => ModelSpec::Mlp {
                hidden: m.hidden.unwrap_or_else(|| {
                    problems.push("model.hidden: an mlp needs hidden = [sizes]".to_string());
                    Vec::new()
                }),
            },
            "cnn" => ModelSpec::Cnn {
                image_side: m.image_side.unwrap_or_else(|| {
                    problems.push("model.image_side: a cnn needs image_side = pixels".to_string());
                    0
                }),
            },
            other => {
                problems.push(format!(
                    "model.kind: unknown model \"{other}\" (expected logistic_regression, mlp or cnn)"
                ));
                ModelSpec::LogisticRegression
            }
        };
        if m.image_side.is_some() && !matches!(model, ModelSpec::Cnn { .. }) {
            problems.push("model.image_side: only a cnn takes an image side".to_string());
        }
        let spec = JobSpec {
            name: raw.name,
            dataset: raw.dataset,
            model,
            features: FeatureSpec {
                label: raw.features.label,
                positive_label: raw.features.positive_label,
                negative_labels: raw.features.negative_labels,
                numeric: raw.features.numeric,
                categorical: raw
                    .features
                    .categorical
                    .into_iter()
                    .map(|c| CategoricalFeature {
                        column: c.column,
                        levels: c.levels,
                    })
                    .collect(),
            },
            training: TrainingSpec {
                rounds: raw.training.rounds,
                local_epochs: raw.training.local_epochs,
                batch_size: raw.training.batch_size,
                learning_rate: raw.training.learning_rate,
                server_learning_rate: raw.training.server_learning_rate,
            },
            privacy: raw.privacy,
            policy: RoundPolicy {
                min_sites: raw.policy.min_sites,
                round_deadline_secs: raw.policy.round_deadline_secs,
                max_round_attempts: raw.policy.max_round_attempts,
            },
        };
        if let Err(mut more) = spec.validate() {
            problems.append(&mut more);
        }
        if problems.is_empty() { Ok(spec) } else { Err(problems) }
    }
}

#[cfg(test)]
mod tests;
