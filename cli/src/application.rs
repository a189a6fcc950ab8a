//! `meridian application`: data-use applications, what a study asks of the
//! hospitals before any job runs. A scientist submits one (checked here
//! first, so a mistake names the file and line without a round trip);
//! every reader lists and shows them, as text or as JSON.

use std::path::Path;

use anyhow::{Context, Result};
use clap::Subcommand;
use meridian_spec::application::ApplicationSpec;
use meridian_spec::date::Date;
use meridian_wire::pb;

use crate::client::{Connection, status_error};
use crate::{out, output};

/// The application commands.
#[derive(Subcommand)]
pub enum ApplicationCommand {
    /// Submit an application (TOML); prints its id.
    Submit {
        /// The application file.
        spec: std::path::PathBuf,
        /// Print the id and the hash as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List every application, newest first.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one application: its terms, what it asks of each site, its validity.
    #[command(visible_alias = "status")]
    Show {
        /// Application id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs an application command against the coordinator.
pub async fn run(command: ApplicationCommand, conn: &Connection) -> Result<()> {
    match command {
        ApplicationCommand::Submit { spec, json } => submit(conn, &spec, json).await,
        ApplicationCommand::List { json } => list(conn, json).await,
        ApplicationCommand::Show { id, json } => show(conn, &id, json).await,
    }
}

async fn client(
    conn: &Connection,
) -> Result<pb::application_service_client::ApplicationServiceClient<tonic::transport::Channel>> {
    Ok(pb::application_service_client::ApplicationServiceClient::new(conn.channel().await?))
}

/// `application submit`: checks the file, sends it, prints the new id.
async fn submit(conn: &Connection, path: &Path, json: bool) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    ApplicationSpec::from_toml(&text, &path.display().to_string()).map_err(anyhow::Error::msg)?;
    let reply = client(conn)
        .await?
        .submit_application(pb::SubmitApplicationRequest { spec_toml: text })
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", path.display(), s.message()))?
        .into_inner();
    if json {
        output::json(&serde_json::json!({ "application_id": reply.application_id, "spec_hash": reply.spec_hash }))?;
    } else {
        out!("{}", reply.application_id)?;
    }
    Ok(())
}

/// `application list`: one line per application, or a JSON array.
async fn list(conn: &Connection, json: bool) -> Result<()> {
    let apps = client(conn)
        .await?
        .list_applications(pb::ListApplicationsRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .applications;
    if json {
        let values = apps.iter().map(status_json).collect::<Result<Vec<_>>>()?;
        output::json(&serde_json::Value::Array(values))?;
        return Ok(());
    }
    out!("application   validity     sites  requester    title")?;
    for a in &apps {
        out!("{:<13} {:<12} {:>5}  {:<12} {}", a.application_id, a.validity, a.sites.len(), a.requester, a.title)?;
    }
    Ok(())
}

/// `application show`: one application, as a block or as JSON.
async fn show(conn: &Connection, id: &str, json: bool) -> Result<()> {
    let status = client(conn)
        .await?
        .get_application(pb::GetApplicationRequest { application_id: id.to_string() })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        output::json(&status_json(&status)?)?;
    } else {
        output::block(&render(&status, &spec_of(&status)?))?;
    }
    Ok(())
}

/// The spec a status carries, checked again here.
fn spec_of(status: &pb::ApplicationStatus) -> Result<ApplicationSpec> {
    ApplicationSpec::from_canonical_json(&status.spec_json, &format!("application {}", status.application_id))
        .map_err(anyhow::Error::msg)
}

/// An application as JSON: its status fields and its whole spec.
fn status_json(status: &pb::ApplicationStatus) -> Result<serde_json::Value> {
    let spec = spec_of(status)?;
    Ok(serde_json::json!({
        "application_id": status.application_id,
        "title": status.title,
        "requester": status.requester,
        "spec_hash": status.spec_hash,
        "submitted_at_unix_ms": status.submitted_at_unix_ms,
        "validity": status.validity,
        "spec": spec,
    }))
}

/// An application as a block of text for a person.
fn render(status: &pb::ApplicationStatus, spec: &ApplicationSpec) -> String {
    let list = |items: Vec<&str>| items.join(", ");
    let families = list(spec.model_families.iter().map(|f| f.as_str()).collect());
    let outputs = list(spec.outputs.iter().map(|o| o.as_str()).collect());
    let mut text = format!(
        "application {} ({})\n  requester  {}\n  submitted  {}\n  hash       {}\n  ethics     {}\n  valid      {} to {} ({})\n  \
         jobs       at most {}\n  datasets   {}\n  label      {}\n  columns    {}\n  models     {families}\n  \
         outputs    {outputs}\n  purpose    {}\n  asked of each site:\n",
        status.application_id,
        spec.title,
        status.requester,
        Date::containing_ms(status.submitted_at_unix_ms),
        status.spec_hash,
        spec.ethics_reference,
        spec.valid_from,
        spec.valid_until,
        status.validity,
        spec.max_jobs,
        list(spec.datasets.iter().map(String::as_str).collect()),
        spec.label,
        list(spec.columns.iter().map(String::as_str).collect()),
        spec.purpose.split_whitespace().collect::<Vec<_>>().join(" "),
    );
    for s in &spec.sites {
        text.push_str(&format!("    {:<14} ε {} at δ = {:e}\n", s.site, s.epsilon, s.delta));
    }
    text
}
