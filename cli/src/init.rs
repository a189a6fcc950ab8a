//! `meridian init coordinator|worker|job|application`: writes a commented,
//! working configuration to start from, every key explained with its
//! default. The templates are the files in `examples/config/` and the
//! example application, which the tests load with the real parsers.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;

use crate::{out, output};

/// What to write a template of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Template {
    /// coordinator.toml, for `meridian coordinator`.
    Coordinator,
    /// worker.toml, for a hospital's `meridian worker`.
    Worker,
    /// job.toml, for `meridian job plan` and `meridian job submit`.
    Job,
    /// application.toml, a data-use application for `meridian application submit`.
    Application,
}

impl Template {
    fn text(self) -> &'static str {
        match self {
            Template::Coordinator => include_str!("../../examples/config/coordinator.toml"),
            Template::Worker => include_str!("../../examples/config/worker.toml"),
            Template::Job => include_str!("../../examples/config/job.toml"),
            Template::Application => include_str!("../../examples/applications/brfss.toml"),
        }
    }

    fn file_name(self) -> &'static str {
        match self {
            Template::Coordinator => "coordinator.toml",
            Template::Worker => "worker.toml",
            Template::Job => "job.toml",
            Template::Application => "application.toml",
        }
    }
}

/// Writes `template` to `out` (default: its usual name here; `-`: stdout),
/// never over an existing file unless `force`.
pub fn run(template: Template, out: Option<PathBuf>, force: bool) -> Result<()> {
    let path = out.unwrap_or_else(|| PathBuf::from(template.file_name()));
    if path == Path::new("-") {
        return Ok(output::block(template.text())?);
    }
    if path.exists() && !force {
        bail!("{} exists; choose another --out or pass --force to replace it", path.display());
    }
    std::fs::write(&path, template.text()).with_context(|| format!("cannot write {}", path.display()))?;
    out!(
        "wrote {}: edit the paths and names it marks, then check it ({})",
        path.display(),
        match template {
            Template::Coordinator => "meridian coordinator --config FILE",
            Template::Worker => "meridian worker --check --connect --config FILE",
            Template::Job => "meridian job plan FILE",
            Template::Application => "set its dates, then meridian application submit FILE",
        }
    )?;
    Ok(())
}
