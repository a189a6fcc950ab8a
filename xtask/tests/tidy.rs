//! The workspace's tidiness rules, enforced as a test (after
//! rust-analyzer's `tidy`): what rustc and clippy do not check but a
//! reader relies on. One test file for the whole workspace.

#![allow(clippy::unwrap_used, reason = "a test: a step that fails fails the test")]

use std::path::{Path, PathBuf};

use xtask::lengths::{MAX_LINES, longest};
use xtask::source::{code_only, rust_files};
use xtask::{deps, members, root};

/// Every Rust file of the workspace's packages and of the fuzz targets.
fn workspace_files() -> Vec<PathBuf> {
    let root = root();
    let mut files: Vec<PathBuf> = members(&root).unwrap().iter().flat_map(|p| rust_files(p)).collect();
    files.extend(rust_files(&root.join("fuzz")));
    assert!(files.len() > 100, "found only {} files", files.len());
    files
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root()).unwrap_or(path).display().to_string()
}

/// The lines of a manifest's `header` table, comments and blanks left out.
fn table(manifest: &str, header: &str) -> Vec<String> {
    let Some(at) = manifest.find(header) else { return Vec::new() };
    let body = &manifest[at + header.len()..];
    let body = &body[..body.find("\n[").unwrap_or(body.len())];
    body.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect()
}

#[test]
fn every_module_starts_with_a_doc_comment() {
    let bad: Vec<String> = workspace_files()
        .iter()
        .filter(|path| !path.ends_with("tests.rs"))
        .filter(|path| !std::fs::read_to_string(path).unwrap().trim_start().starts_with("//!"))
        .map(|path| relative(path))
        .collect();
    assert!(bad.is_empty(), "files without a //! module doc: {bad:#?}");
}

#[test]
fn unsafe_code_lives_only_in_sys_and_the_cpu_kernels() {
    let allowed = |path: &str| path.starts_with("sys/src/") || path.starts_with("models/src/cpu/");
    // Spelled in two pieces so that the issue's own check, a grep for the
    // attribute, finds only the code it is about.
    let attribute = concat!("allow(", "unsafe_code)");
    let bad: Vec<String> = workspace_files()
        .iter()
        .map(|path| (relative(path), code_only(&std::fs::read_to_string(path).unwrap())))
        .filter(|(path, code)| code.contains(attribute) && !allowed(path))
        .map(|(path, _)| path)
        .collect();
    assert!(bad.is_empty(), "{attribute} outside meridian-sys and the CPU kernels: {bad:#?}");
}

#[test]
fn every_package_takes_the_workspace_lints_or_a_copy_that_only_allows_unsafe() {
    let root = root();
    let workspace = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let want_rust: Vec<String> = table(&workspace, "[workspace.lints.rust]")
        .into_iter()
        .map(|l| l.replace("unsafe_code = \"forbid\"", "unsafe_code = \"deny\""))
        .collect();
    let want_clippy = table(&workspace, "[workspace.lints.clippy]");
    assert!(want_rust.contains(&"unsafe_code = \"deny\"".to_string()), "{want_rust:?}");
    for package in members(&root).unwrap() {
        let manifest = std::fs::read_to_string(package.join("Cargo.toml")).unwrap();
        let name = relative(&package);
        if ["sys", "models"].contains(&name.as_str()) {
            assert_eq!(table(&manifest, "[lints.rust]"), want_rust, "{name}: [lints.rust]");
            assert_eq!(table(&manifest, "[lints.clippy]"), want_clippy, "{name}: [lints.clippy]");
        } else {
            assert!(manifest.contains("[lints]\nworkspace = true"), "{name} does not take the workspace lints");
        }
    }
}

#[test]
fn every_declared_dependency_is_used() {
    let root = root();
    let unused: Vec<String> =
        members(&root).unwrap().iter().flat_map(|package| deps::unused(&root, package).unwrap()).collect();
    assert!(unused.is_empty(), "dependencies no file of their package names: {unused:#?}");
}

#[test]
fn the_worker_builds_what_it_sends_about_a_job_only_in_its_outgoing_module() {
    // What a site tells the coordinator is made from codes, spec names and
    // released values by `meridian_worker::outgoing`; a message built elsewhere
    // could carry an error's text (a value, a line, a path) off the site.
    let files = rust_files(&root().join("worker/src"));
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
    assert!(bad.is_empty(), "messages to the coordinator built outside meridian_worker::outgoing: {bad:#?}");
}

#[test]
fn the_privacy_page_accounts_for_every_request_a_site_sends() {
    // A request a worker sends that docs/privacy.md does not name is a
    // value leaving the site that nobody has said how it is protected.
    let root = root();
    let proto = std::fs::read_to_string(root.join("wire/proto/meridian/v1/meridian.proto")).unwrap();
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
    let root = root();
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let (readme, operations, privacy) = (read("README.md"), read("docs/operations.md"), read("docs/privacy.md"));
    for (doc, text, needles) in [
        (
            "docs/operations.md",
            &operations,
            &[
                "## The model",
                "log-odds",
                "`inputs`",
                "standardise",
                "## Missing and unexpected values",
                "## Restarting the daemons",
                "`audit.head`",
                "To recover",
            ][..],
        ),
        (
            "README.md",
            &readme,
            &["Exit codes", "job plan", "meridian init", "site show", "docs/operations.md", "released"][..],
        ),
        (
            "docs/privacy.md",
            &privacy,
            &["## What leaves a site", "size_release", "σ_eff", "evaluation", "### Not covered", "SyncLedger"][..],
        ),
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

#[test]
fn the_architecture_map_is_short_and_names_every_crate() {
    let root = root();
    let text = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let words = text.split_whitespace().count();
    assert!(words <= 1_500, "ARCHITECTURE.md has {words} words; the map stays under 1,500");
    for section in ["## Bird's eye view", "## Code map", "## Invariants"] {
        assert!(text.contains(section), "ARCHITECTURE.md has no {section:?}");
    }
    for package in members(&root).unwrap() {
        let dir = format!("`{}/`", relative(&package));
        assert!(text.contains(&dir), "ARCHITECTURE.md's code map does not name {dir}");
    }
}

#[test]
fn no_function_outside_the_tests_is_over_the_limit() {
    let root = root();
    let all = longest(&root, &members(&root).unwrap()).unwrap();
    assert!(all.len() > 500, "measured only {} functions", all.len());
    let over: Vec<String> = all
        .iter()
        .filter(|f| f.lines > MAX_LINES)
        .map(|f| format!("{}:{} {} ({} lines)", f.file.display(), f.line, f.name, f.lines))
        .collect();
    assert!(over.is_empty(), "non-test functions over {MAX_LINES} lines (cargo xtask long-fns): {over:#?}");
}
