//! A steward's decision signed with the steward's own key. A site checks it
//! without trusting the coordinator that carries it: the certificate must
//! chain to the federation's CA, be a steward's, be bound to this site and
//! name the steward the decision names, and the signature must cover the
//! decision's canonical JSON exactly. So a coordinator can pass a decision
//! on, or withhold it, but cannot make one up or widen one.

use meridian_spec::decision::SiteDecision;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, UnparsedPublicKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::identity::{IdentityFiles, Role, principal_from_der, verify_chain};

/// A decision, the steward's certificate and the steward's signature over
/// the decision's canonical JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedDecision {
    /// [`SiteDecision::canonical_json`], as signed.
    pub decision_json: String,
    /// The steward's certificate (PEM).
    pub steward_cert_pem: Vec<u8>,
    /// ECDSA P-256 / SHA-256 signature (ASN.1 DER) over `decision_json`.
    pub signature: Vec<u8>,
}

/// Why a decision could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// The identity's key is not a PKCS#8 ECDSA P-256 key.
    #[error("the steward's key cannot sign: {0}")]
    Key(String),
    /// The system's random source failed.
    #[error("no randomness for the signature")]
    Random,
}

/// Why a site refuses a signed decision; each names what failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecisionError {
    /// The certificate does not parse, or the CA does not.
    #[error("unreadable certificate: {0}")]
    Certificate(String),
    /// The certificate is not signed by the federation's CA, or not valid now.
    #[error("the certificate is not valid with the federation's CA now: {0}")]
    Chain(String),
    /// The certificate is not a steward's, or is bound to another site.
    #[error("{name} is not a steward of {site}")]
    NotSteward {
        /// The certificate's name.
        name: String,
        /// This site.
        site: String,
    },
    /// The decision is for another site or names another steward.
    #[error("the decision is for {decision_site} by {decision_steward}, signed by {name} for {site}")]
    Mismatch {
        /// The site the decision names.
        decision_site: String,
        /// The steward the decision names.
        decision_steward: String,
        /// The signer.
        name: String,
        /// This site.
        site: String,
    },
    /// The signature does not cover these bytes with this certificate's key.
    #[error("the signature does not match the decision")]
    Signature,
    /// The signed text is not a decision in canonical form.
    #[error("the signed text is not a decision in canonical form: {0}")]
    Form(String),
}

/// Signs `decision` with the identity's private key.
pub fn sign(decision: &SiteDecision, identity: &IdentityFiles) -> Result<SignedDecision, SigningError> {
    let key = PrivateKeyDer::from_pem_slice(&identity.key_pem).map_err(|e| SigningError::Key(e.to_string()))?;
    let PrivateKeyDer::Pkcs8(pkcs8) = key else {
        return Err(SigningError::Key("not a PKCS#8 key".to_string()));
    };
    let rng = SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.secret_pkcs8_der(), &rng)
        .map_err(|e| SigningError::Key(e.to_string()))?;
    let decision_json = decision.canonical_json();
    let signature = pair.sign(&rng, decision_json.as_bytes()).map_err(|_| SigningError::Random)?;
    Ok(SignedDecision {
        decision_json,
        steward_cert_pem: identity.cert_pem.clone(),
        signature: signature.as_ref().to_vec(),
    })
}

/// Whether `signed` carries the certificate whose DER is `der` (a TLS
/// peer's): a caller may send only decisions signed with its own.
pub fn signed_with(signed: &SignedDecision, der: &[u8]) -> bool {
    CertificateDer::from_pem_slice(&signed.steward_cert_pem).is_ok_and(|cert| cert.as_ref() == der)
}

/// Verifies `signed` at `site` against the federation's CA (PEM); returns
/// the decision it carries.
pub fn verify(signed: &SignedDecision, ca_pem: &[u8], site: &str) -> Result<SiteDecision, DecisionError> {
    let unreadable = |e: String| DecisionError::Certificate(e);
    let cert = CertificateDer::from_pem_slice(&signed.steward_cert_pem).map_err(|e| unreadable(e.to_string()))?;
    let ca = CertificateDer::from_pem_slice(ca_pem).map_err(|e| unreadable(e.to_string()))?;
    verify_chain(&cert, ca.into_owned()).map_err(|e| DecisionError::Chain(e.to_string()))?;
    let principal = principal_from_der(&cert).map_err(|e| unreadable(e.to_string()))?;
    if principal.role != Role::Steward || principal.site.as_deref() != Some(site) {
        return Err(DecisionError::NotSteward { name: principal.name, site: site.to_string() });
    }
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert).map_err(|e| unreadable(e.to_string()))?;
    let key = parsed.public_key().subject_public_key.data.as_ref();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key)
        .verify(signed.decision_json.as_bytes(), &signed.signature)
        .map_err(|_| DecisionError::Signature)?;
    let decision: SiteDecision =
        serde_json::from_str(&signed.decision_json).map_err(|e| DecisionError::Form(e.to_string()))?;
    if decision.canonical_json() != signed.decision_json {
        return Err(DecisionError::Form("not the canonical JSON of the decision it holds".to_string()));
    }
    if decision.site != site || decision.steward != principal.name {
        return Err(DecisionError::Mismatch {
            decision_site: decision.site,
            decision_steward: decision.steward,
            name: principal.name,
            site: site.to_string(),
        });
    }
    Ok(decision)
}

#[cfg(test)]
mod tests;
