//! `meridian audit`: checks a daemon's tamper-evident audit log from the
//! command line, so that an auditor needs neither daemon running.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;

use crate::out;

/// The audit commands.
#[derive(Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain of an audit log (its data_dir/audit.log); names the first entry that fails.
    Verify {
        /// The audit.log file.
        path: PathBuf,
    },
    /// Print the entries of an audit log, verified first.
    Show {
        /// The audit.log file.
        path: PathBuf,
    },
}

/// Runs an audit command.
pub fn run(command: AuditCommand) -> Result<()> {
    match command {
        AuditCommand::Verify { path } => verify(&path),
        AuditCommand::Show { path } => show(&path),
    }
}

/// `meridian audit verify`: the chain's length and head, or the first entry that breaks it.
fn verify(path: &Path) -> Result<()> {
    let (entries, head) = meridian_store::audit::verify(path)?;
    out!("{}: {entries} entries, hash chain intact (head {head})", path.display())?;
    Ok(())
}

/// `meridian audit show`: every entry, one a line, once the chain verifies.
fn show(path: &Path) -> Result<()> {
    meridian_store::audit::verify(path)?;
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    for line in text.lines() {
        let e: meridian_store::audit::AuditEntry = serde_json::from_str(line)?;
        out!("{:>5}  {}  {:<18} {:<14} {}", e.seq, e.at_unix_ms, e.kind, e.subject, e.detail)?;
    }
    Ok(())
}
