//! `meridian model`: trained models out of the federation, as files that
//! PyTorch and Burn load.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use crate::client::{self, Connection};
use crate::out;

/// The model commands.
#[derive(Subcommand)]
pub enum ModelCommand {
    /// Download a job's global model as .safetensors (PyTorch nn.Sequential names).
    Pull {
        /// Job id.
        id: String,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
        /// Round whose model to pull (default: the latest).
        #[arg(long)]
        round: Option<u32>,
    },
}

/// Runs a model command against the coordinator.
pub async fn run(command: ModelCommand, conn: &Connection) -> Result<()> {
    let ModelCommand::Pull { id, output, round } = command;
    let (round, n) = client::pull_model(conn, &id, round, &output).await?;
    out!("wrote {} (round {round}, {n} parameters)", output.display())?;
    Ok(())
}
