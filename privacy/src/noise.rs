//! Gaussian noise for differential privacy: the only place Meridian draws it.
//!
//! # Randomness
//!
//! A [`NoiseSource`] owns a ChaCha20 generator (a CSPRNG) seeded with 256
//! bits from the operating system ([`rand::rngs::SysRng`], i.e. `getrandom`).
//! The seed is never stored, logged or printed: [`NoiseSource`]'s `Debug`
//! shows no state. The only deterministic constructor,
//! [`NoiseSource::from_seed_for_tests`], says what it is for in its name.
//! Predictable noise gives no privacy at all.
//!
//! # Sampler
//!
//! Textbook floating-point samplers leak: Mironov (CCS 2012) showed that the
//! low-order bits of a floating-point Laplace sample reveal the unnoised
//! value, and Jin, McMurtry, Rubinstein and Ohrimenko ("Are We There Yet?
//! Timing and Floating-Point Attacks on Differential Privacy Systems",
//! IEEE S&P 2022) did the same for the Gaussian samplers of common DP
//! libraries: the set of doubles that `x + σ·Z` can produce, with `Z` from
//! Box–Muller or the polar method, is sparse and depends on `x`, so an
//! observed output can rule some inputs out.
//!
//! We follow Opacus' "secure mode" mitigation (after Holohan and Braghin,
//! "Secure Random Sampling in Differential Privacy", ESORICS 2021): every
//! sample is the sum of four independent standard normals divided by two,
//! which is again exactly N(0, 1) in distribution, while the rounding
//! pattern of the sum no longer follows the lattice of one Box–Muller
//! output, which is what the attacks exploit. Each normal comes from
//! Box–Muller in `f64` on 53-bit uniforms in (0, 1] (so `ln u` is finite),
//! using both the cosine and sine outputs. This is a mitigation, not a proof;
//! an exact discrete Gaussian would be the principled fix.
//!
//! # Performance
//!
//! Noise is drawn for every parameter at every DP-SGD step. The methods work
//! in place on caller buffers, draw random words straight from the
//! generator's block buffer and allocate nothing.

use rand::rngs::SysRng;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

#[cfg(test)]
mod tests;

/// Errors from drawing noise.
#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    /// The operating system could not provide a seed.
    #[error("cannot seed the noise generator from the operating system: {0}")]
    OsRng(#[source] rand::rngs::SysError),
    /// The standard deviation is negative, infinite or NaN.
    #[error("std_dev must be finite and >= 0, got {0}")]
    StdDev(f64),
}

/// A source of Gaussian noise backed by a ChaCha20 CSPRNG seeded from the
/// operating system. See the [module docs](self) for the sampler.
pub struct NoiseSource {
    rng: ChaCha20Rng,
}

impl std::fmt::Debug for NoiseSource {
    /// Shows no generator state: the state determines all future noise.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoiseSource { .. }")
    }
}

/// 2^-53, the spacing of the 53-bit uniforms.
const TWO_POW_MINUS_53: f64 = 1.0 / (1_u64 << 53) as f64;

impl NoiseSource {
    /// A noise source seeded with 256 bits from the operating system.
    pub fn new() -> Result<Self, NoiseError> {
        let rng = ChaCha20Rng::try_from_rng(&mut SysRng).map_err(NoiseError::OsRng)?;
        Ok(Self { rng })
    }

    /// A deterministic noise source, for tests only.
    ///
    /// Noise from a known seed protects nothing. Never use this outside
    /// tests; production code calls [`NoiseSource::new`].
    pub fn from_seed_for_tests(seed: u64) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }

    /// A uniform double in (0, 1]: one of 2^53 equally spaced values.
    #[inline]
    fn uniform_open_closed(&mut self) -> f64 {
        uniform_from_bits(self.rng.next_u64())
    }

    /// Two independent standard normals by Box–Muller.
    #[inline]
    fn box_muller_pair(&mut self) -> (f64, f64) {
        let u1 = self.uniform_open_closed();
        let u2 = self.uniform_open_closed();
        let radius = (-2.0 * u1.ln()).sqrt();
        let (sin, cos) = (std::f64::consts::TAU * u2).sin_cos();
        (radius * cos, radius * sin)
    }

    /// One hardened standard normal: four Box–Muller normals summed and
    /// halved (Opacus' secure mode).
    #[inline]
    fn hardened_normal(&mut self) -> f64 {
        let (a, b) = self.box_muller_pair();
        let (c, d) = self.box_muller_pair();
        ((a + b) + (c + d)) * 0.5
    }

    /// A standard normal sample, N(0, 1).
    pub fn standard_normal(&mut self) -> f64 {
        self.hardened_normal()
    }

    /// Overwrites `out` with independent N(0, `std_dev`²) samples.
    ///
    /// `std_dev == 0` fills zeros and draws nothing.
    pub fn fill_gaussian(&mut self, out: &mut [f64], std_dev: f64) -> Result<(), NoiseError> {
        check_std_dev(std_dev)?;
        if std_dev == 0.0 {
            out.fill(0.0);
            return Ok(());
        }
        for x in out.iter_mut() {
            *x = std_dev * self.hardened_normal();
        }
        Ok(())
    }

    /// Adds independent N(0, `std_dev`²) noise to each value.
    ///
    /// The noise is drawn and added in `f64`, then rounded to `f32` once.
    /// `std_dev == 0` leaves the values unchanged and draws nothing.
    pub fn add_gaussian_noise(
        &mut self,
        values: &mut [f32],
        std_dev: f64,
    ) -> Result<(), NoiseError> {
        check_std_dev(std_dev)?;
        if std_dev == 0.0 {
            return Ok(());
        }
        for v in values.iter_mut() {
            *v = (f64::from(*v) + std_dev * self.hardened_normal()) as f32;
        }
        Ok(())
    }
}

/// Maps 64 random bits to (0, 1]: the top 53 bits `k` give `(k + 1)·2^-53`,
/// so 0 is excluded (ln 0 would be −∞) and 1 is included.
#[inline]
fn uniform_from_bits(bits: u64) -> f64 {
    ((bits >> 11) + 1) as f64 * TWO_POW_MINUS_53
}

fn check_std_dev(std_dev: f64) -> Result<(), NoiseError> {
    if std_dev.is_finite() && std_dev >= 0.0 {
        Ok(())
    } else {
        Err(NoiseError::StdDev(std_dev))
    }
}
