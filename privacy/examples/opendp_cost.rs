//! Measures what OpenDP's exact discrete Gaussian costs per released value,
//! against the noise source DP-SGD uses, to justify why per-step gradient
//! noise does not go through OpenDP (see docs/privacy.md).
//!
//! Run with `cargo run --release -p meridian-privacy --example opendp_cost`.

use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n = 20_000;
    let start = Instant::now();
    let mut sink = 0u64;
    for i in 0..n {
        sink = sink.wrapping_add(meridian_privacy::release::release_count(1000 + i, 10.0)?.value);
    }
    let opendp = start.elapsed().as_secs_f64() / n as f64;
    let mut values = vec![0f32; 1_000_000];
    let mut noise = meridian_privacy::noise::NoiseSource::new()?;
    let start = Instant::now();
    noise.add_gaussian_noise(&mut values, 1.0)?;
    let ours = start.elapsed().as_secs_f64() / values.len() as f64;
    println!("opendp discrete gaussian: {:.2} µs per value", opendp * 1e6);
    println!("meridian secure gaussian:  {:.3} µs per value", ours * 1e6);
    println!(
        "a 79,170-parameter CNN step: opendp {:.0} ms, meridian {:.1} ms (checksum {sink})",
        opendp * 79_170.0 * 1e3,
        ours * 79_170.0 * 1e3
    );
    Ok(())
}
