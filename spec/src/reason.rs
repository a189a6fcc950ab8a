//! Why a site refused a job or could not carry out a task, in the only form
//! that may leave the hospital: a code from a closed set and names of
//! columns that the job spec itself holds.
//!
//! A site's own errors carry values, line numbers, file paths and counts
//! (`/data/site.csv:42: column "Smoking": value "X" is not one of the
//! levels`): patient data and facts about it, which stay in the site's log
//! and audit. What crosses the wire is a [`SiteReason`], and a
//! [`SiteReason`] can only be built from a [`ReasonCode`] and, through
//! [`SiteReason::column`], from names found in the job's
//! [`FeatureSpec`]: there is no constructor that takes free text. The
//! coordinator applies the same rule to what it receives
//! (`meridian_wire::convert::received_reason`), so a site that bypasses this type still
//! cannot put anything else into the coordinator's state.

use std::fmt;

use crate::job::FeatureSpec;

/// The closed set of reasons a site may give.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReasonCode {
    /// A column the job reads is absent or repeated, or holds a value the
    /// spec does not allow.
    SchemaMismatch,
    /// The dataset's file cannot be opened or read.
    DataUnreadable,
    /// A column the job reads has empty cells.
    MissingValues,
    /// The job would take the dataset past its total budget.
    BudgetExceeded,
    /// The job's planned ε is over the site's per-job cap.
    JobCapExceeded,
    /// The site's policy does not allow the job's model.
    ModelNotAllowed,
    /// The hospital rejected the offer.
    NotApproved,
    /// No decision came within the time an offer may wait.
    Expired,
    /// Too few records to train or evaluate on (site policy).
    TooFewRows,
    /// The site does not serve the dataset the job names.
    DatasetUnknown,
    /// The offered spec does not match its hash, or the model's layout
    /// differs from the one the site builds.
    SpecMismatch,
    /// Local training diverged.
    TrainingDiverged,
    /// The job was stopped before the site could act on it.
    JobStopped,
    /// The site is shutting down.
    ShuttingDown,
    /// Anything else; the site's log has the detail.
    Internal,
}

impl ReasonCode {
    /// Every code, in wire order.
    pub const ALL: [ReasonCode; 15] = [
        ReasonCode::SchemaMismatch,
        ReasonCode::DataUnreadable,
        ReasonCode::MissingValues,
        ReasonCode::BudgetExceeded,
        ReasonCode::JobCapExceeded,
        ReasonCode::ModelNotAllowed,
        ReasonCode::NotApproved,
        ReasonCode::Expired,
        ReasonCode::TooFewRows,
        ReasonCode::DatasetUnknown,
        ReasonCode::SpecMismatch,
        ReasonCode::TrainingDiverged,
        ReasonCode::JobStopped,
        ReasonCode::ShuttingDown,
        ReasonCode::Internal,
    ];

    /// The code as users read and scripts match it (`schema_mismatch`).
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::SchemaMismatch => "schema_mismatch",
            ReasonCode::DataUnreadable => "data_unreadable",
            ReasonCode::MissingValues => "missing_values",
            ReasonCode::BudgetExceeded => "budget_exceeded",
            ReasonCode::JobCapExceeded => "job_cap_exceeded",
            ReasonCode::ModelNotAllowed => "model_not_allowed",
            ReasonCode::NotApproved => "not_approved",
            ReasonCode::Expired => "expired",
            ReasonCode::TooFewRows => "too_few_rows",
            ReasonCode::DatasetUnknown => "dataset_unknown",
            ReasonCode::SpecMismatch => "spec_mismatch",
            ReasonCode::TrainingDiverged => "training_diverged",
            ReasonCode::JobStopped => "job_stopped",
            ReasonCode::ShuttingDown => "shutting_down",
            ReasonCode::Internal => "internal",
        }
    }

    /// What the code means, in one line, for a scientist who reads it.
    pub fn meaning(self) -> &'static str {
        match self {
            ReasonCode::SchemaMismatch => {
                "a column the job reads is missing at the site or holds values the spec does not allow"
            }
            ReasonCode::DataUnreadable => "the site cannot read its dataset file",
            ReasonCode::MissingValues => "a column the job reads has empty cells at the site",
            ReasonCode::BudgetExceeded => "the job would take the dataset past the site's total privacy budget",
            ReasonCode::JobCapExceeded => "the job's planned ε is over the site's per-job cap",
            ReasonCode::ModelNotAllowed => "the site's policy does not allow this model",
            ReasonCode::NotApproved => "the hospital rejected the job",
            ReasonCode::Expired => "no decision came in time",
            ReasonCode::TooFewRows => "the site holds too few records for this job under its policy",
            ReasonCode::DatasetUnknown => "the site does not serve this dataset",
            ReasonCode::SpecMismatch => "the job spec or model layout the site received does not match",
            ReasonCode::TrainingDiverged => "local training diverged",
            ReasonCode::JobStopped => "the job was stopped",
            ReasonCode::ShuttingDown => "the site is shutting down",
            ReasonCode::Internal => "an error at the site; its log has the detail",
        }
    }

    /// The code named `name` ([`ReasonCode::as_str`]).
    pub fn parse(name: &str) -> Option<ReasonCode> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reason fit to leave the site: a code and the job spec's column names
/// it concerns. Its fields are private; the only ways to build one take a
/// [`ReasonCode`] and names checked against a [`FeatureSpec`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteReason {
    code: ReasonCode,
    columns: Vec<String>,
}

impl SiteReason {
    /// A reason naming no column.
    pub fn new(code: ReasonCode) -> SiteReason {
        SiteReason { code, columns: Vec::new() }
    }

    /// Adds `column` if, and only if, `spec` reads a column of that name
    /// (its label, a numeric or a categorical column); any other name (a
    /// column of the file the job does not use, a value) is left out.
    pub fn column(mut self, spec: &FeatureSpec, column: &str) -> SiteReason {
        if let Some(name) = spec.columns().into_iter().find(|c| *c == column)
            && !self.columns.iter().any(|c| c == name)
        {
            self.columns.push(name.to_string());
        }
        self
    }

    /// The code.
    pub fn code(&self) -> ReasonCode {
        self.code
    }

    /// The spec's columns it names.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Rebuilds a reason stored by the coordinator as its code name and
    /// columns; `None` when the name is not a code.
    pub fn from_parts(code: &str, columns: &[String], spec: &FeatureSpec) -> Option<SiteReason> {
        let code = ReasonCode::parse(code)?;
        Some(columns.iter().fold(SiteReason::new(code), |r, c| r.column(spec, c)))
    }
}

impl fmt::Display for SiteReason {
    /// `schema_mismatch (column "Smoking")`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code.as_str())?;
        match self.columns.as_slice() {
            [] => Ok(()),
            [one] => write!(f, " (column {one:?})"),
            many => write!(f, " (columns {})", many.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(", ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::CategoricalFeature;

    fn spec() -> FeatureSpec {
        FeatureSpec {
            label: "HeartDisease".into(),
            positive_label: "Yes".into(),
            negative_labels: vec!["No".into()],
            numeric: vec!["BMI".into()],
            categorical: vec![CategoricalFeature { column: "Smoking".into(), levels: vec!["No".into(), "Yes".into()] }],
        }
    }

    #[test]
    fn only_the_specs_columns_are_kept() {
        let r = SiteReason::new(ReasonCode::SchemaMismatch)
            .column(&spec(), "Smoking")
            .column(&spec(), "MARKER-7f3a")
            .column(&spec(), "/data/site.csv:42")
            .column(&spec(), "Smoking");
        assert_eq!(r.columns(), ["Smoking"]);
        assert_eq!(r.to_string(), "schema_mismatch (column \"Smoking\")");
    }

    #[test]
    fn every_code_is_named_once() {
        for code in ReasonCode::ALL {
            assert_eq!(ReasonCode::parse(code.as_str()), Some(code));
        }
    }
}
