//! Repository hygiene, as rust-analyzer's tidy: every Rust source file
//! starts with a `//!` module doc saying why it exists.

use std::path::Path;

fn visit(dir: &Path, bad: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                visit(&path, bad);
            }
        } else if name.ends_with(".rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            let is_test_module = name == "tests.rs";
            if !is_test_module && !text.trim_start().starts_with("//!") {
                bad.push(path.display().to_string());
            }
        }
    }
}

#[test]
fn every_module_starts_with_a_doc_comment() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut bad = Vec::new();
    for krate in ["proto", "models", "privacy", "coordinator", "worker", "cli", "benches"] {
        visit(&root.join(krate), &mut bad);
    }
    assert!(bad.is_empty(), "files without a //! module doc: {bad:#?}");
}
