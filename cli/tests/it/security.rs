//! Who may talk to the coordinator: only holders of certificates from the
//! federation's CA, and each only through the service of its role.

use std::time::Duration;

use meridian_wire::identity::IdentityFiles;
use meridian_wire::pb;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::util::{Federation, run, wait_for};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

async fn channel(url: &str, tls: ClientTlsConfig) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    Endpoint::from_shared(url.to_string()).unwrap().tls_config(tls).unwrap().connect().await
}

#[test]
fn strangers_and_wrong_roles_are_refused() {
    let fed = Federation::start(&["hospital-a"]);
    let rt = runtime();
    let ca = std::fs::read(fed.identity("alice").join("ca.pem")).unwrap();

    // No client certificate: the TLS handshake or the first call fails.
    let no_cert = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .domain_name(meridian_wire::identity::COORDINATOR_SERVER_NAME);
    let refused = rt.block_on(async {
        match channel(&fed.url, no_cert).await {
            Err(_) => true,
            Ok(ch) => {
                pb::job_service_client::JobServiceClient::new(ch).list_jobs(pb::ListJobsRequest {}).await.is_err()
            }
        }
    });
    assert!(refused, "a client without a certificate was served");

    // A certificate from another federation's CA.
    let other = tempfile::tempdir().unwrap();
    let out = run(&["provision", "--out", other.path().join("f").to_str().unwrap(), "--user", "mallory:scientist"]);
    assert!(out.status.success());
    let mallory = IdentityFiles::from_dir(&other.path().join("f/users/mallory")).unwrap();
    let stranger_tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .identity(tonic::transport::Identity::from_pem(&mallory.cert_pem, &mallory.key_pem))
        .domain_name(meridian_wire::identity::COORDINATOR_SERVER_NAME);
    let refused = rt.block_on(async {
        match channel(&fed.url, stranger_tls).await {
            Err(_) => true,
            Ok(ch) => {
                pb::job_service_client::JobServiceClient::new(ch).list_jobs(pb::ListJobsRequest {}).await.is_err()
            }
        }
    });
    assert!(refused, "a certificate from another CA was accepted");

    // A hospital may not use the scientists' service.
    let hospital = IdentityFiles::from_dir(&fed.identity("hospital-a")).unwrap();
    let err = rt.block_on(async {
        let ch = channel(&fed.url, hospital.client_tls()).await.unwrap();
        pb::job_service_client::JobServiceClient::new(ch).list_jobs(pb::ListJobsRequest {}).await.unwrap_err()
    });
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(err.message(), "hospital-a (role hospital) may not call JobService/ListJobs");

    // A scientist may not use the workers' service.
    let alice = IdentityFiles::from_dir(&fed.identity("alice")).unwrap();
    let err = rt.block_on(async {
        let ch = channel(&fed.url, alice.client_tls()).await.unwrap();
        pb::worker_service_client::WorkerServiceClient::new(ch)
            .register(pb::RegisterRequest::default())
            .await
            .unwrap_err()
    });
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(err.message(), "alice (role scientist) may not call WorkerService/Register");

    // A reviewer reads budgets but cannot submit jobs.
    let out = fed.client("rita", &["budget", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let job = crate::util::example("jobs/wdbc.toml");
    let out = fed.client("rita", &["job", "submit", job.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rita (role reviewer) may not call JobService/SubmitJob"), "{stderr}");
}

#[test]
fn private_keys_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("f");
    assert!(run(&["provision", "--out", out.to_str().unwrap(), "--site", "h1", "--user", "u:admin"]).status.success());
    for key in ["ca/ca.key", "coordinator/key.pem", "sites/h1/key.pem", "users/u/key.pem"] {
        let mode = std::fs::metadata(out.join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    // Provisioning never overwrites a federation.
    let again = run(&["provision", "--out", out.to_str().unwrap(), "--site", "h2"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a federation"));
}

/// Every RPC of every service, called with every role's certificate: the
/// roles allowed get past authorization (whatever else they get), the others
/// get PermissionDenied.
#[test]
fn every_rpc_checks_the_callers_role() {
    use pb::application_service_client::ApplicationServiceClient as Applications;
    use pb::job_service_client::JobServiceClient as Jobs;
    use pb::privacy_service_client::PrivacyServiceClient as Privacy;
    use pb::worker_service_client::WorkerServiceClient as Workers;
    use tonic::Code;

    let fed = Federation::start(&["hospital-a"]);
    let rt = runtime();
    let roles = [
        ("hospital-a", "hospital"),
        ("alice", "scientist"),
        ("rita", "reviewer"),
        ("adam", "admin"),
        ("sam", "steward"),
        ("coordinator", "coordinator"),
    ];
    type Call = fn(
        tonic::transport::Channel,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>>>>;
    let calls: Vec<(&str, &[&str], Call)> = vec![
        ("WorkerService/Register", &["hospital"], |c| {
            Box::pin(async move { Workers::new(c).register(pb::RegisterRequest::default()).await.map(|_| ()) })
        }),
        ("WorkerService/Heartbeat", &["hospital"], |c| {
            Box::pin(async move { Workers::new(c).heartbeat(pb::HeartbeatRequest {}).await.map(|_| ()) })
        }),
        ("WorkerService/ReceiveTasks", &["hospital"], |c| {
            Box::pin(async move { Workers::new(c).receive_tasks(pb::ReceiveTasksRequest {}).await.map(|_| ()) })
        }),
        ("WorkerService/AnswerOffer", &["hospital"], |c| {
            Box::pin(async move { Workers::new(c).answer_offer(pb::OfferAnswer::default()).await.map(|_| ()) })
        }),
        ("WorkerService/PullModel", &["hospital"], |c| {
            Box::pin(async move { Workers::new(c).pull_model(pb::PullModelRequest::default()).await.map(|_| ()) })
        }),
        ("WorkerService/ReserveUpload", &["hospital"], |c| {
            Box::pin(
                async move { Workers::new(c).reserve_upload(pb::ReserveUploadRequest::default()).await.map(|_| ()) },
            )
        }),
        ("WorkerService/PushUpdate", &["hospital"], |c| {
            Box::pin(async move {
                Workers::new(c).push_update(tokio_stream::iter(Vec::<pb::UpdateChunk>::new())).await.map(|_| ())
            })
        }),
        ("WorkerService/ReportEvaluation", &["hospital"], |c| {
            Box::pin(
                async move { Workers::new(c).report_evaluation(pb::EvaluationReport::default()).await.map(|_| ()) },
            )
        }),
        ("WorkerService/ReportFailure", &["hospital"], |c| {
            Box::pin(async move { Workers::new(c).report_failure(pb::TaskFailure::default()).await.map(|_| ()) })
        }),
        ("JobService/SubmitJob", &["scientist", "admin"], |c| {
            Box::pin(async move { Jobs::new(c).submit_job(pb::SubmitJobRequest::default()).await.map(|_| ()) })
        }),
        ("JobService/ListJobs", &["scientist", "reviewer", "admin"], |c| {
            Box::pin(async move { Jobs::new(c).list_jobs(pb::ListJobsRequest {}).await.map(|_| ()) })
        }),
        ("JobService/GetJob", &["scientist", "reviewer", "admin"], |c| {
            Box::pin(async move { Jobs::new(c).get_job(pb::GetJobRequest::default()).await.map(|_| ()) })
        }),
        ("JobService/WatchJob", &["scientist", "reviewer", "admin"], |c| {
            Box::pin(async move { Jobs::new(c).watch_job(pb::GetJobRequest::default()).await.map(|_| ()) })
        }),
        ("JobService/CancelJob", &["scientist", "admin"], |c| {
            Box::pin(async move { Jobs::new(c).cancel_job(pb::CancelJobRequest::default()).await.map(|_| ()) })
        }),
        ("JobService/PullJobModel", &["scientist", "admin"], |c| {
            Box::pin(async move { Jobs::new(c).pull_job_model(pb::PullJobModelRequest::default()).await.map(|_| ()) })
        }),
        ("PrivacyService/GetBudgets", &["scientist", "reviewer", "admin"], |c| {
            Box::pin(async move { Privacy::new(c).get_budgets(pb::GetBudgetsRequest {}).await.map(|_| ()) })
        }),
        ("PrivacyService/ListLedger", &["scientist", "reviewer", "admin"], |c| {
            Box::pin(async move { Privacy::new(c).list_ledger(pb::ListLedgerRequest::default()).await.map(|_| ()) })
        }),
        ("ApplicationService/SubmitApplication", &["scientist", "admin"], |c| {
            Box::pin(async move {
                Applications::new(c).submit_application(pb::SubmitApplicationRequest::default()).await.map(|_| ())
            })
        }),
        ("ApplicationService/ListApplications", &["scientist", "reviewer", "admin", "steward"], |c| {
            Box::pin(
                async move { Applications::new(c).list_applications(pb::ListApplicationsRequest {}).await.map(|_| ()) },
            )
        }),
        ("ApplicationService/GetApplication", &["scientist", "reviewer", "admin", "steward"], |c| {
            Box::pin(async move {
                Applications::new(c).get_application(pb::GetApplicationRequest::default()).await.map(|_| ())
            })
        }),
    ];
    let mut checked = 0;
    for (name, role) in roles {
        let dir = if role == "coordinator" { fed.dir.join("fed").join("coordinator") } else { fed.identity(name) };
        let identity = IdentityFiles::from_dir(&dir).unwrap();
        let channel = rt.block_on(channel(&fed.url, identity.client_tls())).unwrap();
        for (rpc, allowed, call) in &calls {
            let result = rt.block_on(call(channel.clone()));
            let denied =
                matches!(&result, Err(s) if s.code() == Code::PermissionDenied && s.message().contains("may not call"));
            assert_eq!(denied, !allowed.contains(&role), "{rpc} as {role}: {result:?}");
            if denied {
                let message = result.unwrap_err().message().to_string();
                assert_eq!(message, format!("{name} (role {role}) may not call {rpc}"));
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 6 * 20);
}

/// Adding, renewing, expiring and revoking certificates against a running
/// coordinator, and a hospital trying to speak for another.
#[test]
fn certificates_added_renewed_expired_and_revoked_take_effect_live() {
    let fed = Federation::start(&["hospital-a"]);
    let rt = runtime();
    let fed_dir = fed.dir.join("fed");
    let fed_arg = fed_dir.to_str().unwrap();
    let register = |dir: &std::path::Path| {
        let identity = IdentityFiles::from_dir(dir).unwrap();
        rt.block_on(async {
            let ch = channel(&fed.url, identity.client_tls()).await.map_err(|e| format!("{e:?}"))?;
            pb::worker_service_client::WorkerServiceClient::new(ch)
                .register(pb::RegisterRequest::default())
                .await
                .map(|r| r.into_inner().site)
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        })
    };
    let a_cert = std::fs::read(fed_dir.join("sites/hospital-a/cert.pem")).unwrap();

    // A new site signed by the existing CA works at once; no other certificate changed.
    let out = run(&["provision", "add-site", "hospital-b", "--federation", fed_arg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(register(&fed_dir.join("sites/hospital-b")), Ok("hospital-b".to_string()));
    assert_eq!(std::fs::read(fed_dir.join("sites/hospital-a/cert.pem")).unwrap(), a_cert);
    let again = run(&["provision", "add-site", "hospital-b", "--federation", fed_arg]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already has a certificate"));

    // A hospital cannot file ledger entries in another hospital's name.
    let identity = IdentityFiles::from_dir(&fed_dir.join("sites/hospital-a")).unwrap();
    let err = rt.block_on(async {
        let ch = channel(&fed.url, identity.client_tls()).await.unwrap();
        let entry = pb::LedgerEntry { seq: 1, site: "hospital-b".to_string(), ..Default::default() };
        pb::worker_service_client::WorkerServiceClient::new(ch)
            .register(pb::RegisterRequest { ledger: vec![entry], ..Default::default() })
            .await
            .unwrap_err()
    });
    assert_eq!(err.message(), "ledger: entry 1 names site \"hospital-b\", the certificate says \"hospital-a\"");

    // An expired certificate is refused by the TLS handshake.
    let out =
        run(&["provision", "add-user", "temp", "--role", "reviewer", "--valid-days", "0", "--federation", fed_arg]);
    assert!(out.status.success());
    wait_for(Duration::from_secs(10), "the certificate to expire", || {
        let out = fed.client("temp", &["budget"]);
        (!out.status.success()).then_some(())
    });

    // Renewal replaces the key and certificate; the coordinator accepts the new one without a restart.
    let out = run(&["provision", "renew", "temp", "--valid-days", "30", "--federation", fed_arg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(fed.client("temp", &["budget"]).status.success());

    // Revoking by name in coordinator.toml takes effect without a restart.
    let config = fed.dir.join("coordinator.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("[revocation]\nnames = [\"hospital-b\"]\n");
    std::fs::write(&config, text).unwrap();
    let refused = wait_for(Duration::from_secs(10), "the revocation to take effect", || {
        register(&fed_dir.join("sites/hospital-b")).err()
    });
    assert_eq!(refused, "Unauthenticated: the certificates of hospital-b are revoked");
    assert_eq!(register(&fed_dir.join("sites/hospital-a")), Ok("hospital-a".to_string()));
}
