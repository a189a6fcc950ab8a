//! Checks of the workspace that neither rustc nor clippy makes: unused
//! dependencies, function lengths, lint tables that agree, one build for
//! the README's two commands. `cargo xtask`
//! runs them (see `CONTRIBUTING.md`); the workspace's tidy test
//! (`xtask/tests/tidy.rs`) asserts them with the rest of its rules.
//!
//! Standard library only, so that it builds in seconds before anything else.

pub mod deps;
pub mod features;
pub mod lengths;
pub mod source;

use std::path::{Path, PathBuf};

/// The workspace root: the directory above this crate.
pub fn root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// The member packages the workspace manifest lists, as directories.
pub fn members(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml"))?;
    let line = manifest.lines().find(|l| l.trim_start().starts_with("members")).unwrap_or("");
    let list = line.split_once('[').and_then(|(_, rest)| rest.split_once(']')).map_or("", |(list, _)| list);
    Ok(list.split(',').map(|m| m.trim().trim_matches('"')).filter(|m| !m.is_empty()).map(|m| root.join(m)).collect())
}
