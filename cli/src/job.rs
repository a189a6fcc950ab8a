//! `meridian job`: the scientist's commands on training jobs, from
//! submitting and planning one to following it live; the exit code says
//! how a watched job ended or whether a plan found enough sites.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Subcommand;
use meridian_wire::pb;

use crate::client::{self, Connection};
use crate::{Exit, out, output};

/// The job commands.
#[derive(Subcommand)]
pub enum JobCommand {
    /// Submit a job spec (TOML); prints the job id.
    Submit {
        /// The job spec file.
        spec: PathBuf,
        /// Watch the job until it ends (exit code 3 if it fails or is cancelled).
        #[arg(long)]
        watch: bool,
        /// With --watch: one JSON object per event (JSON Lines), ending with the final state.
        #[arg(long, requires = "watch")]
        json: bool,
    },
    /// Check a job spec and say what each site would charge, submitting nothing.
    ///
    /// The spec is checked offline first, then against every site that
    /// holds its dataset: its announced schema and policy, its released
    /// sizes, its per-job cap and budget. Exit code 1 if fewer sites would
    /// take the job than it needs.
    Plan {
        /// The job spec file.
        spec: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List every job.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one job: state, sites, per-round metrics.
    Status {
        /// Job id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow a job live until it ends (exit code 3 if it fails or is cancelled).
    ///
    /// On a terminal: a progress bar and a line per round. Piped: one plain
    /// line per round. With --json: one JSON object per event (JSON Lines),
    /// ending with the final state.
    Watch {
        /// Job id.
        id: String,
        /// One JSON object per event (JSON Lines).
        #[arg(long)]
        json: bool,
    },
    /// Cancel a running job.
    Cancel {
        /// Job id.
        id: String,
        /// Why, shown to everyone.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// Runs a job command against the coordinator.
pub async fn run(command: JobCommand, conn: &Connection) -> Result<Exit> {
    match command {
        JobCommand::Submit { spec, watch, json } => submit(conn, &spec, watch, json).await,
        JobCommand::Plan { spec, json } => plan(conn, &spec, json).await,
        JobCommand::List { json } => list(conn, json).await.map(|()| Exit::Ok),
        JobCommand::Status { id, json } => status(conn, &id, json).await.map(|()| Exit::Ok),
        JobCommand::Watch { id, json } => watch_job(conn, &id, json).await,
        JobCommand::Cancel { id, reason } => cancel(conn, id, reason).await.map(|()| Exit::Ok),
    }
}

/// `job submit`: prints the new job's id (not with `--json`), then watches it if asked.
async fn submit(conn: &Connection, spec: &Path, watch: bool, json: bool) -> Result<Exit> {
    let id = client::submit(conn, spec).await?;
    if !json {
        out!("{id}")?;
    }
    if watch { watch_job(conn, &id, json).await } else { Ok(Exit::Ok) }
}

/// `job plan`: what each site would say; an error exit if too few would take it.
async fn plan(conn: &Connection, spec: &Path, json: bool) -> Result<Exit> {
    let plan = client::plan(conn, spec).await?;
    if json {
        output::json(&client::plan_json(&plan))?;
    } else {
        output::block(&client::render_plan(&plan))?;
    }
    Ok(if plan.takers < plan.min_sites { Exit::Error } else { Exit::Ok })
}

/// `job list`: one line per job, or a JSON array.
async fn list(conn: &Connection, json: bool) -> Result<()> {
    let jobs =
        conn.jobs().await?.list_jobs(pb::ListJobsRequest {}).await.map_err(client::status_error)?.into_inner().jobs;
    if json {
        output::json(&serde_json::json!(&jobs.iter().map(client::status_json).collect::<Vec<_>>()))?;
        return Ok(());
    }
    out!("job           state       round   model                dataset     name")?;
    for j in jobs {
        out!(
            "{:<13} {:<11} {:>3}/{:<3} {:<20} {:<11} {}",
            j.job_id,
            j.state,
            j.current_round,
            j.total_rounds,
            j.model,
            j.dataset,
            j.name
        )?;
    }
    Ok(())
}

/// `job status`: one job, as a block or as JSON.
async fn status(conn: &Connection, id: &str, json: bool) -> Result<()> {
    let s = client::get(conn, id).await?;
    if json {
        output::json(&serde_json::json!(&client::status_json(&s)))?;
    } else {
        output::block(&client::render_status(&s))?;
    }
    Ok(())
}

/// `job cancel`: the job's state and reason once cancelled.
async fn cancel(conn: &Connection, job_id: String, reason: String) -> Result<()> {
    let s = conn
        .jobs()
        .await?
        .cancel_job(pb::CancelJobRequest { job_id, reason })
        .await
        .map_err(client::status_error)?
        .into_inner();
    out!("{} {}: {}", s.job_id, s.state, s.reason)?;
    Ok(())
}

/// `job watch` and `job submit --watch`: reports the job as the output
/// allows, then its final state; the exit code says how it ended.
async fn watch_job(conn: &Connection, id: &str, json: bool) -> Result<Exit> {
    let how = if json {
        client::WatchOutput::Json
    } else if output::progress_bar() {
        client::WatchOutput::Terminal
    } else {
        client::WatchOutput::Lines
    };
    let status = client::watch(conn, id, how).await?;
    if !json {
        output::block(&client::render_status(&status))?;
    }
    Ok(if status.state == "completed" { Exit::Ok } else { Exit::JobEnded })
}
