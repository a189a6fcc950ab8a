//! Bad input gets a one-line error naming the field, file or line, and the
//! daemons keep running.

use std::time::Duration;

use crate::util::{Federation, example, wait_for};

const WDBC_NUMERIC: &[&str] = &["radius_mean", "texture_mean"];

fn job(fed: &Federation, name: &str, edit: impl Fn(String) -> String) -> std::path::PathBuf {
    let base = std::fs::read_to_string(example("jobs/wdbc.toml")).unwrap();
    let path = fed.dir.join(name);
    std::fs::write(&path, edit(base)).unwrap();
    path
}

fn small_spec(text: String) -> String {
    // Only two features, one site.
    let start = text.find("numeric = [").unwrap();
    let end = text[start..].find(']').unwrap() + start + 1;
    let mut t = text.clone();
    t.replace_range(start..end, "numeric = [\"radius_mean\", \"texture_mean\"]");
    t.replace("min_sites = 3", "min_sites = 1").replace("round_deadline_secs = 60", "round_deadline_secs = 20")
}

#[test]
fn bad_job_specs_and_bad_rows_get_clear_errors() {
    let mut fed = Federation::start(&["hospital-a", "hospital-b"]);
    let data = example("data/wdbc_breast_cancer.csv");
    fed.start_worker("hospital-a", "wdbc", &data, "diagnosis", WDBC_NUMERIC);
    // hospital-b serves a copy with one unparseable row (line 3).
    let bad = fed.dir.join("bad.csv");
    let csv = std::fs::read_to_string(&data).unwrap().replacen("842517,M,20.57", "842517,M,twenty", 1);
    std::fs::write(&bad, csv).unwrap();
    let home_b = fed.start_worker("hospital-b", "wdbc-bad", &bad, "diagnosis", WDBC_NUMERIC);

    let submit = |path: &std::path::Path| {
        let out = fed.client("alice", &["job", "submit", path.to_str().unwrap()]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )
    };
    // Wait until the worker registered: a valid job is then accepted.
    let good = job(&fed, "good.toml", small_spec);
    let job_id = wait_for(Duration::from_secs(30), "the worker to register", || {
        let (ok, out, _) = submit(&good);
        ok.then_some(out)
    });

    let unknown_model = job(&fed, "model.toml", |t| small_spec(t).replace("\"logistic_regression\"", "\"resnet\""));
    let (ok, _, err) = submit(&unknown_model);
    assert!(!ok);
    assert_eq!(
        err,
        format!(
            "error: {}: model.kind: unknown model \"resnet\" (expected logistic_regression, mlp or cnn)",
            unknown_model.display()
        )
    );

    let missing = job(&fed, "column.toml", |t| small_spec(t).replace("\"texture_mean\"", "\"texture_avg\""));
    let (ok, _, err) = submit(&missing);
    assert!(!ok);
    assert_eq!(
        err,
        format!(
            "error: {}: features.numeric[1]: column \"texture_avg\" is not a numeric column of dataset \"wdbc\" (site hospital-a)",
            missing.display()
        )
    );

    let invalid = job(&fed, "value.toml", |t| small_spec(t).replace("learning_rate = 0.5", "learning_rate = -1.0"));
    let (ok, _, err) = submit(&invalid);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.ends_with("training.learning_rate: must be finite and > 0, got -1"), "{err}");

    // The coordinator still serves, and the valid job completes.
    let out = fed.client("alice", &["job", "watch", &job_id]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), fed.coordinator_log());

    // The unparseable row: hospital-b refuses the job. The scientist learns
    // the code and the column; the file, line and value stay in the site's log.
    let bad_job = job(&fed, "bad.toml", |t| small_spec(t).replace("dataset = \"wdbc\"", "dataset = \"wdbc-bad\""));
    let (ok, bad_id, err) = wait_for(Duration::from_secs(30), "hospital-b to register", || {
        let r = submit(&bad_job);
        (r.0 || !r.2.contains("no registered site")).then_some(r)
    });
    assert!(ok, "{err}");
    let out = fed.client("alice", &["job", "watch", &bad_id]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("hospital-b refused: schema_mismatch (column \"radius_mean\")"), "{stdout}");
    assert!(!stdout.contains("twenty") && !stdout.contains(bad.to_str().unwrap()), "{stdout}");
    let expected = format!("{}:3: column \"radius_mean\": cannot parse \"twenty\" as a number", bad.display());
    let log = std::fs::read_to_string(home_b.join("worker.log")).unwrap();
    assert!(log.contains(&expected), "{log}");
    // Both workers are still running.
    for d in fed.daemons.iter_mut() {
        assert!(d.0.try_wait().unwrap().is_none(), "a daemon exited");
    }
}

#[test]
fn malformed_daemon_configs_name_file_line_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let worker = tmp.path().join("worker.toml");
    std::fs::write(&worker, "coordinator = \"https://127.0.0.1:1\"\ndata_dir = \"state\"\ndevise = \"cpu\"\n").unwrap();
    let out = crate::util::run(&["worker", "--check", "--config", worker.to_str().unwrap()]);
    // 1: an error in what the command was given (2 is for a wrong command line).
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with(&format!("error: {}:3:1: unknown field `devise`", worker.display())), "{err}");

    std::fs::write(
        &worker,
        "coordinator = \"http://plain\"\ndata_dir = \"state\"\ncpu_threads = 0\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n[[datasets]]\nname = \"d\"\npath = \"d.csv\"\nlabel = \"y\"\nbudget_epsilon = -1.0\njob_epsilon_cap = 1.0\n",
    )
    .unwrap();
    let out = crate::util::run(&["worker", "--check", "--config", worker.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("coordinator: \"http://plain\" must be an https:// URL (Meridian has no plaintext mode)"),
        "{err}"
    );
    assert!(err.contains("datasets[0].budget_epsilon: must be finite and > 0, got -1"), "{err}");
    assert!(err.contains("cpu_threads: must be at least 1, got 0 (leave it out for one per core)"), "{err}");
    assert!(err.contains(&format!("datasets[0].path: {} does not exist", tmp.path().join("d.csv").display())), "{err}");

    let coordinator = tmp.path().join("coordinator.toml");
    std::fs::write(
        &coordinator,
        "listen = \"localhost:port\"\ndata_dir = \"s\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n",
    )
    .unwrap();
    let out = crate::util::run(&["coordinator", "--config", coordinator.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen: \"localhost:port\" is not an address like 127.0.0.1:7443"), "{err}");
}

#[test]
fn worker_check_lists_every_problem_before_the_daemon_runs() {
    let fed = Federation::start(&["hospital-a", "hospital-b"]);
    let home = fed.dir.join("check");
    std::fs::create_dir_all(&home).unwrap();
    // One empty cell and one that is not a number, in two declared numeric columns.
    let csv = std::fs::read_to_string(example("data/wdbc_breast_cancer.csv"))
        .unwrap()
        .replacen("842517,M,20.57,17.77", "842517,M,,17.77", 1)
        .replacen("84300903,M,19.69,21.25", "84300903,M,19.69,n/a", 1);
    std::fs::write(home.join("data.csv"), csv).unwrap();
    let a = fed.identity("hospital-a");
    let b = fed.identity("hospital-b");
    let write = |name: &str, key: &std::path::Path, data_dir: &str, cap: f64| {
        let path = home.join(name);
        std::fs::write(
            &path,
            format!(
                "coordinator = {:?}\ndata_dir = {data_dir:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[[datasets]]\nname = \"wdbc\"\npath = \"data.csv\"\nlabel = \"diagnosis\"\nnumeric = [\"radius_mean\", \"texture_mean\"]\nbudget_epsilon = 10.0\njob_epsilon_cap = {cap:?}\n",
                fed.url,
                a.join("ca.pem"),
                a.join("cert.pem"),
                key
            ),
        )
        .unwrap();
        path
    };
    // hospital-b's key with hospital-a's certificate, a cap over the budget, a data dir under a file.
    std::fs::write(home.join("a-file"), "").unwrap();
    let bad = write("bad.toml", &b.join("key.pem"), "a-file/state", 20.0);
    let out = crate::util::run(&["worker", "--check", "--config", bad.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    for expected in [
        "column \"radius_mean\" (numeric): 1 of 569 cells are empty",
        "column \"texture_mean\" (numeric): 1 of 569 cells are not finite numbers",
        "tls.key: the key is not the certificate's",
        "job_epsilon_cap 20 is more than budget_epsilon 10",
        "data_dir: cannot write in",
        "5 problem(s)",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
    // A certificate of another federation.
    let other = tempfile::tempdir().unwrap();
    let out =
        crate::util::run(&["provision", "--out", other.path().join("f").to_str().unwrap(), "--site", "hospital-a"]);
    assert!(out.status.success());
    let stranger = write("stranger.toml", &a.join("key.pem"), "state", 5.0);
    let text = std::fs::read_to_string(&stranger)
        .unwrap()
        .replace(&format!("{:?}", a.join("ca.pem")), &format!("{:?}", other.path().join("f/sites/hospital-a/ca.pem")));
    std::fs::write(&stranger, text).unwrap();
    let out = crate::util::run(&["worker", "--check", "--config", stranger.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("tls.cert: not valid with this CA now"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A good one, connecting: who the coordinator is, and that it takes us.
    let std::process::Output { stdout, status, .. } = {
        let good = write("good.toml", &a.join("key.pem"), "state", 5.0);
        std::fs::write(home.join("data.csv"), std::fs::read(example("data/wdbc_breast_cancer.csv")).unwrap()).unwrap();
        crate::util::run(&["worker", "--check", "--connect", "--config", good.to_str().unwrap()])
    };
    let text = String::from_utf8_lossy(&stdout).to_string();
    assert!(status.success(), "{text}");
    assert!(text.contains("tls: hospital-a (role hospital), key matches"), "{text}");
    assert!(text.contains("presents coordinator (role coordinator), signed by this site's CA"), "{text}");
    assert!(text.contains("accepts this site's certificate") && text.ends_with("configuration ok\n"), "{text}");
    assert!(text.contains("label \"diagnosis\" takes \"B\" 357, \"M\" 212"), "{text}");

    // A certificate near its end is a warning, not a problem.
    let out = crate::util::run(&[
        "provision",
        "add-site",
        "hospital-c",
        "--federation",
        fed.dir.join("fed").to_str().unwrap(),
        "--valid-days",
        "10",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c = fed.identity("hospital-c");
    let soon = write("soon.toml", &c.join("key.pem"), "state", 5.0);
    let text = std::fs::read_to_string(&soon)
        .unwrap()
        .replace(&format!("{:?}", a.join("cert.pem")), &format!("{:?}", c.join("cert.pem")));
    std::fs::write(&soon, text).unwrap();
    let out = crate::util::run(&["worker", "--check", "--config", soon.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && (text.contains("expires in 9 days") || text.contains("expires in 10 days")),
        "{text}"
    );
}

#[test]
fn labels_written_as_toml_integers_work_like_their_strings() {
    let mut fed = Federation::start(&["hospital-a"]);
    // WDBC with its diagnosis as 1 (malignant) and 0 (benign).
    let csv: String = std::fs::read_to_string(example("data/wdbc_breast_cancer.csv"))
        .unwrap()
        .lines()
        .map(|l| format!("{}\n", l.replacen(",M,", ",1,", 1).replacen(",B,", ",0,", 1)))
        .collect();
    let data = fed.dir.join("coded.csv");
    std::fs::write(&data, csv).unwrap();
    fed.start_worker("hospital-a", "wdbc", &data, "diagnosis", WDBC_NUMERIC);
    let spec = job(&fed, "coded.toml", |t| {
        small_spec(t)
            .replace("positive_label = \"M\"", "positive_label = 1")
            .replace("negative_labels = [\"B\"]", "negative_labels = [0]")
    });
    let id = wait_for(Duration::from_secs(30), "the worker to register", || {
        let out = fed.client("alice", &["job", "submit", spec.to_str().unwrap()]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    let out = fed.client("alice", &["job", "watch", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn job_plan_says_what_each_site_would_charge_before_anything_is_submitted() {
    let mut fed = Federation::start(&["hospital-a", "hospital-b"]);
    let data = example("data/wdbc_breast_cancer.csv");
    fed.start_worker("hospital-a", "wdbc", &data, "diagnosis", WDBC_NUMERIC);
    // hospital-b holds 12 records, about 10 training rows: under its
    // policy's floor of 50 even as released with noise of scale 10 (with 40
    // records, ~32 rows, the noised size passed the floor about one run in
    // 28).
    let few: String = std::fs::read_to_string(&data).unwrap().lines().take(13).map(|l| format!("{l}\n")).collect();
    let few_path = fed.dir.join("few.csv");
    std::fs::write(&few_path, few).unwrap();
    fed.start_worker("hospital-b", "wdbc", &few_path, "diagnosis", WDBC_NUMERIC);
    let spec = job(&fed, "plan.toml", small_spec);
    let plan = |spec: &std::path::Path| fed.client("rita", &["job", "plan", spec.to_str().unwrap(), "--json"]);
    let json: serde_json::Value = wait_for(Duration::from_secs(30), "both workers to register", || {
        let out = plan(&spec);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (json["sites"].as_array()?.len() == 2).then_some(json)
    });
    let site = |name: &str| json["sites"].as_array().unwrap().iter().find(|s| s["site"] == name).unwrap().clone();
    let (a, b) = (site("hospital-a"), site("hospital-b"));
    assert_eq!((a["would_take"].as_bool(), b["would_take"].as_bool()), (Some(true), Some(false)), "{json}");
    let failed: Vec<&serde_json::Value> =
        b["checks"].as_array().unwrap().iter().filter(|c| c["passed"] == false).collect();
    assert_eq!(failed[0]["code"], "too_few_rows", "{b}");
    let mechanisms: Vec<&str> =
        a["charges"].as_array().unwrap().iter().map(|c| c["mechanism"].as_str().unwrap()).collect();
    assert_eq!(mechanisms, ["dp_sgd", "evaluation", "evaluation"]);
    assert_eq!(json["takers"], 1);
    let text =
        String::from_utf8_lossy(&fed.client("rita", &["job", "plan", spec.to_str().unwrap()]).stdout).to_string();
    assert!(
        text.contains("hospital-b: would refuse it") && text.contains("1 of 2 sites would take the job; it needs 1"),
        "{text}"
    );

    // The plan is what the site then charges.
    let id = String::from_utf8_lossy(&fed.client("alice", &["job", "submit", spec.to_str().unwrap()]).stdout)
        .trim()
        .to_string();
    let status: serde_json::Value = wait_for(Duration::from_secs(60), "hospital-a to answer", || {
        let s: serde_json::Value =
            serde_json::from_slice(&fed.client("alice", &["job", "status", &id, "--json"]).stdout).ok()?;
        let answered = s["sites"].as_array()?.iter().any(|x| x["site"] == "hospital-a" && x["state"] == "accepted");
        answered.then_some(s)
    });
    let at_a = status["sites"].as_array().unwrap().iter().find(|x| x["site"] == "hospital-a").unwrap();
    assert!(
        (at_a["planned_epsilon"].as_f64().unwrap() - a["planned_epsilon"].as_f64().unwrap()).abs() < 1e-12,
        "{at_a} vs {a}"
    );
    assert_eq!(at_a["train_examples"], a["train_rows"]);

    // A batch no site can serve: refused by the plan and at submit.
    let big = job(&fed, "big.toml", |t| small_spec(t).replace("batch_size = 32", "batch_size = 100000"));
    let out = fed.client("rita", &["job", "plan", big.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL batch          training.batch_size 100000"));
    let out = fed.client("alice", &["job", "submit", big.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("training.batch_size 100000 against"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A spec that is wrong on its own is refused before anything is sent.
    let broken = job(&fed, "broken.toml", |t| small_spec(t).replace("rounds = 5", "rounds = 0"));
    let out = fed.client("rita", &["job", "plan", broken.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("training.rounds: must be in 1..=10000, got 0"));
}

#[test]
fn init_writes_templates_that_work_once_their_paths_exist() {
    let fed = Federation::start(&["hospital-a"]);
    let dir = fed.dir.join("init");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let init =
        |what: &str| crate::util::run(&["init", what, "--out", dir.join(format!("{what}.toml")).to_str().unwrap()]);
    for what in ["coordinator", "worker", "job", "application"] {
        let out = init(what);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // Never over an existing file.
        let again = init(what);
        assert_eq!(again.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&again.stderr).contains("exists; choose another --out or pass --force"));
    }
    // The files the templates name, where they name them.
    std::fs::create_dir_all(dir.join("federation")).unwrap();
    let copy_dir = |from: &std::path::Path, to: &std::path::Path| {
        std::fs::create_dir_all(to).unwrap();
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            std::fs::copy(from.join(f), to.join(f)).unwrap();
        }
    };
    copy_dir(&fed.identity("hospital-a"), &dir.join("federation/sites/hospital-a"));
    copy_dir(&fed.dir.join("fed").join("coordinator"), &dir.join("federation/coordinator"));
    std::fs::copy(example("data/brfss_heart_2020.csv.gz"), dir.join("data/brfss.csv.gz")).unwrap();
    // The worker's passes every check.
    let out = crate::util::run(&["worker", "--check", "--config", dir.join("worker.toml").to_str().unwrap()]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The coordinator's starts (on a free port).
    let config = dir.join("coordinator.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace("0.0.0.0:7443", "127.0.0.1:0");
    std::fs::write(&config, text).unwrap();
    let ready = dir.join("ready");
    let mut child = crate::util::meridian()
        .args(["coordinator", "--config", config.to_str().unwrap(), "--ready-file", ready.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let listening = wait_for(Duration::from_secs(30), "the templated coordinator to listen", || {
        std::fs::read_to_string(&ready).ok()
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(listening.starts_with("127.0.0.1:"), "{listening}");
    // The job's is a valid spec, for the template's dataset.
    let spec =
        meridian_spec::job::JobSpec::from_toml(&std::fs::read_to_string(dir.join("job.toml")).unwrap(), "job.toml")
            .unwrap();
    assert_eq!(spec.dataset, "brfss");
    // The application's is a valid application, for the same dataset.
    let text = std::fs::read_to_string(dir.join("application.toml")).unwrap();
    let app = meridian_spec::application::ApplicationSpec::from_toml(&text, "application.toml").unwrap();
    assert_eq!(app.datasets, ["brfss"]);
    assert_eq!(app.check_job(&spec, app.valid_from.start_ms()), Ok(()));
    // To stdout.
    let out = crate::util::run(&["init", "job", "--out", "-"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("# job.toml"));
}
