//! `meridian site …`: the hospital's own view and decisions, on the worker
//! host, from the worker's configuration and its state directory, with no
//! call to the coordinator: its ledger and budgets, the offers waiting for a
//! person, and the decisions on them.

use std::path::Path;

use anyhow::{Context, Result};
use clap::Subcommand;
use worker::WorkerConfig;
use worker::approvals::Approvals;
use worker::ledger::Ledger;

use crate::{client, out, output};

/// The site commands.
#[derive(Subcommand)]
pub enum SiteCommand {
    /// List offers waiting for a decision.
    Pending,
    /// Approve a pending offer (binds to the exact spec the site was offered).
    Approve {
        /// Job id.
        job: String,
    },
    /// Reject a pending offer; only the code not_approved leaves the site.
    Reject {
        /// Job id.
        job: String,
        /// Why, for the site's own audit.
        #[arg(long)]
        reason: String,
    },
    /// The site's own ledger: every charge, with what a reviewer needs to recompute it.
    Ledger {
        /// Print JSON (the same fields as `meridian budget ledger --json`).
        #[arg(long)]
        json: bool,
    },
}

/// The site's state, opened from its configuration.
struct Site {
    config: WorkerConfig,
    ledger: Ledger,
    approvals: Approvals,
}

impl Site {
    fn open(config: &Path) -> Result<Site> {
        let config = WorkerConfig::load(config)?;
        let db = config.data_dir.join("ledger.sqlite");
        if !db.is_file() {
            anyhow::bail!(
                "{}: no site database yet (the worker creates it when it first starts)",
                db.display()
            );
        }
        let cert = std::fs::read(&config.tls_cert).with_context(|| format!("cannot read {}", config.tls_cert.display()))?;
        let site = proto::identity::principal_from_pem(&cert).map_err(anyhow::Error::msg)?.name;
        let ledger = Ledger::open(&db, &site).with_context(|| format!("opening {}", db.display()))?;
        let approvals = Approvals::open(&db).with_context(|| format!("opening {}", db.display()))?;
        Ok(Site { config, ledger, approvals })
    }
}

/// Runs a site command against the worker configuration at `config`.
pub fn run(command: SiteCommand, config: &Path) -> Result<()> {
    let site = Site::open(config)?;
    match command {
        SiteCommand::Pending => {
            let pending = site.approvals.pending()?;
            if pending.is_empty() {
                out!("no offers waiting for approval")?;
            }
            for a in pending {
                out!(
                    "{}  {:<24} dataset {:<10} model {:<20} planned ε {:.3}  spec {}",
                    a.job_id,
                    a.name,
                    a.dataset,
                    a.model,
                    a.planned_epsilon,
                    &a.spec_hash[..12.min(a.spec_hash.len())]
                )?;
            }
        }
        SiteCommand::Approve { job } => {
            let a = site.approvals.decide(&job, None)?;
            out!("approved {} (spec {})", a.job_id, a.spec_hash)?;
        }
        SiteCommand::Reject { job, reason } => {
            let a = site.approvals.decide(&job, Some(&reason))?;
            out!("rejected {}: {}", a.job_id, a.reason)?;
        }
        SiteCommand::Ledger { json } => {
            let entries = site.ledger.entries()?;
            if json {
                output::json(&serde_json::json!(entries.iter().map(client::ledger_json).collect::<Vec<_>>()))?;
            } else {
                output::block(&client::render_ledger(&entries))?;
            }
            let _ = &site.config;
        }
    }
    Ok(())
}
