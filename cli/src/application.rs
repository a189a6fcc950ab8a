//! `meridian application`: data-use applications, what a study asks of the
//! hospitals before any job runs. A scientist submits one (checked here
//! first, so a mistake names the file and line without a round trip);
//! every reader lists and shows them, as text or as JSON; a hospital's
//! steward approves (with terms no wider than asked), rejects or revokes
//! for its site, each decision signed here with the steward's own key.

use std::path::Path;

use anyhow::{Context, Result};
use clap::Subcommand;
use meridian_spec::application::ApplicationSpec;
use meridian_spec::date::Date;
use meridian_spec::decision::{SiteDecision, Verdict};
use meridian_wire::identity::{IdentityFiles, principal_from_pem};
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
    /// Approve an application for your site (stewards), by default on every term it asks.
    Approve {
        /// Application id.
        id: String,
        /// The application's hash, as `application show` printed it: the
        /// terms you reviewed. Nothing is signed if the application differs.
        #[arg(long)]
        hash: String,
        /// Grant less ε than asked.
        #[arg(long)]
        epsilon: Option<f64>,
        /// End the grant earlier (YYYY-MM-DD, the last day it holds).
        #[arg(long)]
        until: Option<String>,
        /// Allow fewer jobs than asked.
        #[arg(long)]
        max_jobs: Option<u32>,
        /// Allow only these of the columns asked for (comma-separated).
        #[arg(long, value_delimiter = ',')]
        columns: Vec<String>,
        /// Print the application's status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Reject an application for your site (stewards).
    Reject {
        /// Application id.
        id: String,
        /// Why, for the requester and the audit.
        #[arg(long)]
        reason: String,
        /// Print the application's status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke your site's approval of an application (stewards).
    Revoke {
        /// Application id.
        id: String,
        /// Why, for the requester and the audit.
        #[arg(long)]
        reason: String,
        /// Print the application's status as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The terms a steward narrows an approval to.
struct Narrower {
    epsilon: Option<f64>,
    until: Option<String>,
    max_jobs: Option<u32>,
    columns: Vec<String>,
}

/// Runs an application command against the coordinator.
pub async fn run(command: ApplicationCommand, conn: &Connection) -> Result<()> {
    match command {
        ApplicationCommand::Submit { spec, json } => submit(conn, &spec, json).await,
        ApplicationCommand::List { json } => list(conn, json).await,
        ApplicationCommand::Show { id, json } => show(conn, &id, json).await,
        ApplicationCommand::Approve { id, hash, epsilon, until, max_jobs, columns, json } => {
            let terms = Narrower { epsilon, until, max_jobs, columns };
            decide(conn, &id, json, |spec, site| {
                if spec.hash() != hash {
                    anyhow::bail!("{id} now hashes to {}, not the {hash} you reviewed: show it again", spec.hash());
                }
                approval(spec, site, terms)
            })
            .await
        }
        ApplicationCommand::Reject { id, reason, json } => {
            decide(conn, &id, json, |_, _| Ok(Verdict::Reject { reason })).await
        }
        ApplicationCommand::Revoke { id, reason, json } => {
            decide(conn, &id, json, |_, _| Ok(Verdict::Revoke { reason })).await
        }
    }
}

/// An approval of everything `site` was asked, narrowed by `terms`.
fn approval(spec: &ApplicationSpec, site: &str, terms: Narrower) -> Result<Verdict> {
    let mut grant = spec.full_grant(site).with_context(|| format!("the application asks nothing of {site}"))?;
    if let Some(epsilon) = terms.epsilon {
        grant.epsilon = epsilon;
    }
    if let Some(until) = terms.until {
        grant.valid_until = Date::parse(&until).map_err(|e| anyhow::anyhow!("--until: {e}"))?;
    }
    if let Some(max_jobs) = terms.max_jobs {
        grant.max_jobs = max_jobs;
    }
    if !terms.columns.is_empty() {
        grant.columns = terms.columns;
    }
    Ok(Verdict::Approve { grant })
}

/// Signs the steward's decision on application `id` with its own key and
/// sends it; prints what it decided, or the application's status as JSON.
async fn decide(
    conn: &Connection,
    id: &str,
    json: bool,
    verdict: impl FnOnce(&ApplicationSpec, &str) -> Result<Verdict>,
) -> Result<()> {
    let identity = IdentityFiles::from_dir(&conn.identity)
        .with_context(|| format!("loading the identity in {}", conn.identity.display()))?;
    let me = principal_from_pem(&identity.cert_pem)?;
    let Some(site) = me.site else {
        anyhow::bail!("{} is a {}: only a site's steward decides on an application", me.name, me.role);
    };
    let status = get(conn, id).await?;
    let spec = spec_of(&status)?;
    let verdict = verdict(&spec, &site)?;
    let decision = SiteDecision {
        application_id: id.to_string(),
        application_hash: spec.hash(),
        site,
        steward: me.name,
        decided_at_ms: meridian_sys::now_ms(),
        verdict,
    };
    decision.check_against(&spec).map_err(|problems| anyhow::anyhow!("{id}: {}", problems.join("; ")))?;
    let signed = meridian_wire::decision::sign(&decision, &identity)?;
    let request = pb::DecideApplicationRequest {
        decision_json: signed.decision_json,
        steward_cert_pem: signed.steward_cert_pem.into(),
        signature: signed.signature.into(),
    };
    let status = conn.applications().await?.decide_application(request).await.map_err(status_error)?.into_inner();
    if json {
        output::json(&status_json(&status)?)?;
    } else {
        out!("{} {}", decision.application_id, decision_line(&decision))?;
    }
    Ok(())
}

/// One decision as a line: the site, the verdict, who, and its terms.
fn decision_line(d: &SiteDecision) -> String {
    let day = Date::containing_ms(d.decided_at_ms);
    let head = format!("{}: {} by {} on {day}", d.site, d.verdict.as_str(), d.steward);
    match &d.verdict {
        Verdict::Approve { grant } => format!(
            "{head}: ε {} at δ = {:e} until {}, at most {} jobs, {} columns",
            grant.epsilon,
            grant.delta,
            grant.valid_until,
            grant.max_jobs,
            grant.columns.len()
        ),
        Verdict::Reject { reason } | Verdict::Revoke { reason } => format!("{head}: {reason}"),
    }
}

/// One application's status from the coordinator.
async fn get(conn: &Connection, id: &str) -> Result<pb::ApplicationStatus> {
    let request = pb::GetApplicationRequest { application_id: id.to_string() };
    Ok(conn.applications().await?.get_application(request).await.map_err(status_error)?.into_inner())
}

/// `application submit`: checks the file, sends it, prints the new id.
async fn submit(conn: &Connection, path: &Path, json: bool) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    ApplicationSpec::from_toml(&text, &path.display().to_string()).map_err(anyhow::Error::msg)?;
    let reply = conn
        .applications()
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
    let apps = conn
        .applications()
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
        let validity = validity_name(a);
        out!("{:<13} {:<12} {:>5}  {:<12} {}", a.application_id, validity, a.sites.len(), a.requester, a.title)?;
    }
    Ok(())
}

/// `application show`: one application, as a block or as JSON.
async fn show(conn: &Connection, id: &str, json: bool) -> Result<()> {
    let status = get(conn, id).await?;
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
        "validity": validity_name(status),
        "spec": spec,
        "decisions": decisions(status)?,
    }))
}

/// The validity a status carries, by name.
fn validity_name(status: &pb::ApplicationStatus) -> &'static str {
    meridian_wire::convert::validity(status.validity).map_or("unknown", |v| v.as_str())
}

/// The decisions a status carries, parsed.
fn decisions(status: &pb::ApplicationStatus) -> Result<Vec<SiteDecision>> {
    status
        .decisions
        .iter()
        .map(|d| serde_json::from_str(&d.decision_json).context("a decision the coordinator sent does not parse"))
        .collect()
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
        validity_name(status),
        spec.max_jobs,
        list(spec.datasets.iter().map(String::as_str).collect()),
        spec.label,
        list(spec.columns.iter().map(String::as_str).collect()),
        spec.purpose.split_whitespace().collect::<Vec<_>>().join(" "),
    );
    for s in &spec.sites {
        text.push_str(&format!("    {:<14} ε {} at δ = {:e}\n", s.site, s.epsilon, s.delta));
    }
    match decisions(status) {
        Ok(decisions) if decisions.is_empty() => text.push_str("  decisions: none yet\n"),
        Ok(decisions) => {
            text.push_str("  decisions (a site's latest is in force):\n");
            for d in &decisions {
                text.push_str(&format!("    {}\n", decision_line(d)));
            }
        }
        Err(e) => text.push_str(&format!("  decisions: {e}\n")),
    }
    text
}
