//! What a ledger entry charged, by name: the one list of the mechanisms
//! through which anything leaves a site.
//!
//! Every mechanism is Gaussian with sensitivity 1 in its entry's units, so
//! the entry's `(sample_rate, noise_multiplier, steps)` are all a reviewer
//! needs to recompute its ε; the mechanism says what was released, so that
//! `meridian budget ledger` can show where a budget went.

use std::fmt;

use crate::pb;

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
    pub const ALL: [Mechanism; 4] = [Mechanism::DpSgd, Mechanism::SizeRelease, Mechanism::Evaluation, Mechanism::JobSize];

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

    /// The wire value.
    pub fn to_wire(self) -> i32 {
        (match self {
            Mechanism::DpSgd => pb::Mechanism::DpSgd,
            Mechanism::SizeRelease => pb::Mechanism::SizeRelease,
            Mechanism::Evaluation => pb::Mechanism::Evaluation,
            Mechanism::JobSize => pb::Mechanism::JobSize,
        }) as i32
    }

    /// The mechanism of a wire value; `None` for unspecified or unknown.
    pub fn from_wire(value: i32) -> Option<Mechanism> {
        match pb::Mechanism::try_from(value) {
            Ok(pb::Mechanism::DpSgd) => Some(Mechanism::DpSgd),
            Ok(pb::Mechanism::SizeRelease) => Some(Mechanism::SizeRelease),
            Ok(pb::Mechanism::Evaluation) => Some(Mechanism::Evaluation),
            Ok(pb::Mechanism::JobSize) => Some(Mechanism::JobSize),
            Ok(pb::Mechanism::Unspecified) | Err(_) => None,
        }
    }

    /// The mechanism of `entry`; an entry from a site that predates
    /// mechanisms charged a job's size in round 0 and DP-SGD otherwise.
    pub fn of(entry: &pb::LedgerEntry) -> Mechanism {
        Mechanism::from_wire(entry.mechanism).unwrap_or(if entry.round == 0 { Mechanism::JobSize } else { Mechanism::DpSgd })
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
    fn names_and_wire_values_round_trip() {
        for m in Mechanism::ALL {
            assert_eq!(Mechanism::parse(m.as_str()), Some(m));
            let entry = pb::LedgerEntry { mechanism: m.to_wire(), round: 3, ..Default::default() };
            assert_eq!(Mechanism::of(&entry), m);
            assert_eq!(Mechanism::from_wire(m.to_wire()), Some(m));
        }
    }

    #[test]
    fn entries_from_before_mechanisms_are_read_by_their_round() {
        let old = |round| pb::LedgerEntry { round, ..Default::default() };
        assert_eq!(Mechanism::of(&old(0)), Mechanism::JobSize);
        assert_eq!(Mechanism::of(&old(4)), Mechanism::DpSgd);
    }
}
