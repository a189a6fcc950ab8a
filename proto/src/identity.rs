//! How a certificate names its holder: the subject's common name (CN) is the
//! site or user name and its organizational unit (OU) is the [`Role`].
//!
//! Provisioning writes these fields and the coordinator reads them back on
//! every call, so both sides share this one definition.

use std::fmt;
use std::str::FromStr;

/// What the holder of a certificate may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A hospital's worker daemon: may call the worker service only.
    Hospital,
    /// A data scientist: submits, watches and cancels jobs, pulls models, reads budgets.
    Scientist,
    /// A privacy reviewer: reads jobs, budgets and ledgers; submits nothing.
    Reviewer,
    /// An administrator: everything a scientist and a reviewer may do.
    Admin,
    /// The coordinator's own server certificate; it calls no RPC.
    Coordinator,
}

impl Role {
    /// Every role, in a fixed order (for help texts and matrix tests).
    pub const ALL: [Role; 5] = [
        Role::Hospital,
        Role::Scientist,
        Role::Reviewer,
        Role::Admin,
        Role::Coordinator,
    ];

    /// The string stored in the certificate's OU.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Hospital => "hospital",
            Role::Scientist => "scientist",
            Role::Reviewer => "reviewer",
            Role::Admin => "admin",
            Role::Coordinator => "coordinator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of [`Role::ALL`].
#[derive(Debug, thiserror::Error)]
#[error("unknown role \"{0}\" (expected hospital, scientist, reviewer, admin or coordinator)")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_string()))
    }
}

/// Checks a site or user name: 1–64 characters of `[A-Za-z0-9._-]`, so it is
/// safe as a file name, a certificate CN and a SQL key alike.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("name \"{name}\" must have 1 to 64 characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "name \"{name}\" contains '{c}'; use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}
