//! A steward's decision on a data-use application, as the site takes it.
//! The site is the authority: it believes neither the coordinator that
//! carries a decision nor the terms the coordinator says were approved. It
//! checks the steward's signature against the federation's CA and its own
//! site name, that the steward is one its policy honours
//! (`policy.stewards`), and that the decision is within the application's
//! terms, before it reserves anything.

use meridian_spec::application::ApplicationSpec;
use meridian_spec::decision::SiteDecision;
use meridian_wire::decision::{DecisionError, SignedDecision, verify};

#[cfg(test)]
mod tests;

/// Why the site does not take a decision.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecisionRefusal {
    /// The signature, the certificate or the binding to this site fails.
    #[error(transparent)]
    Signature(#[from] DecisionError),
    /// A real steward of this site, but not one its policy honours.
    #[error("{steward} is not a steward this site honours (policy.stewards)")]
    NotHonoured {
        /// The steward's certificate name.
        steward: String,
    },
    /// The decision does not fit the application it names.
    #[error("the decision is outside the application's terms: {}", .0.join("; "))]
    Terms(Vec<String>),
}

/// The decision `signed` carries, if this `site` (whose CA is `ca_pem`
/// and whose policy honours `honoured`) takes it on `application`.
pub fn accept_decision(
    signed: &SignedDecision,
    application: &ApplicationSpec,
    site: &str,
    ca_pem: &[u8],
    honoured: &[String],
) -> Result<SiteDecision, DecisionRefusal> {
    let decision = verify(signed, ca_pem, site)?;
    if !honoured.contains(&decision.steward) {
        return Err(DecisionRefusal::NotHonoured { steward: decision.steward });
    }
    decision.check_against(application).map_err(DecisionRefusal::Terms)?;
    Ok(decision)
}
