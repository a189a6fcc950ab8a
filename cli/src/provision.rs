//! `meridian provision`: a federation's certificates.
//!
//! One CA signs everything. The coordinator's certificate names
//! `meridian-coordinator` (what clients verify) plus the given hosts; each
//! site and user certificate carries its name as CN and its role as OU,
//! which is all the coordinator needs to authorize a call. Each identity is
//! written as a directory with `ca.pem`, `cert.pem` and `key.pem`; private
//! keys are created with mode 0600 and never overwritten.
//!
//! The command's flags and its handler come first; the certificate work
//! they call, which the demo and the sim share, follows.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use meridian_wire::identity::{COORDINATOR_SERVER_NAME, Role, site_uri, validate_name};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

use crate::out;

/// `meridian provision` without a subcommand: a new federation.
#[derive(Args)]
pub struct ProvisionArgs {
    /// Directory to create the federation in.
    #[arg(long, default_value = "federation")]
    out: PathBuf,
    /// A hospital site name (repeat for each site).
    #[arg(long = "site")]
    sites: Vec<String>,
    /// A user as NAME:ROLE with ROLE scientist, reviewer or admin, or a
    /// hospital's data steward as NAME:steward@SITE (repeat).
    #[arg(long = "user")]
    users: Vec<String>,
    /// Extra DNS name or IP address of the coordinator (repeat).
    #[arg(long = "coordinator-host")]
    coordinator_hosts: Vec<String>,
    /// Validity of each certificate in days.
    #[arg(long, default_value_t = 365)]
    valid_days: u32,
}

/// The provision subcommands: one identity more, or one renewed.
#[derive(Subcommand)]
pub enum ProvisionCommand {
    /// Sign a certificate for one more hospital with the existing CA; no other certificate changes.
    AddSite {
        /// Site name.
        name: String,
        /// The federation directory (holding ca/ca.pem and ca/ca.key).
        #[arg(long, default_value = "federation")]
        federation: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        valid_days: u32,
    },
    /// Sign a certificate for one more user with a role, with the existing CA.
    AddUser {
        /// User name.
        name: String,
        /// scientist, reviewer, admin or steward.
        #[arg(long)]
        role: String,
        /// For a steward: the one site it decides for (one of the federation's sites).
        #[arg(long)]
        site: Option<String>,
        /// The federation directory.
        #[arg(long, default_value = "federation")]
        federation: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        valid_days: u32,
    },
    /// Replace an identity's key and certificate (before it expires); the coordinator needs no restart.
    Renew {
        /// Site or user name (or "coordinator").
        name: String,
        /// The federation directory.
        #[arg(long, default_value = "federation")]
        federation: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        valid_days: u32,
    },
}

/// Runs `meridian provision`: a subcommand if given, else a new federation.
pub fn run(command: Option<ProvisionCommand>, args: ProvisionArgs) -> Result<()> {
    match command {
        Some(command) => add_identity(command),
        None => create_federation(args),
    }
}

/// `meridian provision --site … --user …`: the CA and every identity.
fn create_federation(args: ProvisionArgs) -> Result<()> {
    let (mut users, mut stewards) = (Vec::new(), Vec::new());
    for u in &args.users {
        let (name, role) = u.split_once(':').with_context(|| format!("--user \"{u}\": expected NAME:ROLE"))?;
        if let Some(site) = role.strip_prefix("steward@") {
            if !args.sites.iter().any(|s| s == site) {
                bail!("--user \"{u}\": {site} is not a --site of this federation");
            }
            stewards.push((name.to_string(), site.to_string()));
            continue;
        }
        let role: Role = role.parse().map_err(anyhow::Error::msg)?;
        match role {
            Role::Hospital | Role::Coordinator => {
                bail!("--user \"{u}\": users are scientist, reviewer, admin or steward@SITE; hospitals use --site")
            }
            Role::Steward => bail!("--user \"{u}\": a steward decides for one site: NAME:steward@SITE"),
            _ => users.push((name.to_string(), role)),
        }
    }
    let done = provision(&Plan {
        out: args.out.clone(),
        coordinator_hosts: args.coordinator_hosts,
        sites: args.sites,
        users,
        stewards,
        valid_days: args.valid_days,
    })?;
    out!("federation in {}", args.out.display())?;
    out!("  coordinator  {}", done.coordinator.display())?;
    for (n, p) in done.sites.iter().chain(&done.users) {
        out!("  {n:<12} {}", p.display())?;
    }
    Ok(())
}

/// `meridian provision add-site|add-user|renew`: one identity signed with
/// the existing CA.
fn add_identity(command: ProvisionCommand) -> Result<()> {
    let (name, role, site, federation, days, renew) = match command {
        ProvisionCommand::AddSite { name, federation, valid_days } => {
            (name, Role::Hospital, None, federation, valid_days, false)
        }
        ProvisionCommand::AddUser { name, role, site, federation, valid_days } => {
            let role: Role = role.parse().map_err(anyhow::Error::msg)?;
            let site = user_site(&federation, role, site)?;
            (name, role, site, federation, valid_days, false)
        }
        ProvisionCommand::Renew { name, federation, valid_days } => {
            let (role, site) = existing_role(&federation, &name)?;
            (name, role, site, federation, valid_days, true)
        }
    };
    let (dir, fingerprint) = add(&federation, &name, role, site.as_deref(), days, renew)?;
    let what = site.map_or_else(|| role.to_string(), |site| format!("{role} of {site}"));
    out!("{} {name} ({what}) in {}", if renew { "renewed" } else { "added" }, dir.display())?;
    out!("certificate sha256 {fingerprint}")?;
    Ok(())
}

/// The site `add-user` binds a user to: a steward's, which must be one of
/// the federation's sites; no other role takes one.
fn user_site(federation: &Path, role: Role, site: Option<String>) -> Result<Option<String>> {
    match (role, site) {
        (Role::Hospital | Role::Coordinator, _) => {
            bail!("--role {role}: users are scientist, reviewer, admin or steward; hospitals use add-site")
        }
        (Role::Steward, None) => bail!("--role steward: a steward decides for one site; name it with --site"),
        (Role::Steward, Some(site)) if validate_name(&site).is_err() => {
            bail!("--site {site}: not a site name (letters, digits, '.', '_' and '-')")
        }
        (Role::Steward, Some(site)) if !federation.join("sites").join(&site).join("cert.pem").exists() => {
            bail!("--site {site}: not a site of the federation in {}", federation.display())
        }
        (Role::Steward, Some(site)) => Ok(Some(site)),
        (_, Some(_)) => bail!("--site is for stewards only; a {role} is not bound to a site"),
        (_, None) => Ok(None),
    }
}

/// The role (and a steward's site) of an identity `federation` already
/// holds: the coordinator, a site, or a user (read from its certificate).
fn existing_role(federation: &Path, name: &str) -> Result<(Role, Option<String>)> {
    if name == "coordinator" {
        return Ok((Role::Coordinator, None));
    }
    if federation.join("sites").join(name).exists() {
        return Ok((Role::Hospital, None));
    }
    let cert = std::fs::read(federation.join("users").join(name).join("cert.pem"))
        .with_context(|| format!("{name} is neither a site nor a user of {}", federation.display()))?;
    let principal = meridian_wire::identity::principal_from_pem(&cert)?;
    Ok((principal.role, principal.site))
}

/// What to provision.
pub struct Plan {
    /// Output directory (must not already hold a CA).
    pub out: PathBuf,
    /// Extra DNS names or IP addresses of the coordinator.
    pub coordinator_hosts: Vec<String>,
    /// Hospital sites.
    pub sites: Vec<String>,
    /// Users and their roles.
    pub users: Vec<(String, Role)>,
    /// Data stewards and the site each decides for.
    pub stewards: Vec<(String, String)>,
    /// Validity of every certificate in days.
    pub valid_days: u32,
}

/// Signs a certificate for `name` with `role` and writes the identity
/// directory `dir` (`ca.pem`, `cert.pem`, `key.pem` with mode 0600). With
/// `replace`, an existing identity is renewed in place (new key, new
/// certificate); otherwise existing files are never overwritten.
#[allow(clippy::too_many_arguments)]
fn issue(
    issuer: &Issuer<'_, KeyPair>,
    ca_pem: &str,
    dir: &Path,
    name: &str,
    role: Role,
    server_names: &[String],
    site: Option<&str>,
    valid_days: u32,
    replace: bool,
) -> Result<PathBuf> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.distinguished_name.push(DnType::OrganizationalUnitName, role.as_str());
    params.distinguished_name.push(DnType::OrganizationName, "Meridian federation");
    for host in server_names {
        params.subject_alt_names.push(match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.clone().try_into()?),
        });
    }
    if let Some(site) = site {
        params.subject_alt_names.push(SanType::URI(site_uri(site).try_into()?));
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = if server_names.is_empty() {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
    };
    validity(&mut params, valid_days);
    let cert = params.signed_by(&key, issuer).with_context(|| format!("signing the certificate of {name}"))?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if replace {
        replace_file(&dir.join("key.pem"), &key.serialize_pem(), true)?;
        replace_file(&dir.join("cert.pem"), &cert.pem(), false)?;
        replace_file(&dir.join("ca.pem"), ca_pem, false)?;
    } else {
        write_file(&dir.join("ca.pem"), ca_pem, false)?;
        write_file(&dir.join("cert.pem"), &cert.pem(), false)?;
        write_file(&dir.join("key.pem"), &key.serialize_pem(), true)?;
    }
    Ok(dir.to_path_buf())
}

/// Replaces `path` atomically (0600 when private).
fn replace_file(path: &Path, contents: &str, private: bool) -> Result<()> {
    let how = meridian_store::atomic::Replace { private, ..Default::default() };
    meridian_store::atomic::replace(path, contents.as_bytes(), how)
        .with_context(|| format!("cannot replace {}", path.display()))
}

/// Signs one more identity with an existing federation's CA, touching no
/// other certificate; with `renew`, replaces an existing identity's key and
/// certificate. Returns the identity directory and the certificate's
/// SHA-256 fingerprint (for revocation lists).
pub fn add(
    federation: &Path,
    name: &str,
    role: Role,
    site: Option<&str>,
    valid_days: u32,
    renew: bool,
) -> Result<(PathBuf, String)> {
    validate_name(name)?;
    let ca_dir = federation.join("ca");
    let ca_pem = fs::read_to_string(ca_dir.join("ca.pem"))
        .with_context(|| format!("cannot read {}", ca_dir.join("ca.pem").display()))?;
    let ca_key = fs::read_to_string(ca_dir.join("ca.key"))
        .with_context(|| format!("cannot read {}", ca_dir.join("ca.key").display()))?;
    let key = KeyPair::from_pem(&ca_key).context("the CA key does not parse")?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).context("the CA certificate does not parse")?;
    let dir = match role {
        Role::Hospital => federation.join("sites").join(name),
        Role::Coordinator => federation.join("coordinator"),
        _ => federation.join("users").join(name),
    };
    if dir.join("cert.pem").exists() && !renew {
        bail!("{} already has a certificate in {}; use renew to replace it", name, dir.display());
    }
    if !dir.join("cert.pem").exists() && renew {
        bail!("{} has no certificate in {} to renew", name, dir.display());
    }
    let server_names: Vec<String> = if role == Role::Coordinator {
        vec![COORDINATOR_SERVER_NAME.to_string(), "localhost".to_string(), "127.0.0.1".to_string()]
    } else {
        Vec::new()
    };
    let dir = issue(&issuer, &ca_pem, &dir, name, role, &server_names, site, valid_days, renew)?;
    let cert = fs::read(dir.join("cert.pem"))?;
    Ok((dir, fingerprint(&cert)?))
}

/// SHA-256 of a PEM certificate's DER, lowercase hex.
pub fn fingerprint(cert_pem: &[u8]) -> Result<String> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(cert_pem).map_err(|e| anyhow::anyhow!("unreadable certificate: {e}"))?;
    Ok(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&pem.contents)))
}

/// Where each identity directory was written.
pub struct Provisioned {
    /// The coordinator's identity.
    pub coordinator: PathBuf,
    /// Each site's identity, by name.
    pub sites: Vec<(String, PathBuf)>,
    /// Each user's identity, by name.
    pub users: Vec<(String, PathBuf)>,
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<()> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    if private {
        opts.mode(0o600);
    }
    let mut f = opts.open(path).with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// Creates the CA and every identity of `plan`.
pub fn provision(plan: &Plan) -> Result<Provisioned> {
    if plan.out.join("ca").join("ca.key").exists() {
        bail!("{} already holds a federation (ca/ca.key exists); choose an empty directory", plan.out.display());
    }
    let stewards = plan.stewards.iter().map(|(n, _)| n);
    for name in plan.sites.iter().chain(plan.users.iter().map(|(n, _)| n)).chain(stewards) {
        validate_name(name)?;
    }
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, "Meridian federation CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut ca_params, plan.valid_days.max(1) * 5);
    let ca_cert = ca_params.self_signed(&ca_key).context("self-signing the CA")?;
    let ca_dir = plan.out.join("ca");
    fs::create_dir_all(&ca_dir).with_context(|| format!("cannot create {}", ca_dir.display()))?;
    write_file(&ca_dir.join("ca.pem"), &ca_cert.pem(), false)?;
    write_file(&ca_dir.join("ca.key"), &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let ca_pem = ca_cert.pem();
    let issue = |dir: &Path, name: &str, role: Role, server_names: &[String], site: Option<&str>| {
        issue(&issuer, &ca_pem, dir, name, role, server_names, site, plan.valid_days, false)
    };

    let mut server_names = vec![COORDINATOR_SERVER_NAME.to_string(), "localhost".to_string(), "127.0.0.1".to_string()];
    server_names.extend(plan.coordinator_hosts.iter().cloned());
    let coordinator = issue(&plan.out.join("coordinator"), "coordinator", Role::Coordinator, &server_names, None)?;
    let mut sites = Vec::new();
    for s in &plan.sites {
        sites.push((s.clone(), issue(&plan.out.join("sites").join(s), s, Role::Hospital, &[], None)?));
    }
    let mut users = Vec::new();
    for (u, role) in &plan.users {
        users.push((u.clone(), issue(&plan.out.join("users").join(u), u, *role, &[], None)?));
    }
    for (u, site) in &plan.stewards {
        users.push((u.clone(), issue(&plan.out.join("users").join(u), u, Role::Steward, &[], Some(site))?));
    }
    Ok(Provisioned { coordinator, sites, users })
}
