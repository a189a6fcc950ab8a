use super::*;

const WDBC: &str = include_str!("../../../examples/jobs/wdbc.toml");
const BRFSS: &str = include_str!("../../../examples/jobs/brfss.toml");

#[track_caller]
fn check_err(text: &str, expected: &str) {
    let err = JobSpec::from_toml(text, "job.toml").unwrap_err();
    assert_eq!(err.to_string(), expected);
}

#[test]
fn example_jobs_parse() {
    let wdbc = JobSpec::from_toml(WDBC, "wdbc.toml").unwrap();
    assert_eq!(wdbc.features.input_dim(), 30);
    assert_eq!(wdbc.model, ModelSpec::LogisticRegression);
    let brfss = JobSpec::from_toml(BRFSS, "brfss.toml").unwrap();
    assert_eq!(brfss.features.input_dim(), 50);
    assert_eq!(brfss.policy.min_sites, 3);
}

#[test]
fn canonical_json_round_trips_and_hash_is_stable() {
    let spec = JobSpec::from_toml(WDBC, "wdbc.toml").unwrap();
    let back = JobSpec::from_canonical_json(&spec.canonical_json()).unwrap();
    assert_eq!(back, spec);
    assert_eq!(back.hash(), spec.hash());
    let mut changed = spec.clone();
    changed.training.rounds += 1;
    assert_ne!(changed.hash(), spec.hash());
}

#[test]
fn unknown_model_names_the_field() {
    check_err(
        &WDBC.replace("kind = \"logistic_regression\"", "kind = \"resnet\""),
        "job.toml: model.kind: unknown model \"resnet\" (expected logistic_regression, mlp or cnn)",
    );
}

#[test]
fn invalid_values_are_all_reported() {
    check_err(
        &WDBC.replace("rounds = 5", "rounds = 0").replace("delta = 1e-5", "delta = 0.5"),
        "job.toml: training.rounds: must be in 1..=10000, got 0; privacy.delta: must be in (0, 0.01), got 0.5",
    );
}

#[test]
fn wrong_type_names_line_and_key() {
    check_err(
        &WDBC.replace("batch_size = 32", "batch_size = \"many\""),
        "job.toml:49:14: training.batch_size: invalid type: string \"many\", expected usize",
    );
}

#[test]
fn unknown_key_is_refused() {
    let err =
        JobSpec::from_toml(&WDBC.replace("[privacy]", "[privacy]\nepsilon = 3"), "job.toml").unwrap_err().to_string();
    assert!(err.starts_with("job.toml:"), "{err}");
    assert!(err.contains("unknown field `epsilon`"), "{err}");
}

#[test]
fn duplicate_columns_are_refused() {
    check_err(
        &WDBC.replace("\"texture_mean\",", "\"radius_mean\","),
        "job.toml: features.numeric[1] repeats column \"radius_mean\" (already features.numeric[0])",
    );
}

#[test]
fn client_dp_is_optional_and_validated() {
    let with = format!(
        "{WDBC}\n[client_dp]\nclip = 0.5\nnoise_multiplier = 1.0\n[client_dp.adaptive]\ntarget_quantile = 0.5\nlearning_rate = 0.2\ncount_noise_multiplier = 5.0\n"
    );
    let spec = JobSpec::from_toml(&with, "job.toml").unwrap();
    let c = spec.client_dp.clone().unwrap();
    // z_Δ = (1 - 1/100)^(-1/2)
    assert!((c.update_noise_multiplier() - (1.0f64 - 0.01).powf(-0.5)).abs() < 1e-12);
    assert_ne!(spec.hash(), JobSpec::from_toml(WDBC, "job.toml").unwrap().hash());
    check_err(
        &with.replace("count_noise_multiplier = 5.0", "count_noise_multiplier = 0.4"),
        "job.toml: client_dp.adaptive.count_noise_multiplier: must exceed noise_multiplier / 2 = 0.5 so the update keeps some budget, got 0.4",
    );
}

#[test]
fn robust_aggregation_is_chosen_by_name_and_validated() {
    let median = JobSpec::from_toml(&format!("{WDBC}\n[aggregation]\nrule = \"median\"\n"), "job.toml").unwrap();
    assert_eq!(median.aggregation, Aggregation::Median);
    assert_eq!(JobSpec::from_toml(WDBC, "job.toml").unwrap().aggregation, Aggregation::Fedavg);
    check_err(
        &format!("{WDBC}\n[aggregation]\nrule = \"krum\"\nbyzantine = 1\n"),
        "job.toml: aggregation.byzantine: Krum tolerating 1 bad sites needs min_sites >= 5, got 3",
    );
    let err = JobSpec::from_toml(&format!("{WDBC}\n[aggregation]\nrule = \"mode\"\n"), "job.toml").unwrap_err();
    assert!(err.to_string().contains("unknown variant `mode`"), "{err}");
}

#[test]
fn labels_and_levels_may_be_written_as_integers() {
    let text = WDBC
        .replace("positive_label = \"M\"", "positive_label = 1")
        .replace("negative_labels = [\"B\"]", "negative_labels = [0, \"unknown\"]");
    let spec = JobSpec::from_toml(
        &format!("{text}\n[[features.categorical]]\ncolumn = \"cp\"\nlevels = [1, 2, \"4\"]\n"),
        "job.toml",
    )
    .unwrap();
    assert_eq!(spec.features.positive_label, "1");
    assert_eq!(spec.features.negative_labels, ["0", "unknown"]);
    assert_eq!(spec.features.categorical[0].levels, ["1", "2", "4"]);
    // The same spec written with strings is the same spec, with the same hash.
    let strings = WDBC
        .replace("positive_label = \"M\"", "positive_label = \"1\"")
        .replace("negative_labels = [\"B\"]", "negative_labels = [\"0\", \"unknown\"]");
    let same = JobSpec::from_toml(
        &format!("{strings}\n[[features.categorical]]\ncolumn = \"cp\"\nlevels = [\"1\", \"2\", \"4\"]\n"),
        "job.toml",
    )
    .unwrap();
    assert_eq!(spec.hash(), same.hash());
    // A float is not a cell's text: refused with the key.
    let err = JobSpec::from_toml(&WDBC.replace("positive_label = \"M\"", "positive_label = 1.0"), "job.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("positive_label"), "{err}");
}

#[test]
fn a_spec_stored_by_an_earlier_version_still_reads() {
    let spec = JobSpec::from_toml(WDBC, "job.toml").unwrap();
    let mut old: serde_json::Value = serde_json::from_str(&spec.canonical_json()).unwrap();
    let object = old.as_object_mut().unwrap();
    object.remove("evaluation");
    object["privacy"].as_object_mut().unwrap().insert("count_noise_scale".into(), 10.0.into());
    let read = JobSpec::from_canonical_json(&old.to_string()).unwrap();
    assert_eq!(read.evaluation, EvaluationSpec::default());
    assert_eq!(read.privacy.noise_multiplier, spec.privacy.noise_multiplier);
}
