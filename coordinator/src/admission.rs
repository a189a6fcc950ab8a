//! Admission of a site's update: every check an update must pass before it
//! is stored and counted (round, layout, ledger entry, declared weight,
//! finite values, norm bound), as plain functions of what the job expects and
//! the bytes that arrived.
//!
//! They live apart from the gRPC service so that the rules can be read in
//! one place and exercised without a network, by the unit tests here and
//! by the `update_admission` fuzz target (`fuzz/`), which feeds them
//! arbitrary protobuf. Every rejection is a reason a person can act on; the
//! service records it in the audit log and the round goes on.

use proto::pb;
use proto::tensor::ChunkValidator;

/// What the job expects of an update arriving now.
#[derive(Clone, Debug)]
pub struct Expected<'a> {
    /// The job's id.
    pub job_id: &'a str,
    /// The job's state, as `JobState::as_str` spells it.
    pub state: &'a str,
    /// Whether the job is running a round (the only state that takes updates).
    pub running: bool,
    /// The round the job is in.
    pub current_round: u32,
    /// The hash of the job's parameter layout.
    pub layout_hash: &'a str,
    /// The number of parameters of the job's model.
    pub num_params: u64,
    /// The hash of the job's spec, which the ledger entry must name.
    pub spec_hash: &'a str,
    /// The job's `policy.max_update_norm`, if any.
    pub max_update_norm: Option<f64>,
    /// The training examples the sending site declared when it accepted the
    /// job (released with noise): its FedAvg weight in every round.
    pub declared_examples: u64,
}

/// Checks an update's header, sent by `site`: the round, the layout, the
/// ledger entry (the charge must be committed before an update is sent) and
/// the weight. Returns the ledger entry it checked.
pub fn check_header<'h>(
    expected: &Expected<'_>,
    site: &str,
    header: &'h pb::UpdateHeader,
) -> Result<&'h pb::LedgerEntry, String> {
    if !expected.running || header.round != expected.current_round {
        return Err(format!(
            "job {} is {} at round {}, not accepting updates for round {}",
            expected.job_id, expected.state, expected.current_round, header.round
        ));
    }
    if header.layout_hash != expected.layout_hash || header.num_params != expected.num_params {
        return Err(format!(
            "update layout {} with {} values does not match the job's layout {} with {}",
            header.layout_hash, header.num_params, expected.layout_hash, expected.num_params
        ));
    }
    let Some(entry) = &header.ledger_entry else {
        return Err(
            "update carries no ledger entry: the site must commit its privacy charge first"
                .to_string(),
        );
    };
    if entry.job_id != expected.job_id
        || entry.round != header.round
        || entry.site != site
        || entry.spec_hash != expected.spec_hash
    {
        return Err("the ledger entry does not belong to this job, round and site".to_string());
    }
    // A site cannot weigh its updates more heavily than it declared; the
    // worker sends at least 1 so that a released count of 0 still counts.
    if header.num_examples != expected.declared_examples.max(1) {
        return Err(format!(
            "num_examples {} differs from the {} training examples {site} declared when it accepted the job",
            header.num_examples,
            expected.declared_examples.max(1)
        ));
    }
    Ok(entry)
}

/// Checks an update's values chunk by chunk as they stream past (the
/// service writes each accepted chunk straight to disk), then the whole
/// vector's length and norm bound.
#[derive(Debug)]
pub struct UpdateReceiver {
    validator: ChunkValidator,
    max_update_norm: Option<f64>,
}

impl UpdateReceiver {
    /// Prepares to receive the values of an update whose header passed [`check_header`].
    pub fn new(expected: &Expected<'_>) -> Self {
        // The header was checked against the job, so this is the job's own size.
        let len = expected.num_params as usize;
        UpdateReceiver {
            validator: match expected.max_update_norm {
                Some(_) => ChunkValidator::with_norm(len),
                None => ChunkValidator::new(len),
            },
            max_update_norm: expected.max_update_norm,
        }
    }

    /// Checks the next chunk of data.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.validator
            .check(chunk)
            .map_err(|e| format!("malformed update: {e}"))
    }

    /// Confirms the update is complete (every value present; each was
    /// finite) and within the norm bound.
    pub fn finish(self) -> Result<(), String> {
        self.validator
            .finish()
            .map_err(|e| format!("malformed update: {e}"))?;
        if let Some(bound) = self.max_update_norm {
            // `new` sums the squares whenever the job has a bound.
            let norm = self
                .validator
                .norm()
                .ok_or("the update's norm was not measured")?;
            if norm > bound {
                return Err(format!(
                    "update norm {norm:.4} exceeds the job's bound policy.max_update_norm = {bound}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected() -> Expected<'static> {
        Expected {
            job_id: "job-1",
            state: "running",
            running: true,
            current_round: 3,
            layout_hash: "abc",
            num_params: 4,
            spec_hash: "spec",
            max_update_norm: Some(2.0),
            declared_examples: 10,
        }
    }

    fn header() -> pb::UpdateHeader {
        pb::UpdateHeader {
            job_id: "job-1".to_string(),
            round: 3,
            layout_hash: "abc".to_string(),
            num_params: 4,
            num_examples: 10,
            metrics: Default::default(),
            ledger_entry: Some(pb::LedgerEntry {
                job_id: "job-1".to_string(),
                round: 3,
                site: "hospital-a".to_string(),
                spec_hash: "spec".to_string(),
                ..Default::default()
            }),
        }
    }

    fn bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn a_well_formed_update_is_admitted() {
        let h = header();
        assert_eq!(
            check_header(&expected(), "hospital-a", &h),
            Ok(h.ledger_entry.as_ref().unwrap())
        );
        let mut receiver = UpdateReceiver::new(&expected());
        receiver.push(&bytes(&[0.5, -0.5])).unwrap();
        receiver.push(&bytes(&[0.5, 1.0])).unwrap();
        assert_eq!(receiver.finish(), Ok(()));
    }

    /// A named way to spoil a header, and the reason it must be refused with.
    type Spoiled = (
        &'static str,
        Box<dyn Fn(&mut pb::UpdateHeader)>,
        &'static str,
    );

    #[test]
    fn each_header_fault_has_its_reason() {
        let cases: Vec<Spoiled> = vec![
            (
                "old round",
                Box::new(|h| h.round = 2),
                "not accepting updates for round 2",
            ),
            (
                "layout",
                Box::new(|h| h.layout_hash = "f00d".into()),
                "does not match the job's layout",
            ),
            (
                "length",
                Box::new(|h| h.num_params = 5),
                "with 5 values does not match",
            ),
            (
                "no entry",
                Box::new(|h| h.ledger_entry = None),
                "no ledger entry",
            ),
            (
                "other site's entry",
                Box::new(|h| h.ledger_entry.as_mut().unwrap().site = "hospital-b".into()),
                "does not belong",
            ),
            (
                "other spec",
                Box::new(|h| h.ledger_entry.as_mut().unwrap().spec_hash = "x".into()),
                "does not belong",
            ),
            (
                "inflated weight",
                Box::new(|h| h.num_examples = 1_000),
                "num_examples 1000 differs from the 10 training examples hospital-a declared",
            ),
        ];
        for (what, spoil, reason) in cases {
            let mut h = header();
            spoil(&mut h);
            let err = check_header(&expected(), "hospital-a", &h).unwrap_err();
            assert!(err.contains(reason), "{what}: {err}");
        }
        let evaluating = Expected {
            running: false,
            state: "evaluating",
            ..expected()
        };
        assert!(
            check_header(&evaluating, "hospital-a", &header())
                .unwrap_err()
                .contains("is evaluating")
        );
    }

    #[test]
    fn values_beyond_the_norm_bound_or_missing_are_refused() {
        let mut receiver = UpdateReceiver::new(&expected());
        receiver.push(&bytes(&[2.0, 2.0, 0.0, 0.0])).unwrap();
        assert!(
            receiver
                .finish()
                .unwrap_err()
                .contains("exceeds the job's bound policy.max_update_norm = 2")
        );
        let mut receiver = UpdateReceiver::new(&expected());
        receiver.push(&bytes(&[0.1, 0.1, 0.1])).unwrap();
        assert_eq!(
            receiver.finish().unwrap_err(),
            "malformed update: stream ended after 3 of 4 values"
        );
        let mut receiver = UpdateReceiver::new(&expected());
        assert!(
            receiver
                .push(&bytes(&[0.1, f32::NAN]))
                .unwrap_err()
                .contains("value 1 is not finite")
        );
    }
}
