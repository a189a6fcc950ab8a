//! What a ledger entry charged, by name: the one list of the mechanisms
//! through which anything leaves a site.
//!
//! Every mechanism is Gaussian with sensitivity 1 in its entry's units, so
//! the entry's `(sample_rate, noise_multiplier, steps)` are all a reviewer
//! needs to recompute its ε; the mechanism says what was released, so that
//! `meridian budget ledger` can show where a budget went.

use std::fmt;

/// A mechanism a site charges to its ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mechanism {
    /// One round of DP-SGD, with its clip count if the spec releases one.
    DpSgd,
    /// The dataset's training and test sizes, released once for every job.
    SizeRelease,
    /// A held-out evaluation: the test split's score × label histogram.
    Evaluation,
    /// A job's training-set size, released at acceptance by sites that
    /// predate size releases.
    JobSize,
}

impl Mechanism {
    /// Every mechanism.
    pub const ALL: [Mechanism; 4] =
        [Mechanism::DpSgd, Mechanism::SizeRelease, Mechanism::Evaluation, Mechanism::JobSize];

    /// Its name in ledgers, JSON and tables (`dp_sgd`).
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::DpSgd => "dp_sgd",
            Mechanism::SizeRelease => "size_release",
            Mechanism::Evaluation => "evaluation",
            Mechanism::JobSize => "job_size",
        }
    }

    /// The mechanism named `name`.
    pub fn parse(name: &str) -> Option<Mechanism> {
        Self::ALL.into_iter().find(|m| m.as_str() == name)
    }
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in Mechanism::ALL {
            assert_eq!(Mechanism::parse(m.as_str()), Some(m));
        }
        assert_eq!(Mechanism::parse("dp-sgd"), None);
    }
}
