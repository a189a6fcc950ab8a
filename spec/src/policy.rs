//! A site's policy as checks a job passes or fails, the one definition the
//! site applies to an offer and the coordinator applies to a plan: the
//! model the policy allows, the dataset, its released sizes against the
//! policy's floors, and the job's batch against the released training
//! rows. Everything here is what a site announces (its policy and its
//! released sizes), so both sides reach the same verdict.

use crate::job::JobSpec;
use crate::reason::ReasonCode;

/// What a site's policy says, as its worker config holds it and as it
/// announces it at registration.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy<'a> {
    /// Model kinds allowed; empty: all.
    pub allowed_models: &'a [String],
    /// Fewest released training rows.
    pub min_training_rows: u64,
    /// Fewest released test rows.
    pub min_test_rows: u64,
}

/// A dataset's released (train, test) sizes.
pub type Sizes = (u64, u64);

/// One check of a job against a site's policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    /// What is checked.
    pub name: &'static str,
    /// What it found: a line that says so, or the code and the line.
    pub outcome: Result<String, (ReasonCode, String)>,
}

impl Check {
    fn new(name: &'static str, ok: bool, code: ReasonCode, line: String) -> Check {
        Check { name, outcome: if ok { Ok(line) } else { Err((code, line)) } }
    }
}

/// Every policy check of `spec` at a site that serves the job's dataset
/// (`serves`) with released `sizes` (`None`: none released).
pub fn checks(policy: &Policy<'_>, spec: &JobSpec, serves: bool, sizes: Option<Sizes>) -> Vec<Check> {
    let kind = spec.model.kind();
    let allowed = policy.allowed_models.is_empty() || policy.allowed_models.iter().any(|m| m == kind);
    let mut all = vec![
        Check::new(
            "model",
            allowed,
            ReasonCode::ModelNotAllowed,
            if allowed {
                format!("model {kind} is allowed")
            } else {
                format!(
                    "the site's policy does not allow model \"{kind}\" (allowed: {})",
                    policy.allowed_models.join(", ")
                )
            },
        ),
        Check::new(
            "dataset",
            serves,
            ReasonCode::DatasetUnknown,
            format!("the site {} dataset \"{}\"", if serves { "serves" } else { "does not serve" }, spec.dataset),
        ),
    ];
    let Some((train, test)) = sizes else {
        let line = format!("dataset \"{}\" has no released size yet", spec.dataset);
        all.push(Check::new("released sizes", false, ReasonCode::DataUnreadable, line));
        return all;
    };
    let floor = |name, released: u64, min: u64, key: &str| {
        let line = format!("{released} released {name} rows; the policy's {key} is {min}");
        Check::new(name, released >= min, ReasonCode::TooFewRows, line)
    };
    all.push(floor("training", train, policy.min_training_rows, "min_training_rows"));
    all.push(floor("test", test, policy.min_test_rows, "min_test_rows"));
    let batch = spec.training.batch_size as u64;
    let line = format!("training.batch_size {batch} against {train} released training rows");
    all.push(Check::new("batch", batch <= train, ReasonCode::TooFewRows, line));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec::from_toml(include_str!("../../examples/jobs/wdbc.toml"), "wdbc.toml").unwrap()
    }

    fn failures(policy: &Policy<'_>, serves: bool, sizes: Option<Sizes>) -> Vec<(&'static str, ReasonCode)> {
        checks(policy, &spec(), serves, sizes)
            .into_iter()
            .filter_map(|c| c.outcome.err().map(|(code, _)| (c.name, code)))
            .collect()
    }

    #[test]
    fn each_check_fails_with_its_code() {
        let cnn_only = ["cnn".to_string()];
        let open = Policy { allowed_models: &[], min_training_rows: 50, min_test_rows: 20 };
        assert!(failures(&open, true, Some((400, 100))).is_empty());
        let strict = Policy { allowed_models: &cnn_only, ..open.clone() };
        assert_eq!(failures(&strict, true, Some((400, 100))), [("model", ReasonCode::ModelNotAllowed)]);
        assert_eq!(failures(&open, false, Some((400, 100))), [("dataset", ReasonCode::DatasetUnknown)]);
        assert_eq!(failures(&open, true, None), [("released sizes", ReasonCode::DataUnreadable)]);
        // 30 training rows: under the floor, and fewer than the batch of 32.
        assert_eq!(
            failures(&open, true, Some((30, 10))),
            [("training", ReasonCode::TooFewRows), ("test", ReasonCode::TooFewRows), ("batch", ReasonCode::TooFewRows)]
        );
    }
}
