//! A hostile hospital: a participant that sends broken or poisoned updates.
//! Each is rejected with its reason and recorded in the audit log, and the
//! round goes on with the honest sites.

use std::time::Duration;

use meridian_wire::pb;

use crate::util::{Federation, RawSite, example, run, wait_for};

const NUMERIC: &[&str] = &["radius_mean", "texture_mean"];

#[test]
fn broken_and_poisoned_updates_are_rejected_and_the_round_goes_on() {
    let mut fed = Federation::start(&["hospital-a", "hospital-x"]);
    fed.start_worker("hospital-a", "wdbc", &example("data/wdbc_breast_cancer.csv"), "diagnosis", NUMERIC);
    let mut evil = RawSite::join(&fed, "hospital-x", "wdbc", "diagnosis", NUMERIC);

    let spec = fed.dir.join("job.toml");
    let text = std::fs::read_to_string(example("jobs/wdbc.toml")).unwrap();
    let start = text.find("numeric = [").unwrap();
    let end = text[start..].find(']').unwrap() + start + 1;
    let mut text = text.clone();
    text.replace_range(start..end, "numeric = [\"radius_mean\", \"texture_mean\"]");
    let text = text
        .replace("rounds = 5", "rounds = 1")
        .replace("min_sites = 3", "min_sites = 1")
        .replace("round_deadline_secs = 60", "round_deadline_secs = 4\nmax_update_norm = 50.0");
    std::fs::write(&spec, text).unwrap();
    wait_for(Duration::from_secs(30), "hospital-a to register", || {
        let out = fed.client("rita", &["budget", "--json"]);
        String::from_utf8_lossy(&out.stdout).contains("hospital-a").then_some(())
    });
    let out = fed.client("alice", &["job", "submit", spec.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let job_id = String::from_utf8_lossy(&out.stdout).trim().to_string();

    // The hostile site accepts the offer, then waits for round 1.
    let (spec_hash, train) = evil.accept_until_training(100);
    let entry = |round: u32| pb::LedgerEntry {
        seq: 1,
        site: "hospital-x".to_string(),
        job_id: job_id.clone(),
        round,
        spec_hash: spec_hash.clone(),
        ..Default::default()
    };
    let header = |round: u32, layout: &str, n: u64, ledger: Option<pb::LedgerEntry>| pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(pb::UpdateHeader {
            job_id: job_id.clone(),
            round,
            layout_hash: layout.to_string(),
            num_params: n,
            num_examples: 100,

            ledger_entry: ledger,
            ..Default::default()
        })),
    };
    // A header for a part of the update: values first..first + count.
    let part = |first: u64, count: u64, upload_id: &str| {
        let mut message = header(1, &train.layout_hash, train.num_params, Some(entry(1)));
        if let Some(pb::update_chunk::Part::Header(h)) = &mut message.part {
            (h.first_value, h.value_count, h.upload_id) = (first, count, upload_id.to_string());
        }
        message
    };
    let data = |values: Vec<f32>| pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Data(
            values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into(),
        )),
    };
    let n = train.num_params as usize;
    let layout = train.layout_hash.clone();
    let mut nan = vec![0.5f32; n];
    nan[3] = f32::NAN;
    let too_short = format!("malformed update: stream ended after {} of {n} values", n - 1);
    let too_long = format!("malformed update: received more than the {n} values the header announced");
    let attempts: Vec<(&str, Vec<pb::UpdateChunk>, &str)> = vec![
        (
            "NaN",
            vec![header(1, &layout, n as u64, Some(entry(1))), data(nan)],
            "malformed update: value 3 is not finite (NaN)",
        ),
        (
            "infinite",
            vec![header(1, &layout, n as u64, Some(entry(1))), data(vec![f32::INFINITY; n])],
            "malformed update: value 0 is not finite (inf)",
        ),
        ("too short", vec![header(1, &layout, n as u64, Some(entry(1))), data(vec![0.1; n - 1])], &too_short),
        ("too long", vec![header(1, &layout, n as u64, Some(entry(1))), data(vec![0.1; n + 1])], &too_long),
        (
            "wrong layout",
            vec![header(1, "f00d", n as u64, Some(entry(1))), data(vec![0.1; n])],
            "does not match the job's layout",
        ),
        (
            "replayed round",
            vec![header(0, &layout, n as u64, Some(entry(0))), data(vec![0.1; n])],
            "not accepting updates for round 0",
        ),
        (
            "no ledger entry",
            vec![header(1, &layout, n as u64, None), data(vec![0.1; n])],
            "update carries no ledger entry",
        ),
        (
            "scaled",
            vec![header(1, &layout, n as u64, Some(entry(1))), data(vec![100.0; n])],
            "exceeds the job's bound policy.max_update_norm = 50",
        ),
        (
            "oversized chunk",
            vec![header(1, &layout, n as u64, Some(entry(1))), data(vec![0.1; (1 << 18) + 1])],
            "malformed update: chunk 0 has 1048580 bytes, more than the limit of 1048576",
        ),
        ("a part off a chunk's boundary", vec![part(1, 2, "u1"), data(vec![0.1; 2])], "starting on a chunk"),
        (
            "a part past the update's end",
            vec![part(0, n as u64 + 1, "u1"), data(vec![0.1; n + 1])],
            "is not within the update",
        ),
        ("a part without an upload id", vec![part(0, 2, ""), data(vec![0.1; 2])], "upload_id"),
        (
            "a scaled part, judged with the rest",
            vec![part(0, n as u64, "u2"), data(vec![100.0; n])],
            "exceeds the job's bound policy.max_update_norm = 50",
        ),
    ];
    for (what, messages, expected) in attempts {
        let reply = evil.rt.block_on(evil.client.push_update(tokio_stream::iter(messages))).unwrap().into_inner();
        assert!(!reply.accepted, "{what} was accepted");
        assert!(reply.reason.contains(expected), "{what}: {}", reply.reason);
    }

    // A part is kept until the rest of its upload arrives; the upload's
    // other parts must carry the same header but for their range.
    let push = |messages: Vec<pb::UpdateChunk>| {
        evil.rt.block_on(evil.client.clone().push_update(tokio_stream::iter(messages))).unwrap().into_inner()
    };
    let kept = push(vec![part(0, 1, "u3"), data(vec![0.1])]);
    assert!(kept.accepted && !kept.complete, "{kept:?}");
    let mut other = part(0, 1, "u3");
    if let Some(pb::update_chunk::Part::Header(h)) = &mut other.part {
        h.exact_metrics.insert("train_loss".to_string(), 0.5);
    }
    let refused = push(vec![other, data(vec![0.1])]);
    assert!(!refused.accepted && refused.reason.contains("header differs"), "{refused:?}");

    // The honest site's update carries the round; the job completes at the deadline without hospital-x.
    let out = fed.client("alice", &["job", "watch", &job_id]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let audit = fed.dir.join("coord-state").join("audit.log");
    let text = std::fs::read_to_string(&audit).unwrap();
    assert_eq!(text.matches("update.rejected").count(), 14, "{text}");
    assert!(run(&["audit", "verify", audit.to_str().unwrap()]).status.success());
}
