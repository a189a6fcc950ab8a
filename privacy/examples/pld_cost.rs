//! Measures what the PLD accountant costs per ε against the RDP accountant,
//! on the DP-SGD runs the fixture records, to back the claim that PLD
//! accounting is cheap enough to report on every round (dp_accounting's
//! `PLDAccountant` is far slower on these; `docs/perf-log.md`).
//!
//! Run with `cargo run --release -p meridian-privacy --example pld_cost`.

use std::time::Instant;

/// (name, sample rate, noise multiplier, steps), all at δ = 1e-5.
const RUNS: [(&str, f64, f64, u64); 4] = [
    ("q=0.01 sigma=1 T=10000", 0.01, 1.0, 10_000),
    ("Abadi 2016: q=0.01 sigma=4 T=10000", 0.01, 4.0, 10_000),
    ("MNIST b256: sigma=1.1 T=14062", 256.0 / 60_000.0, 1.1, 14_062),
    ("MNIST b256: sigma=0.6 T=7031", 256.0 / 60_000.0, 0.6, 7_031),
];

/// Repetitions per run; the median is reported.
const REPETITIONS: usize = 15;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for (name, q, sigma, steps) in RUNS {
        let mut pld_ms = Vec::with_capacity(REPETITIONS);
        let mut pld = 0.0;
        for _ in 0..REPETITIONS {
            let start = Instant::now();
            pld = meridian_privacy::dpsgd_epsilon_pld(q, sigma, steps, 1e-5)?;
            pld_ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        pld_ms.sort_by(f64::total_cmp);
        let start = Instant::now();
        let rdp = meridian_privacy::dpsgd_epsilon(q, sigma, steps, 1e-5)?.epsilon;
        let rdp_ms = start.elapsed().as_secs_f64() * 1e3;
        println!(
            "{name}: PLD ε {pld:.6} in {:.1} ms (median; min {:.1}), RDP ε {rdp:.6} in {rdp_ms:.1} ms",
            pld_ms[REPETITIONS / 2],
            pld_ms[0],
        );
    }
    Ok(())
}
