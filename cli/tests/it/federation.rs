//! The whole loop: `meridian demo --dataset wdbc` runs a coordinator and
//! three workers as processes; afterwards the state they left is checked.

use rusqlite::Connection;
use serde_json::Value;

use crate::util::run;

#[test]
fn demo_federation_trains_and_ledgers_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("demo");
    let out = run(&["demo", "--dataset", "wdbc", "--quiet", "--work-dir", work.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "demo failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The demo says where its configs are, and they are there.
    let printed = String::from_utf8_lossy(&out.stdout);
    for config in [
        work.join("hospital-a").join("worker.toml"),
        work.join("coordinator").join("coordinator.toml"),
        work.join("job.toml"),
    ] {
        assert!(config.is_file() && printed.contains(config.to_str().unwrap()), "{}: {printed}", config.display());
    }
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(work.join("summary.json")).unwrap()).unwrap();
    let job = &summary["job"];
    assert_eq!(job["state"], "completed");
    let job_id = job["job_id"].as_str().unwrap();
    let rounds = job["rounds"].as_array().unwrap();
    let eval = |r: &Value, k: &str| r["eval_metrics"][k].as_f64().unwrap();
    let initial = rounds.iter().find(|r| r["round"] == 0).expect("initial model evaluated");
    let last = rounds.last().unwrap();
    assert_eq!(last["round"], 5);
    // Metrics come from the sites' noised histograms: about 114 held-out
    // records in all, so they are rough (the model itself is checked
    // below), but each is a proper value with its standard error.
    for r in [initial, last] {
        assert!((0.0..=1.0).contains(&eval(r, "auc")) && eval(r, "auc_se") > 0.0, "{r}");
        assert!(eval(r, "examples") > 40.0 && eval(r, "examples") < 200.0, "{r}");
    }
    assert_eq!(last["site_evaluations"].as_array().unwrap().len(), 3, "{last}");

    // Each worker's ledger: exactly one entry per round it served, for this job.
    let coordinator = Connection::open(summary["coordinator_db"].as_str().unwrap()).unwrap();
    for (site, path) in summary["ledgers"].as_object().unwrap() {
        let ledger = Connection::open(path.as_str().unwrap()).unwrap();
        type Row = (i64, u32, u64, f64, f64, f64, f64, String);
        let read = |conn: &Connection, table: &str, filter: &str| -> Vec<Row> {
            let sql = format!(
                "SELECT seq, round, steps, noise_multiplier, sample_rate, epsilon_round, epsilon_job, mechanism FROM {table} WHERE job_id = ?1 {filter} ORDER BY seq"
            );
            let mut stmt = conn.prepare(&sql).unwrap();
            let args: Vec<&dyn rusqlite::ToSql> = if filter.is_empty() { vec![&job_id] } else { vec![&job_id, site] };
            stmt.query_map(args.as_slice(), |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get::<_, i64>(2)? as u64,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
        };
        let local = read(&ledger, "ledger", "");
        // Every release of the job is an entry of its own: DP-SGD (with its
        // clip count, one mechanism) each round, an evaluation of every
        // round's model (the initial one too). The dataset's size was
        // released once, for every job.
        let rounds = |mechanism: &str| local.iter().filter(|e| e.7 == mechanism).map(|e| e.1).collect::<Vec<_>>();
        assert_eq!(rounds("dp_sgd"), vec![1, 2, 3, 4, 5], "{site}");
        assert_eq!(rounds("evaluation"), vec![0, 1, 2, 3, 4, 5], "{site}");
        assert_eq!(local.len(), 11, "{site}: {local:?}");
        // With a clip count, each DP-SGD entry is charged at the joint σ of
        // the gradient and the count: (σ⁻² + σ_b⁻²)^(−1/2) for σ = 1, σ_b = 10.
        let joint = (1.0f64 + 0.01).powf(-0.5);
        assert!(local.iter().filter(|e| e.7 == "dp_sgd").all(|e| (e.3 - joint).abs() < 1e-12), "{local:?}");
        // The coordinator's mirror holds the same entries, field for field.
        let mirror = read(&coordinator, "ledger_mirror", "AND site = ?2");
        assert_eq!(mirror, local, "{site}: mirror differs from the site's ledger");
        // ε of the job grows with every round and stays under the per-job cap.
        assert!(local.windows(2).all(|w| w[1].6 > w[0].6), "{site}");
        assert!(local.last().unwrap().6 <= 15.0);
        // The ledger refuses edits.
        let err = ledger.execute("UPDATE ledger SET epsilon_round = 0", []).unwrap_err();
        assert!(err.to_string().contains("append-only"), "{err}");
    }
    // Every daemon's audit log verifies; one changed byte is reported at its entry.
    let coordinator_audit = work.join("coordinator").join("state").join("audit.log");
    for log in [coordinator_audit.clone(), work.join("hospital-a").join("state").join("audit.log")] {
        let out = crate::util::run(&["audit", "verify", log.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("hash chain intact"));
    }
    let text = std::fs::read_to_string(&coordinator_audit).unwrap();
    assert!(text.contains("\"kind\":\"job.submitted\""), "{text}");
    assert!(text.contains("\"kind\":\"update.accepted\""), "{text}");
    let third_line = text.lines().take(2).map(|l| l.len() + 1).sum::<usize>();
    let mut bytes = text.into_bytes();
    let at = third_line + 40;
    bytes[at] = if bytes[at] == b'7' { b'8' } else { b'7' };
    std::fs::write(&coordinator_audit, bytes).unwrap();
    let out = crate::util::run(&["audit", "verify", coordinator_audit.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("entry 3 (line 3)"), "{err}");

    // The model came back as safetensors with PyTorch names.
    let model = std::fs::read(work.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(model[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&model[8..8 + header_len]).unwrap();
    assert_eq!(header["0.weight"]["shape"], serde_json::json!([2, 30]));
    assert_eq!(model.len(), 8 + header_len + 62 * 4);
    // The pulled model separates the classes on the whole dataset: its own
    // AUC, computed here from its weights, not from any released metric.
    let weights: Vec<f32> =
        model[8 + header_len..].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let offset = |name: &str| header[name]["data_offsets"][0].as_u64().unwrap() as usize / 4;
    let (w, b) =
        (&weights[offset("0.weight")..offset("0.weight") + 60], &weights[offset("0.bias")..offset("0.bias") + 2]);
    let auc = pulled_model_auc(w, b);
    assert!(auc > 0.95, "the pulled model's AUC on WDBC is {auc}");
}

/// AUC on all of WDBC of a logistic regression with weights `w` (`[2, 30]`)
/// and bias `b`, its inputs standardised over the whole file as each site
/// standardises over its own split.
fn pulled_model_auc(w: &[f32], b: &[f32]) -> f64 {
    let text = std::fs::read_to_string(crate::util::example("data/wdbc_breast_cancer.csv")).unwrap();
    let rows: Vec<(Vec<f64>, bool)> = text
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[2..32].iter().map(|v| v.parse().unwrap()).collect(), f[1] == "M")
        })
        .collect();
    let n = rows.len() as f64;
    let mean: Vec<f64> = (0..30).map(|j| rows.iter().map(|r| r.0[j]).sum::<f64>() / n).collect();
    let std: Vec<f64> =
        (0..30).map(|j| (rows.iter().map(|r| (r.0[j] - mean[j]).powi(2)).sum::<f64>() / n).sqrt()).collect();
    let score = |x: &[f64]| -> f64 {
        (0..30).map(|j| f64::from(w[30 + j] - w[j]) * (x[j] - mean[j]) / std[j]).sum::<f64>() + f64::from(b[1] - b[0])
    };
    let (pos, neg): (Vec<f64>, Vec<f64>) = {
        let scored: Vec<(f64, bool)> = rows.iter().map(|(x, y)| (score(x), *y)).collect();
        (scored.iter().filter(|s| s.1).map(|s| s.0).collect(), scored.iter().filter(|s| !s.1).map(|s| s.0).collect())
    };
    let wins: f64 = pos
        .iter()
        .map(|p| {
            neg.iter()
                .map(|q| {
                    if p > q {
                        1.0
                    } else if p == q {
                        0.5
                    } else {
                        0.0
                    }
                })
                .sum::<f64>()
        })
        .sum();
    wins / (pos.len() * neg.len()) as f64
}

#[test]
fn client_level_dp_clips_noises_and_adapts_the_clip() {
    use crate::util::{Federation, example, wait_for};
    use std::time::Duration;
    let mut fed = Federation::start(&["hospital-a", "hospital-b"]);
    let data = example("data/wdbc_breast_cancer.csv");
    let numeric = ["radius_mean", "texture_mean", "perimeter_mean"];
    fed.start_worker("hospital-a", "wdbc", &data, "diagnosis", &numeric);
    fed.start_worker("hospital-b", "wdbc", &data, "diagnosis", &numeric);
    let spec = fed.dir.join("cdp.toml");
    std::fs::write(
        &spec,
        format!(
            r#"name = "client-dp"
dataset = "wdbc"
[model]
kind = "logistic_regression"
[features]
label = "diagnosis"
positive_label = "M"
negative_labels = ["B"]
numeric = {numeric:?}
[training]
rounds = 4
batch_size = 32
learning_rate = 0.5
[privacy]
noise_multiplier = 1.0
clip_norm = 1.0
delta = 1e-5
[policy]
min_sites = 2
round_deadline_secs = 30
[client_dp]
clip = 0.01
noise_multiplier = 0.5
[client_dp.adaptive]
target_quantile = 0.5
learning_rate = 0.5
count_noise_multiplier = 2.0
"#
        ),
    )
    .unwrap();
    let job_id = wait_for(Duration::from_secs(30), "both workers to register", || {
        let out = fed.client("alice", &["job", "submit", spec.to_str().unwrap()]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    let out = fed.client("alice", &["job", "watch", &job_id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let out = fed.client("alice", &["job", "status", &job_id, "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    // 4 rounds of a Gaussian with z_Δ = (0.5⁻² − 4⁻²)^(−1/2) at sampling rate 1.
    let z = (0.5f64.powi(-2) - 4.0f64.powi(-2)).powf(-0.5);
    let mut acc = meridian_privacy::accountant::RdpAccountant::new();
    acc.compose_poisson_gaussian(1.0, z, 4).unwrap();
    let expected = acc.epsilon(1e-5).unwrap().epsilon;
    assert!((status["client_epsilon"].as_f64().unwrap() - expected).abs() < 1e-9, "{status}");
    let clips: Vec<f64> = status["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "aggregated")
        .map(|r| r["train_metrics"]["client_clip"].as_f64().unwrap())
        .collect();
    assert_eq!(clips.len(), 4);
    assert_eq!(clips[0], 0.01);
    // Each round uses the clip the previous round computed.
    assert!(clips.windows(2).all(|w| w[0] != w[1]), "{clips:?}");
}

#[test]
fn a_large_model_moves_between_a_real_worker_and_the_coordinator_in_parts() {
    // An MLP of about 8.4M parameters (34 MB with the WDBC features, past
    // `meridian_worker::download::PARTED_FROM_BYTES`): the worker pulls each model
    // and pushes each update in two parts over two connections, its update
    // headers carrying its training metrics, which every part must share.
    use crate::util::{Federation, WDBC_NUMERIC, WdbcJob, example, wait_for};
    use std::time::Duration;
    let mut fed = Federation::start(&["hospital-a"]);
    let data = example("data/wdbc_breast_cancer.csv");
    fed.start_worker("hospital-a", "wdbc", &data, "diagnosis", WDBC_NUMERIC);
    let spec =
        WdbcJob { rounds: 2, local_epochs: 0.05, hidden: "[3000, 2800]", deadline_secs: 300, ..WdbcJob::default() }
            .write(&fed, "big.toml");
    let job_id = wait_for(Duration::from_secs(30), "the worker to register", || {
        let out = fed.client("alice", &["job", "submit", spec.to_str().unwrap()]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    let out = fed.client("alice", &["job", "watch", &job_id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let out = fed.client("alice", &["job", "status", &job_id, "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["state"], "completed", "{status}");
    assert!(status["num_params"].as_u64().unwrap() * 4 >= 32 << 20, "{status}");
    // Each round's update: one part kept, then the other completing it.
    let log = fed.coordinator_log();
    assert_eq!(log.matches("update part received").count(), 2, "{log}");
    assert_eq!(log.matches("update accepted").count(), 2, "{log}");
    assert!(!log.contains("update rejected"), "{log}");
}
