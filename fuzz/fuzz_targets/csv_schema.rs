//! CSV schema parsing and encoding (`meridian_worker::dataset`): any file, plain or
//! gzip, either loads into a dataset whose every value is finite and whose
//! shapes agree with the spec, or fails with an error that names the file;
//! never a panic.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meridian_worker::dataset::{CategoricalFeature, FeatureSpec, SplitOptions, load, read_header};

fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| std::env::temp_dir().join(format!("meridian-fuzz-csv-{}.csv", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    std::fs::write(path, data).expect("write the scratch file");
    let spec = FeatureSpec {
        label: "y".to_string(),
        positive_label: "1".to_string(),
        negative_labels: vec!["0".to_string()],
        numeric: vec!["a".to_string(), "b".to_string()],
        categorical: vec![CategoricalFeature {
            column: "c".to_string(),
            levels: vec!["x".to_string(), "z".to_string()],
        }],
    };
    let _ = read_header(path);
    let split = SplitOptions { test_fraction: 0.25, seed: 7 };
    match load(path, &spec, &split) {
        Ok(ds) => {
            assert_eq!(ds.dim, 4);
            assert_eq!(ds.train_x.len(), ds.n_train() * ds.dim);
            assert_eq!(ds.test_x.len(), ds.n_test() * ds.dim);
            assert!(ds.n_train() > 0 && ds.n_test() > 0);
            assert!(ds.train_x.iter().chain(&ds.test_x).all(|v| v.is_finite()), "a non-finite feature");
            assert!(ds.train_y.iter().chain(&ds.test_y).all(|y| *y <= 1));
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains("meridian-fuzz-csv"), "the error does not name the file: {message}");
            assert!(!message.contains('\n'), "a multi-line error: {message}");
        }
    }
});
