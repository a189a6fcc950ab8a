use meridian_spec::decision::Verdict;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

use super::*;
use crate::identity::site_uri;

/// A CA and the PEM identity it signs for `name` with `role` (bound to
/// `site` when given).
struct Federation {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Federation {
    fn new() -> Federation {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).unwrap();
        Federation { ca_pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    fn identity(&self, name: &str, role: &str, site: Option<&str>) -> IdentityFiles {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.distinguished_name.push(DnType::OrganizationalUnitName, role);
        if let Some(site) = site {
            params.subject_alt_names.push(SanType::URI(site_uri(site).try_into().unwrap()));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        IdentityFiles {
            ca_pem: self.ca_pem.clone().into_bytes(),
            cert_pem: cert.pem().into_bytes(),
            key_pem: key.serialize_pem().into_bytes(),
        }
    }
}

fn decision(site: &str, steward: &str) -> SiteDecision {
    SiteDecision {
        application_id: "app-00000001".into(),
        application_hash: "a".repeat(64),
        site: site.into(),
        steward: steward.into(),
        decided_at_ms: 1_796_688_000_000,
        verdict: Verdict::Reject { reason: "not our population".into() },
    }
}

#[test]
fn a_stewards_signed_decision_verifies_at_its_site_only() {
    let fed = Federation::new();
    let sam = fed.identity("sam", "steward", Some("hospital-a"));
    let signed = sign(&decision("hospital-a", "sam"), &sam).unwrap();
    let ca = fed.ca_pem.as_bytes();
    assert_eq!(verify(&signed, ca, "hospital-a"), Ok(decision("hospital-a", "sam")));
    let der = CertificateDer::from_pem_slice(&sam.cert_pem).unwrap();
    assert!(signed_with(&signed, der.as_ref()) && !signed_with(&signed, b"other"));
    let elsewhere = verify(&signed, ca, "hospital-b").unwrap_err();
    assert_eq!(elsewhere.to_string(), "sam is not a steward of hospital-b");
}

#[test]
fn a_changed_decision_or_a_borrowed_signature_is_refused() {
    let fed = Federation::new();
    let ca = fed.ca_pem.as_bytes();
    let sam = fed.identity("sam", "steward", Some("hospital-a"));
    let signed = sign(&decision("hospital-a", "sam"), &sam).unwrap();

    // The coordinator turns a rejection into something else.
    let mut altered = signed.clone();
    altered.decision_json = altered.decision_json.replace("not our population", "fine");
    assert_eq!(verify(&altered, ca, "hospital-a"), Err(DecisionError::Signature));

    // Another steward's certificate beside sam's signature.
    let ann = fed.identity("ann", "steward", Some("hospital-a"));
    let borrowed = SignedDecision { steward_cert_pem: ann.cert_pem.clone(), ..signed.clone() };
    assert_eq!(verify(&borrowed, ca, "hospital-a"), Err(DecisionError::Signature));

    // A steward signing a decision in another steward's name.
    let forged = sign(&decision("hospital-a", "sam"), &ann).unwrap();
    let err = verify(&forged, ca, "hospital-a").unwrap_err();
    assert!(matches!(err, DecisionError::Mismatch { .. }), "{err}");
}

#[test]
fn only_a_steward_of_the_federation_bound_to_the_site_may_decide() {
    let fed = Federation::new();
    let ca = fed.ca_pem.as_bytes();
    let admin = fed.identity("adam", "admin", None);
    let signed = sign(&decision("hospital-a", "adam"), &admin).unwrap();
    assert_eq!(verify(&signed, ca, "hospital-a").unwrap_err().to_string(), "adam is not a steward of hospital-a");

    // A steward of another federation's CA.
    let stranger = Federation::new().identity("sam", "steward", Some("hospital-a"));
    let signed = sign(&decision("hospital-a", "sam"), &stranger).unwrap();
    assert!(matches!(verify(&signed, ca, "hospital-a"), Err(DecisionError::Chain(_))));

    // A steward certificate bound to no site does not even parse as one.
    let unbound = fed.identity("sam", "steward", None);
    let signed = sign(&decision("hospital-a", "sam"), &unbound).unwrap();
    let err = verify(&signed, ca, "hospital-a").unwrap_err().to_string();
    assert!(err.contains("must name exactly one site"), "{err}");
}
