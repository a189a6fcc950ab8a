//! The synthetic data every benchmark trains on, defined bit for bit so that
//! the Python reference (Opacus) generates the same rows.
//!
//! Row `i`, feature `j` of a `D`-feature dataset is `2·u(seed, i·D + j) − 1`,
//! with `u` the [`splitmix64`] output's top 24 bits scaled to `[0, 1)`; the
//! label is 1 when the first five features sum to more than 0.

/// SplitMix64's `i`-th output (0-based) from state `seed`: `z = seed +
/// (i+1)·0x9E3779B97F4A7C15`, then the two xor-shift-multiply rounds and a
/// final xor-shift, all wrapping mod 2⁶⁴.
pub fn splitmix64(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `u(seed, i)`: the top 24 bits of [`splitmix64`] as a multiple of 2⁻²⁴
/// in `[0, 1)` (exact in `f32`).
pub fn uniform(seed: u64, i: u64) -> f32 {
    // A 24-bit integer converts to f32 exactly.
    (splitmix64(seed, i) >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// Features that decide the label: the first five.
pub const LABEL_FEATURES: usize = 5;

/// A generated dataset, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Features per row.
    pub dim: usize,
    /// `rows() · dim` values in `[-1, 1)`.
    pub x: Vec<f32>,
    /// One label per row, 0 or 1.
    pub y: Vec<u8>,
}

impl Dataset {
    /// `n` rows of `dim` features from `seed`.
    ///
    /// # Panics
    /// When `dim < LABEL_FEATURES`: the label rule needs five features.
    pub fn generate(seed: u64, n: usize, dim: usize) -> Dataset {
        assert!(dim >= LABEL_FEATURES, "the label needs {LABEL_FEATURES} features, got {dim}");
        let x: Vec<f32> = (0..(n * dim) as u64).map(|k| 2.0 * uniform(seed, k) - 1.0).collect();
        let y = x.chunks_exact(dim).map(label).collect();
        Dataset { dim, x, y }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.y.len()
    }

    /// Features of row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.dim..(i + 1) * self.dim]
    }
}

/// 1 when the first [`LABEL_FEATURES`] features sum to more than 0. Summed
/// in `f64`, where the sum of five multiples of 2⁻²³ below 1 is exact, so
/// the label does not depend on summation order.
pub fn label(row: &[f32]) -> u8 {
    let sum: f64 = row[..LABEL_FEATURES].iter().map(|&v| f64::from(v)).sum();
    u8::from(sum > 0.0)
}

#[cfg(test)]
mod tests;
