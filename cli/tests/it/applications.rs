//! Data-use applications at a real coordinator: a scientist submits one,
//! every reader lists and shows it bound to its hash, an invalid one is
//! refused naming the file and field, and a hospital may not submit.

use crate::util::{Federation, example};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The day `days` from today (UTC), as YYYY-MM-DD.
fn day(days: i64) -> String {
    meridian_spec::date::Date::containing_ms(meridian_sys::now_ms() + days * 86_400_000).to_string()
}

/// The example application, in force from yesterday for a year, so that
/// the tests do not depend on the day they run.
fn application(fed: &Federation) -> std::path::PathBuf {
    let text = std::fs::read_to_string(example("applications/brfss.toml")).unwrap();
    let text = text
        .replace("valid_from = 2026-12-01", &format!("valid_from = {}", day(-1)))
        .replace("valid_until = 2027-06-30", &format!("valid_until = {}", day(365)));
    let path = fed.dir.join("application.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Provisions `name` as the steward of `site` with the federation's CA;
/// returns what `provision` printed.
fn add_steward(fed: &Federation, name: &str, site: &str) -> String {
    let federation = fed.dir.join("fed");
    let federation = federation.to_str().unwrap();
    let out = crate::util::run(&[
        "provision",
        "add-user",
        name,
        "--role",
        "steward",
        "--site",
        site,
        "--federation",
        federation,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

fn args(a: &[String]) -> Vec<&str> {
    a.iter().map(String::as_str).collect()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn an_application_is_submitted_listed_and_shown_bound_to_its_hash() {
    let fed = Federation::start(&["hospital-a"]);
    let file = application(&fed);
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
    assert!(text.contains("DEMO-IRB-2026-017") && text.contains(&format!("{} to {}", day(-1), day(365))), "{text}");
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
    let text = std::fs::read_to_string(application(&fed)).unwrap();

    let bad = fed.dir.join("bad.toml");
    std::fs::write(&bad, text.replace("max_jobs = 5", "max_jobs = 0")).unwrap();
    let out = fed.client("alice", &["application", "submit", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("bad.toml") && err.contains("max_jobs: must be at least 1"), "{err}");

    // Valid, but over: nobody could approve it. The coordinator says so.
    let past = fed.dir.join("past.toml");
    let expired = text.replace(&format!("valid_from = {}", day(-1)), "valid_from = 2020-01-01");
    std::fs::write(&past, expired.replace(&format!("valid_until = {}", day(365)), "valid_until = 2020-06-30")).unwrap();
    let out = fed.client("alice", &["application", "submit", past.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("past.toml") && err.contains("valid_until: 2020-06-30 has passed"), "{err}");

    let good = application(&fed);
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

#[test]
fn a_steward_is_bound_to_one_site_and_reads_only_what_asks_it() {
    let fed = Federation::start(&["hospital-a", "hospital-z"]);
    let fed_dir = fed.dir.join("fed");
    let fed_arg = fed_dir.to_str().unwrap();
    let file = application(&fed);
    let out = fed.client("alice", &["application", "submit", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();

    // sam decides for hospital-a, which the application asks.
    let sam = std::fs::read(fed.identity("sam").join("cert.pem")).unwrap();
    let principal = meridian_wire::identity::principal_from_pem(&sam).unwrap();
    assert_eq!((principal.role.as_str(), principal.site.as_deref()), ("steward", Some("hospital-a")));
    let out = fed.client("sam", &["application", "list", "--json"]);
    let list: Vec<serde_json::Value> = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(list.len(), 1, "{}", stderr(&out));
    assert!(fed.client("sam", &["application", "show", &id]).status.success());

    // zoe decides for hospital-z, which it does not ask: she sees nothing of it.
    let added = add_steward(&fed, "zoe", "hospital-z");
    assert!(added.contains("added zoe (steward of hospital-z)"), "{added}");
    let out = fed.client("zoe", &["application", "list", "--json"]);
    assert_eq!(stdout(&out).trim(), "[]", "{}", stderr(&out));
    let out = fed.client("zoe", &["application", "show", &id]);
    assert!(!out.status.success());
    assert!(
        stderr(&out)
            .contains(&format!("zoe (steward of hospital-z) may not read {id}, which asks nothing of hospital-z")),
        "{}",
        stderr(&out)
    );
    // Nor may a steward call anything else.
    let out = fed.client("zoe", &["job", "list"]);
    assert!(
        !out.status.success() && stderr(&out).contains("zoe (role steward) may not call JobService/ListJobs"),
        "{}",
        stderr(&out)
    );

    // Renewing keeps the binding.
    let out = crate::util::run(&["provision", "renew", "zoe", "--federation", fed_arg]);
    assert!(out.status.success() && stdout(&out).contains("renewed zoe (steward of hospital-z)"), "{}", stderr(&out));
    let zoe = std::fs::read(fed.identity("zoe").join("cert.pem")).unwrap();
    assert_eq!(meridian_wire::identity::principal_from_pem(&zoe).unwrap().site.as_deref(), Some("hospital-z"));

    // A steward is for one site of the federation, and only a steward is bound to one.
    let refused = |args: &[&str], expected: &str| {
        let out = crate::util::run(args);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(expected), "{args:?}: {}", stderr(&out));
    };
    refused(&["provision", "add-user", "x", "--role", "steward", "--federation", fed_arg], "name it with --site");
    refused(
        &["provision", "add-user", "x", "--role", "steward", "--site", "../users/sam", "--federation", fed_arg],
        "--site ../users/sam: not a site name",
    );
    refused(
        &["provision", "add-user", "x", "--role", "steward", "--site", "nowhere", "--federation", fed_arg],
        "--site nowhere: not a site of the federation",
    );
    refused(
        &["provision", "add-user", "x", "--role", "reviewer", "--site", "hospital-a", "--federation", fed_arg],
        "--site is for stewards only",
    );
    let other = fed.dir.join("other");
    refused(
        &["provision", "--out", other.to_str().unwrap(), "--site", "h1", "--user", "x:steward@h2"],
        "h2 is not a --site of this federation",
    );
    refused(
        &["provision", "--out", other.to_str().unwrap(), "--site", "h1", "--user", "x:steward"],
        "NAME:steward@SITE",
    );
}

#[test]
fn stewards_approve_within_the_terms_reject_and_revoke_each_decision_signed() {
    let fed = Federation::start(&["hospital-a", "hospital-b"]);
    add_steward(&fed, "ann", "hospital-b");
    let file = application(&fed);
    let out = fed.client("alice", &["application", "submit", file.to_str().unwrap()]);
    let id = stdout(&out).trim().to_string();
    let text = std::fs::read_to_string(&file).unwrap();
    let hash = meridian_spec::application::ApplicationSpec::from_toml(&text, "a").unwrap().hash();
    let refused = |user: &str, args: &[&str], expected: &str| {
        let out = fed.client(user, args);
        assert!(!out.status.success(), "{user} {args:?}: {}", stdout(&out));
        assert!(stderr(&out).contains(expected), "{user} {args:?}: {}", stderr(&out));
    };

    // Wider than asked: refused before anything is signed or sent.
    let approve = |extra: &[&str]| {
        let mut args = vec!["application", "approve", id.as_str(), "--hash", hash.as_str()];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    refused("sam", &args(&approve(&["--epsilon", "5"])), "epsilon: 5 is not in (0, 4], what hospital-a was asked");
    refused("sam", &args(&approve(&["--columns", "BMI,Income"])), "columns: \"Income\" was not asked for");
    refused("alice", &args(&approve(&[])), "alice is a scientist: only a site's steward decides");
    // The terms reviewed are named by hash: another hash signs nothing.
    let other = "0".repeat(64);
    refused("sam", &["application", "approve", &id, "--hash", &other], "not the 000");

    // sam approves for hospital-a on narrower terms.
    let until = day(90);
    let narrower = approve(&["--epsilon", "2.5", "--until", &until, "--max-jobs", "2"]);
    let out = fed.client("sam", &args(&narrower));
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out);
    assert!(line.contains("hospital-a: approve by sam"), "{line}");
    assert!(line.contains(&format!("ε 2.5 at δ = 1e-5 until {until}, at most 2 jobs, 17 columns")), "{line}");
    refused("sam", &args(&narrower), "hospital-a already decided \"approve\"");

    // ann rejects for hospital-b; there is nothing of hers to revoke.
    refused("ann", &["application", "revoke", &id, "--reason", "x"], "hospital-b has not approved");
    let out = fed.client("ann", &["application", "reject", &id, "--reason", "our board meets in March"]);
    assert!(out.status.success(), "{}", stderr(&out));
    refused("ann", &["application", "approve", &id, "--hash", &hash], "a decision is final");

    // sam withdraws hospital-a's approval.
    let out = fed.client("sam", &["application", "revoke", &id, "--reason", "consent withdrawn", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let decisions = status["decisions"].as_array().unwrap();
    let summary: Vec<(&str, &str, &str)> = decisions
        .iter()
        .map(|d| {
            (d["site"].as_str().unwrap(), d["steward"].as_str().unwrap(), d["verdict"]["decision"].as_str().unwrap())
        })
        .collect();
    assert_eq!(
        summary,
        [("hospital-a", "sam", "approve"), ("hospital-b", "ann", "reject"), ("hospital-a", "sam", "revoke")]
    );
    assert_eq!(decisions[0]["verdict"]["grant"]["epsilon"], 2.5);
    assert_eq!(decisions[1]["verdict"]["reason"], "our board meets in March");

    // The reader's view lists every decision; the audit names each by hash.
    let text = stdout(&fed.client("rita", &["application", "show", &id]));
    assert!(text.contains("hospital-b: reject by ann") && text.contains("hospital-a: revoke by sam"), "{text}");
    let audit = std::fs::read_to_string(fed.dir.join("coord-state").join("audit.log")).unwrap();
    assert_eq!(audit.matches("application.decided").count(), 3, "{audit}");
}

#[test]
fn the_coordinator_refuses_a_decision_whose_signature_does_not_hold() {
    use meridian_spec::decision::{SiteDecision, Verdict};
    use meridian_wire::identity::IdentityFiles;
    use meridian_wire::pb;

    let fed = Federation::start(&["hospital-a"]);
    let file = application(&fed);
    let id = stdout(&fed.client("alice", &["application", "submit", file.to_str().unwrap()])).trim().to_string();
    let spec =
        meridian_spec::application::ApplicationSpec::from_toml(&std::fs::read_to_string(&file).unwrap(), "a").unwrap();
    add_steward(&fed, "ann", "hospital-a");
    let sam = IdentityFiles::from_dir(&fed.identity("sam")).unwrap();
    let ann = IdentityFiles::from_dir(&fed.identity("ann")).unwrap();
    let decision = SiteDecision {
        application_id: id,
        application_hash: spec.hash(),
        site: "hospital-a".into(),
        steward: "sam".into(),
        decided_at_ms: meridian_sys::now_ms(),
        verdict: Verdict::Reject { reason: "no".into() },
    };
    let signed = meridian_wire::decision::sign(&decision, &sam).unwrap();
    // The reason changed after signing: a relay cannot turn it into anything else.
    let request = pb::DecideApplicationRequest {
        decision_json: signed.decision_json.replace("\"no\"", "\"yes\""),
        steward_cert_pem: signed.steward_cert_pem.clone().into(),
        signature: signed.signature.clone().into(),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let send = |as_sam: bool, request: pb::DecideApplicationRequest| {
        let tls = if as_sam { sam.client_tls() } else { ann.client_tls() };
        rt.block_on(async {
            let channel = tonic::transport::Endpoint::from_shared(fed.url.clone())
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            pb::application_service_client::ApplicationServiceClient::new(channel).decide_application(request).await
        })
        .unwrap_err()
    };
    let err = send(true, request);
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "decision refused: the signature does not match the decision");

    // Sam's intact decision, sent over another steward's connection.
    let intact = |signed: &meridian_wire::decision::SignedDecision| pb::DecideApplicationRequest {
        decision_json: signed.decision_json.clone(),
        steward_cert_pem: signed.steward_cert_pem.clone().into(),
        signature: signed.signature.clone().into(),
    };
    let err = send(false, intact(&signed));
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(err.message(), "ann may send only decisions signed with its own certificate");

    // Signed, but dated a day ago.
    let stale = SiteDecision { decided_at_ms: meridian_sys::now_ms() - 86_400_000, ..decision };
    let err = send(true, intact(&meridian_wire::decision::sign(&stale, &sam).unwrap()));
    assert!(err.message().contains("is not now (more than 10 minutes off)"), "{}", err.message());
}
