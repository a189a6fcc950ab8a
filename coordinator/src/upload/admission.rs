//! Admission of a site's update: every check an update must pass before it
//! is stored and counted (round, layout, ledger entry, declared weight,
//! finite values, norm bound), as plain functions of what the job expects and
//! the bytes that arrived.
//!
//! They live apart from the gRPC service so that the rules can be read in
//! one place and exercised without a network, by the unit tests here and
//! by the `update_admission` fuzz target (`fuzz/`), which feeds them
//! arbitrary protobuf. Every rejection is a reason a person can act on; the
//! receiving path (`upload::receive`) records it in the audit log and the
//! round goes on.

use meridian_spec::mechanism::Mechanism;
use meridian_wire::pb;
use meridian_wire::tensor::{CHUNK_VALUES, ChunkError, ChunkValidator};

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
    /// Whether the job's spec releases a clip count with each round.
    pub releases_clip_count: bool,
}

/// Why an update, or a part of one, is refused: a reason the site can act
/// on. Each check of this module refuses with its own variant.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// The job is not running the round the update is for.
    #[error("job {job_id} is {state} at round {current_round}, not accepting updates for round {round}")]
    NotAccepting {
        /// The job's id.
        job_id: String,
        /// The job's state.
        state: String,
        /// The round the job is in.
        current_round: u32,
        /// The round the update is for.
        round: u32,
    },
    /// The update's layout or length is not the job's.
    #[error(
        "update layout {layout_hash} with {num_params} values does not match \
         the job's layout {job_layout_hash} with {job_num_params}"
    )]
    Layout {
        /// The layout hash the update names.
        layout_hash: String,
        /// The number of values the update declares.
        num_params: u64,
        /// The job's layout hash.
        job_layout_hash: String,
        /// The number of parameters of the job's model.
        job_num_params: u64,
    },
    /// The header carries no ledger entry.
    #[error("update carries no ledger entry: the site must commit its privacy charge first")]
    NoLedgerEntry,
    /// The ledger entry is another job's, round's, site's or mechanism's.
    #[error("the ledger entry does not belong to this job, round and site")]
    ForeignLedgerEntry,
    /// A clip count the job's spec does not release.
    #[error("the update carries a clip count, which the job's spec does not release")]
    UnreleasedClipCount,
    /// An exact metric that is NaN or infinite.
    #[error("exact_metrics.{name}: not finite ({value})")]
    NonFiniteMetric {
        /// The metric's name.
        name: String,
        /// Its value.
        value: f64,
    },
    /// A weight other than the one the site declared.
    #[error(
        "num_examples {num_examples} differs from the {declared} training examples {site} \
         declared when it accepted the job"
    )]
    Weight {
        /// The weight the update carries.
        num_examples: u64,
        /// The weight the site declared (at least 1).
        declared: u64,
        /// The sending site.
        site: String,
    },
    /// A part's fields on a header that announces no part.
    #[error("first_value and upload_id are for a part, but value_count is 0")]
    PartWithoutValues,
    /// A part not within the update, or not starting on a chunk boundary.
    #[error(
        "a part of values {first_value}+{value_count} is not within the update's {num_params} values \
         starting on a chunk of {chunk}",
        chunk = CHUNK_VALUES
    )]
    PartRange {
        /// Where the part's values start.
        first_value: u64,
        /// How many values it carries.
        value_count: u64,
        /// The number of values of the whole update.
        num_params: u64,
    },
    /// An upload id that is not 1 to 64 letters, digits, `-` and `_`.
    #[error("upload_id {upload_id:?} is not 1 to 64 letters, digits, '-' and '_'")]
    UploadId {
        /// The upload id.
        upload_id: String,
    },
    /// A part's sum of squares is missing where the job bounds the norm.
    #[error("the update's norm was not measured")]
    NormNotMeasured,
    /// The update's norm exceeds the job's bound.
    #[error("update norm {norm:.4} exceeds the job's bound policy.max_update_norm = {bound}")]
    NormExceeded {
        /// The update's L2 norm.
        norm: f64,
        /// The job's `policy.max_update_norm`.
        bound: f64,
    },
    /// The values are malformed: misaligned, too many or too few, or not finite.
    #[error("malformed update: {0}")]
    Malformed(ChunkError),
}

/// Checks an update's header, sent by `site`: the round, the layout, the
/// ledger entry (the charge must be committed before an update is sent) and
/// the weight. Returns the ledger entry it checked.
pub fn check_header<'h>(
    expected: &Expected<'_>,
    site: &str,
    header: &'h pb::UpdateHeader,
) -> Result<&'h pb::LedgerEntry, Refusal> {
    if !expected.running || header.round != expected.current_round {
        return Err(Refusal::NotAccepting {
            job_id: expected.job_id.to_string(),
            state: expected.state.to_string(),
            current_round: expected.current_round,
            round: header.round,
        });
    }
    if header.layout_hash != expected.layout_hash || header.num_params != expected.num_params {
        return Err(Refusal::Layout {
            layout_hash: header.layout_hash.clone(),
            num_params: header.num_params,
            job_layout_hash: expected.layout_hash.to_string(),
            job_num_params: expected.num_params,
        });
    }
    let Some(entry) = &header.ledger_entry else {
        return Err(Refusal::NoLedgerEntry);
    };
    let belongs = |entry: &pb::LedgerEntry, mechanism: Mechanism| {
        entry.job_id == expected.job_id
            && entry.round == header.round
            && entry.site == site
            && entry.spec_hash == expected.spec_hash
            && entry.charged() == mechanism
    };
    if !belongs(entry, Mechanism::DpSgd) {
        return Err(Refusal::ForeignLedgerEntry);
    }
    // A clip count is charged with the steps, at their joint noise: only a
    // job whose spec releases one may receive one.
    if header.clipped_count.is_some() && !expected.releases_clip_count {
        return Err(Refusal::UnreleasedClipCount);
    }
    if let Some((name, value)) = header.exact_metrics.iter().find(|(_, v)| !v.is_finite()) {
        return Err(Refusal::NonFiniteMetric { name: name.clone(), value: *value });
    }
    // A site cannot weigh its updates more heavily than it declared; the
    // worker sends at least 1 so that a released count of 0 still counts.
    if header.num_examples != expected.declared_examples.max(1) {
        return Err(Refusal::Weight {
            num_examples: header.num_examples,
            declared: expected.declared_examples.max(1),
            site: site.to_string(),
        });
    }
    Ok(entry)
}

/// The most parts one update may be sent in at once (a receiving slot each).
pub const MAX_UPLOAD_PARTS: u32 = 2;

/// The values one stream of an update sent in parts carries, and the upload
/// its parts belong to.
#[derive(Debug, Clone, PartialEq)]
pub struct PartOfUpdate {
    /// Where its values start in the update.
    pub first_value: u64,
    /// How many values it carries.
    pub value_count: u64,
    /// The upload all of its parts name.
    pub upload_id: String,
}

/// The part a header announces (`None`: the whole update), or why it is
/// refused: a part starts on a chunk boundary, holds at least one value,
/// lies within the update and names its upload (at most 64 letters, digits,
/// `-` and `_`). A header that passed [`check_header`] carries the job's
/// own `num_params`.
pub fn check_part(header: &pb::UpdateHeader) -> Result<Option<PartOfUpdate>, Refusal> {
    if header.value_count == 0 {
        if header.first_value != 0 || !header.upload_id.is_empty() {
            return Err(Refusal::PartWithoutValues);
        }
        return Ok(None);
    }
    let chunk = CHUNK_VALUES as u64;
    let end = header.first_value.checked_add(header.value_count);
    if !header.first_value.is_multiple_of(chunk) || end.is_none_or(|end| end > header.num_params) {
        return Err(Refusal::PartRange {
            first_value: header.first_value,
            value_count: header.value_count,
            num_params: header.num_params,
        });
    }
    let id = &header.upload_id;
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(Refusal::UploadId { upload_id: id.clone() });
    }
    Ok(Some(PartOfUpdate { first_value: header.first_value, value_count: header.value_count, upload_id: id.clone() }))
}

/// What every part of one upload must share: the header but for the part's
/// range and upload id, in bytes that do not depend on the order a map's
/// entries were decoded in (protobuf maps decode into hash maps, whose
/// order differs from one decoding to the next) and that compare a NaN
/// metric equal to itself.
pub fn upload_identity(header: &pb::UpdateHeader) -> Vec<u8> {
    use prost::Message;
    let rest = pb::UpdateHeader {
        first_value: 0,
        value_count: 0,
        upload_id: String::new(),
        exact_metrics: Default::default(),
        ..header.clone()
    };
    let mut bytes = rest.encode_to_vec();
    let mut metrics: Vec<(&String, &f64)> = header.exact_metrics.iter().collect();
    metrics.sort_by(|a, b| a.0.cmp(b.0));
    for (name, value) in metrics {
        bytes.extend_from_slice(&(name.len() as u64).to_le_bytes());
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(&value.to_bits().to_le_bytes());
    }
    bytes
}

/// Checks that the norm of an update whose parts' values had these sums of
/// squares is within the job's bound (the sums are measured wherever the
/// job has one).
pub fn check_norm(
    expected: &Expected<'_>,
    sums_of_squares: impl IntoIterator<Item = Option<f64>>,
) -> Result<(), Refusal> {
    norm_within(expected.max_update_norm, sums_of_squares)
}

fn norm_within(bound: Option<f64>, sums_of_squares: impl IntoIterator<Item = Option<f64>>) -> Result<(), Refusal> {
    let Some(bound) = bound else {
        return Ok(());
    };
    let mut sum = 0.0;
    for part in sums_of_squares {
        sum += part.ok_or(Refusal::NormNotMeasured)?;
    }
    let norm = f64::sqrt(sum);
    if norm > bound {
        return Err(Refusal::NormExceeded { norm, bound });
    }
    Ok(())
}

/// Checks an update's values chunk by chunk as they stream past (the
/// receiving path writes each accepted chunk straight to disk), then the whole
/// vector's length and norm bound.
#[derive(Debug)]
pub struct UpdateReceiver {
    validator: ChunkValidator,
    max_update_norm: Option<f64>,
    /// A part of an update: its norm is judged with the other parts'.
    part: bool,
}

impl UpdateReceiver {
    /// Prepares to receive the values of an update whose header passed [`check_header`].
    pub fn new(expected: &Expected<'_>) -> Self {
        // The header was checked against the job, so this is the job's own size.
        UpdateReceiver::of(expected, expected.num_params as usize, false)
    }

    /// Prepares to receive one part of an update, which [`check_part`] passed.
    pub fn part(expected: &Expected<'_>, part: &PartOfUpdate) -> Self {
        UpdateReceiver::of(expected, part.value_count as usize, true)
    }

    fn of(expected: &Expected<'_>, len: usize, part: bool) -> Self {
        UpdateReceiver {
            validator: match expected.max_update_norm {
                Some(_) => ChunkValidator::with_norm(len),
                None => ChunkValidator::new(len),
            },
            max_update_norm: expected.max_update_norm,
            part,
        }
    }

    /// Checks the next chunk of data.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), Refusal> {
        self.validator.check(chunk).map_err(Refusal::Malformed)
    }

    /// Confirms the update (or part) is complete: every value present, each
    /// finite. An update sent whole must be within the norm bound; a part
    /// gives its values' sum of squares (where the job has a bound), for
    /// [`check_norm`] once every part is in.
    pub fn finish(self) -> Result<Option<f64>, Refusal> {
        self.validator.finish().map_err(Refusal::Malformed)?;
        // `of` sums the squares whenever the job has a bound.
        let sum_of_squares = self.validator.sum_of_squares();
        if self.part {
            return Ok(sum_of_squares);
        }
        norm_within(self.max_update_norm, [sum_of_squares])?;
        Ok(None)
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
            releases_clip_count: true,
        }
    }

    fn header() -> pb::UpdateHeader {
        pb::UpdateHeader {
            job_id: "job-1".to_string(),
            round: 3,
            layout_hash: "abc".to_string(),
            num_params: 4,
            num_examples: 10,

            ledger_entry: Some(pb::LedgerEntry {
                job_id: "job-1".to_string(),
                round: 3,
                site: "hospital-a".to_string(),
                spec_hash: "spec".to_string(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn a_clip_count_is_admitted_only_where_the_spec_releases_one() {
        let h = pb::UpdateHeader { clipped_count: Some(12), ..header() };
        assert!(check_header(&expected(), "hospital-a", &h).is_ok());
        let without = Expected { releases_clip_count: false, ..expected() };
        let err = check_header(&without, "hospital-a", &h).unwrap_err();
        assert_eq!(err, Refusal::UnreleasedClipCount);
        assert!(err.to_string().contains("does not release"), "{err}");
        // The DP-SGD entry must be one: an evaluation's entry does not charge an update.
        let mut h = header();
        if let Some(e) = &mut h.ledger_entry {
            e.mechanism = meridian_wire::convert::mechanism_value(Mechanism::Evaluation);
        }
        assert!(check_header(&expected(), "hospital-a", &h).is_err());
    }

    #[test]
    fn a_well_formed_update_is_admitted() {
        let h = header();
        assert_eq!(check_header(&expected(), "hospital-a", &h), Ok(h.ledger_entry.as_ref().unwrap()));
        let mut receiver = UpdateReceiver::new(&expected());
        receiver.push(&bytes(&[0.5, -0.5])).unwrap();
        receiver.push(&bytes(&[0.5, 1.0])).unwrap();
        assert_eq!(receiver.finish(), Ok(None));
    }

    /// A named way to spoil a header, and the reason it must be refused with.
    type Spoiled = (&'static str, Box<dyn Fn(&mut pb::UpdateHeader)>, &'static str);

    #[test]
    fn each_header_fault_has_its_reason() {
        let cases: Vec<Spoiled> = vec![
            ("old round", Box::new(|h| h.round = 2), "not accepting updates for round 2"),
            ("layout", Box::new(|h| h.layout_hash = "f00d".into()), "does not match the job's layout"),
            ("length", Box::new(|h| h.num_params = 5), "with 5 values does not match"),
            ("no entry", Box::new(|h| h.ledger_entry = None), "no ledger entry"),
            (
                "other site's entry",
                Box::new(|h| h.ledger_entry.as_mut().unwrap().site = "hospital-b".into()),
                "does not belong",
            ),
            ("other spec", Box::new(|h| h.ledger_entry.as_mut().unwrap().spec_hash = "x".into()), "does not belong"),
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
            assert!(err.to_string().contains(reason), "{what}: {err}");
        }
        let evaluating = Expected { running: false, state: "evaluating", ..expected() };
        let err = check_header(&evaluating, "hospital-a", &header()).unwrap_err();
        assert!(matches!(&err, Refusal::NotAccepting { state, .. } if state == "evaluating"), "{err:?}");
        assert!(err.to_string().contains("is evaluating"), "{err}");
    }

    #[test]
    fn refusals_read_as_the_reasons_sites_are_sent() {
        let chunk = meridian_wire::tensor::CHUNK_VALUES;
        let cases = [
            (
                Refusal::Layout {
                    layout_hash: "f00d".into(),
                    num_params: 5,
                    job_layout_hash: "abc".into(),
                    job_num_params: 4,
                },
                "update layout f00d with 5 values does not match the job's layout abc with 4".to_string(),
            ),
            (
                Refusal::Weight { num_examples: 1_000, declared: 10, site: "hospital-a".into() },
                "num_examples 1000 differs from the 10 training examples hospital-a declared when it accepted the job"
                    .to_string(),
            ),
            (
                Refusal::PartRange { first_value: 1, value_count: 5, num_params: 4 },
                format!("a part of values 1+5 is not within the update's 4 values starting on a chunk of {chunk}"),
            ),
            (
                Refusal::UploadId { upload_id: "a/b".into() },
                r#"upload_id "a/b" is not 1 to 64 letters, digits, '-' and '_'"#.to_string(),
            ),
            (
                Refusal::NormExceeded { norm: 2.828_427, bound: 2.0 },
                "update norm 2.8284 exceeds the job's bound policy.max_update_norm = 2".to_string(),
            ),
        ];
        for (refusal, reason) in cases {
            assert_eq!(refusal.to_string(), reason);
        }
    }

    #[test]
    fn values_beyond_the_norm_bound_or_missing_are_refused() {
        let mut receiver = UpdateReceiver::new(&expected());
        receiver.push(&bytes(&[2.0, 2.0, 0.0, 0.0])).unwrap();
        let err = receiver.finish().unwrap_err();
        assert!(matches!(err, Refusal::NormExceeded { bound: 2.0, .. }), "{err:?}");
        assert!(err.to_string().contains("exceeds the job's bound policy.max_update_norm = 2"), "{err}");
        let mut receiver = UpdateReceiver::new(&expected());
        receiver.push(&bytes(&[0.1, 0.1, 0.1])).unwrap();
        let err = receiver.finish().unwrap_err();
        assert_eq!(err, Refusal::Malformed(ChunkError::Truncated { received: 3, expected: 4 }));
        assert_eq!(err.to_string(), "malformed update: stream ended after 3 of 4 values");
        let mut receiver = UpdateReceiver::new(&expected());
        let err = receiver.push(&bytes(&[0.1, f32::NAN])).unwrap_err();
        assert!(matches!(err, Refusal::Malformed(ChunkError::NotFinite { index: 1, .. })), "{err:?}");
        assert!(err.to_string().contains("value 1 is not finite"), "{err}");
    }

    #[test]
    fn a_part_is_within_the_update_on_a_chunk_and_names_its_upload() {
        let chunk = meridian_wire::tensor::CHUNK_VALUES as u64;
        let part = |first_value, value_count, upload_id: &str| {
            let header = pb::UpdateHeader {
                num_params: chunk * 3,
                first_value,
                value_count,
                upload_id: upload_id.to_string(),
                ..header()
            };
            check_part(&header)
        };
        assert_eq!(part(0, 0, ""), Ok(None));
        assert_eq!(
            part(chunk, chunk * 2, "a-1_b"),
            Ok(Some(PartOfUpdate { first_value: chunk, value_count: chunk * 2, upload_id: "a-1_b".to_string() }))
        );
        assert!(part(0, 1, "u").is_ok());
        for (first_value, value_count, id, why) in [
            (chunk, 0, "", "value_count is 0"),
            (0, 0, "u", "value_count is 0"),
            (1, 5, "u", "chunk"),
            (chunk, chunk * 2 + 1, "u", "within"),
            (u64::MAX - chunk + 1, chunk, "u", "within"),
            (0, 5, "", "upload_id"),
            (0, 5, "a/b", "upload_id"),
            (0, 5, &"x".repeat(65), "upload_id"),
        ] {
            let err = part(first_value, value_count, id).unwrap_err();
            assert!(err.to_string().contains(why), "{first_value}+{value_count} {id:?}: {err}");
        }
    }

    #[test]
    fn a_part_gives_its_sum_of_squares_and_the_whole_is_judged_by_the_bound() {
        let e = expected();
        let part = PartOfUpdate { first_value: 0, value_count: 2, upload_id: "u".to_string() };
        let mut receiver = UpdateReceiver::part(&e, &part);
        // Beyond the bound of 2 alone (norm 2.83), but a part is not judged alone.
        receiver.push(&bytes(&[2.0, 2.0])).unwrap();
        assert_eq!(receiver.finish(), Ok(Some(8.0)));
        let mut short = UpdateReceiver::part(&e, &part);
        short.push(&bytes(&[1.0])).unwrap();
        assert!(short.finish().unwrap_err().to_string().contains("stream ended after 1 of 2 values"));
        assert_eq!(check_norm(&e, [Some(1.0), Some(3.0)]), Ok(()));
        assert!(matches!(check_norm(&e, [Some(1.0), Some(3.5)]), Err(Refusal::NormExceeded { .. })));
        assert!(check_norm(&e, [Some(1.0), Some(3.5)]).unwrap_err().to_string().contains("exceeds"));
        assert_eq!(check_norm(&e, [Some(1.0), None]), Err(Refusal::NormNotMeasured));
        assert!(check_norm(&e, [Some(1.0), None]).unwrap_err().to_string().contains("not measured"));
        let unbounded = Expected { max_update_norm: None, ..expected() };
        assert_eq!(check_norm(&unbounded, [None, None]), Ok(()));
    }

    #[test]
    fn the_parts_of_an_upload_share_their_header_whatever_order_its_metrics_decode_in() {
        use prost::Message;
        let mut h = header();
        for i in 0..32 {
            h.exact_metrics.insert(format!("metric-{i}"), f64::from(i) / 3.0);
        }
        h.exact_metrics.insert("loss".to_string(), f64::NAN);
        let bytes = h.encode_to_vec();
        // Each decoding has a hash map of its own, ordered its own way.
        let (a, b) = (pb::UpdateHeader::decode(&bytes[..]).unwrap(), pb::UpdateHeader::decode(&bytes[..]).unwrap());
        let part = |mut h: pb::UpdateHeader, first_value, upload_id: &str| {
            (h.first_value, h.value_count, h.upload_id) = (first_value, 7, upload_id.to_string());
            h
        };
        assert_eq!(upload_identity(&part(a.clone(), 0, "u")), upload_identity(&part(b.clone(), 262_144, "u")));
        let mut other = b.clone();
        other.exact_metrics.insert("metric-3".to_string(), 2.0);
        assert_ne!(upload_identity(&a), upload_identity(&other));
        let other = pb::UpdateHeader { num_examples: 11, ..b };
        assert_ne!(upload_identity(&a), upload_identity(&other));
    }
}
