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

use crate::evaluation::ScoreBins;
use crate::mechanism::Mechanism;

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
    /// Client-level DP at the coordinator (DP-FedAvg), on top of each site's DP-SGD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_dp: Option<ClientDpSpec>,
    /// How the coordinator combines the sites' updates.
    #[serde(default, skip_serializing_if = "Aggregation::is_fedavg")]
    pub aggregation: Aggregation,
    /// How each site's held-out evaluation is released.
    pub evaluation: EvaluationSpec,
}

/// Each site's held-out evaluation of a global model leaves as one
/// histogram of the model's logits by label ([`crate::evaluation`]), each
/// cell noised with a discrete Gaussian and charged to the site's ledger.
/// A site evaluates the model it starts each round from and the final
/// model: `rounds` evaluations at `noise_scale`, one at
/// `final_noise_scale`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationSpec {
    /// Score bins, uniform in logit between `logit_min` and `logit_max`
    /// (the outer two open-ended).
    pub bins: usize,
    /// Lower edge of the first bin.
    pub logit_min: f64,
    /// Upper edge of the last bin.
    pub logit_max: f64,
    /// Standard deviation of each cell's noise, for the evaluations during training.
    pub noise_scale: f64,
    /// Standard deviation of each cell's noise for the final model's evaluation.
    pub final_noise_scale: f64,
}

impl Default for EvaluationSpec {
    fn default() -> Self {
        EvaluationSpec {
            bins: Self::DEFAULT_BINS,
            logit_min: -6.0,
            logit_max: 6.0,
            noise_scale: 20.0,
            final_noise_scale: 20.0,
        }
    }
}

impl EvaluationSpec {
    /// Bins of an evaluation whose spec does not say.
    pub const DEFAULT_BINS: usize = 24;

    /// The bins.
    pub fn score_bins(&self) -> ScoreBins {
        ScoreBins { bins: self.bins, logit_min: self.logit_min, logit_max: self.logit_max }
    }

    /// The noise scale of the evaluation of round `round`'s model in a job of `rounds` rounds.
    pub fn noise_for(&self, round: u32, rounds: u32) -> f64 {
        if round >= rounds { self.final_noise_scale } else { self.noise_scale }
    }
}

/// How updates are combined. FedAvg streams updates into a running sum
/// (memory O(d)); the robust rules need every update of the round at once
/// (memory O(n·d), refused above [`Aggregation::MAX_ROBUST_BYTES`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
pub enum Aggregation {
    /// Mean weighted by training examples.
    #[default]
    Fedavg,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise mean after dropping the `trim_fraction` largest and
    /// smallest values of each coordinate.
    TrimmedMean {
        /// Share trimmed at each end, in [0, 0.5).
        trim_fraction: f64,
    },
    /// Krum (Blanchard et al. 2017): the update closest to its n − f − 2
    /// nearest neighbours, tolerating `byzantine` bad sites.
    Krum {
        /// Bad sites to tolerate (f); needs n > 2f + 2.
        byzantine: usize,
    },
    /// Multi-Krum: the mean of the `select` best-scored updates.
    MultiKrum {
        /// Bad sites to tolerate (f).
        byzantine: usize,
        /// Updates averaged (m).
        select: usize,
    },
}

impl Aggregation {
    /// Most memory a robust rule may hold for one round's updates: 2 GiB.
    pub const MAX_ROBUST_BYTES: u64 = 2 << 30;

    /// Whether this is plain FedAvg.
    pub fn is_fedavg(&self) -> bool {
        matches!(self, Aggregation::Fedavg)
    }

    /// The rule's name in `aggregation.rule`.
    pub fn name(&self) -> &'static str {
        match self {
            Aggregation::Fedavg => "fedavg",
            Aggregation::Median => "median",
            Aggregation::TrimmedMean { .. } => "trimmed_mean",
            Aggregation::Krum { .. } => "krum",
            Aggregation::MultiKrum { .. } => "multi_krum",
        }
    }
}

/// Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): the
/// coordinator clips each site's update to L2 norm `clip`, adds
/// N(0, (noise_multiplier · clip)²) to their sum and averages with equal
/// weights, so one whole hospital's contribution is protected.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientDpSpec {
    /// L2 bound on each site's update (the initial bound when adaptive).
    pub clip: f64,
    /// Noise standard deviation on the sum, in units of the clip.
    pub noise_multiplier: f64,
    /// Adaptive clipping (Andrew et al. 2021); absent: a fixed clip.
    #[serde(default)]
    pub adaptive: Option<AdaptiveClipSpec>,
}

/// Geometric update of the clip towards a quantile of the update norms,
/// from a noised count of unclipped updates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveClipSpec {
    /// Target fraction of updates left unclipped (γ).
    pub target_quantile: f64,
    /// Step size of the geometric update (η_C).
    pub learning_rate: f64,
    /// Noise multiplier of the unclipped count (σ_b); the update's noise
    /// multiplier is raised so the pair costs what `noise_multiplier` alone would.
    pub count_noise_multiplier: f64,
}

impl ClientDpSpec {
    /// The noise multiplier applied to the sum of clipped updates. With
    /// adaptive clipping the count release takes part of the budget:
    /// z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (Andrew et al. 2021, Thm. 1).
    pub fn update_noise_multiplier(&self) -> f64 {
        match &self.adaptive {
            None => self.noise_multiplier,
            Some(a) => {
                let inner = self.noise_multiplier.powi(-2) - (2.0 * a.count_noise_multiplier).powi(-2);
                if inner > 0.0 { inner.powf(-0.5) } else { f64::INFINITY }
            }
        }
    }
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

/// How a job wants the data encoded.
///
/// Identical at every site, so every site produces the same input layout.
/// Field names in [`FeatureSpec::validate`]'s messages are prefixed with
/// `features.`, the key under which a job carries this spec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// Name of the label column.
    pub label: String,
    /// Value of the label column that means class 1.
    pub positive_label: String,
    /// Values of the label column that mean class 0 (e.g. `["No"]`).
    ///
    /// Any label value that is neither this nor `positive_label` fails the
    /// load: a typo must not silently become a negative example.
    pub negative_labels: Vec<String>,
    /// Numeric columns, standardised with the mean and (population)
    /// standard deviation of the local training split; a constant column
    /// gets standard deviation 1.
    pub numeric: Vec<String>,
    /// Categorical columns, one-hot encoded over their levels in order.
    pub categorical: Vec<CategoricalFeature>,
}

/// A categorical column and the values it may take.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoricalFeature {
    /// Name of the column.
    pub column: String,
    /// The values the column may take, one input each, in this order; any
    /// other value fails the load.
    pub levels: Vec<String>,
}

impl FeatureSpec {
    /// Number of model inputs: one per numeric column plus one per level of
    /// each categorical column.
    pub fn input_dim(&self) -> usize {
        self.numeric.len() + self.categorical.iter().map(|c| c.levels.len()).sum::<usize>()
    }

    /// Names of the model inputs in order: numeric columns as they are
    /// (`BMI`), then `column=level` for each categorical level (`Sex=Female`).
    pub fn encoded_names(&self) -> Vec<String> {
        let mut names = self.numeric.clone();
        for feature in &self.categorical {
            for level in &feature.levels {
                names.push(format!("{}={level}", feature.column));
            }
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

    /// Checks the spec on its own, without a file, collecting every problem.
    ///
    /// Each message names its field, e.g. `features.categorical[2].levels is
    /// empty`. Rejected: an empty label, positive or negative label value; no
    /// negative labels; the positive label listed as negative; repeated
    /// negative labels; empty, repeated or label column feature columns;
    /// categorical columns without levels or with repeated levels; names or
    /// values with surrounding whitespace (values are trimmed when read, so
    /// they could never match); and a spec with no feature at all.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();

        check_name(&mut problems, "features.label", &self.label);
        check_name(&mut problems, "features.positive_label", &self.positive_label);
        if self.negative_labels.is_empty() {
            problems.push("features.negative_labels is empty: list the label values meaning class 0".into());
        }
        for (i, value) in self.negative_labels.iter().enumerate() {
            let field = format!("features.negative_labels[{i}]");
            check_name(&mut problems, &field, value);
            if !value.is_empty() && *value == self.positive_label {
                problems.push(format!("{field} is {value:?}, the positive label"));
            } else if let Some(j) = self.negative_labels[..i].iter().position(|v| v == value) {
                problems.push(format!("{field} repeats {value:?} (already features.negative_labels[{j}])"));
            }
        }

        // Every feature column with the field that names it, to find repeats.
        let mut columns: Vec<(String, &str)> = Vec::new();
        let named_columns = self
            .numeric
            .iter()
            .enumerate()
            .map(|(i, column)| (format!("features.numeric[{i}]"), column.as_str()))
            .chain(
                self.categorical
                    .iter()
                    .enumerate()
                    .map(|(i, feature)| (format!("features.categorical[{i}].column"), feature.column.as_str())),
            );
        for (field, column) in named_columns {
            check_name(&mut problems, &field, column);
            if column.is_empty() {
                continue;
            }
            if column == self.label {
                problems.push(format!("{field} is {column:?}, the label column"));
            } else if let Some((first, _)) = columns.iter().find(|(_, c)| *c == column) {
                problems.push(format!("{field} repeats column {column:?} (already {first})"));
            }
            columns.push((field, column));
        }

        for (i, feature) in self.categorical.iter().enumerate() {
            if feature.levels.is_empty() {
                problems.push(format!("features.categorical[{i}].levels is empty"));
            }
            for (k, level) in feature.levels.iter().enumerate() {
                let field = format!("features.categorical[{i}].levels[{k}]");
                if level.trim() != level {
                    problems.push(format!(
                        "{field} {level:?} has surrounding whitespace, but values are trimmed when read"
                    ));
                }
                if let Some(j) = feature.levels[..k].iter().position(|l| l == level) {
                    problems.push(format!("{field} repeats {level:?} (already features.categorical[{i}].levels[{j}])"));
                }
            }
        }

        if self.numeric.is_empty() && self.categorical.is_empty() {
            problems.push("features.numeric and features.categorical are both empty".into());
        }

        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }
}

/// Adds a problem to `problems` if `value`, the content of `field`, is empty
/// or has surrounding whitespace.
fn check_name(problems: &mut Vec<String>, field: &str, value: &str) {
    if value.is_empty() {
        problems.push(format!("{field} is empty"));
    } else if value.trim() != value {
        problems.push(format!("{field} {value:?} has surrounding whitespace, but values are trimmed when read"));
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
    /// Standard deviation of the noise on each DP-SGD step's count of
    /// clipped examples, which a site sums over a round and releases (the
    /// clipped fraction the scientist tunes C with); 0: not released. The
    /// step is then charged at [`PrivacySpec::charged_noise_multiplier`].
    #[serde(default = "default_clip_count_noise")]
    pub clip_count_noise: f64,
}

fn default_clip_count_noise() -> f64 {
    10.0
}

impl PrivacySpec {
    /// The noise multiplier each DP-SGD step is charged at. A step's
    /// clipped count is released from the same Poisson sample as its noised
    /// gradient sum, so the two are one Gaussian mechanism on the vector
    /// (sum / C, count), sensitivity (1, 1) for one record, with noise
    /// (σ, σ_b): a Gaussian of noise multiplier
    /// σ_eff = (σ⁻² + σ_b⁻²)^(−1/2). Charging the two apart would charge
    /// less than the mechanism run; without a clip count it is σ.
    pub fn charged_noise_multiplier(&self) -> f64 {
        if self.clip_count_noise > 0.0 {
            (self.noise_multiplier.powi(-2) + self.clip_count_noise.powi(-2)).powf(-0.5)
        } else {
            self.noise_multiplier
        }
    }
}

/// One mechanism a job runs at a site, as the site's ledger will charge
/// it over the whole job.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlannedCharge {
    /// What is released.
    pub mechanism: Mechanism,
    /// Poisson sampling rate (1 for a release over the whole split).
    pub sample_rate: f64,
    /// Noise standard deviation in units of the sensitivity.
    pub noise_multiplier: f64,
    /// Compositions over the whole job.
    pub steps: u64,
}

/// What a job asks of one site: everything follows from the spec and the
/// site's *released* training-set size, never from its exact row count,
/// so that the sampling rate, the steps and the ε a site will be charged
/// leave the site as post-processing of a DP release, and the coordinator
/// can compute the same plan before the job is submitted.
#[derive(Clone, Debug, PartialEq)]
pub struct SitePlan {
    /// The site's released training-set size the plan is for.
    pub train_rows: u64,
    /// q = min(1, batch_size / train_rows).
    pub sample_rate: f64,
    /// ceil(local_epochs / q) DP-SGD steps per round.
    pub steps_per_round: u64,
    /// The expected batch size q · train_rows, which each step's noised
    /// gradient sum is divided by (the batch size itself, unless q is 1).
    pub expected_batch: f64,
    /// Every charge of the whole job.
    pub charges: Vec<PlannedCharge>,
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
    /// Largest L2 norm of a site's update the coordinator accepts; a larger
    /// one (a scaled or poisoned update) is rejected. Absent: no bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_update_norm: Option<f64>,
}

/// What `charges` have still to charge once `charged` steps of each
/// mechanism are charged: each planned charge less the steps charged, in
/// plan order (a mechanism planned twice, as evaluations are, consumes the
/// first before the second).
pub fn remaining(
    charges: &[PlannedCharge],
    charged: &std::collections::BTreeMap<Mechanism, u64>,
) -> Vec<PlannedCharge> {
    let mut used = charged.clone();
    charges
        .iter()
        .map(|c| {
            let u = used.entry(c.mechanism).or_default();
            let consumed = (*u).min(c.steps);
            *u -= consumed;
            PlannedCharge { steps: c.steps - consumed, ..*c }
        })
        .collect()
}

impl JobSpec {
    /// Parses and validates TOML text; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<JobSpec, SpecError> {
        let raw: RawJobSpec = toml::from_str(text).map_err(|e| SpecError::from_toml(&e, text, origin))?;
        JobSpec::try_from(raw).map_err(|problems| SpecError::Invalid { origin: origin.to_string(), problems })
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
    ///
    /// A spec stored by an earlier version reads too: its per-job
    /// `privacy.count_noise_scale` is dropped and a missing `evaluation`
    /// takes the defaults. (Its hash is then another spec's, so a site
    /// refuses to accept it again, but a job already running carries on.)
    pub fn from_canonical_json(json: &str) -> Result<JobSpec, SpecError> {
        let invalid = |e: serde_json::Error| SpecError::Invalid {
            origin: "job offer".to_string(),
            problems: vec![e.to_string()],
        };
        let mut value: serde_json::Value = serde_json::from_str(json).map_err(invalid)?;
        if let Some(privacy) = value.get_mut("privacy").and_then(serde_json::Value::as_object_mut) {
            privacy.remove("count_noise_scale");
        }
        if let Some(object) = value.as_object_mut()
            && !object.contains_key("evaluation")
        {
            let defaults = serde_json::to_value(EvaluationSpec::default()).map_err(invalid)?;
            object.insert("evaluation".to_string(), defaults);
        }
        let spec: JobSpec = serde_json::from_value(value).map_err(invalid)?;
        spec.validate().map_err(|problems| SpecError::Invalid { origin: "job offer".to_string(), problems })?;
        Ok(spec)
    }

    /// The job's plan at a site whose dataset released `train_rows`
    /// training rows.
    pub fn site_plan(&self, train_rows: u64) -> SitePlan {
        let t = &self.training;
        let q = (t.batch_size as f64 / train_rows.max(1) as f64).min(1.0);
        let steps_per_round = (t.local_epochs / q).ceil().max(1.0) as u64;
        let dp_sgd = PlannedCharge {
            mechanism: Mechanism::DpSgd,
            sample_rate: q,
            noise_multiplier: self.privacy.charged_noise_multiplier(),
            steps: steps_per_round * u64::from(t.rounds),
        };
        let mut charges = vec![dp_sgd];
        // The model each round starts from, then the final one.
        let e = &self.evaluation;
        charges.push(PlannedCharge {
            mechanism: Mechanism::Evaluation,
            sample_rate: 1.0,
            noise_multiplier: e.noise_scale,
            steps: u64::from(t.rounds),
        });
        charges.push(PlannedCharge {
            mechanism: Mechanism::Evaluation,
            sample_rate: 1.0,
            noise_multiplier: e.final_noise_scale,
            steps: 1,
        });
        SitePlan { train_rows, sample_rate: q, steps_per_round, expected_batch: q * train_rows.max(1) as f64, charges }
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
        self.validate_model(&mut p);
        if let Err(mut f) = self.features.validate() {
            p.append(&mut f);
        }
        self.training.validate_into(&mut p);
        self.privacy.validate_into(&mut p);
        self.evaluation.validate_into(&mut p);
        if let Some(c) = &self.client_dp {
            c.validate_into(&mut p);
        }
        self.validate_aggregation(&mut p);
        self.policy.validate_into(&mut p);
        if p.is_empty() { Ok(()) } else { Err(p) }
    }

    /// Pushes the problems of `[model]`, whose CNN image must match the
    /// features.
    fn validate_model(&self, p: &mut Vec<String>) {
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
    }

    /// Pushes the problems of `[aggregation]`, which depend on the policy's
    /// `min_sites` and on whether client-level DP is on.
    fn validate_aggregation(&self, p: &mut Vec<String>) {
        match &self.aggregation {
            Aggregation::TrimmedMean { trim_fraction } if !(0.0..0.5).contains(trim_fraction) => {
                p.push(format!("aggregation.trim_fraction: must be in [0, 0.5), got {trim_fraction}"));
            }
            Aggregation::Krum { byzantine } | Aggregation::MultiKrum { byzantine, .. }
                if (self.policy.min_sites as usize) < 2 * byzantine + 3 =>
            {
                p.push(format!(
                    "aggregation.byzantine: Krum tolerating {byzantine} bad sites needs min_sites >= {}, got {}",
                    2 * byzantine + 3,
                    self.policy.min_sites
                ));
            }
            _ => {}
        }
        if let Aggregation::MultiKrum { select, .. } = &self.aggregation
            && (*select == 0 || *select > self.policy.min_sites as usize)
        {
            p.push(format!("aggregation.select: must be in 1..=min_sites ({}), got {select}", self.policy.min_sites));
        }
        if self.client_dp.is_some() && !self.aggregation.is_fedavg() {
            p.push(format!(
                "aggregation.rule: client-level DP needs fedavg (its noise is calibrated to a clipped sum), got {}",
                self.aggregation.name()
            ));
        }
    }
}

impl TrainingSpec {
    /// Pushes the problems of `[training]`.
    fn validate_into(&self, p: &mut Vec<String>) {
        if self.rounds == 0 || self.rounds > 10_000 {
            p.push(format!("training.rounds: must be in 1..=10000, got {}", self.rounds));
        }
        if !(self.local_epochs.is_finite() && self.local_epochs > 0.0 && self.local_epochs <= 1000.0) {
            p.push(format!("training.local_epochs: must be in (0, 1000], got {}", self.local_epochs));
        }
        if self.batch_size == 0 {
            p.push("training.batch_size: must be at least 1".to_string());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            p.push(format!("training.learning_rate: must be finite and > 0, got {}", self.learning_rate));
        }
        if !(self.server_learning_rate.is_finite() && self.server_learning_rate > 0.0) {
            p.push(format!("training.server_learning_rate: must be finite and > 0, got {}", self.server_learning_rate));
        }
    }
}

impl PrivacySpec {
    /// Pushes the problems of `[privacy]`.
    fn validate_into(&self, p: &mut Vec<String>) {
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            p.push(format!(
                "privacy.noise_multiplier: must be finite and > 0 (training without noise is not private), got {}",
                self.noise_multiplier
            ));
        }
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            p.push(format!("privacy.clip_norm: must be finite and > 0, got {}", self.clip_norm));
        }
        if !(self.delta.is_finite() && self.delta > 0.0 && self.delta < 1e-2) {
            p.push(format!("privacy.delta: must be in (0, 0.01), got {}", self.delta));
        }
        if !(self.clip_count_noise == 0.0 || (self.clip_count_noise.is_finite() && self.clip_count_noise >= 1.0)) {
            p.push(format!(
                "privacy.clip_count_noise: must be 0 (not released) or finite and >= 1, got {}",
                self.clip_count_noise
            ));
        }
    }
}

impl EvaluationSpec {
    /// Pushes the problems of `[evaluation]`.
    fn validate_into(&self, p: &mut Vec<String>) {
        if !(2..=256).contains(&self.bins) {
            p.push(format!("evaluation.bins: must be in 2..=256, got {}", self.bins));
        }
        if !(self.logit_min.is_finite() && self.logit_max.is_finite() && self.logit_min < self.logit_max) {
            p.push(format!(
                "evaluation.logit_min, evaluation.logit_max: must be finite with logit_min < logit_max, got {} and {}",
                self.logit_min, self.logit_max
            ));
        }
        for (field, scale) in [("noise_scale", self.noise_scale), ("final_noise_scale", self.final_noise_scale)] {
            if !(scale.is_finite() && scale >= 1.0) {
                p.push(format!("evaluation.{field}: must be finite and >= 1, got {scale}"));
            }
        }
    }
}

impl ClientDpSpec {
    /// Pushes the problems of `[client_dp]`, then of its `adaptive` table.
    fn validate_into(&self, p: &mut Vec<String>) {
        if !(self.clip.is_finite() && self.clip > 0.0) {
            p.push(format!("client_dp.clip: must be finite and > 0, got {}", self.clip));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            p.push(format!("client_dp.noise_multiplier: must be finite and > 0, got {}", self.noise_multiplier));
        }
        if let Some(a) = &self.adaptive {
            a.validate_into(self.noise_multiplier, p);
        }
    }
}

impl AdaptiveClipSpec {
    /// Pushes the problems of `[client_dp.adaptive]`; its count's noise must
    /// leave the update some of the client-level budget, `noise_multiplier`.
    fn validate_into(&self, noise_multiplier: f64, p: &mut Vec<String>) {
        if !(self.target_quantile > 0.0 && self.target_quantile < 1.0) {
            p.push(format!("client_dp.adaptive.target_quantile: must be in (0, 1), got {}", self.target_quantile));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            p.push(format!("client_dp.adaptive.learning_rate: must be finite and > 0, got {}", self.learning_rate));
        }
        if !(self.count_noise_multiplier.is_finite() && self.count_noise_multiplier > 0.0) {
            p.push(format!(
                "client_dp.adaptive.count_noise_multiplier: must be finite and > 0, got {}",
                self.count_noise_multiplier
            ));
        } else if 2.0 * self.count_noise_multiplier <= noise_multiplier {
            p.push(format!(
                "client_dp.adaptive.count_noise_multiplier: must exceed noise_multiplier / 2 = {} so the update keeps some budget, got {}",
                noise_multiplier / 2.0,
                self.count_noise_multiplier
            ));
        }
    }
}

impl RoundPolicy {
    /// Pushes the problems of `[policy]`.
    fn validate_into(&self, p: &mut Vec<String>) {
        if self.min_sites == 0 {
            p.push("policy.min_sites: must be at least 1".to_string());
        }
        if self.round_deadline_secs == 0 || self.round_deadline_secs > 7 * 24 * 3600 {
            p.push(format!("policy.round_deadline_secs: must be in 1..=604800, got {}", self.round_deadline_secs));
        }
        if let Some(bound) = self.max_update_norm
            && !(bound.is_finite() && bound > 0.0)
        {
            p.push(format!("policy.max_update_norm: must be finite and > 0, got {bound}"));
        }
        if self.max_round_attempts == 0 {
            p.push("policy.max_round_attempts: must be at least 1".to_string());
        }
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
    /// A spec from `origin` with these problems, each naming its field.
    pub(crate) fn invalid(origin: &str, problems: Vec<String>) -> SpecError {
        SpecError::Invalid { origin: origin.to_string(), problems }
    }

    pub(crate) fn from_toml(err: &toml::de::Error, text: &str, origin: &str) -> SpecError {
        let (line, column) = err.span().map(|span| line_column(text, span.start)).unwrap_or((1, 1));
        let message = err.message().lines().next().unwrap_or("invalid TOML").to_string();
        let key = key_at(text, line);
        let message = match key {
            Some(key) if !message.contains(&key) => format!("{key}: {message}"),
            _ => message,
        };
        SpecError::Syntax { origin: origin.to_string(), line, column, message }
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
    privacy: RawPrivacy,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    client_dp: Option<ClientDpSpec>,
    #[serde(default)]
    aggregation: Aggregation,
    #[serde(default)]
    evaluation: RawEvaluation,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvaluation {
    bins: Option<usize>,
    logit_min: Option<f64>,
    logit_max: Option<f64>,
    noise_scale: Option<f64>,
    final_noise_scale: Option<f64>,
}

impl RawEvaluation {
    /// The spec, each missing key at its default (the final noise at the
    /// noise of the other evaluations).
    fn resolve(self) -> EvaluationSpec {
        let d = EvaluationSpec::default();
        let noise_scale = self.noise_scale.unwrap_or(d.noise_scale);
        EvaluationSpec {
            bins: self.bins.unwrap_or(d.bins),
            logit_min: self.logit_min.unwrap_or(d.logit_min),
            logit_max: self.logit_max.unwrap_or(d.logit_max),
            noise_scale,
            final_noise_scale: self.final_noise_scale.unwrap_or(noise_scale),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrivacy {
    noise_multiplier: f64,
    clip_norm: f64,
    delta: f64,
    #[serde(default = "default_clip_count_noise")]
    clip_count_noise: f64,
    /// Gone: each site now releases its dataset's size once for every job.
    #[serde(default)]
    count_noise_scale: Option<f64>,
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
    positive_label: CellValue,
    negative_labels: Vec<CellValue>,
    #[serde(default)]
    numeric: Vec<String>,
    #[serde(default)]
    categorical: Vec<RawCategorical>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCategorical {
    column: String,
    levels: Vec<CellValue>,
}

/// A value a CSV cell holds, as a spec names it: a string, or an integer
/// written as TOML writes numbers (`positive_label = 1` means the cell "1").
/// Cells are text, so the spec keeps the text.
#[derive(Deserialize)]
#[serde(untagged)]
enum CellValue {
    Text(String),
    Integer(i64),
}

impl CellValue {
    fn into_text(self) -> String {
        match self {
            CellValue::Text(text) => text,
            CellValue::Integer(n) => n.to_string(),
        }
    }
}

fn texts(values: Vec<CellValue>) -> Vec<String> {
    values.into_iter().map(CellValue::into_text).collect()
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
    #[serde(default)]
    max_update_norm: Option<f64>,
}

impl Default for RawPolicy {
    fn default() -> Self {
        RawPolicy {
            max_update_norm: None,
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
        let image_side = raw.model.image_side;
        let model = raw.model.resolve(&mut problems);
        if raw.privacy.count_noise_scale.is_some() {
            problems.push(
                "privacy.count_noise_scale: no longer a job setting; each site releases its dataset's size once, for every job, with the noise its worker.toml sets (datasets[].size_noise_scale): remove this key"
                    .to_string(),
            );
        }
        if image_side.is_some() && !matches!(model, ModelSpec::Cnn { .. }) {
            problems.push("model.image_side: only a cnn takes an image side".to_string());
        }
        let spec = JobSpec {
            name: raw.name,
            dataset: raw.dataset,
            model,
            features: raw.features.resolve(),
            training: raw.training.resolve(),
            privacy: raw.privacy.resolve(),
            policy: raw.policy.resolve(),
            client_dp: raw.client_dp,
            aggregation: raw.aggregation,
            evaluation: raw.evaluation.resolve(),
        };
        if let Err(mut more) = spec.validate() {
            problems.append(&mut more);
        }
        if problems.is_empty() { Ok(spec) } else { Err(problems) }
    }
}

impl RawModel {
    /// The model `kind` names, pushing what is missing for it or given
    /// without it (a stand-in model when `kind` is unknown, so that the
    /// rest of the spec is still checked).
    fn resolve(self, problems: &mut Vec<String>) -> ModelSpec {
        match self.kind.as_str() {
            "logistic_regression" => {
                if self.hidden.is_some() {
                    problems.push("model.hidden: only an mlp has hidden layers".to_string());
                }
                ModelSpec::LogisticRegression
            }
            "mlp" => ModelSpec::Mlp {
                hidden: self.hidden.unwrap_or_else(|| {
                    problems.push("model.hidden: an mlp needs hidden = [sizes]".to_string());
                    Vec::new()
                }),
            },
            "cnn" => ModelSpec::Cnn {
                image_side: self.image_side.unwrap_or_else(|| {
                    problems.push("model.image_side: a cnn needs image_side = pixels".to_string());
                    0
                }),
            },
            other => {
                problems
                    .push(format!("model.kind: unknown model \"{other}\" (expected logistic_regression, mlp or cnn)"));
                ModelSpec::LogisticRegression
            }
        }
    }
}

impl FeatureSpecRaw {
    /// The features, every label and level as the text a cell holds.
    fn resolve(self) -> FeatureSpec {
        FeatureSpec {
            label: self.label,
            positive_label: self.positive_label.into_text(),
            negative_labels: texts(self.negative_labels),
            numeric: self.numeric,
            categorical: self
                .categorical
                .into_iter()
                .map(|c| CategoricalFeature { column: c.column, levels: texts(c.levels) })
                .collect(),
        }
    }
}

impl RawTraining {
    /// The training settings, defaults filled in.
    fn resolve(self) -> TrainingSpec {
        TrainingSpec {
            rounds: self.rounds,
            local_epochs: self.local_epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            server_learning_rate: self.server_learning_rate,
        }
    }
}

impl RawPrivacy {
    /// The DP-SGD settings (the retired `count_noise_scale` is refused by
    /// the caller).
    fn resolve(self) -> PrivacySpec {
        PrivacySpec {
            noise_multiplier: self.noise_multiplier,
            clip_norm: self.clip_norm,
            delta: self.delta,
            clip_count_noise: self.clip_count_noise,
        }
    }
}

impl RawPolicy {
    /// The round policy, defaults filled in.
    fn resolve(self) -> RoundPolicy {
        RoundPolicy {
            min_sites: self.min_sites,
            round_deadline_secs: self.round_deadline_secs,
            max_round_attempts: self.max_round_attempts,
            max_update_norm: self.max_update_norm,
        }
    }
}

#[cfg(test)]
mod tests;
