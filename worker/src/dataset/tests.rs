//! Tests of `dataset`: encoding values, file formats, line numbers, every
//! error message in full, split determinism and spec validation.

use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use tempfile::TempDir;

use super::*;

/// A spec over the columns of [`PATIENTS`].
fn patients_spec() -> FeatureSpec {
    FeatureSpec {
        label: "HeartDisease".into(),
        positive_label: "Yes".into(),
        negative_labels: vec!["No".into()],
        numeric: vec!["Age".into(), "Const".into()],
        categorical: vec![
            CategoricalFeature { column: "Sex".into(), levels: vec!["Female".into(), "Male".into()] },
            CategoricalFeature { column: "Race".into(), levels: vec!["White".into(), "Black".into(), "Asian".into()] },
        ],
    }
}

/// Five patients with distinct ages, so each encoded row can be traced back.
const PATIENTS: &str = "\
Age,Sex,Const,Race,HeartDisease,Unused
30,Female,5,White,Yes,x
40,Male,5,Black,No,y
50,Female,5,Asian,No,z
60,Male,5,White,Yes,x
70,Female,5,Black,No,y
";

/// A 0.2 test fraction: one test row and four training rows of [`PATIENTS`].
fn split() -> SplitOptions {
    SplitOptions { test_fraction: 0.2, seed: 42 }
}

/// A 0.2 split of `path` that holds out some rows and keeps some for
/// training: with a handful of rows, a seed's hashes can put every row on
/// one side.
fn usable_split(path: &Path) -> SplitOptions {
    (0..)
        .map(|seed| SplitOptions { test_fraction: 0.2, seed })
        .find(|s| count_split(path, s).is_ok_and(|c| c.train > 0 && c.test > 0))
        .unwrap()
}

/// Writes `contents` to `name` in `dir`.
fn write(dir: &TempDir, name: &str, contents: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// `contents`, gzip-compressed.
fn gzip(contents: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(contents).unwrap();
    encoder.finish().unwrap()
}

/// Loads `contents` as `data.csv` with `spec` and asserts the load fails
/// with exactly `expected`, in which `{path}` stands for the file's path.
#[track_caller]
fn check_error(contents: &str, spec: &FeatureSpec, expected: &str) {
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "data.csv", contents.as_bytes());
    check_load_error(&path, spec, &split(), expected);
}

/// Asserts that loading `path` fails with exactly `expected`, in which
/// `{path}` stands for `path`.
#[track_caller]
fn check_load_error(path: &Path, spec: &FeatureSpec, split: &SplitOptions, expected: &str) {
    let error = load(path, spec, split).unwrap_err().to_string();
    assert_eq!(error, expected.replace("{path}", &path.display().to_string()));
    assert!(!error.contains('\n'), "error spans lines: {error}");
}

#[test]
fn encodes_one_hot_and_standardised_values() {
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "patients.csv", PATIENTS.as_bytes());
    let data = load(&path, &patients_spec(), &split()).unwrap();

    assert_eq!(data.dim, 7);
    assert_eq!(
        data.encoded_names,
        ["Age", "Const", "Sex=Female", "Sex=Male", "Race=White", "Race=Black", "Race=Asian"]
    );
    assert_eq!((data.n_train(), data.n_test()), (4, 1));
    assert_eq!((data.train_x.len(), data.test_x.len()), (4 * 7, 7));

    // Which age is held out decides the training statistics: population
    // mean and standard deviation of the other four ages.
    let (age_mean, age_std) = data.standardisation[0];
    let test_age = (f64::from(data.test_x[0]) * age_std + age_mean).round();
    let expected = match test_age as u32 {
        30 => (55.0, 125f64.sqrt()),
        40 => (52.5, 218.75f64.sqrt()),
        50 => (50.0, 250f64.sqrt()),
        60 => (47.5, 218.75f64.sqrt()),
        70 => (45.0, 125f64.sqrt()),
        other => panic!("no patient is {other}"),
    };
    assert_eq!(data.standardisation[0], expected);
    // A constant column keeps its value as mean and gets std 1, so it encodes as 0.
    assert_eq!(data.standardisation[1], (5.0, 1.0));

    // Every patient appears once, encoded exactly.
    let encoded = |age: f64, female: bool, race: usize| {
        let mut row = vec![((age - age_mean) / age_std) as f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        row[if female { 2 } else { 3 }] = 1.0;
        row[4 + race] = 1.0;
        row
    };
    let mut expected_rows = vec![
        (encoded(30.0, true, 0), 1),
        (encoded(40.0, false, 1), 0),
        (encoded(50.0, true, 2), 0),
        (encoded(60.0, false, 0), 1),
        (encoded(70.0, true, 1), 0),
    ];
    let rows = data.train_x.chunks(7).zip(&data.train_y).chain(data.test_x.chunks(7).zip(&data.test_y));
    for (x, &y) in rows {
        let at = expected_rows.iter().position(|(row, _)| row[0] == x[0]).unwrap();
        assert_eq!((x.to_vec(), y), expected_rows.remove(at));
    }
    assert!(expected_rows.is_empty());
}

#[test]
fn gzip_is_detected_by_magic_bytes_and_reads_like_plain() {
    let dir = TempDir::new().unwrap();
    let plain = write(&dir, "patients.csv", PATIENTS.as_bytes());
    let gz = write(&dir, "patients.csv.gz", &gzip(PATIENTS.as_bytes()));
    let gz_without_extension = write(&dir, "patients.dat", &gzip(PATIENTS.as_bytes()));
    let plain_with_gz_extension = write(&dir, "plain.csv.gz", PATIENTS.as_bytes());
    // Two concatenated gzip members, as `cat a.gz b.gz` makes.
    let (head, tail) = PATIENTS.split_at(PATIENTS.find("50,").unwrap());
    let members = [gzip(head.as_bytes()), gzip(tail.as_bytes())].concat();
    let multi_member = write(&dir, "members.csv.gz", &members);

    let expected = load(&plain, &patients_spec(), &split()).unwrap();
    for path in [gz, gz_without_extension, plain_with_gz_extension, multi_member] {
        assert_eq!(load(&path, &patients_spec(), &split()).unwrap(), expected, "{}", path.display());
        assert_eq!(read_header(&path).unwrap(), read_header(&plain).unwrap());
    }
}

#[test]
fn honours_quotes_and_trims_values() {
    let dir = TempDir::new().unwrap();
    let csv = "\
 Diabetic , BMI ,Label
\"No, borderline diabetes\",20,No
  Yes  , 30 ,\" Yes \"
\"No, borderline diabetes\",\"40\",No
No,50,No
\"Yes (during pregnancy)\",60,No
";
    let path = write(&dir, "quoted.csv", csv.as_bytes());
    let spec = FeatureSpec {
        label: "Label".into(),
        positive_label: "Yes".into(),
        negative_labels: vec!["No".into()],
        numeric: vec![],
        categorical: vec![CategoricalFeature {
            column: "Diabetic".into(),
            levels: vec!["No".into(), "No, borderline diabetes".into(), "Yes".into(), "Yes (during pregnancy)".into()],
        }],
    };
    assert_eq!(read_header(&path).unwrap(), ["Diabetic", "BMI", "Label"]);

    let data = load(&path, &spec, &usable_split(&path)).unwrap();
    let mut rows: Vec<(Vec<f32>, u8)> = data
        .train_x
        .chunks(4)
        .map(<[f32]>::to_vec)
        .zip(data.train_y.iter().copied())
        .chain(data.test_x.chunks(4).map(<[f32]>::to_vec).zip(data.test_y.iter().copied()))
        .collect();
    rows.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(
        rows,
        [
            (vec![0.0, 0.0, 0.0, 1.0], 0),
            (vec![0.0, 0.0, 1.0, 0.0], 1),
            (vec![0.0, 1.0, 0.0, 0.0], 0),
            (vec![0.0, 1.0, 0.0, 0.0], 0),
            (vec![1.0, 0.0, 0.0, 0.0], 0),
        ]
    );
}

#[test]
fn header_byte_order_mark_is_ignored() {
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "bom.csv", format!("\u{feff}{PATIENTS}").as_bytes());
    assert_eq!(read_header(&path).unwrap()[0], "Age");
    assert!(load(&path, &patients_spec(), &split()).is_ok());
}

/// Rows `x,y` for x in `range`, labelled Yes for even x.
fn numbered(range: std::ops::Range<u32>) -> String {
    let mut csv = String::from("x,y\n");
    for i in range {
        csv.push_str(&format!("{i},{}\n", if i % 2 == 0 { "Yes" } else { "No" }));
    }
    csv
}

fn x_spec() -> FeatureSpec {
    FeatureSpec {
        label: "y".into(),
        positive_label: "Yes".into(),
        negative_labels: vec!["No".into()],
        numeric: vec!["x".into()],
        categorical: vec![],
    }
}

/// The `x` values of each split, in order.
fn sides(data: &EncodedDataset) -> (Vec<u32>, Vec<u32>) {
    let (mean, std) = data.standardisation[0];
    let decode = |x: &[f32]| x.iter().map(|&v| (f64::from(v) * std + mean).round() as u32).collect();
    (decode(&data.train_x), decode(&data.test_x))
}

#[test]
fn split_is_deterministic_and_each_row_decides_its_own_side() {
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "ten.csv", numbered(0..10).as_bytes());
    let spec = x_spec();
    let at = |test_fraction, seed| SplitOptions { test_fraction, seed };
    let first = load(&path, &spec, &at(0.3, 1)).unwrap();
    assert_eq!(first, load(&path, &spec, &at(0.3, 1)).unwrap());
    assert_ne!(sides(&first), sides(&load(&path, &spec, &at(0.3, 2)).unwrap()));

    // Every row lands in exactly one split, with its own label.
    let (train, test) = sides(&first);
    let mut seen: Vec<(u32, u8)> =
        train.iter().zip(&first.train_y).chain(test.iter().zip(&first.test_y)).map(|(&x, &y)| (x, y)).collect();
    seen.sort();
    assert_eq!(seen, (0..10).map(|i| (i, u8::from(i % 2 == 0))).collect::<Vec<_>>());

    // One record more moves no other record across the split: neighbouring
    // datasets have neighbouring training sets, as DP-SGD's guarantee needs.
    let more = write(&dir, "eleven.csv", numbered(0..11).as_bytes());
    let (train11, test11) = sides(&load(&more, &spec, &at(0.3, 1)).unwrap());
    let without = |v: &[u32]| v.iter().copied().filter(|&x| x != 10).collect::<Vec<_>>();
    assert_eq!((without(&train11), without(&test11)), (train, test));

    // Over many rows the test share is near the fraction.
    let many = write(&dir, "many.csv", numbered(0..4000).as_bytes());
    for fraction in [0.1, 0.25, 0.5] {
        let sizes = count_split(&many, &at(fraction, 3)).unwrap();
        assert_eq!(sizes.train + sizes.test, 4000);
        let expected = 4000.0 * fraction;
        // Within 5 binomial standard deviations.
        let sd = (4000.0 * fraction * (1.0 - fraction)).sqrt();
        assert!((sizes.test as f64 - expected).abs() < 5.0 * sd, "{fraction}: {sizes:?}");
        let data = load(&many, &spec, &at(fraction, 3)).unwrap();
        assert_eq!((data.n_train() as u64, data.n_test() as u64), (sizes.train, sizes.test));
    }
}

#[test]
fn counting_a_split_digests_the_records() {
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "ten.csv", numbered(0..10).as_bytes());
    let split = SplitOptions { test_fraction: 0.3, seed: 1 };
    let sizes = count_split(&path, &split).unwrap();
    assert_eq!(sizes.train + sizes.test, 10);
    // The same records, compressed or padded, give the same digest; one more record does not.
    let gz = write(&dir, "ten.csv.gz", &gzip(numbered(0..10).as_bytes()));
    assert_eq!(count_split(&gz, &split).unwrap(), sizes);
    let padded = write(&dir, "padded.csv", numbered(0..10).replace(",", " , ").as_bytes());
    assert_eq!(count_split(&padded, &split).unwrap().digest, sizes.digest);
    let more = write(&dir, "eleven.csv", numbered(0..11).as_bytes());
    assert_ne!(count_split(&more, &split).unwrap().digest, sizes.digest);
}

#[test]
fn wdbc_loads_standardised() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/wdbc.csv");
    let header = read_header(&path).unwrap();
    assert_eq!(header.len(), 32);
    let spec = FeatureSpec {
        label: "diagnosis".into(),
        positive_label: "M".into(),
        negative_labels: vec!["B".into()],
        numeric: header[2..].to_vec(),
        categorical: vec![],
    };
    let data = load(&path, &spec, &SplitOptions { test_fraction: 0.2, seed: 7 }).unwrap();

    assert_eq!(data.dim, 30);
    // Each record's own hash decides: about a fifth of 569 are held out.
    assert_eq!((data.n_train(), data.n_test()), (445, 124));
    let counted = count_split(&path, &SplitOptions { test_fraction: 0.2, seed: 7 }).unwrap();
    assert_eq!((counted.train, counted.test), (445, 124));
    let malignant = data.train_y.iter().chain(&data.test_y).filter(|&&y| y == 1).count();
    assert_eq!(malignant, 212);
    for j in 0..30 {
        let column: Vec<f64> = data.train_x.chunks(30).map(|row| f64::from(row[j])).collect();
        let n = column.len() as f64;
        let mean = column.iter().sum::<f64>() / n;
        let std = (column.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 1e-6, "{}: mean {mean}", spec.numeric[j]);
        assert!((std - 1.0).abs() < 1e-6, "{}: std {std}", spec.numeric[j]);
    }
}

#[test]
fn input_layout() {
    let spec = patients_spec();
    assert_eq!(spec.input_dim(), 7);
    assert_eq!(spec.encoded_names().len(), spec.input_dim());
    assert_eq!(spec.encoded_names()[2], "Sex=Female");
}

#[test]
fn spec_deserialises_strictly() {
    let json = r#"{"label":"y","positive_label":"Yes","negative_labels":["No"],
        "numeric":["x"],"categorical":[{"column":"c","levels":["a"]}]}"#;
    let spec: FeatureSpec = serde_json::from_str(json).unwrap();
    assert_eq!(spec.input_dim(), 2);
    let typo = json.replace("\"numeric\"", "\"numerics\"");
    let error = serde_json::from_str::<FeatureSpec>(&typo).unwrap_err().to_string();
    assert!(error.starts_with("unknown field `numerics`"), "{error}");
}

#[test]
fn spec_validation_collects_every_problem() {
    assert_eq!(patients_spec().validate(), Ok(()));

    let spec = FeatureSpec {
        label: "HeartDisease".into(),
        positive_label: "Yes".into(),
        negative_labels: vec!["No".into(), "Yes".into(), "No".into(), " Maybe".into()],
        numeric: vec!["BMI".into(), "HeartDisease".into(), "".into()],
        categorical: vec![
            CategoricalFeature { column: "BMI".into(), levels: vec!["a".into()] },
            CategoricalFeature { column: "Sex".into(), levels: vec![] },
            CategoricalFeature { column: "Race".into(), levels: vec!["White".into(), "Black ".into(), "White".into()] },
        ],
    };
    assert_eq!(
        spec.validate().unwrap_err(),
        [
            "features.negative_labels[1] is \"Yes\", the positive label",
            "features.negative_labels[2] repeats \"No\" (already features.negative_labels[0])",
            "features.negative_labels[3] \" Maybe\" has surrounding whitespace, but values are trimmed when read",
            "features.numeric[1] is \"HeartDisease\", the label column",
            "features.numeric[2] is empty",
            "features.categorical[0].column repeats column \"BMI\" (already features.numeric[0])",
            "features.categorical[1].levels is empty",
            "features.categorical[2].levels[1] \"Black \" has surrounding whitespace, but values are trimmed when read",
            "features.categorical[2].levels[2] repeats \"White\" (already features.categorical[2].levels[0])",
        ]
    );

    let empty = FeatureSpec {
        label: String::new(),
        positive_label: String::new(),
        negative_labels: vec![],
        numeric: vec![],
        categorical: vec![],
    };
    assert_eq!(
        empty.validate().unwrap_err(),
        [
            "features.label is empty",
            "features.positive_label is empty",
            "features.negative_labels is empty: list the label values meaning class 0",
            "features.numeric and features.categorical are both empty",
        ]
    );
}

#[test]
fn error_invalid_spec() {
    let mut spec = patients_spec();
    spec.label = String::new();
    spec.categorical[0].levels.clear();
    check_error(
        PATIENTS,
        &spec,
        "invalid feature spec: features.label is empty; features.categorical[0].levels is empty",
    );
}

#[test]
fn error_invalid_split() {
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "patients.csv", PATIENTS.as_bytes());
    for test_fraction in [0.0, 1.0, -0.5, f64::NAN] {
        check_load_error(
            &path,
            &patients_spec(),
            &SplitOptions { test_fraction, seed: 0 },
            &format!(
                "invalid split options: split.test_fraction must be strictly between 0 and 1, got {test_fraction}"
            ),
        );
    }
}

#[test]
fn error_cannot_open() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("absent.csv");
    let cause = std::fs::File::open(&path).unwrap_err();
    check_load_error(&path, &patients_spec(), &split(), &format!("{{path}}: cannot open: {cause}"));
    assert_eq!(read_header(&path).unwrap_err().to_string(), format!("{}: cannot open: {cause}", path.display()));
}

#[test]
fn error_corrupt_gzip() {
    let dir = TempDir::new().unwrap();
    let mut bytes = gzip(PATIENTS.as_bytes());
    let middle = bytes.len() / 2;
    bytes.truncate(middle);
    let truncated = write(&dir, "truncated.csv.gz", &bytes);
    check_load_error(&truncated, &patients_spec(), &split(), "{path}:1: cannot read: incomplete deflate stream");
    let garbage = write(&dir, "garbage.csv.gz", b"\x1f\x8bnot really gzip");
    check_load_error(&garbage, &patients_spec(), &split(), "{path}:1: cannot read: invalid gzip header");
}

#[test]
fn error_no_header() {
    check_error("", &patients_spec(), "{path}: the file is empty, but a header row is required");
    check_error("\n\r\n\n", &patients_spec(), "{path}: the file is empty, but a header row is required");
}

#[test]
fn error_missing_column() {
    let mut spec = patients_spec();
    spec.numeric.push("BMI".into());
    check_error(
        PATIENTS,
        &spec,
        "{path}: column \"BMI\" required by features.numeric[2] is not in the header \
         (columns: Age, Sex, Const, Race, HeartDisease, Unused)",
    );
    let mut spec = patients_spec();
    spec.label = "Target".into();
    check_error(
        PATIENTS,
        &spec,
        "{path}: column \"Target\" required by features.label is not in the header \
         (columns: Age, Sex, Const, Race, HeartDisease, Unused)",
    );
}

#[test]
fn a_header_with_control_characters_gives_a_one_line_error() {
    // Found by the csv_schema fuzz target: a quoted column name holding a
    // line break and a control byte used to be printed as it was.
    let mut spec = patients_spec();
    spec.label = "Target".into();
    check_error(
        "Age,\"Se\nx\",\u{12}Race\n30,Female,White\n",
        &spec,
        "{path}: column \"Target\" required by features.label is not in the header \
         (columns: Age, Se\\nx, \\u{12}Race)",
    );
}

#[test]
fn values_beyond_f32_are_refused_with_their_line() {
    // Found by the csv_schema fuzz target: 4e38 is a finite f64 but not an f32.
    check_error(
        "Age,Sex,Const,Race,HeartDisease,Unused\n30,Female,5,White,Yes,x\n4e38,Male,5,White,No,x\n",
        &patients_spec(),
        "{path}:3: column \"Age\": \"4e38\" is outside the range of 32-bit floats (±3.4e38) that training uses",
    );
}

#[test]
fn error_duplicate_column() {
    check_error(
        "Age,Sex,Const,Race,HeartDisease,Sex\n30,Female,5,White,Yes,Male\n",
        &patients_spec(),
        "{path}: column \"Sex\" required by features.categorical[0].column is in the header twice \
         (columns 2 and 6)",
    );
}

#[test]
fn error_field_count() {
    check_error(
        &format!("{PATIENTS}80,Male,5,White\n"),
        &patients_spec(),
        "{path}:7: the row has 4 fields, but the header has 6",
    );
}

#[test]
fn row_errors_carry_line_and_fault() {
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "data.csv", PATIENTS.replace("40,Male", "4O,Male").as_bytes());
    let error = load(&path, &patients_spec(), &split()).unwrap_err();
    let DatasetError::Row { path: at, line, fault } = error else {
        panic!("not a row error: {error}");
    };
    assert_eq!((at, line), (path, 3));
    assert_eq!(*fault, RowError::NotANumber { column: "Age".into(), value: "4O".into() });
}

#[test]
fn error_not_a_number() {
    check_error(
        &PATIENTS.replace("50,Female", "abc,Female"),
        &patients_spec(),
        "{path}:4: column \"Age\": cannot parse \"abc\" as a number",
    );
    check_error(
        &PATIENTS.replace("40,Male", "  ,Male"),
        &patients_spec(),
        "{path}:3: column \"Age\": cannot parse \"\" as a number",
    );
    check_error(
        &PATIENTS.replace("60,Male", "\"6,5\",Male"),
        &patients_spec(),
        "{path}:5: column \"Age\": cannot parse \"6,5\" as a number",
    );
}

#[test]
fn error_not_finite() {
    check_error(
        &PATIENTS.replace("40,Male", "NaN,Male"),
        &patients_spec(),
        "{path}:3: column \"Age\": \"NaN\" is not a finite number",
    );
    check_error(
        &PATIENTS.replace("Male,5,White", "Male,-inf,White"),
        &patients_spec(),
        "{path}:5: column \"Const\": \"-inf\" is not a finite number",
    );
    check_error(
        &PATIENTS.replace("70,", "1e999,"),
        &patients_spec(),
        "{path}:6: column \"Age\": \"1e999\" is not a finite number",
    );
}

#[test]
fn error_unknown_level() {
    check_error(
        &PATIENTS.replace("Asian", "Martian"),
        &patients_spec(),
        "{path}:4: column \"Race\": value \"Martian\" is not one of the levels [\"White\", \"Black\", \"Asian\"]",
    );
    // Levels are matched exactly, case included.
    check_error(
        &PATIENTS.replace("40,Male", "40,male"),
        &patients_spec(),
        "{path}:3: column \"Sex\": value \"male\" is not one of the levels [\"Female\", \"Male\"]",
    );
}

#[test]
fn error_unknown_label() {
    check_error(
        &PATIENTS.replace("Asian,No", "Asian,Maybe"),
        &patients_spec(),
        "{path}:4: column \"HeartDisease\": label \"Maybe\" is neither the positive label \"Yes\" \
         nor one of the negative labels [\"No\"]",
    );
}

#[test]
fn error_no_rows() {
    check_error("Age,Sex,Const,Race,HeartDisease\n", &patients_spec(), "{path}: no data rows after the header");
}

#[test]
fn error_empty_split() {
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "patients.csv", PATIENTS.as_bytes());
    check_load_error(
        &path,
        &patients_spec(),
        &SplitOptions { test_fraction: 0.05, seed: 0 },
        "{path}: test_fraction 0.05 (split_seed 0) splits 5 rows into 5 train and 0 test rows, but both need at least one",
    );
    check_load_error(
        &path,
        &patients_spec(),
        &SplitOptions { test_fraction: 0.95, seed: 0 },
        "{path}: test_fraction 0.95 (split_seed 0) splits 5 rows into 0 train and 5 test rows, but both need at least one",
    );
}

#[test]
fn error_lines_are_physical_lines() {
    let bad_last_row = |text: &str| format!("{text}80,Male,5,Martian,No,x\n");
    let expected = |line: u32| {
        format!(
            "{{path}}:{line}: column \"Race\": value \"Martian\" is not one of the levels \
             [\"White\", \"Black\", \"Asian\"]"
        )
    };
    // Plain `\n`: header on line 1, five rows, the bad row on line 7.
    check_error(&bad_last_row(PATIENTS), &patients_spec(), &expected(7));
    // Windows line breaks.
    check_error(&bad_last_row(PATIENTS).replace('\n', "\r\n"), &patients_spec(), &expected(7));
    // Old Mac line breaks.
    check_error(&bad_last_row(PATIENTS).replace('\n', "\r"), &patients_spec(), &expected(7));
    // Blank lines are skipped but still counted.
    check_error(&bad_last_row(&PATIENTS.replace("\n40", "\n\n\n40")), &patients_spec(), &expected(9));
    check_error(
        &bad_last_row(&PATIENTS.replace("\n40", "\r\n\r\n40").replace("x\n", "x\r\n")),
        &patients_spec(),
        &expected(8),
    );
    // A quoted value spanning lines counts each of them; the bad row is
    // reported where it starts.
    check_error(&bad_last_row(&PATIENTS.replace(",y\n", ",\"y\ny\"\n")), &patients_spec(), &expected(9));
    check_error(
        &PATIENTS.replace("Asian", "\"Mart\nian\""),
        &patients_spec(),
        "{path}:4: column \"Race\": value \"Mart\\nian\" is not one of the levels \
         [\"White\", \"Black\", \"Asian\"]",
    );
}

#[test]
fn error_lines_in_gzip_and_long_files() {
    let dir = TempDir::new().unwrap();
    let mut csv = String::from("Age,Sex,Const,Race,HeartDisease,Unused\r\n");
    for i in 0..20_000 {
        csv.push_str(&format!("{},Female,5,White,No,\"note\r\n{i}\"\r\n", 20 + i % 50));
    }
    csv.push_str("20,Female,5,White,Perhaps,x\r\n");
    let path = write(&dir, "long.csv.gz", &gzip(csv.as_bytes()));
    check_load_error(
        &path,
        &patients_spec(),
        &split(),
        "{path}:40002: column \"HeartDisease\": label \"Perhaps\" is neither the positive label \"Yes\" \
         nor one of the negative labels [\"No\"]",
    );
}
