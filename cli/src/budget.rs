//! `meridian budget`: the reviewer's view of privacy spent, per hospital,
//! dataset and job, and the ledger entries it is composed from.

use anyhow::Result;
use clap::Subcommand;

use crate::client::{self, Connection};
use crate::output;

/// The budget commands (none: the budgets themselves).
#[derive(Subcommand)]
pub enum BudgetCommand {
    /// Every ledger entry, with all parameters needed to recompute ε.
    Ledger {
        /// Only this site.
        #[arg(long, default_value = "")]
        site: String,
        /// Only this dataset.
        #[arg(long, default_value = "")]
        dataset: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a budget command against the coordinator; `json` is `budget --json`,
/// which also applies to `budget ledger`.
pub async fn run(command: Option<BudgetCommand>, json: bool, conn: &Connection) -> Result<()> {
    match command {
        None => budgets(conn, json).await,
        Some(BudgetCommand::Ledger { site, dataset, json: json_here }) => {
            ledger(conn, &site, &dataset, json || json_here).await
        }
    }
}

/// `meridian budget`: every budget row, as a table or JSON.
async fn budgets(conn: &Connection, json: bool) -> Result<()> {
    let rows = client::budgets(conn).await?;
    if json {
        output::json(&serde_json::json!(&rows.iter().map(client::budget_json).collect::<Vec<_>>()))?;
    } else {
        output::block(&client::render_budgets(&rows))?;
    }
    Ok(())
}

/// `meridian budget ledger`: the entries, optionally of one site or dataset.
async fn ledger(conn: &Connection, site: &str, dataset: &str, json: bool) -> Result<()> {
    let entries = client::ledger(conn, site, dataset).await?;
    if json {
        output::json(&serde_json::json!(&entries.iter().map(client::ledger_json).collect::<Vec<_>>()))?;
    } else {
        output::block(&client::render_ledger(&entries))?;
    }
    Ok(())
}
