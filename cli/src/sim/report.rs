//! What a `meridian sim` run measured, and how it is printed: a few lines
//! for a person, or one JSON object for `BENCHMARKS.md`'s tables.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;

use super::site::Observed;
use crate::out;

/// The coordinator's resident memory in bytes, and its peak, from `/proc`.
pub(super) fn rss(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// The coordinator's resident memory, in bytes: with no site connected,
/// with every site connected, and its peak over the job.
pub(super) struct Memory {
    pub(super) idle: u64,
    pub(super) connected: u64,
    pub(super) peak: u64,
}

/// How long each phase took.
pub(super) struct Timings {
    /// Provisioning every certificate.
    pub(super) provisioned: Duration,
    /// From the first site connecting to the last one registered.
    pub(super) connected: Duration,
    /// From submission to round 1's end.
    pub(super) first_round: Duration,
    /// The median round, in seconds.
    pub(super) median_round_secs: f64,
    /// From submission to the job's completion.
    pub(super) job: Duration,
}

/// Everything a run measured.
pub(super) struct Report<'a> {
    pub(super) sites: usize,
    pub(super) rounds: u32,
    pub(super) num_params: u64,
    pub(super) url: String,
    pub(super) timings: Timings,
    pub(super) memory: Memory,
    pub(super) transfers: Transfers,
    /// The sites' errors once the job ended.
    pub(super) errors: Vec<String>,
    pub(super) observed: &'a Observed,
}

/// Bytes moved each way, and the rates of the transfers.
pub(super) struct Transfers {
    pulled: u64,
    pushed: u64,
    /// Bytes per second of transfer time, summed over sites.
    pull_rate: f64,
    push_rate: f64,
    /// Each transfer's rate in GB/s.
    pull_rates: Vec<f64>,
    push_rates: Vec<f64>,
}

impl Transfers {
    /// What the sites have moved so far.
    pub(super) fn of(observed: &Observed) -> Transfers {
        let pulled = observed.pulled_bytes.load(Ordering::Relaxed);
        let pushed = observed.pushed_bytes.load(Ordering::Relaxed);
        let rate = |bytes: u64, micros: &AtomicU64| bytes as f64 / (micros.load(Ordering::Relaxed).max(1) as f64 / 1e6);
        Transfers {
            pulled,
            pushed,
            pull_rate: rate(pulled, &observed.pull_micros),
            push_rate: rate(pushed, &observed.push_micros),
            pull_rates: observed.pull_rates.lock().map(|r| r.clone()).unwrap_or_default(),
            push_rates: observed.push_rates.lock().map(|r| r.clone()).unwrap_or_default(),
        }
    }
}

impl Report<'_> {
    /// Prints the report: one JSON object, or lines for a person.
    pub(super) fn print(&self, json: bool) -> Result<()> {
        if json { self.print_json() } else { self.print_text() }
    }

    /// How much the coordinator's memory grew per 100 sites, in bytes.
    fn growth_per_100(&self) -> f64 {
        (self.memory.peak.saturating_sub(self.memory.idle)) as f64 / self.sites as f64 * 100.0
    }

    fn print_json(&self) -> Result<()> {
        let (time, memory, t, observed) = (&self.timings, &self.memory, &self.transfers, self.observed);
        out!(
            "{}",
            serde_json::json!({
                "sites": self.sites, "rounds": self.rounds, "params": self.num_params,
                "provision_s": time.provisioned.as_secs_f64(), "connect_s": time.connected.as_secs_f64(),
                "first_round_s": time.first_round.as_secs_f64(), "median_round_s": time.median_round_secs,
                "job_s": time.job.as_secs_f64(),
                "coordinator_rss_idle_mb": mb(memory.idle), "coordinator_rss_connected_mb": mb(memory.connected),
                "coordinator_rss_peak_mb": mb(memory.peak), "rss_growth_mb_per_100_sites": mb(self.growth_per_100() as u64),
                "pulled_mb": mb(t.pulled), "pushed_mb": mb(t.pushed),
                "pull_gb_per_s_per_transfer": t.pull_rate / 1e9, "push_gb_per_s_per_transfer": t.push_rate / 1e9,
                "pull_gb_per_s_each": t.pull_rates, "push_gb_per_s_each": t.push_rates,
                "model_mismatches": observed.model_mismatches.load(Ordering::Relaxed), "refused_updates": observed.refused.load(Ordering::Relaxed),
                "errors": self.errors,
            })
        )?;
        Ok(())
    }

    fn print_text(&self) -> Result<()> {
        let (time, memory) = (&self.timings, &self.memory);
        out!(
            "meridian sim: {} simulated hospitals, {} rounds, {} parameters, coordinator on {}",
            self.sites,
            self.rounds,
            self.num_params,
            self.url
        )?;
        out!(
            "  provisioned {} certificates in {:.2} s; all sites registered over mTLS in {:.2} s",
            self.sites + 2,
            time.provisioned.as_secs_f64(),
            time.connected.as_secs_f64()
        )?;
        out!(
            "  round 1 closed {:.3} s after submission; then {:.3} s per round (median); job complete in {:.2} s",
            time.first_round.as_secs_f64(),
            time.median_round_secs,
            time.job.as_secs_f64()
        )?;
        self.print_transfers()?;
        out!(
            "  coordinator RSS: {:.1} MB idle, {:.1} MB with the sites connected, {:.1} MB peak: {:.2} MB per 100 sites",
            mb(memory.idle),
            mb(memory.connected),
            mb(memory.peak),
            mb(self.growth_per_100() as u64)
        )?;
        if !self.errors.is_empty() {
            out!("  site errors: {:?}", self.errors)?;
        }
        Ok(())
    }

    /// The bytes moved; with one site, each transfer's rate too.
    fn print_transfers(&self) -> Result<()> {
        let t = &self.transfers;
        if self.sites != 1 {
            out!("  moved {:.1} MB of models to sites and {:.1} MB of updates back", mb(t.pulled), mb(t.pushed))?;
            return Ok(());
        }
        out!(
            "  moved {:.1} MB of models to the site at {:.2} GB/s and {:.1} MB of updates back at {:.2} GB/s (acknowledged once durable on the coordinator's disk)",
            mb(t.pulled),
            t.pull_rate / 1e9,
            mb(t.pushed),
            t.push_rate / 1e9
        )?;
        let list = |rates: &[f64]| rates.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", ");
        out!("  each pull, GB/s: {}; each push: {}", list(&t.pull_rates), list(&t.push_rates))?;
        Ok(())
    }
}
