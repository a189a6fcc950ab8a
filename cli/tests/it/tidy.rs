//! Repository hygiene, as rust-analyzer's tidy: every Rust source file
//! starts with a `//!` module doc saying why it exists.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, recursively, leaving out build output and
/// hidden directories.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_starts_with_a_doc_comment() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for krate in ["proto", "models", "privacy", "coordinator", "worker", "cli", "benches"] {
        rust_files(&root.join(krate), &mut files);
    }
    let bad: Vec<String> = files
        .iter()
        .filter(|path| !path.ends_with("tests.rs"))
        .filter(|path| !std::fs::read_to_string(path).unwrap().trim_start().starts_with("//!"))
        .map(|path| path.display().to_string())
        .collect();
    assert!(bad.is_empty(), "files without a //! module doc: {bad:#?}");
}

#[test]
fn the_worker_builds_what_it_sends_about_a_job_only_in_its_outgoing_module() {
    // What a site tells the coordinator is made from codes, spec names and
    // released values by `worker::outgoing`; a message built elsewhere
    // could carry an error's text (a value, a line, a path) off the site.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut bad = Vec::new();
    for path in files.iter().filter(|p| !p.ends_with("outgoing.rs")) {
        let text = std::fs::read_to_string(path).unwrap();
        for message in ["pb::OfferAnswer {", "pb::TaskFailure {", "pb::SiteReason {", "pb::EvaluationReport {"] {
            if text.contains(message) {
                bad.push(format!("{}: {message}", path.display()));
            }
        }
        // `upload` cuts a header `outgoing` built into parts: it may set a
        // part's range and id on a copy of it, and nothing else.
        for (at, _) in text.match_indices("pb::UpdateHeader {") {
            let body = &text[at..text[at..].find('}').map_or(text.len(), |end| at + end)];
            let copies_a_built_header = path.ends_with("upload.rs") && body.contains("..header.clone()");
            if !copies_a_built_header {
                bad.push(format!("{}: pb::UpdateHeader {{", path.display()));
            }
        }
    }
    assert!(bad.is_empty(), "messages to the coordinator built outside worker::outgoing: {bad:#?}");
}

#[test]
fn the_privacy_page_accounts_for_every_request_a_site_sends() {
    // A request a worker sends that docs/privacy.md does not name is a
    // value leaving the site that nobody has said how it is protected.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let proto = std::fs::read_to_string(root.join("proto/proto/meridian/v1/meridian.proto")).unwrap();
    let privacy = std::fs::read_to_string(root.join("docs/privacy.md")).unwrap();
    let service = &proto[proto.find("service WorkerService {").unwrap()..];
    let service = &service[..service.find("\n}").unwrap()];
    let requests: Vec<&str> = service
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .map(|l| l[l.find('(').unwrap() + 1..l.find(')').unwrap()].trim_start_matches("stream ").trim())
        .collect();
    assert!(requests.len() >= 10, "{requests:?}");
    let missing: Vec<&&str> = requests.iter().filter(|r| !privacy.contains(&format!("`{r}`"))).collect();
    assert!(missing.is_empty(), "requests of WorkerService docs/privacy.md does not account for: {missing:?}");
}

#[test]
fn the_documents_answer_a_newcomers_first_questions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let (readme, operations, privacy) = (read("README.md"), read("docs/operations.md"), read("docs/privacy.md"));
    for (doc, text, needles) in [
        ("docs/operations.md", &operations, &["## The model", "log-odds", "`inputs`", "standardise", "## Missing and unexpected values", "## Restarting the daemons", "`audit.head`", "To recover"][..]),
        ("README.md", &readme, &["Exit codes", "job plan", "meridian init", "site show", "docs/operations.md", "released"][..]),
        ("docs/privacy.md", &privacy, &["## What leaves a site", "size_release", "σ_eff", "evaluation", "### Not covered", "SyncLedger"][..]),
    ] {
        for needle in needles {
            assert!(text.contains(needle), "{doc} does not say {needle:?}");
        }
    }
    // The "Not covered" list no longer has unnoised metrics by default.
    let not_covered = &privacy[privacy.find("### Not covered").unwrap()..];
    let not_covered = &not_covered[..not_covered.find("\n## ").unwrap_or(not_covered.len())];
    assert!(!not_covered.contains("Held-out evaluation metrics are aggregate statistics released without noise"));
}
