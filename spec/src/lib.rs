//! What a scientist asks of the sites and what a site may answer: the job
//! spec, a site's policy as checks of it, the mechanisms a ledger charges
//! and the reasons a site gives. Plain data with serde and TOML; nothing
//! here knows the wire or the disk.
//!
//! # Brief overview
//! - [`application::ApplicationSpec`]: a data-use application (purpose,
//!   datasets and columns, model families, validity, jobs, ε per site) and
//!   the one check of a job against its terms; [`date`] its calendar days;
//!   [`decision`] a steward's approval (with a grant no wider than asked),
//!   rejection or revocation for one site.
//! - [`job::JobSpec`]: a validated job, parsed once from TOML; the coordinator
//!   and every site see the same canonical JSON of it and bind to its hash.
//! - [`evaluation`]: a held-out evaluation as the noised score × label
//!   histogram that leaves a site, and every metric derived from it.
//! - [`mechanism`]: what a ledger entry charged (DP-SGD, a size release,
//!   an evaluation, a clip count).
//! - [`policy`]: a site's policy as checks of a job, which the site and
//!   the coordinator's plan apply alike.
//! - [`reason`]: why a site refused or failed, as a code and the spec's
//!   column names only: the one form a site's reasons leave it in.
//! - [`config_file`]: errors of a TOML file, naming the file and the field.

pub mod application;
pub mod config_file;
pub mod date;
pub mod decision;
pub mod evaluation;
pub mod job;
pub mod mechanism;
pub mod policy;
pub mod reason;
