//! Whether `cargo run` (the demo) and `cargo test --workspace` (the tests)
//! build each third-party crate with the same features.
//!
//! Cargo unifies features over the packages and targets one command
//! builds, so a dev-dependency that asks for a feature the binary's graph
//! leaves off gives the test build its own copy of that crate and of
//! everything above it: one such feature under Burn rebuilt all of Burn
//! for whichever README command ran second. `cargo tree` prints each
//! crate's features as the command's resolver sees them; a crate of the
//! binary's graph whose feature set the test graph lacks is a rebuild.
//! Workspace members may differ (the tests arm failpoints in
//! `meridian-sys`); they are Meridian's own and rebuild in seconds.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// One crate as a graph holds it: `name vX.Y.Z|feature,feature`.
pub type Node = String;

/// The crates and feature sets `cargo tree` prints for `args`, from `root`.
pub fn graph(root: &Path, args: &[&str]) -> std::io::Result<BTreeSet<Node>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let output = Command::new(cargo)
        .current_dir(root)
        .args(["tree", "--quiet", "--prefix", "none", "--format", "{p}|{f}"])
        .args(args)
        .output()?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(std::io::Error::other(format!("cargo tree {}: {stderr}", args.join(" "))));
    }
    Ok(parse(&String::from_utf8_lossy(&output.stdout)))
}

/// The nodes of `cargo tree --prefix none --format '{p}|{f}'` output.
pub fn parse(tree: &str) -> BTreeSet<Node> {
    tree.lines()
        .map(|l| l.trim_end().trim_end_matches(" (*)").replace(" (proc-macro)", ""))
        .filter(|l| !l.is_empty())
        .collect()
}

/// The third-party crates of `run` whose feature set `test` does not hold.
pub fn rebuilt(run: &BTreeSet<Node>, test: &BTreeSet<Node>) -> Vec<Node> {
    run.iter().filter(|n| !test.contains(*n) && !is_member(n)).cloned().collect()
}

/// Whether the node is a path package of this workspace (`name v0.1.0 (/…)|`).
fn is_member(node: &str) -> bool {
    node.split('|').next().is_some_and(|package| package.ends_with(')') && package.contains(" (/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feature_set_the_tests_lack_is_a_rebuild_but_a_member_is_not() {
        let run = parse(
            "meridian v0.1.0 (/w/cli)|\nburn v0.22.1|std\nfastrand v2.5.0|alloc,std (*)\nmeridian-sys v0.1.0 (/w/sys)|\nserde_derive v1.0.0 (proc-macro)|default\n",
        );
        let test = parse(
            "burn v0.22.1|std\nfastrand v2.5.0|alloc,default,std\nmeridian-sys v0.1.0 (/w/sys)|failpoints\nserde_derive v1.0.0|default\n",
        );
        assert_eq!(rebuilt(&run, &test), ["fastrand v2.5.0|alloc,std"]);
        assert!(rebuilt(&test, &test).is_empty());
    }
}
