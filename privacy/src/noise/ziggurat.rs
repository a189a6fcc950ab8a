//! Standard normals by the Ziggurat method: the same algorithm, tables and
//! use of random bits as `rand_distr::StandardNormal`, written out here so
//! that the common case inlines into the noise loop.
//!
//! `rand_distr`'s sampler (Doornik's ZIGNOR, 256 strips) is what Meridian
//! drew its noise from before; through its generic interface it cost about
//! 2.6 ns per normal, which made the Ziggurat, not the keystream, the
//! larger part of DP-SGD's noise. This copy keeps every decision of the
//! original and differs only in where the code sits: the accept test of
//! 98.8 % of draws is a few inlined instructions, and the wedge and tail
//! (the rest) stay out of line. The tests hold it to the original: driven
//! by the same generator, the two return identical samples and leave the
//! generator at the same position.

use std::sync::LazyLock;

use rand::{Rng, RngExt};
use rand_distr::Open01;

/// The rightmost strip's edge: where the tail begins.
const TAIL_START: f64 = 3.654_152_885_361_009;
/// The area of each strip and of the base (strip 0 with the tail).
const STRIP_AREA: f64 = 0.004_928_673_233_99;
/// Strips.
const STRIPS: usize = 256;

/// The unnormalised density, e^(−x²/2).
#[inline]
fn density(x: f64) -> f64 {
    (-x * x / 2.0).exp()
}

/// Strip edges `x` and the density at them, `f`; 257 entries, as
/// `rand_distr`'s `ziggurat_tables.py` computes them.
pub(super) struct Tables {
    x: [f64; STRIPS + 1],
    f: [f64; STRIPS + 1],
}

/// The tables, computed once per process.
pub(super) static TABLES: LazyLock<Tables> = LazyLock::new(Tables::compute);

impl Tables {
    fn compute() -> Tables {
        let inverse_density = |y: f64| (-2.0 * y.ln()).sqrt();
        let mut x = [0.0; STRIPS + 1];
        x[0] = STRIP_AREA / density(TAIL_START);
        x[1] = TAIL_START;
        for i in 2..STRIPS {
            x[i] = inverse_density(STRIP_AREA / x[i - 1] + density(x[i - 1]));
        }
        x[STRIPS] = 0.0;
        Tables {
            x,
            f: x.map(density),
        }
    }

    /// One N(0, 1) sample from `rng`.
    #[inline(always)]
    pub(super) fn standard_normal<R: Rng + ?Sized>(&self, rng: &mut R) -> f64 {
        let bits = rng.next_u64();
        let strip = (bits & 0xff) as usize;
        // The top 52 bits as a double in [2, 4), less 3: u in [−1, 1).
        let u = f64::from_bits((bits >> 12) | (1024 << 52)) - 3.0;
        let x = u * self.x[strip];
        if x.abs() < self.x[strip + 1] {
            return x;
        }
        self.wedge_or_tail(rng, strip, u, x)
    }

    /// The draws that fall outside the inner rectangles (1.2 %): accept in
    /// the wedge by the density, sample the tail (Marsaglia's method), or
    /// start again.
    #[cold]
    #[inline(never)]
    fn wedge_or_tail<R: Rng + ?Sized>(&self, rng: &mut R, strip: usize, u: f64, x: f64) -> f64 {
        if strip == 0 {
            let (mut tail_x, mut tail_y) = (1.0f64, 0.0f64);
            while -2.0 * tail_y < tail_x * tail_x {
                let a: f64 = rng.sample(Open01);
                let b: f64 = rng.sample(Open01);
                tail_x = a.ln() / TAIL_START;
                tail_y = b.ln();
            }
            return if u < 0.0 {
                tail_x - TAIL_START
            } else {
                TAIL_START - tail_x
            };
        }
        let height = self.f[strip + 1] + (self.f[strip] - self.f[strip + 1]) * rng.random::<f64>();
        if height < density(x) {
            return x;
        }
        self.standard_normal(rng)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha12Rng;
    use rand_distr::{Distribution, StandardNormal};

    use super::*;

    /// Entries of `rand_distr` 0.6's `ZIG_NORM_X` and `ZIG_NORM_F`, as printed
    /// there (the `f` table with 18 decimals, hence the tolerance below).
    #[allow(clippy::excessive_precision, reason = "copied digit for digit")]
    const X: [(usize, f64); 6] = [
        (0, 3.910757959537090045),
        (1, 3.654152885361008796),
        (2, 3.449278298560964462),
        (3, 3.320244733839166074),
        (255, 0.215241895913273806),
        (256, 0.0),
    ];
    #[allow(clippy::excessive_precision, reason = "copied digit for digit")]
    const F: [(usize, f64); 5] = [
        (0, 0.000477467764586655),
        (1, 0.001260285930498598),
        (3, 0.004037972593371872),
        (255, 0.977101701282731328),
        (256, 1.0),
    ];

    #[test]
    fn tables_are_rand_distrs() {
        let tables = &*TABLES;
        for (i, want) in X {
            assert_eq!(tables.x[i], want, "x[{i}]");
        }
        for (i, want) in F {
            assert!((tables.f[i] - want).abs() <= 1e-18, "f[{i}] {} vs {want}", tables.f[i]);
        }
    }

    /// The copy is the original: same samples, same bits consumed, over
    /// enough draws (2 M, about 24,000 of them outside the rectangles) to
    /// pass through the wedges and the tail many times.
    #[test]
    fn samples_are_rand_distrs_from_the_same_bits() {
        let mut ours = ChaCha12Rng::seed_from_u64(5);
        let mut theirs = ChaCha12Rng::seed_from_u64(5);
        let mut tails = 0;
        for draw in 0..2_000_000 {
            let a = TABLES.standard_normal(&mut ours);
            let b: f64 = StandardNormal.sample(&mut theirs);
            assert_eq!(a.to_bits(), b.to_bits(), "draw {draw}: {a} vs {b}");
            tails += usize::from(a.abs() > TAIL_START);
        }
        // 2·(1 − Φ(3.654)) · 2 M ≈ 520 draws from the tail.
        assert!(tails > 400, "{tails} tails");
        assert_eq!(ours.next_u64(), theirs.next_u64(), "same bits consumed");
    }
}
