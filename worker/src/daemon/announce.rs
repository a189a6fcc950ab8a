//! What a site announces of its datasets when it registers: each one's
//! declared schema, its budget, and its sizes as released (noised and
//! charged) by the ledger. The exact row counts never leave the site.

use meridian_wire::pb;
use tracing::{info, warn};

use super::Worker;
use crate::config::DatasetConfig;
use crate::dataset::{self, SplitOptions};
use crate::error::WorkerError;
use crate::ledger::SizeRelease;

impl Worker {
    /// Each dataset as announced: its schema as configured, its budget and
    /// its released sizes, released now if its records changed since the
    /// last release (or never were). Blocking: it reads every file.
    pub(super) fn announcements(&self) -> Vec<pb::DatasetInfo> {
        self.config.datasets.iter().map(|d| self.announce(d)).collect()
    }

    fn announce(&self, d: &DatasetConfig) -> pb::DatasetInfo {
        // The columns the configuration declares that the file holds:
        // names IT wrote, never whatever else a file's header says.
        let header = dataset::read_header(&d.path).unwrap_or_default();
        let columns = std::iter::once(&d.label)
            .chain(&d.numeric)
            .chain(&d.categorical)
            .filter(|c| header.contains(c))
            .cloned()
            .collect();
        let size = match self.release_sizes(d) {
            Ok(r) => {
                if r.stale {
                    warn!(dataset = %d.name, release = r.release, "the dataset's records changed, but its budget has no room for a new size release: the last one stands");
                }
                info!(dataset = %d.name, release = r.release, train_rows = r.train_rows, test_rows = r.test_rows, "dataset sizes released");
                Some(pb::ReleasedSize { train_rows: r.train_rows, test_rows: r.test_rows, release: r.release })
            }
            Err(detail) => {
                warn!(dataset = %d.name, %detail, "the dataset's sizes could not be released; it takes no jobs");
                None
            }
        };
        pb::DatasetInfo {
            name: d.name.clone(),
            columns,
            label: d.label.clone(),
            numeric: d.numeric.clone(),
            categorical: d.categorical.clone(),
            size,
            budget_epsilon: d.budget_epsilon,
            budget_delta: d.budget_delta,
            job_epsilon_cap: d.job_epsilon_cap,
        }
    }

    /// The dataset's sizes as the ledger releases them, from a count of
    /// its records now.
    fn release_sizes(&self, d: &DatasetConfig) -> Result<SizeRelease, WorkerError> {
        let split = SplitOptions { test_fraction: d.test_fraction, seed: d.split_seed };
        let sizes = dataset::count_split(&d.path, &split)?;
        Ok(self.ledger.release_sizes(d, &sizes)?)
    }
}
