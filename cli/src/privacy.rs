//! `meridian privacy`: the accountants as calculators, so that a scientist
//! can cost a DP-SGD run, or find the noise a target ε needs, before
//! writing a job spec; nothing is charged and nothing is contacted.

use anyhow::{Result, bail};
use clap::Subcommand;
use meridian_privacy::accountant;

use crate::out;

/// Which accountant computes ε.
#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum AccountantKind {
    /// Rényi DP (Mironov et al.), dp_accounting's default orders and improved conversion.
    Rdp,
    /// Privacy loss distribution (dp_accounting's PLD, discretization 1e-4): tighter.
    Pld,
}

/// The privacy calculators.
#[derive(Subcommand)]
pub enum PrivacyCommand {
    /// ε of DP-SGD (Poisson-subsampled Gaussian) by the RDP accountant.
    Epsilon {
        /// Poisson sampling rate q.
        #[arg(long)]
        sample_rate: f64,
        /// Noise multiplier σ.
        #[arg(long)]
        noise: f64,
        /// Number of steps.
        #[arg(long)]
        steps: u64,
        /// δ.
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
        /// rdp (Rényi DP, dp_accounting's orders and conversion) or pld (privacy loss distribution, tighter).
        #[arg(long, value_enum, default_value = "rdp")]
        accountant: AccountantKind,
        /// Use the old conversion ε = rdp + ln(1/δ)/(α−1) on TF Privacy's orders (reproduces published tables; rdp only).
        #[arg(long)]
        legacy_conversion: bool,
        /// Print JSON with full precision.
        #[arg(long)]
        json: bool,
    },
    /// The smallest noise multiplier σ that meets a target ε.
    Noise {
        /// Target ε.
        #[arg(long)]
        target_epsilon: f64,
        /// Poisson sampling rate q.
        #[arg(long)]
        sample_rate: f64,
        /// Number of steps.
        #[arg(long)]
        steps: u64,
        /// δ.
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
        /// Print JSON with full precision.
        #[arg(long)]
        json: bool,
    },
}

/// A DP-SGD run to cost: `steps` steps at Poisson rate `sample_rate` with
/// noise multiplier `noise`, at `delta`.
struct DpSgdRun {
    sample_rate: f64,
    noise: f64,
    steps: u64,
    delta: f64,
}

/// Runs a privacy calculator.
pub fn run(command: PrivacyCommand) -> Result<()> {
    match command {
        PrivacyCommand::Epsilon { sample_rate, noise, steps, delta, accountant, legacy_conversion, json } => {
            let run = DpSgdRun { sample_rate, noise, steps, delta };
            match accountant {
                AccountantKind::Pld if legacy_conversion => {
                    bail!("--legacy-conversion applies to the rdp accountant only")
                }
                AccountantKind::Pld => epsilon_pld(&run, json),
                AccountantKind::Rdp => epsilon_rdp(&run, legacy_conversion, json),
            }
        }
        PrivacyCommand::Noise { target_epsilon, sample_rate, steps, delta, json } => {
            noise(target_epsilon, sample_rate, steps, delta, json)
        }
    }
}

/// `privacy epsilon --accountant pld`.
fn epsilon_pld(run: &DpSgdRun, json: bool) -> Result<()> {
    let DpSgdRun { sample_rate, noise, steps, delta } = *run;
    let epsilon = accountant::dpsgd_epsilon_pld(sample_rate, noise, steps, delta)?;
    if json {
        out!(
            "{}",
            serde_json::json!({
                "epsilon": epsilon, "delta": delta, "accountant": "pld", "discretization": 1e-4,
                "sample_rate": sample_rate, "noise_multiplier": noise, "steps": steps,
            })
        )?;
    } else {
        out!("ε = {epsilon:.6} at δ = {delta:e} (PLD, discretization 1e-4)")?;
    }
    Ok(())
}

/// `privacy epsilon --accountant rdp`, with the improved conversion or, if
/// `legacy`, TF Privacy's.
fn epsilon_rdp(run: &DpSgdRun, legacy: bool, json: bool) -> Result<()> {
    let DpSgdRun { sample_rate, noise, steps, delta } = *run;
    let mut acc = if legacy { accountant::RdpAccountant::legacy() } else { accountant::RdpAccountant::new() };
    acc.compose_poisson_gaussian(sample_rate, noise, steps)?;
    let e = if legacy { acc.epsilon_legacy(delta)? } else { acc.epsilon(delta)? };
    let conversion = if legacy { "legacy" } else { "improved" };
    if json {
        out!(
            "{}",
            serde_json::json!({
                "epsilon": e.epsilon, "delta": delta, "order": e.order, "accountant": "rdp", "conversion": conversion,
                "sample_rate": sample_rate, "noise_multiplier": noise, "steps": steps,
            })
        )?;
    } else {
        out!("ε = {:.6} at δ = {delta:e} (RDP, optimal order {}, {conversion} conversion)", e.epsilon, e.order)?;
    }
    Ok(())
}

/// `privacy noise`: the smallest σ that meets `target_epsilon`.
fn noise(target_epsilon: f64, sample_rate: f64, steps: u64, delta: f64, json: bool) -> Result<()> {
    let sigma = accountant::noise_multiplier_for_epsilon(target_epsilon, sample_rate, steps, delta)?;
    if json {
        out!(
            "{}",
            serde_json::json!({
                "noise_multiplier": sigma, "target_epsilon": target_epsilon, "delta": delta, "sample_rate": sample_rate, "steps": steps,
            })
        )?;
    } else {
        out!("σ = {sigma:.6} gives ε ≤ {target_epsilon} at δ = {delta:e} over {steps} steps at q = {sample_rate}")?;
    }
    Ok(())
}
