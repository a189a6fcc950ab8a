//! `ApplicationService`: scientists submit data-use applications, and every
//! role that reads jobs reads them; a hospital's steward reads those that
//! ask its site, and no other. An application is validated here as the
//! CLI validated it, so a hand-made request is held to the same rules, and
//! one whose validity has already ended is refused: nobody could approve
//! it. Each submission is an audit entry bound to the application's hash.
//!
//! A steward's decision arrives signed with the steward's key. The
//! coordinator checks it as a site will ([`meridian_wire::decision::verify`]),
//! against the application's terms, and against the site's earlier
//! decisions (a decision is final, except that an approval can be revoked),
//! then records it with its certificate and signature and audits it.

use meridian_spec::application::ApplicationSpec;
use meridian_spec::date::Date;
use meridian_spec::decision::{SiteDecision, Verdict};
use meridian_sys::now_ms;
use meridian_wire::decision::SignedDecision;
use meridian_wire::identity::{Principal, Role};
use meridian_wire::pb;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::service::{SUBMITTERS, Services};
use crate::store::{ApplicationRow, DecisionRow};

const READERS: &[Role] = &[Role::Scientist, Role::Reviewer, Role::Admin, Role::Steward];
const STEWARDS: &[Role] = &[Role::Steward];

/// How far a decision's time may be from the coordinator's clock.
const MAX_CLOCK_SKEW_MS: i64 = 10 * 60 * 1000;

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
        let mut applications = Vec::new();
        for row in rows.iter().filter(|a| visible_to(&who, a)) {
            applications.push(status(row, &self.inner.store.decisions(&row.id)?, now));
        }
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
        Ok(Response::new(status(&row, &self.inner.store.decisions(id)?, now_ms())))
    }

    async fn decide_application(
        &self,
        req: Request<pb::DecideApplicationRequest>,
    ) -> Result<Response<pb::ApplicationStatus>, Status> {
        let who = self.authorize(&req, STEWARDS, "ApplicationService/DecideApplication")?;
        let site = who.site.clone().unwrap_or_default();
        let peer = req.peer_certs().and_then(|certs| certs.first().map(|c| c.as_ref().to_vec())).unwrap_or_default();
        let r = req.into_inner();
        let signed = SignedDecision {
            decision_json: r.decision_json,
            steward_cert_pem: r.steward_cert_pem.to_vec(),
            signature: r.signature.to_vec(),
        };
        // The signing certificate is the caller's own, whose revocation
        // `authorize` has just checked.
        if !meridian_wire::decision::signed_with(&signed, &peer) {
            return Err(Status::permission_denied(format!(
                "{} may send only decisions signed with its own certificate",
                who.name
            )));
        }
        let decision = meridian_wire::decision::verify(&signed, &self.ca_pem, &site)
            .map_err(|e| Status::invalid_argument(format!("decision refused: {e}")))?;
        let now = now_ms();
        if (decision.decided_at_ms - now).abs() > MAX_CLOCK_SKEW_MS {
            let at = Date::containing_ms(decision.decided_at_ms);
            return Err(Status::invalid_argument(format!("decided_at_ms: {at} is not now (more than 10 minutes off)")));
        }
        let id = decision.application_id.clone();
        let row =
            self.inner.store.application(&id)?.ok_or_else(|| Status::not_found(format!("no application \"{id}\"")))?;
        decision.check_against(&row.spec).map_err(|problems| Status::invalid_argument(problems.join("; ")))?;
        let record = DecisionRow {
            decision_json: signed.decision_json,
            steward_cert_pem: signed.steward_cert_pem,
            signature: signed.signature,
            decision,
        };
        self.inner.store.record_decision(&record, |past| check_sequence(past, &record.decision, now))?;
        let d = &record.decision;
        info!(application = %id, site = %d.site, steward = %d.steward, verdict = d.verdict.as_str(), "application decided");
        self.inner.audit(
            "application.decided",
            &id,
            serde_json::json!({
                "site": d.site, "steward": d.steward, "verdict": d.verdict.as_str(),
                "application_hash": d.application_hash, "decision_hash": d.hash(),
            }),
        );
        Ok(Response::new(status(&row, &self.inner.store.decisions(&id)?, now_ms())))
    }
}

/// Whether `decision` may follow the site's `past` decisions: a first
/// decision approves or rejects, an approval may later be revoked, and
/// nothing else changes a decision; an approval must still be in force.
fn check_sequence(past: &[DecisionRow], decision: &SiteDecision, now: i64) -> Result<(), Status> {
    let (site, id) = (&decision.site, &decision.application_id);
    let current = past.iter().rev().find(|d| &d.decision.site == site).map(|d| &d.decision.verdict);
    match (current, &decision.verdict) {
        (None, Verdict::Approve { grant }) if grant.valid_until.end_ms() <= now => {
            Err(Status::failed_precondition(format!("valid_until: {} has passed", grant.valid_until)))
        }
        (None, Verdict::Approve { .. } | Verdict::Reject { .. })
        | (Some(Verdict::Approve { .. }), Verdict::Revoke { .. }) => Ok(()),
        (None, Verdict::Revoke { .. }) => {
            Err(Status::failed_precondition(format!("{site} has not approved {id}: there is nothing to revoke")))
        }
        (Some(verdict), _) => Err(Status::failed_precondition(format!(
            "{site} already decided \"{}\" on {id}; a decision is final, except that an approval can be revoked",
            verdict.as_str()
        ))),
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

/// An application as every reader sees it, with its decisions and its
/// validity on `now`.
fn status(row: &ApplicationRow, decisions: &[DecisionRow], now: i64) -> pb::ApplicationStatus {
    let spec = &row.spec;
    pb::ApplicationStatus {
        application_id: row.id.clone(),
        title: spec.title.clone(),
        requester: row.requester.clone(),
        spec_hash: row.spec_hash.clone(),
        spec_json: spec.canonical_json(),
        submitted_at_unix_ms: row.submitted_at_ms,
        validity: pb::ApplicationValidity::from(spec.validity_at(now)) as i32,
        sites: spec
            .sites
            .iter()
            .map(|s| pb::ApplicationSiteRequest { site: s.site.clone(), epsilon: s.epsilon, delta: s.delta })
            .collect(),
        decisions: decisions
            .iter()
            .map(|d| pb::ApplicationDecision {
                site: d.decision.site.clone(),
                steward: d.decision.steward.clone(),
                verdict: pb::DecisionVerdict::from(&d.decision.verdict) as i32,
                decided_at_unix_ms: d.decision.decided_at_ms,
                decision_json: d.decision_json.clone(),
            })
            .collect(),
    }
}
