//! One model of time, end to end: an upload that keeps making progress is
//! waited for past the round's deadline; an update stream that falls silent
//! for the idle timeout is dropped with that reason; a cancelled job stops
//! local training within a second.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meridian_wire::pb;
use rusqlite::Connection;

use crate::util::{Federation, RawSite, WDBC_NUMERIC, WdbcJob, example, wait_for};

const NUMERIC: &[&str] = WDBC_NUMERIC;

fn spec(
    fed: &Federation,
    file: &str,
    rounds: u32,
    local_epochs: f64,
    hidden: &str,
    deadline_secs: u32,
) -> std::path::PathBuf {
    WdbcJob { rounds, local_epochs, hidden, deadline_secs, max_round_attempts: 2, ..WdbcJob::default() }
        .write(fed, file)
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn wait_for_sites(fed: &Federation, sites: &[&str]) {
    wait_for(Duration::from_secs(30), "the workers to register", || {
        let out = fed.client("rita", &["budget", "--json"]);
        let text = stdout(&out);
        sites.iter().all(|s| text.contains(s)).then_some(())
    });
}

#[test]
fn an_upload_still_making_progress_is_waited_for_past_the_deadline() {
    let mut fed = Federation::start_with(&["hospital-a", "hospital-b"], 0, "idle_timeout_secs = 2");
    let data = example("data/wdbc_breast_cancer.csv");
    fed.start_worker("hospital-a", "wdbc", &data, "diagnosis", NUMERIC);
    // hospital-b's uplink is capped at 40 kB/s: its 270 kB update takes at
    // least 6.7 s to send, past the 4 s deadline and longer than the 2 s idle
    // timeout, but it never stops moving.
    fed.start_worker_with_toml(
        "hospital-b",
        "wdbc",
        &data,
        "diagnosis",
        NUMERIC,
        40.0,
        20.0,
        "[network]\nupload_limit_mb_per_sec = 0.04\n",
    );
    wait_for_sites(&fed, &["hospital-a", "hospital-b"]);
    let spec = spec(&fed, "slow.toml", 2, 1.0, "[256, 256]", 4);
    let job_id = fed.submit(&spec);
    let out = fed.client("alice", &["job", "watch", &job_id]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), fed.coordinator_log());

    // min_sites is 1, so without the wait each round would have closed at its
    // deadline with hospital-a alone and refused hospital-b's late update.
    let coordinator = Connection::open(fed.dir.join("coord-state").join("coordinator.sqlite")).unwrap();
    let sites: Vec<(u32, String)> = coordinator
        .prepare("SELECT round, site FROM updates WHERE job_id = ?1 ORDER BY round, site")
        .unwrap()
        .query_map([&job_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let expected: Vec<(u32, String)> = [(1, "hospital-a"), (1, "hospital-b"), (2, "hospital-a"), (2, "hospital-b")]
        .iter()
        .map(|(r, s)| (*r, s.to_string()))
        .collect();
    assert_eq!(sites, expected);
    let audit = std::fs::read_to_string(fed.dir.join("coord-state").join("audit.log")).unwrap();
    assert!(!audit.contains("update.rejected"), "{audit}");
    // Each round was closed with both sites' updates in it.
    let aggregated: Vec<&str> = audit.lines().filter(|l| l.contains("\"round.aggregated\"")).collect();
    assert_eq!(aggregated.len(), 2, "{audit}");
    for line in aggregated {
        assert!(line.contains("hospital-a") && line.contains("hospital-b"), "{line}");
    }
}

#[test]
fn an_update_stream_silent_for_the_idle_timeout_is_dropped_with_its_reason() {
    let mut fed = Federation::start_with(&["hospital-a", "hospital-x"], 0, "idle_timeout_secs = 2");
    fed.start_worker("hospital-a", "wdbc", &example("data/wdbc_breast_cancer.csv"), "diagnosis", NUMERIC);
    let mut stalled = RawSite::join(&fed, "hospital-x", "wdbc", "diagnosis", NUMERIC);
    wait_for_sites(&fed, &["hospital-a"]);
    let spec = spec(&fed, "stall.toml", 1, 1.0, "[16]", 30);
    let job_id = fed.submit(&spec);
    let (spec_hash, train) = stalled.accept_until_training(100);
    // A header and half the values, then nothing, with the connection open.
    let n = train.num_params as usize;
    let header = pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(pb::UpdateHeader {
            job_id: job_id.clone(),
            round: 1,
            layout_hash: train.layout_hash.clone(),
            num_params: n as u64,
            num_examples: 100,

            ledger_entry: Some(pb::LedgerEntry {
                site: "hospital-x".to_string(),
                job_id: job_id.clone(),
                round: 1,
                spec_hash,
                ..Default::default()
            }),
            ..Default::default()
        })),
    };
    let half = pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Data(meridian_wire::tensor::encode_chunk(&vec![0.01f32; n / 2]))),
    };
    let messages = tokio_stream::StreamExt::chain(tokio_stream::iter(vec![header, half]), tokio_stream::pending());
    let reply = stalled.rt.block_on(stalled.client.push_update(messages)).unwrap().into_inner();
    assert!(!reply.accepted);
    assert_eq!(
        reply.reason,
        "the update stream was silent for more than the idle timeout of 2 s; the transfer was dropped"
    );
    let out = fed.client("alice", &["job", "watch", &job_id]);
    assert!(out.status.success(), "{}", stdout(&out));
    let audit = std::fs::read_to_string(fed.dir.join("coord-state").join("audit.log")).unwrap();
    assert!(audit.contains("the update stream was silent for more than the idle timeout of 2 s"), "{audit}");
}

#[test]
fn a_cancelled_job_stops_local_training_within_a_second() {
    let mut fed = Federation::start(&["hospital-a"]);
    let home = fed.start_worker("hospital-a", "wdbc", &example("data/wdbc_breast_cancer.csv"), "diagnosis", NUMERIC);
    wait_for_sites(&fed, &["hospital-a"]);
    // One round of 50 local epochs of a 1M-parameter MLP: many seconds of training.
    let spec = spec(&fed, "long.toml", 1, 50.0, "[1024, 1024]", 3600);
    let job_id = fed.submit(&spec);
    let log = home.join("worker.log");
    wait_for(Duration::from_secs(60), "local training to start", || {
        std::fs::read_to_string(&log).ok()?.contains("local training started").then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let asked_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    let out = fed.client("alice", &["job", "cancel", &job_id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let audit = home.join("state").join("audit.log");
    let stopped_at = wait_for(Duration::from_secs(30), "the worker to stop training", || {
        let text = std::fs::read_to_string(&audit).ok()?;
        let line = text.lines().find(|l| l.contains("\"training.cancelled\""))?;
        let entry: serde_json::Value = serde_json::from_str(line).ok()?;
        entry["at_unix_ms"].as_i64()
    });
    let took = stopped_at - asked_at;
    eprintln!("local training stopped {took} ms after the cancel was asked for");
    assert!(
        took < 1_000,
        "training stopped {took} ms after the cancel\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
