use meridian_spec::decision::Verdict;
use meridian_wire::identity::{IdentityFiles, site_uri};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};

use super::*;

const BRFSS: &str = include_str!("../../../examples/applications/brfss.toml");

/// A CA's PEM and a steward identity it signs for `site`.
fn steward(name: &str, site: &str) -> (String, IdentityFiles) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.distinguished_name.push(DnType::OrganizationalUnitName, "steward");
    params.subject_alt_names.push(SanType::URI(site_uri(site).try_into().unwrap()));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let identity = IdentityFiles {
        ca_pem: ca_pem.clone().into_bytes(),
        cert_pem: cert.pem().into_bytes(),
        key_pem: key.serialize_pem().into_bytes(),
    };
    (ca_pem, identity)
}

fn approval(app: &ApplicationSpec, epsilon: f64) -> SiteDecision {
    let grant = meridian_spec::decision::Grant { epsilon, ..app.full_grant("hospital-a").unwrap() };
    SiteDecision {
        application_id: "app-00000001".into(),
        application_hash: app.hash(),
        site: "hospital-a".into(),
        steward: "sam".into(),
        decided_at_ms: 1_796_688_000_000,
        verdict: Verdict::Approve { grant },
    }
}

#[test]
fn the_site_takes_an_honoured_stewards_decision_within_the_terms() {
    let app = ApplicationSpec::from_toml(BRFSS, "brfss.toml").unwrap();
    let (ca, sam) = steward("sam", "hospital-a");
    let signed = meridian_wire::decision::sign(&approval(&app, 2.0), &sam).unwrap();
    let honoured = vec!["sam".to_string()];
    assert_eq!(accept_decision(&signed, &app, "hospital-a", ca.as_bytes(), &honoured), Ok(approval(&app, 2.0)));

    // Signed by a real steward of the site, whom the policy does not name.
    let refused = accept_decision(&signed, &app, "hospital-a", ca.as_bytes(), &["ann".to_string()]).unwrap_err();
    assert_eq!(refused.to_string(), "sam is not a steward this site honours (policy.stewards)");

    // Signed, honoured, but wider than the application asked.
    let wide = meridian_wire::decision::sign(&approval(&app, 9.0), &sam).unwrap();
    let refused = accept_decision(&wide, &app, "hospital-a", ca.as_bytes(), &honoured).unwrap_err();
    assert!(matches!(&refused, DecisionRefusal::Terms(p) if p[0].starts_with("epsilon: 9")), "{refused}");

    // Another site's check of the same decision.
    let refused = accept_decision(&signed, &app, "hospital-b", ca.as_bytes(), &honoured).unwrap_err();
    assert!(matches!(refused, DecisionRefusal::Signature(_)), "{refused}");
}
