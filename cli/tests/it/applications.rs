//! Data-use applications at a real coordinator: a scientist submits one,
//! every reader lists and shows it bound to its hash, an invalid one is
//! refused naming the file and field, and a hospital may not submit.

use crate::util::{Federation, example};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn an_application_is_submitted_listed_and_shown_bound_to_its_hash() {
    let fed = Federation::start(&["hospital-a"]);
    let file = example("applications/brfss.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let local = meridian_spec::application::ApplicationSpec::from_toml(&text, "brfss.toml").unwrap();

    let out = fed.client("alice", &["application", "submit", file.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let reply: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let id = reply["application_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("app-") && id.len() == 12, "{id}");
    assert_eq!(reply["spec_hash"], local.hash());

    // A reviewer reads it as JSON: the whole spec, as submitted.
    let out = fed.client("rita", &["application", "show", &id, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(shown["requester"], "alice");
    assert_eq!(shown["spec_hash"], local.hash());
    let spec: meridian_spec::application::ApplicationSpec = serde_json::from_value(shown["spec"].clone()).unwrap();
    assert_eq!(spec, local);
    let today = meridian_spec::date::Date::containing_ms(meridian_sys::now_ms());
    let validity = local.validity_at(meridian_sys::now_ms()).as_str();
    assert_eq!(shown["validity"], validity, "on {today}");

    // As text: the terms and what each site is asked.
    let out = fed.client("adam", &["application", "status", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("Heart disease risk from routine survey answers"), "{text}");
    assert!(text.contains("DEMO-IRB-2026-017") && text.contains("2026-12-01 to 2027-06-30"), "{text}");
    assert!(text.contains("hospital-b") && text.contains("ε 4 at δ = 1e-5"), "{text}");

    // A second one; the list is newest first.
    let out = fed.client("alice", &["application", "submit", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let second = stdout(&out).trim().to_string();
    let out = fed.client("rita", &["application", "list", "--json"]);
    let list: Vec<serde_json::Value> = serde_json::from_str(&stdout(&out)).unwrap();
    let ids: Vec<&str> = list.iter().map(|a| a["application_id"].as_str().unwrap()).collect();
    assert_eq!(ids, [second.as_str(), id.as_str()]);
    let out = fed.client("rita", &["application", "list"]);
    assert!(stdout(&out).lines().nth(1).unwrap().starts_with(&second), "{}", stdout(&out));

    let audit = std::fs::read_to_string(fed.dir.join("coord-state").join("audit.log")).unwrap();
    assert!(audit.contains("application.submitted") && audit.contains(&local.hash()), "{audit}");
}

#[test]
fn a_bad_application_is_refused_naming_the_file_and_field_and_hospitals_may_not_submit() {
    let fed = Federation::start(&["hospital-a"]);
    let text = std::fs::read_to_string(example("applications/brfss.toml")).unwrap();

    let bad = fed.dir.join("bad.toml");
    std::fs::write(&bad, text.replace("max_jobs = 5", "max_jobs = 0")).unwrap();
    let out = fed.client("alice", &["application", "submit", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("bad.toml") && err.contains("max_jobs: must be at least 1"), "{err}");

    // Valid, but over: nobody could approve it. The coordinator says so.
    let past = fed.dir.join("past.toml");
    let expired = text.replace("valid_from = 2026-12-01", "valid_from = 2020-01-01");
    std::fs::write(&past, expired.replace("valid_until = 2027-06-30", "valid_until = 2020-06-30")).unwrap();
    let out = fed.client("alice", &["application", "submit", past.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("past.toml") && err.contains("valid_until: 2020-06-30 has passed"), "{err}");

    let good = example("applications/brfss.toml");
    let out = fed.client("hospital-a", &["application", "submit", good.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("may not call ApplicationService/SubmitApplication"), "{err}");
    let out = fed.client("hospital-a", &["application", "list"]);
    assert!(!out.status.success() && stderr(&out).contains("may not call"), "{}", stderr(&out));

    let out = fed.client("rita", &["application", "show", "app-00000000"]);
    assert!(!out.status.success() && stderr(&out).contains("no application \"app-00000000\""), "{}", stderr(&out));
    let out = fed.client("rita", &["application", "list", "--json"]);
    assert_eq!(stdout(&out).trim(), "[]");
}
