//! Declared dependencies that no source file of their crate names.
//!
//! A dependency is used when the crate's code (comments and literals left
//! out) names it as a path (`name::`), imports it or calls one of its
//! macros. Normal and dev-dependencies may be used anywhere in the package
//! but its build script; build dependencies only there. This is
//! `cargo-machete`'s rule, without a tool to install. A dependency whose
//! line ends in `# xtask: shared-build` is there for its features alone
//! (see [`crate::features`]) and is not checked.

use std::path::{Path, PathBuf};

use crate::source::{code_only, rust_files};

/// Which table of a manifest a dependency is declared in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// `[dependencies]`.
    Normal,
    /// `[dev-dependencies]`.
    Dev,
    /// `[build-dependencies]`.
    Build,
}

/// A dependency declared in a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Declared {
    /// Its name in the manifest (`tonic-prost`).
    pub name: String,
    /// Its table.
    pub table: Table,
    /// Its line in the manifest, from 1.
    pub line: usize,
}

/// The comment that marks a dependency declared for its features alone.
pub const SHARED_BUILD: &str = "# xtask: shared-build";

/// The dependencies a manifest declares, from its text, less those marked
/// [`SHARED_BUILD`].
pub fn declared(manifest: &str) -> Vec<Declared> {
    let mut table = None;
    let mut out = Vec::new();
    for (i, line) in manifest.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('[') {
            table = match line.trim_matches(['[', ']']).rsplit('.').next() {
                Some("dependencies") => Some(Table::Normal),
                Some("dev-dependencies") => Some(Table::Dev),
                Some("build-dependencies") => Some(Table::Build),
                _ => None,
            };
            continue;
        }
        let Some(table) = table else { continue };
        let key = line.split(['=', '.']).next().unwrap_or("").trim();
        if !key.is_empty() && !key.starts_with('#') && !line.ends_with(SHARED_BUILD) {
            out.push(Declared { name: key.to_string(), table, line: i + 1 });
        }
    }
    out
}

/// Whether `code` (from [`code_only`]) names the crate `ident`.
pub fn names_crate(code: &str, ident: &str) -> bool {
    let bytes = code.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    code.match_indices(ident).any(|(at, _)| {
        let before_ok = at == 0 || (!is_ident(bytes[at - 1]) && bytes[at - 1] != b':');
        let after = code[at + ident.len()..].trim_start();
        let used =
            after.starts_with("::") || after.starts_with('!') || after.starts_with(';') || after.starts_with(" as");
        let imported = code[..at].trim_end().ends_with("use") || code[..at].trim_end().ends_with("extern crate");
        before_ok && (used || (imported && !after.starts_with('(')))
    })
}

/// The dependencies of the package at `dir` that none of its files name,
/// as `manifest:line: name (table)` with the manifest's path relative to `root`.
pub fn unused(root: &Path, dir: &Path) -> std::io::Result<Vec<String>> {
    let manifest_path = dir.join("Cargo.toml");
    let manifest = std::fs::read_to_string(&manifest_path)?;
    let (mut package, mut build) = (String::new(), String::new());
    for file in package_files(dir) {
        let code = code_only(&std::fs::read_to_string(&file)?);
        if file == dir.join("build.rs") {
            build.push_str(&code);
        } else {
            package.push_str(&code);
            package.push('\n');
        }
    }
    Ok(declared(&manifest)
        .into_iter()
        .filter(|d| {
            let code = if d.table == Table::Build { &build } else { &package };
            !names_crate(code, &d.name.replace('-', "_"))
        })
        .map(|d| {
            format!(
                "{}:{}: {} ({:?})",
                manifest_path.strip_prefix(root).unwrap_or(&manifest_path).display(),
                d.line,
                d.name,
                d.table
            )
        })
        .collect())
}

/// The package's Rust files: its targets, tests, benches, examples and build script.
fn package_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> =
        ["src", "tests", "benches", "examples"].iter().flat_map(|sub| rust_files(&dir.join(sub))).collect();
    if dir.join("build.rs").exists() {
        files.push(dir.join("build.rs"));
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_and_names_are_read_from_a_manifest() {
        let manifest = "[package]\nname = \"x\"\n\n[dependencies]\nmeridian-spec.workspace = true\nserde = { version = \"1\" }\nfastrand = \"2\" # xtask: shared-build\n# a comment\n\n[dev-dependencies]\ntempfile = \"3\"\n\n[build-dependencies]\nprotox.workspace = true\n\n[features]\nwgpu = []\n";
        let got: Vec<(String, Table, usize)> =
            declared(manifest).into_iter().map(|d| (d.name, d.table, d.line)).collect();
        assert_eq!(
            got,
            [
                ("meridian-spec".to_string(), Table::Normal, 5),
                ("serde".to_string(), Table::Normal, 6),
                ("tempfile".to_string(), Table::Dev, 11),
                ("protox".to_string(), Table::Build, 14),
            ]
        );
    }

    #[test]
    fn a_crate_is_named_by_paths_imports_and_macros_only() {
        assert!(names_crate("use serde::Serialize;", "serde"));
        assert!(names_crate("let x = hex::encode(y);", "hex"));
        assert!(names_crate("tonic::include_proto!(\"x\")", "tonic"));
        assert!(names_crate("use bytemuck;", "bytemuck"));
        assert!(names_crate("x!(); anyhow!(\"no\")", "anyhow"));
        assert!(!names_crate("let hex = 3; hex(y); self::hex::f()", "hex"));
        assert!(!names_crate("let s = my_serde::x;", "serde"));
    }
}
