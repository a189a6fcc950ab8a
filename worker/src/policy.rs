//! The site's policy applied to an offer: [`meridian_spec::policy`]'s checks with
//! the site's own configuration and its dataset's latest released sizes.
//! The daemon refuses an offer at the first failing check; `meridian site
//! show` lists them all. The checks that read the data (its schema) or the
//! ledger (cap and budget) follow these, in `Worker::decide_offer` and in
//! `site show`.

use meridian_spec::job::JobSpec;
pub use meridian_spec::policy::Check;

use crate::config::WorkerConfig;
use crate::ledger::SizeRelease;
use crate::outgoing::Refusal;

/// The policy as the site's configuration states it.
pub fn of(config: &WorkerConfig) -> meridian_spec::policy::Policy<'_> {
    meridian_spec::policy::Policy {
        allowed_models: &config.allowed_models,
        min_training_rows: config.min_training_rows,
        min_test_rows: config.min_test_rows,
    }
}

/// Every policy check of `spec`, given the job's dataset's latest released
/// sizes (`None`: none released).
pub fn checks(config: &WorkerConfig, spec: &JobSpec, sizes: Option<&SizeRelease>) -> Vec<Check> {
    let serves = config.datasets.iter().any(|d| d.name == spec.dataset);
    meridian_spec::policy::checks(&of(config), spec, serves, sizes.map(|s| (s.train_rows, s.test_rows)))
}

/// The first check `spec` fails, as the refusal the daemon answers with.
pub fn first_failure(config: &WorkerConfig, spec: &JobSpec, sizes: Option<&SizeRelease>) -> Option<Refusal> {
    checks(config, spec, sizes).into_iter().find_map(|c| c.outcome.err()).map(|(code, line)| Refusal::new(code, line))
}
