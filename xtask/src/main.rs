//! `cargo xtask <check>`: the workspace checks of `meridian-xtask`, for
//! `.ci/run` and for a contributor before a commit.

use std::process::ExitCode;

use xtask::lengths::{MAX_LINES, longest};
use xtask::{deps, features, members, root};

const USAGE: &str = "usage: cargo xtask <unused-deps | shared-build | long-fns [--top N]>
  unused-deps   fail if a package declares a dependency none of its files names
  shared-build  fail if `cargo run` would build a crate with other features than the tests
  long-fns      print the longest non-test functions; fail if one is over the limit";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("unused-deps") => unused_deps(),
        Some("shared-build") => shared_build(),
        Some("long-fns") => long_fns(args.get(2).and_then(|n| n.parse().ok()).unwrap_or(15)),
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

fn unused_deps() -> Result<(), String> {
    let root = root();
    let mut unused = Vec::new();
    for package in members(&root).map_err(|e| format!("cannot read the workspace manifest: {e}"))? {
        unused.extend(deps::unused(&root, &package).map_err(|e| format!("{}: {e}", package.display()))?);
    }
    if unused.is_empty() {
        println!("every declared dependency is used");
        return Ok(());
    }
    Err(format!("dependencies no file of their package names:\n  {}", unused.join("\n  ")))
}

fn shared_build() -> Result<(), String> {
    let root = root();
    let run =
        features::graph(&root, &["--package", "meridian", "--edges", "normal,build"]).map_err(|e| e.to_string())?;
    let test = features::graph(&root, &["--workspace", "--edges", "normal,build,dev"]).map_err(|e| e.to_string())?;
    let rebuilt = features::rebuilt(&run, &test);
    if rebuilt.is_empty() {
        println!(
            "`cargo run` and `cargo test --workspace` build each third-party crate with the same features ({} checked)",
            run.len()
        );
        return Ok(());
    }
    Err(format!(
        "`cargo run` builds these with features the test build does not (name|features); \
         declare the missing features in the binary's graph, see xtask/src/features.rs:\n  {}",
        rebuilt.join("\n  ")
    ))
}

fn long_fns(top: usize) -> Result<(), String> {
    let root = root();
    let packages = members(&root).map_err(|e| format!("cannot read the workspace manifest: {e}"))?;
    let all = longest(&root, &packages).map_err(|e| format!("cannot read the sources: {e}"))?;
    for f in all.iter().take(top) {
        println!("{:>5}  {}:{}  {}", f.lines, f.file.display(), f.line, f.name);
    }
    let over = all.iter().filter(|f| f.lines > MAX_LINES).count();
    if over > 0 {
        return Err(format!("{over} non-test functions are over {MAX_LINES} lines"));
    }
    Ok(())
}
