use super::*;

const BRFSS: &str = include_str!("../../../examples/applications/brfss.toml");

fn app() -> ApplicationSpec {
    ApplicationSpec::from_toml(BRFSS, "brfss.toml").unwrap()
}

fn decision(verdict: Verdict) -> SiteDecision {
    SiteDecision {
        application_id: "app-00000001".into(),
        application_hash: app().hash(),
        site: "hospital-a".into(),
        steward: "sam".into(),
        decided_at_ms: 1_796_688_000_000,
        verdict,
    }
}

#[test]
fn the_full_grant_and_any_narrower_one_pass() {
    let app = app();
    let full = app.full_grant("hospital-a").unwrap();
    assert_eq!((full.epsilon, full.max_jobs, full.columns.len()), (4.0, 5, 17));
    assert_eq!(app.check_grant("hospital-a", &full), Ok(()));
    let narrower = Grant {
        epsilon: 2.5,
        valid_until: Date::parse("2027-03-31").unwrap(),
        max_jobs: 2,
        columns: vec!["BMI".into(), "Smoking".into()],
        ..full
    };
    assert_eq!(app.check_grant("hospital-a", &narrower), Ok(()));
    assert_eq!(decision(Verdict::Approve { grant: narrower }).check_against(&app), Ok(()));
    assert!(app.full_grant("hospital-z").is_none());
}

#[test]
fn a_grant_wider_than_asked_is_refused_naming_each_term() {
    let app = app();
    let wider = Grant {
        epsilon: 4.5,
        delta: 1e-4,
        valid_until: Date::parse("2027-07-01").unwrap(),
        max_jobs: 6,
        columns: vec!["BMI".into(), "Income".into()],
    };
    assert_eq!(
        app.check_grant("hospital-a", &wider).unwrap_err(),
        [
            "epsilon: 4.5 is not in (0, 4], what hospital-a was asked",
            "delta: 0.0001 is not the application's 0.00001",
            "valid_until: 2027-07-01 is outside the application's 2026-12-01..=2027-06-30",
            "max_jobs: 6 is not in 1..=5",
            "columns: \"Income\" was not asked for",
        ]
    );
    let none = Grant { epsilon: 0.0, max_jobs: 0, columns: vec![], ..app.full_grant("hospital-a").unwrap() };
    assert_eq!(app.check_grant("hospital-a", &none).unwrap_err().len(), 3);
    let twice = Grant {
        columns: vec!["BMI".into(), "BMI".into(), "Age".into(), "Pay".into()],
        ..app.full_grant("hospital-a").unwrap()
    };
    assert_eq!(
        app.check_grant("hospital-a", &twice).unwrap_err(),
        ["columns: \"BMI\" is named twice", "columns: \"Age\" was not asked for", "columns: \"Pay\" was not asked for"]
    );
    assert_eq!(app.check_grant("hospital-z", &none).unwrap_err(), ["site: the application asks nothing of hospital-z"]);
}

#[test]
fn a_decision_binds_the_application_and_says_why_it_refuses() {
    let app = app();
    let mut other = decision(Verdict::Reject { reason: "not our population".into() });
    assert_eq!(other.check_against(&app), Ok(()));
    other.application_hash = "0".repeat(64);
    assert_eq!(other.check_against(&app).unwrap_err().len(), 1);
    let silent = decision(Verdict::Revoke { reason: " ".into() });
    assert_eq!(silent.check_against(&app).unwrap_err(), ["reason: a revoke says why"]);
    let mut elsewhere = decision(Verdict::Approve { grant: app.full_grant("hospital-a").unwrap() });
    elsewhere.site = "hospital-z".into();
    assert_eq!(elsewhere.check_against(&app).unwrap_err(), ["site: the application asks nothing of hospital-z"]);
}

#[test]
fn the_canonical_form_round_trips_and_its_hash_binds_the_terms() {
    let d = decision(Verdict::Approve { grant: app().full_grant("hospital-a").unwrap() });
    let json = d.canonical_json();
    assert!(json.contains("\"decision\":\"approve\"") && json.contains("\"valid_until\":\"2027-06-30\""), "{json}");
    let back: SiteDecision = serde_json::from_str(&json).unwrap();
    assert_eq!(back, d);
    let mut less = d.clone();
    if let Verdict::Approve { grant } = &mut less.verdict {
        grant.epsilon = 3.9;
    }
    assert_ne!(less.hash(), d.hash());
}
