//! A data-use application: what a scientist asks of the hospitals before
//! any job runs. Why the records are used (title, purpose, the ethics
//! approval), which datasets and columns, which model families, what
//! outputs, until when, how many jobs, and how much privacy each site may
//! spend on the whole study.
//!
//! Like a job spec it is parsed once from TOML, checked with every problem
//! named by its field, and bound to by the SHA-256 of its canonical JSON:
//! each site's decision, and every job run under it, names that hash, so
//! the terms a steward approved cannot change under them.
//!
//! [`ApplicationSpec::check_job`] is the one test of a job against the
//! terms, used alike by the coordinator (before it offers a job) and by
//! each site (which is the authority). A refusal names the [`Term`] the job
//! falls outside of.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::date::Date;
use crate::job::{JobSpec, ModelSpec, SpecError};

#[cfg(test)]
mod tests;

/// The longest title, in characters: a title is a line, the purpose the
/// text.
pub const MAX_TITLE_CHARS: usize = 200;

/// A validated data-use application.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplicationSpec {
    /// One line naming the study.
    pub title: String,
    /// Why the records are used, for the stewards who decide.
    pub purpose: String,
    /// The ethics committee's (or data access committee's) reference.
    pub ethics_reference: String,
    /// The dataset names a job under this application may train on.
    pub datasets: Vec<String>,
    /// The label column.
    pub label: String,
    /// The feature columns asked for (the label is not one of them).
    pub columns: Vec<String>,
    /// The model families a job may train.
    pub model_families: Vec<ModelFamily>,
    /// What may be released at the end of a job.
    pub outputs: Vec<Output>,
    /// How many jobs may run under the application.
    pub max_jobs: u32,
    /// First day of validity (UTC).
    pub valid_from: Date,
    /// Last day of validity (UTC), included.
    pub valid_until: Date,
    /// What is asked of each site, in name order.
    pub sites: Vec<SiteRequest>,
}

/// The privacy asked of one site for the whole application.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteRequest {
    /// The site's name, as in its certificate.
    pub site: String,
    /// The ε every job of the application may spend there together.
    pub epsilon: f64,
    /// The δ at which that ε is read.
    pub delta: f64,
}

/// A family of networks, as `model.kind` names it in a job spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFamily {
    /// `logistic_regression`.
    LogisticRegression,
    /// `mlp`, any hidden sizes.
    Mlp,
    /// `cnn`, any image side.
    Cnn,
}

impl ModelFamily {
    /// The family of a job's model.
    pub fn of(model: &ModelSpec) -> ModelFamily {
        match model {
            ModelSpec::LogisticRegression => ModelFamily::LogisticRegression,
            ModelSpec::Mlp { .. } => ModelFamily::Mlp,
            ModelSpec::Cnn { .. } => ModelFamily::Cnn,
        }
    }

    /// The name in specs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFamily::LogisticRegression => "logistic_regression",
            ModelFamily::Mlp => "mlp",
            ModelFamily::Cnn => "cnn",
        }
    }
}

impl fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a job may release once reviewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// The trained model's weights.
    ModelWeights,
    /// The job's (noised) metrics.
    Metrics,
}

impl Output {
    /// The name in specs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Output::ModelWeights => "model_weights",
            Output::Metrics => "metrics",
        }
    }
}

/// Where a day lies in an application's validity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Validity {
    /// Before `valid_from`.
    NotStarted,
    /// From `valid_from` to the end of `valid_until`.
    InForce,
    /// After `valid_until`.
    Expired,
}

impl Validity {
    /// The name in statuses.
    pub fn as_str(self) -> &'static str {
        match self {
            Validity::NotStarted => "not_started",
            Validity::InForce => "in_force",
            Validity::Expired => "expired",
        }
    }
}

/// A term of an application that a job can fall outside of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Term {
    /// The dataset is not one the application names.
    Dataset,
    /// The label or a feature column is not one the application (or the
    /// site's grant) allows.
    Columns,
    /// The model's family is not allowed.
    ModelFamily,
    /// The job would spend more ε than is left of the grant.
    Epsilon,
    /// The job's δ is larger than the application's.
    Delta,
    /// The application has not started or has expired.
    Validity,
    /// The application's jobs are used up.
    JobCount,
    /// A site the job would run at is not part of the application.
    Site,
}

impl Term {
    /// The term's name in refusals.
    pub fn as_str(self) -> &'static str {
        match self {
            Term::Dataset => "dataset",
            Term::Columns => "columns",
            Term::ModelFamily => "model_family",
            Term::Epsilon => "epsilon",
            Term::Delta => "delta",
            Term::Validity => "validity",
            Term::JobCount => "max_jobs",
            Term::Site => "sites",
        }
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job outside an application's terms: the term, and what the job asked
/// that the term does not allow (names from the two specs only).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("outside the application's {term}: {detail}")]
pub struct OutsideTerms {
    /// The term.
    pub term: Term,
    /// What the job asked, in the specs' own names.
    pub detail: String,
}

impl ApplicationSpec {
    /// Parses and validates TOML text; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<ApplicationSpec, SpecError> {
        let raw: RawApplication = toml::from_str(text).map_err(|e| SpecError::from_toml(&e, text, origin))?;
        let spec = raw.into_spec().map_err(|problems| SpecError::invalid(origin, problems))?;
        spec.validate().map_err(|problems| SpecError::invalid(origin, problems))?;
        Ok(spec)
    }

    /// The canonical JSON every party hashes and stores.
    pub fn canonical_json(&self) -> String {
        // Plain structs of strings, numbers and unit enums always serialise.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// SHA-256 of [`ApplicationSpec::canonical_json`], hex.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_json().as_bytes()))
    }

    /// Parses canonical JSON received from another party, and validates it.
    pub fn from_canonical_json(json: &str, origin: &str) -> Result<ApplicationSpec, SpecError> {
        let spec: ApplicationSpec =
            serde_json::from_str(json).map_err(|e| SpecError::invalid(origin, vec![e.to_string()]))?;
        spec.validate().map_err(|problems| SpecError::invalid(origin, problems))?;
        Ok(spec)
    }

    /// Every problem of the spec, each naming its field.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        self.validate_text(&mut problems);
        self.validate_data(&mut problems);
        self.validate_terms(&mut problems);
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    fn validate_text(&self, problems: &mut Vec<String>) {
        if self.title.trim().is_empty() {
            problems.push("title: must not be empty".into());
        } else if self.title.chars().count() > MAX_TITLE_CHARS || self.title.contains('\n') {
            problems.push(format!("title: must be one line of at most {MAX_TITLE_CHARS} characters"));
        }
        if self.purpose.trim().is_empty() {
            problems.push("purpose: must say why the records are used".into());
        }
        if self.ethics_reference.trim().is_empty() {
            problems.push("ethics_reference: must name the approval the study holds".into());
        }
    }

    fn validate_data(&self, problems: &mut Vec<String>) {
        names_problems("datasets", &self.datasets, problems);
        names_problems("columns", &self.columns, problems);
        if self.label.trim().is_empty() {
            problems.push("label: must name the label column".into());
        } else if self.columns.contains(&self.label) {
            problems.push(format!("columns: {:?} is the label, not a feature", self.label));
        }
        if self.model_families.is_empty() {
            problems.push("model_families: must allow at least one family".into());
        }
        if has_duplicates(&self.model_families) {
            problems.push("model_families: a family is named twice".into());
        }
        if self.outputs.is_empty() {
            problems.push("outputs: must ask for at least one output".into());
        }
        if has_duplicates(&self.outputs) {
            problems.push("outputs: an output is named twice".into());
        }
    }

    fn validate_terms(&self, problems: &mut Vec<String>) {
        if self.max_jobs == 0 {
            problems.push("max_jobs: must be at least 1".into());
        }
        if self.valid_until < self.valid_from {
            problems.push(format!("valid_until: {} is before valid_from {}", self.valid_until, self.valid_from));
        }
        if self.sites.is_empty() {
            problems.push("sites: must ask at least one site".into());
        }
        let names: Vec<String> = self.sites.iter().map(|s| s.site.clone()).collect();
        names_problems("sites.site", &names, problems);
        // Parsing sorts them; a canonical form from elsewhere must be sorted
        // too, or the same terms would have two hashes.
        if names.windows(2).any(|w| w[0] > w[1]) {
            problems.push("sites: must be in name order".into());
        }
        for s in &self.sites {
            let site = &s.site;
            if !(s.epsilon.is_finite() && s.epsilon > 0.0) {
                problems.push(format!("sites[{site}].epsilon: must be a positive number, got {}", s.epsilon));
            }
            if !(s.delta > 0.0 && s.delta < 1.0) {
                problems.push(format!("sites[{site}].delta: must lie strictly between 0 and 1, got {}", s.delta));
            }
        }
    }

    /// What is asked of `site`, if it is part of the application.
    pub fn site(&self, site: &str) -> Option<&SiteRequest> {
        self.sites.iter().find(|s| s.site == site)
    }

    /// Where `now_ms` (ms since the Unix epoch) lies in the validity.
    pub fn validity_at(&self, now_ms: i64) -> Validity {
        if now_ms < self.valid_from.start_ms() {
            Validity::NotStarted
        } else if now_ms < self.valid_until.end_ms() {
            Validity::InForce
        } else {
            Validity::Expired
        }
    }

    /// Whether the application is in force at `now_ms`: from
    /// `valid_from`'s first instant to the end of `valid_until`.
    pub fn in_force_at(&self, now_ms: i64) -> bool {
        self.validity_at(now_ms) == Validity::InForce
    }

    /// Checks the parts of `job` that the application alone decides: its
    /// dataset, label and columns, model family and δ, and that it is
    /// `now_ms` within the validity. The ε and the job count, which depend
    /// on what each site granted and has spent, are the site's checks
    /// (and the coordinator's plan).
    pub fn check_job(&self, job: &JobSpec, now_ms: i64) -> Result<(), OutsideTerms> {
        let outside = |term, detail: String| Err(OutsideTerms { term, detail });
        if !self.in_force_at(now_ms) {
            let today = Date::containing_ms(now_ms);
            return outside(Term::Validity, format!("{today} is outside {}..={}", self.valid_from, self.valid_until));
        }
        if !self.datasets.contains(&job.dataset) {
            return outside(Term::Dataset, format!("dataset {:?}", job.dataset));
        }
        if job.features.label != self.label {
            return outside(Term::Columns, format!("label {:?}", job.features.label));
        }
        let mut features = job.features.columns().into_iter().filter(|c| *c != job.features.label);
        if let Some(column) = features.find(|c| !self.columns.iter().any(|a| a == c)) {
            return outside(Term::Columns, format!("column {column:?}"));
        }
        let family = ModelFamily::of(&job.model);
        if !self.model_families.contains(&family) {
            return outside(Term::ModelFamily, format!("model family {family}"));
        }
        let delta = self.sites.iter().map(|s| s.delta).fold(f64::INFINITY, f64::min);
        if job.privacy.delta > delta {
            return outside(Term::Delta, format!("δ {} above {delta}", job.privacy.delta));
        }
        Ok(())
    }
}

/// Problems with a list of names: empty, blank or repeated entries.
pub(crate) fn names_problems(field: &str, names: &[String], problems: &mut Vec<String>) {
    if names.is_empty() {
        problems.push(format!("{field}: must name at least one"));
    }
    if names.iter().any(|n| n.trim().is_empty()) {
        problems.push(format!("{field}: a name is empty"));
    }
    let mut seen = BTreeSet::new();
    for name in names {
        if !seen.insert(name) {
            problems.push(format!("{field}: {name:?} is named twice"));
        }
    }
}

fn has_duplicates<T: Ord>(items: &[T]) -> bool {
    items.iter().collect::<BTreeSet<_>>().len() != items.len()
}

// ---- raw TOML shape ---------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApplication {
    title: String,
    purpose: String,
    ethics_reference: String,
    datasets: Vec<String>,
    label: String,
    columns: Vec<String>,
    model_families: Vec<ModelFamily>,
    outputs: Vec<Output>,
    max_jobs: u32,
    valid_from: RawDate,
    valid_until: RawDate,
    sites: Vec<SiteRequest>,
}

/// A date written as a string (`"2027-06-30"`) or as a TOML date
/// (`2027-06-30`).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawDate {
    Text(String),
    Toml(toml::value::Datetime),
}

impl RawDate {
    fn date(&self, field: &str) -> Result<Date, String> {
        let text = match self {
            RawDate::Text(text) => text.clone(),
            RawDate::Toml(datetime) if datetime.time.is_none() && datetime.offset.is_none() => datetime.to_string(),
            RawDate::Toml(datetime) => return Err(format!("{field}: {datetime} is not a date of the form YYYY-MM-DD")),
        };
        Date::parse(&text).map_err(|e| format!("{field}: {e}"))
    }
}

impl RawApplication {
    fn into_spec(self) -> Result<ApplicationSpec, Vec<String>> {
        let (valid_from, valid_until) = match (self.valid_from.date("valid_from"), self.valid_until.date("valid_until"))
        {
            (Ok(from), Ok(until)) => (from, until),
            (from, until) => return Err([from.err(), until.err()].into_iter().flatten().collect()),
        };
        let mut sites = self.sites;
        sites.sort_by(|a, b| a.site.cmp(&b.site));
        Ok(ApplicationSpec {
            title: self.title,
            purpose: self.purpose,
            ethics_reference: self.ethics_reference,
            datasets: self.datasets,
            label: self.label,
            columns: self.columns,
            model_families: self.model_families,
            outputs: self.outputs,
            max_jobs: self.max_jobs,
            valid_from,
            valid_until,
            sites,
        })
    }
}
