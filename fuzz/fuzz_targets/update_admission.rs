//! Update validation as the coordinator runs it (`meridian_coordinator::admission`),
//! fed arbitrary bytes decoded as length-delimited `UpdateChunk` protobuf
//! messages: malformed protobuf, headers and data in any order, any values.
//! An admitted update always has the job's length, only finite values and a
//! norm within the job's bound; an admitted part of an update has its own
//! length and only finite values, lies within the update on a chunk
//! boundary, and its norm is judged with its upload's other parts (here,
//! as the only one).

#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian_coordinator::admission::{Expected, UpdateReceiver, check_header, check_norm, check_part};
use meridian_wire::pb;
use prost::Message;

const BOUND: f64 = 10.0;

fuzz_target!(|data: &[u8]| {
    let expected = Expected {
        job_id: "job-1",
        state: "running",
        running: true,
        current_round: 2,
        layout_hash: "ab",
        num_params: 6,
        spec_hash: "s",
        max_update_norm: Some(BOUND),
        declared_examples: 40,
        releases_clip_count: true,
    };
    let mut buf = data;
    let mut messages = Vec::new();
    while !buf.is_empty() {
        match pb::UpdateChunk::decode_length_delimited(&mut buf) {
            Ok(m) => messages.push(m),
            // Malformed protobuf: tonic refuses the call before admission sees it.
            Err(_) => return,
        }
    }
    let mut messages = messages.into_iter();
    let Some(pb::UpdateChunk { part: Some(pb::update_chunk::Part::Header(header)) }) = messages.next() else {
        return;
    };
    if check_header(&expected, "hospital-a", &header).is_err() {
        return;
    }
    assert_eq!(header.round, 2);
    assert_eq!(header.num_params, 6);
    assert_eq!(header.num_examples, 40);
    assert!(header.ledger_entry.as_ref().is_some_and(|e| e.site == "hospital-a"));
    let Ok(part) = check_part(&header) else {
        return;
    };
    if let Some(part) = &part {
        assert!(part.value_count > 0 && part.first_value + part.value_count <= 6);
        assert_eq!(part.first_value % meridian_wire::tensor::CHUNK_VALUES as u64, 0);
    }
    let mut receiver = match &part {
        None => UpdateReceiver::new(&expected),
        Some(part) => UpdateReceiver::part(&expected, part),
    };
    let mut values: Vec<f32> = Vec::new();
    for message in messages {
        match message.part {
            Some(pb::update_chunk::Part::Data(d)) => {
                if receiver.push(&d).is_err() {
                    return;
                }
                // What the coordinator would write to disk for this chunk.
                values.extend(d.chunks_exact(4).map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]])));
            }
            _ => return,
        }
    }
    let admitted = match (receiver.finish(), &part) {
        (Ok(_), None) => true,
        (Ok(sum_of_squares), Some(part)) => {
            assert_eq!(values.len() as u64, part.value_count);
            check_norm(&expected, [sum_of_squares]).is_ok()
        }
        (Err(_), _) => false,
    };
    if admitted {
        assert_eq!(values.len() as u64, part.as_ref().map_or(6, |p| p.value_count));
        assert!(values.iter().all(|v| v.is_finite()));
        let norm = values.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        assert!(norm <= BOUND, "admitted an update of norm {norm}");
    }
});
