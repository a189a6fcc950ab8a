//! Who may talk to the coordinator: only holders of certificates from the
//! federation's CA, and each only through the service of its role.

use proto::identity::IdentityFiles;
use proto::pb;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::util::{Federation, run};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

async fn channel(url: &str, tls: ClientTlsConfig) -> Result<tonic::transport::Channel, String> {
    Endpoint::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

#[test]
fn strangers_and_wrong_roles_are_refused() {
    let fed = Federation::start(&["hospital-a"]);
    let rt = runtime();
    let ca = std::fs::read(fed.identity("alice").join("ca.pem")).unwrap();

    // No client certificate: the TLS handshake or the first call fails.
    let no_cert = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .domain_name(proto::identity::COORDINATOR_SERVER_NAME);
    let refused = rt.block_on(async {
        match channel(&fed.url, no_cert).await {
            Err(_) => true,
            Ok(ch) => pb::job_service_client::JobServiceClient::new(ch)
                .list_jobs(pb::ListJobsRequest {})
                .await
                .is_err(),
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
        .domain_name(proto::identity::COORDINATOR_SERVER_NAME);
    let refused = rt.block_on(async {
        match channel(&fed.url, stranger_tls).await {
            Err(_) => true,
            Ok(ch) => pb::job_service_client::JobServiceClient::new(ch)
                .list_jobs(pb::ListJobsRequest {})
                .await
                .is_err(),
        }
    });
    assert!(refused, "a certificate from another CA was accepted");

    // A hospital may not use the scientists' service.
    let hospital = IdentityFiles::from_dir(&fed.identity("hospital-a")).unwrap();
    let err = rt.block_on(async {
        let ch = channel(&fed.url, hospital.client_tls()).await.unwrap();
        pb::job_service_client::JobServiceClient::new(ch)
            .list_jobs(pb::ListJobsRequest {})
            .await
            .unwrap_err()
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
