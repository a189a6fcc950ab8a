//! The site's policy, as checks a job offer passes or fails: the model the
//! policy allows, the dataset, its released sizes against the policy's
//! floors and the job's batch. The daemon refuses an offer at the first
//! failing check; `meridian site show` lists them all, each with what it
//! found. The checks that read the data (its schema) or the ledger (cap and
//! budget) follow these, in `Worker::decide_offer` and in `site show`.

use proto::job::JobSpec;
use proto::reason::ReasonCode;

use crate::config::WorkerConfig;
use crate::ledger::SizeRelease;
use crate::outgoing::Refusal;

/// One check of an offer against the policy.
#[derive(Clone, Debug)]
pub struct Check {
    /// What is checked.
    pub name: &'static str,
    /// What it found: `Ok` with a line that says so, or the refusal.
    pub outcome: Result<String, Refusal>,
}

impl Check {
    fn new(name: &'static str, outcome: Result<String, Refusal>) -> Check {
        Check { name, outcome }
    }
}

/// Every policy check of `spec`, given the job's dataset's latest released
/// sizes (`None`: none released).
pub fn checks(config: &WorkerConfig, spec: &JobSpec, sizes: Option<&SizeRelease>) -> Vec<Check> {
    let kind = spec.model.kind();
    let model = if config.allowed_models.is_empty() || config.allowed_models.iter().any(|m| m == kind) {
        Ok(format!("model {kind} is allowed"))
    } else {
        Err(Refusal::new(
            ReasonCode::ModelNotAllowed,
            format!("site policy does not allow model \"{kind}\" (allowed: {})", config.allowed_models.join(", ")),
        ))
    };
    let dataset = if config.datasets.iter().any(|d| d.name == spec.dataset) {
        Ok(format!("the site serves dataset \"{}\"", spec.dataset))
    } else {
        Err(Refusal::new(ReasonCode::DatasetUnknown, format!("this site has no dataset \"{}\"", spec.dataset)))
    };
    let mut all = vec![Check::new("model", model), Check::new("dataset", dataset)];
    let Some(sizes) = sizes else {
        let detail = format!("dataset \"{}\" has no released size yet", spec.dataset);
        all.push(Check::new("released sizes", Err(Refusal::new(ReasonCode::DataUnreadable, detail))));
        return all;
    };
    let floor = |name, released: u64, min: u64, key: &str| {
        let line = format!("{released} released {name} rows; the policy's {key} is {min}");
        Check::new(name, if released >= min { Ok(line) } else { Err(Refusal::new(ReasonCode::TooFewRows, line)) })
    };
    all.push(floor("training", sizes.train_rows, config.min_training_rows, "min_training_rows"));
    all.push(floor("test", sizes.test_rows, config.min_test_rows, "min_test_rows"));
    let batch = spec.training.batch_size as u64;
    let line = format!("training.batch_size {batch} against {} released training rows", sizes.train_rows);
    all.push(Check::new(
        "batch",
        if batch <= sizes.train_rows { Ok(line) } else { Err(Refusal::new(ReasonCode::TooFewRows, line)) },
    ));
    all
}

/// The first check `spec` fails, as the refusal the daemon answers with.
pub fn first_failure(config: &WorkerConfig, spec: &JobSpec, sizes: Option<&SizeRelease>) -> Option<Refusal> {
    checks(config, spec, sizes).into_iter().find_map(|c| c.outcome.err())
}
