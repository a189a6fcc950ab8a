use super::*;

const BRFSS: &str = include_str!("../../../examples/applications/brfss.toml");
const BRFSS_JOB: &str = include_str!("../../../examples/jobs/brfss.toml");

fn brfss() -> ApplicationSpec {
    ApplicationSpec::from_toml(BRFSS, "brfss.toml").unwrap()
}

fn job() -> JobSpec {
    JobSpec::from_toml(BRFSS_JOB, "job.toml").unwrap()
}

/// Milliseconds at noon UTC of `date`.
fn noon(date: &str) -> i64 {
    Date::parse(date).unwrap().start_ms() + 12 * 3_600_000
}

#[test]
fn the_example_parses_with_its_sites_in_name_order() {
    let app = brfss();
    assert_eq!(app.datasets, ["brfss"]);
    assert_eq!(app.columns.len(), 17);
    assert_eq!(app.model_families, [ModelFamily::LogisticRegression, ModelFamily::Mlp]);
    assert_eq!(app.valid_until.to_string(), "2027-06-30");
    let names: Vec<&str> = app.sites.iter().map(|s| s.site.as_str()).collect();
    assert_eq!(names, ["hospital-a", "hospital-b", "hospital-c"]);
    assert_eq!(app.site("hospital-b").unwrap().epsilon, 4.0);
    assert!(app.site("hospital-z").is_none());
}

#[test]
fn canonical_json_round_trips_and_the_hash_binds_every_term() {
    let app = brfss();
    let back = ApplicationSpec::from_canonical_json(&app.canonical_json(), "offer").unwrap();
    assert_eq!(back, app);
    assert_eq!(back.hash(), app.hash());
    assert_eq!(app.hash().len(), 64);
    let mut longer = app.clone();
    longer.valid_until = Date::parse("2027-07-01").unwrap();
    let mut more = app.clone();
    more.sites[0].epsilon = 4.5;
    assert_ne!(longer.hash(), app.hash());
    assert_ne!(more.hash(), app.hash());
    // Sites listed in another order are the same application.
    let reordered = BRFSS.replacen("hospital-a", "hospital-x", 1).replacen("hospital-c", "hospital-a", 1);
    let reordered = reordered.replacen("hospital-x", "hospital-c", 1);
    assert_eq!(ApplicationSpec::from_toml(&reordered, "r.toml").unwrap().hash(), app.hash());
    // A canonical form from elsewhere with its sites out of order is refused.
    let mut unsorted = app.clone();
    unsorted.sites.reverse();
    let err = ApplicationSpec::from_canonical_json(&unsorted.canonical_json(), "offer").unwrap_err().to_string();
    assert_eq!(err, "offer: sites: must be in name order");
}

#[test]
fn dates_may_be_strings_or_toml_dates() {
    let quoted = BRFSS.replace("valid_until = 2027-06-30", "valid_until = \"2027-06-30\"");
    assert_eq!(ApplicationSpec::from_toml(&quoted, "q.toml").unwrap(), brfss());
    let timed = BRFSS.replace("valid_until = 2027-06-30", "valid_until = 2027-06-30T10:00:00");
    let err = ApplicationSpec::from_toml(&timed, "t.toml").unwrap_err().to_string();
    assert_eq!(err, "t.toml: valid_until: 2027-06-30T10:00:00 is not a date of the form YYYY-MM-DD");
    let impossible = BRFSS.replace("valid_from = 2026-12-01", "valid_from = \"2026-02-30\"");
    let err = ApplicationSpec::from_toml(&impossible, "i.toml").unwrap_err().to_string();
    assert_eq!(err, "i.toml: valid_from: \"2026-02-30\" is not a date of the form YYYY-MM-DD");
}

#[test]
fn every_problem_is_named_by_its_field() {
    let text = BRFSS
        .replace("ethics_reference = \"DEMO-IRB-2026-017\"", "ethics_reference = \" \"")
        .replace("\"Smoking\",", "\"Smoking\", \"BMI\", \"HeartDisease\",")
        .replace("max_jobs = 5", "max_jobs = 0")
        .replace("valid_from = 2026-12-01", "valid_from = 2027-07-01")
        .replacen("epsilon = 4.0", "epsilon = -1.0", 1)
        .replacen("delta = 1e-5", "delta = 1.0", 1)
        .replace("outputs = [\"model_weights\", \"metrics\"]", "outputs = []");
    let err = ApplicationSpec::from_toml(&text, "app.toml").unwrap_err();
    let SpecError::Invalid { origin, problems } = err else { panic!("{err}") };
    assert_eq!(origin, "app.toml");
    assert_eq!(
        problems,
        [
            "ethics_reference: must name the approval the study holds",
            "columns: \"BMI\" is named twice",
            "columns: \"HeartDisease\" is the label, not a feature",
            "outputs: must ask for at least one output",
            "max_jobs: must be at least 1",
            "valid_until: 2027-06-30 is before valid_from 2027-07-01",
            "sites[hospital-a].epsilon: must be a positive number, got -1",
            "sites[hospital-a].delta: must lie strictly between 0 and 1, got 1",
        ]
    );
}

#[test]
fn syntax_errors_and_unknown_fields_name_the_line() {
    let err = ApplicationSpec::from_toml("title = \"x\"\nepsilon = 3\n", "app.toml").unwrap_err().to_string();
    assert!(err.starts_with("app.toml:"), "{err}");
    let misspelt = BRFSS.replace("max_jobs = 5", "max_job = 5");
    let err = ApplicationSpec::from_toml(&misspelt, "app.toml").unwrap_err().to_string();
    assert!(err.contains("max_job"), "{err}");
    let family = BRFSS.replace("\"mlp\"]", "\"transformer\"]");
    let err = ApplicationSpec::from_toml(&family, "app.toml").unwrap_err().to_string();
    assert!(err.starts_with("app.toml:") && err.contains("transformer"), "{err}");
}

#[test]
fn a_job_within_the_terms_passes() {
    assert_eq!(brfss().check_job(&job(), noon("2027-01-15")), Ok(()));
    // Validity includes both of its days.
    let app = brfss();
    assert!(app.in_force_at(app.valid_from.start_ms()));
    assert!(app.in_force_at(app.valid_until.end_ms() - 1));
    assert!(!app.in_force_at(app.valid_until.end_ms()));
    assert!(!app.in_force_at(app.valid_from.start_ms() - 1));
    assert_eq!(app.validity_at(app.valid_from.start_ms() - 1), Validity::NotStarted);
    assert_eq!(app.validity_at(app.valid_until.end_ms()), Validity::Expired);
}

#[test]
fn a_job_outside_the_terms_is_refused_naming_the_term() {
    let now = noon("2027-01-15");
    let refused = |app: &ApplicationSpec, job: &JobSpec| app.check_job(job, now).unwrap_err();

    let late = brfss().check_job(&job(), noon("2027-07-01")).unwrap_err();
    assert_eq!(late.term, Term::Validity);
    assert_eq!(late.to_string(), "outside the application's validity: 2027-07-01 is outside 2026-12-01..=2027-06-30");

    let mut other_data = job();
    other_data.dataset = "wdbc".into();
    assert_eq!(refused(&brfss(), &other_data).term, Term::Dataset);

    let mut narrower = brfss();
    narrower.columns.retain(|c| c != "Race");
    let outside = refused(&narrower, &job());
    assert_eq!((outside.term, outside.detail.as_str()), (Term::Columns, "column \"Race\""));

    let mut other_label = job();
    other_label.features.label = "Stroke".into();
    assert_eq!(refused(&brfss(), &other_label).term, Term::Columns);

    let mut cnn = job();
    cnn.model = ModelSpec::Cnn { image_side: 28 };
    let outside = refused(&brfss(), &cnn);
    assert_eq!(outside.to_string(), "outside the application's model_family: model family cnn");

    let mut loose = job();
    loose.privacy.delta = 1e-4;
    assert_eq!(refused(&brfss(), &loose).term, Term::Delta);
}
