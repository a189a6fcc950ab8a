//! Between the spec's types and their messages: mechanisms, reasons, and
//! an application's validity and a decision's verdict.
//!
//! The spec crate names what a ledger entry charged ([`Mechanism`]) and why a
//! site refused ([`SiteReason`]) without knowing the wire; here is the one
//! place each is mapped to and from its `meridian.v1` form. A received
//! reason keeps only what [`SiteReason`]'s own constructors allow.

use meridian_spec::application::Validity;
use meridian_spec::decision::Verdict;
use meridian_spec::job::FeatureSpec;
use meridian_spec::mechanism::Mechanism;
use meridian_spec::reason::{ReasonCode, SiteReason};

use crate::pb;

impl From<Mechanism> for pb::Mechanism {
    fn from(m: Mechanism) -> pb::Mechanism {
        match m {
            Mechanism::DpSgd => pb::Mechanism::DpSgd,
            Mechanism::SizeRelease => pb::Mechanism::SizeRelease,
            Mechanism::Evaluation => pb::Mechanism::Evaluation,
            Mechanism::JobSize => pb::Mechanism::JobSize,
        }
    }
}

/// The wire value of `m`.
pub fn mechanism_value(m: Mechanism) -> i32 {
    pb::Mechanism::from(m) as i32
}

/// The mechanism of a wire value; `None` for unspecified or unknown.
pub fn mechanism(value: i32) -> Option<Mechanism> {
    match pb::Mechanism::try_from(value) {
        Ok(pb::Mechanism::DpSgd) => Some(Mechanism::DpSgd),
        Ok(pb::Mechanism::SizeRelease) => Some(Mechanism::SizeRelease),
        Ok(pb::Mechanism::Evaluation) => Some(Mechanism::Evaluation),
        Ok(pb::Mechanism::JobSize) => Some(Mechanism::JobSize),
        Ok(pb::Mechanism::Unspecified) | Err(_) => None,
    }
}

impl From<Validity> for pb::ApplicationValidity {
    fn from(v: Validity) -> pb::ApplicationValidity {
        match v {
            Validity::NotStarted => pb::ApplicationValidity::NotStarted,
            Validity::InForce => pb::ApplicationValidity::InForce,
            Validity::Expired => pb::ApplicationValidity::Expired,
        }
    }
}

/// The validity of a wire value; `None` for unspecified or unknown.
pub fn validity(value: i32) -> Option<Validity> {
    match pb::ApplicationValidity::try_from(value) {
        Ok(pb::ApplicationValidity::NotStarted) => Some(Validity::NotStarted),
        Ok(pb::ApplicationValidity::InForce) => Some(Validity::InForce),
        Ok(pb::ApplicationValidity::Expired) => Some(Validity::Expired),
        Ok(pb::ApplicationValidity::Unspecified) | Err(_) => None,
    }
}

impl From<&Verdict> for pb::DecisionVerdict {
    fn from(v: &Verdict) -> pb::DecisionVerdict {
        match v {
            Verdict::Approve { .. } => pb::DecisionVerdict::Approve,
            Verdict::Reject { .. } => pb::DecisionVerdict::Reject,
            Verdict::Revoke { .. } => pb::DecisionVerdict::Revoke,
        }
    }
}

impl pb::LedgerEntry {
    /// The mechanism this entry charged; an entry from a site that predates
    /// mechanisms charged a job's size in round 0 and DP-SGD otherwise.
    pub fn charged(&self) -> Mechanism {
        mechanism(self.mechanism).unwrap_or(if self.round == 0 { Mechanism::JobSize } else { Mechanism::DpSgd })
    }
}

impl From<ReasonCode> for pb::ReasonCode {
    fn from(code: ReasonCode) -> pb::ReasonCode {
        match code {
            ReasonCode::SchemaMismatch => pb::ReasonCode::SchemaMismatch,
            ReasonCode::DataUnreadable => pb::ReasonCode::DataUnreadable,
            ReasonCode::MissingValues => pb::ReasonCode::MissingValues,
            ReasonCode::BudgetExceeded => pb::ReasonCode::BudgetExceeded,
            ReasonCode::JobCapExceeded => pb::ReasonCode::JobCapExceeded,
            ReasonCode::ModelNotAllowed => pb::ReasonCode::ModelNotAllowed,
            ReasonCode::NotApproved => pb::ReasonCode::NotApproved,
            ReasonCode::Expired => pb::ReasonCode::Expired,
            ReasonCode::TooFewRows => pb::ReasonCode::TooFewRows,
            ReasonCode::DatasetUnknown => pb::ReasonCode::DatasetUnknown,
            ReasonCode::SpecMismatch => pb::ReasonCode::SpecMismatch,
            ReasonCode::TrainingDiverged => pb::ReasonCode::TrainingDiverged,
            ReasonCode::JobStopped => pb::ReasonCode::JobStopped,
            ReasonCode::ShuttingDown => pb::ReasonCode::ShuttingDown,
            ReasonCode::Internal => pb::ReasonCode::Internal,
        }
    }
}

/// The code of a wire value; an unknown or unspecified one is
/// [`ReasonCode::Internal`].
fn reason_code(code: i32) -> ReasonCode {
    match pb::ReasonCode::try_from(code) {
        Ok(pb::ReasonCode::SchemaMismatch) => ReasonCode::SchemaMismatch,
        Ok(pb::ReasonCode::DataUnreadable) => ReasonCode::DataUnreadable,
        Ok(pb::ReasonCode::MissingValues) => ReasonCode::MissingValues,
        Ok(pb::ReasonCode::BudgetExceeded) => ReasonCode::BudgetExceeded,
        Ok(pb::ReasonCode::JobCapExceeded) => ReasonCode::JobCapExceeded,
        Ok(pb::ReasonCode::ModelNotAllowed) => ReasonCode::ModelNotAllowed,
        Ok(pb::ReasonCode::NotApproved) => ReasonCode::NotApproved,
        Ok(pb::ReasonCode::Expired) => ReasonCode::Expired,
        Ok(pb::ReasonCode::TooFewRows) => ReasonCode::TooFewRows,
        Ok(pb::ReasonCode::DatasetUnknown) => ReasonCode::DatasetUnknown,
        Ok(pb::ReasonCode::SpecMismatch) => ReasonCode::SpecMismatch,
        Ok(pb::ReasonCode::TrainingDiverged) => ReasonCode::TrainingDiverged,
        Ok(pb::ReasonCode::JobStopped) => ReasonCode::JobStopped,
        Ok(pb::ReasonCode::ShuttingDown) => ReasonCode::ShuttingDown,
        Ok(pb::ReasonCode::Internal | pb::ReasonCode::Unspecified) | Err(_) => ReasonCode::Internal,
    }
}

impl From<&SiteReason> for pb::SiteReason {
    fn from(reason: &SiteReason) -> pb::SiteReason {
        pb::SiteReason { code: pb::ReasonCode::from(reason.code()) as i32, columns: reason.columns().to_vec() }
    }
}

/// What the coordinator keeps of a received reason: an unknown or missing
/// code becomes [`ReasonCode::Internal`], and only the names that `spec`
/// reads are kept, however the message was made.
pub fn received_reason(reason: Option<&pb::SiteReason>, spec: &FeatureSpec) -> SiteReason {
    let Some(reason) = reason else {
        return SiteReason::new(ReasonCode::Internal);
    };
    reason.columns.iter().fold(SiteReason::new(reason_code(reason.code)), |r, c| r.column(spec, c))
}

#[cfg(test)]
mod tests {
    use meridian_spec::job::CategoricalFeature;

    use super::*;

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
    fn validities_round_trip() {
        for v in [Validity::NotStarted, Validity::InForce, Validity::Expired] {
            assert_eq!(validity(pb::ApplicationValidity::from(v) as i32), Some(v));
        }
        assert_eq!(validity(0), None);
        assert_eq!(validity(99), None);
    }

    #[test]
    fn mechanisms_round_trip() {
        for m in Mechanism::ALL {
            let entry = pb::LedgerEntry { mechanism: mechanism_value(m), round: 3, ..Default::default() };
            assert_eq!(entry.charged(), m);
            assert_eq!(mechanism(mechanism_value(m)), Some(m));
        }
    }

    #[test]
    fn entries_from_before_mechanisms_are_read_by_their_round() {
        let old = |round| pb::LedgerEntry { round, ..Default::default() };
        assert_eq!(old(0).charged(), Mechanism::JobSize);
        assert_eq!(old(4).charged(), Mechanism::DpSgd);
    }

    #[test]
    fn the_coordinator_drops_what_a_hand_made_message_adds() {
        let wire = pb::SiteReason { code: 9_999, columns: vec!["BMI".into(), "value \"X\" at line 42".into()] };
        let r = received_reason(Some(&wire), &spec());
        assert_eq!(r.code(), ReasonCode::Internal);
        assert_eq!(r.columns(), ["BMI"]);
        assert_eq!(received_reason(None, &spec()).code(), ReasonCode::Internal);
    }

    #[test]
    fn every_code_goes_over_the_wire_and_back() {
        for code in ReasonCode::ALL {
            let wire = pb::SiteReason::from(&SiteReason::new(code));
            assert_eq!(received_reason(Some(&wire), &spec()).code(), code);
        }
    }
}
