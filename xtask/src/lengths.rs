//! The longest functions outside tests: a function a reader cannot hold in
//! view at once is split before it lands (the limit is `MAX_LINES`).

use std::path::{Path, PathBuf};

use crate::source::{code_only, functions, rust_files};

/// The most lines a non-test function may span, signature to closing brace.
pub const MAX_LINES: usize = 80;

/// A function and where it is.
#[derive(Clone, Debug)]
pub struct Measured {
    /// The file, relative to the workspace root.
    pub file: PathBuf,
    /// The function's name.
    pub name: String,
    /// Its first line.
    pub line: usize,
    /// Its length in lines.
    pub lines: usize,
}

/// Every non-test function of the packages under `root` (their `src`,
/// `benches` and `examples`), longest first.
pub fn longest(root: &Path, packages: &[PathBuf]) -> std::io::Result<Vec<Measured>> {
    let mut all = Vec::new();
    for package in packages {
        for sub in ["src", "benches", "examples"] {
            for file in rust_files(&package.join(sub)) {
                if file.file_name().is_some_and(|n| n == "tests.rs")
                    || file.components().any(|c| c.as_os_str() == "tests")
                {
                    continue;
                }
                let code = code_only(&std::fs::read_to_string(&file)?);
                let relative = file.strip_prefix(root).unwrap_or(&file).to_path_buf();
                all.extend(functions(&code).into_iter().filter(|f| !f.test).map(|f| Measured {
                    file: relative.clone(),
                    name: f.name,
                    line: f.line,
                    lines: f.lines,
                }));
            }
        }
    }
    all.sort_by(|a, b| b.lines.cmp(&a.lines).then_with(|| a.file.cmp(&b.file)));
    Ok(all)
}
