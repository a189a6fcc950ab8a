//! `ApplicationService`: scientists submit data-use applications, and every
//! role that reads jobs reads them; a hospital's steward reads those that
//! ask its site, and no other. An application is validated here as the
//! CLI validated it, so a hand-made request is held to the same rules, and
//! one whose validity has already ended is refused: nobody could approve
//! it. Each submission is an audit entry bound to the application's hash.

use meridian_spec::application::ApplicationSpec;
use meridian_spec::date::Date;
use meridian_sys::now_ms;
use meridian_wire::identity::{Principal, Role};
use meridian_wire::pb;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::service::Services;
use crate::store::ApplicationRow;

const SUBMITTERS: &[Role] = &[Role::Scientist, Role::Admin];
const READERS: &[Role] = &[Role::Scientist, Role::Reviewer, Role::Admin, Role::Steward];

#[tonic::async_trait]
impl pb::application_service_server::ApplicationService for Services {
    async fn submit_application(
        &self,
        req: Request<pb::SubmitApplicationRequest>,
    ) -> Result<Response<pb::SubmitApplicationResponse>, Status> {
        let who = self.authorize(&req, SUBMITTERS, "ApplicationService/SubmitApplication")?;
        let spec = ApplicationSpec::from_toml(&req.get_ref().spec_toml, "application")
            .map_err(|e| Status::invalid_argument(e.to_string().trim_start_matches("application: ").to_string()))?;
        let now = now_ms();
        if spec.valid_until.end_ms() <= now {
            let today = Date::containing_ms(now);
            return Err(Status::invalid_argument(format!(
                "valid_until: {} has passed (today is {today})",
                spec.valid_until
            )));
        }
        let row = self.insert_new(spec, &who.name, now)?;
        info!(application = %row.id, requester = %who.name, "application submitted");
        self.inner.audit(
            "application.submitted",
            &row.id,
            serde_json::json!({ "by": who.name, "spec_hash": row.spec_hash, "title": row.spec.title }),
        );
        Ok(Response::new(pb::SubmitApplicationResponse { application_id: row.id, spec_hash: row.spec_hash }))
    }

    async fn list_applications(
        &self,
        req: Request<pb::ListApplicationsRequest>,
    ) -> Result<Response<pb::ListApplicationsResponse>, Status> {
        let who = self.authorize(&req, READERS, "ApplicationService/ListApplications")?;
        let now = now_ms();
        let rows = self.inner.store.applications()?;
        let applications = rows.iter().filter(|a| visible_to(&who, a)).map(|a| status(a, now)).collect();
        Ok(Response::new(pb::ListApplicationsResponse { applications }))
    }

    async fn get_application(
        &self,
        req: Request<pb::GetApplicationRequest>,
    ) -> Result<Response<pb::ApplicationStatus>, Status> {
        let who = self.authorize(&req, READERS, "ApplicationService/GetApplication")?;
        let id = &req.get_ref().application_id;
        let row =
            self.inner.store.application(id)?.ok_or_else(|| Status::not_found(format!("no application \"{id}\"")))?;
        if !visible_to(&who, &row) {
            let site = who.site.as_deref().unwrap_or_default();
            return Err(Status::permission_denied(format!(
                "{} (steward of {site}) may not read {id}, which asks nothing of {site}",
                who.name
            )));
        }
        Ok(Response::new(status(&row, now_ms())))
    }
}

impl Services {
    /// Stores `spec` under a fresh id.
    fn insert_new(&self, spec: ApplicationSpec, requester: &str, now: i64) -> Result<ApplicationRow, Status> {
        let mut row = ApplicationRow {
            id: String::new(),
            spec_hash: spec.hash(),
            spec,
            requester: requester.to_string(),
            submitted_at_ms: now,
        };
        // A clash with an existing id must not overwrite its application.
        for _ in 0..8 {
            row.id = format!("app-{:08x}", rand::random::<u32>());
            if self.inner.store.insert_application(&row)? {
                return Ok(row);
            }
        }
        Err(Status::internal("no unused application id after 8 draws"))
    }
}

/// Whether `who` may read `row`: a steward only an application that asks
/// its site.
fn visible_to(who: &Principal, row: &ApplicationRow) -> bool {
    match (&who.role, &who.site) {
        (Role::Steward, Some(site)) => row.spec.site(site).is_some(),
        (Role::Steward, None) => false,
        _ => true,
    }
}

/// An application as every reader sees it, with its validity on `now`.
fn status(row: &ApplicationRow, now: i64) -> pb::ApplicationStatus {
    let spec = &row.spec;
    pb::ApplicationStatus {
        application_id: row.id.clone(),
        title: spec.title.clone(),
        requester: row.requester.clone(),
        spec_hash: row.spec_hash.clone(),
        spec_json: spec.canonical_json(),
        submitted_at_unix_ms: row.submitted_at_ms,
        validity: spec.validity_at(now).as_str().to_string(),
        sites: spec
            .sites
            .iter()
            .map(|s| pb::ApplicationSiteRequest { site: s.site.clone(), epsilon: s.epsilon, delta: s.delta })
            .collect(),
    }
}
