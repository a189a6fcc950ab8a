//! Checks the real FFT and the convolutions against direct evaluation.

use super::*;

/// The DFT by its definition, O(n²).
fn naive_dft(input: &[f64]) -> Vec<Complex> {
    let n = input.len();
    (0..=n / 2)
        .map(|k| {
            let mut sum = Complex::ZERO;
            for (j, &x) in input.iter().enumerate() {
                let angle = -2.0 * std::f64::consts::PI * ((j * k) % n) as f64 / n as f64;
                sum = sum.add(Complex { re: x * angle.cos(), im: x * angle.sin() });
            }
            sum
        })
        .collect()
}

fn naive_convolve(a: &[f64], b: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; a.len() + b.len() - 1];
    for (i, &x) in a.iter().enumerate() {
        for (j, &y) in b.iter().enumerate() {
            out[i + j] += x * y;
        }
    }
    out
}

/// A deterministic pseudo-random sequence in [0, 1).
fn sequence(len: usize, seed: u64) -> Vec<f64> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

/// A real sequence in the packed layout of [`RealFft`].
fn packed(fft: &RealFft, input: &[f64]) -> Vec<Complex> {
    let mut buffer = fft.buffer();
    fold_into(&mut buffer, input, 0);
    buffer
}

#[test]
fn forward_matches_the_definition() {
    for len in [2, 4, 8, 16, 64, 256, 1024] {
        let input = sequence(len, len as u64);
        let fft = RealFft::new(len);
        let mut got = packed(&fft, &input);
        fft.forward(&mut got);
        let want = naive_dft(&input);
        assert_eq!(want.len(), len / 2 + 1);
        let tolerance = 1e-13 * len as f64;
        let close = |g: f64, w: f64| (g - w).abs() < tolerance;
        // Slot 0 holds the real X[0] and X[len/2].
        assert!(close(got[0].re, want[0].re) && close(got[0].im, want[len / 2].re));
        assert!(want[0].im.abs() < tolerance && want[len / 2].im.abs() < tolerance);
        for k in 1..len / 2 {
            let (g, w) = (got[k], want[k]);
            assert!(close(g.re, w.re) && close(g.im, w.im), "len {len}, k {k}: {g:?} vs {w:?}");
        }
    }
}

#[test]
fn inverse_undoes_forward() {
    for len in [2, 4, 8, 32, 1024] {
        let input = sequence(len, 7);
        let fft = RealFft::new(len);
        let mut buffer = packed(&fft, &input);
        fft.forward(&mut buffer);
        fft.inverse(&mut buffer);
        for (i, x) in input.iter().enumerate() {
            let y = sample(&buffer, i);
            assert!((x - y).abs() < 1e-14, "len {len}, {i}: {x} vs {y}");
        }
    }
}

#[test]
fn twiddles_are_exact_roots_of_unity() {
    for len in [2, 4, 8, 16, 1 << 12] {
        let fft = RealFft::new(len);
        for (k, w) in fft.twiddles.iter().enumerate() {
            let angle = -2.0 * std::f64::consts::PI * k as f64 / len as f64;
            assert!(
                (w.re - angle.cos()).abs() < 1e-15 && (w.im - angle.sin()).abs() < 1e-15,
                "len {len}, k {k}: {w:?}"
            );
        }
    }
}

#[test]
fn convolution_matches_the_definition() {
    let a = sequence(37, 1);
    let b = sequence(100, 2);
    let fft = RealFft::new(transform_len(a.len() + b.len() - 1).unwrap());
    let got = convolve(&fft, &a, &b);
    let want = naive_convolve(&a, &b);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-11, "{g} vs {w}");
    }
}

#[test]
fn self_convolution_window_matches_repeated_convolution() {
    let probs = [0.5, 0.3, 0.2];
    let mut want = vec![1.0];
    for _ in 0..5 {
        want = naive_convolve(&want, &probs);
    }
    // The full result has 11 entries; a window of 6 starting at 3 with a
    // cyclic length of 16 sees no aliasing.
    let fft = RealFft::new(16);
    let got = self_convolve_window(&fft, &probs, 5, 3, 6);
    for (g, w) in got.iter().zip(&want[3..9]) {
        assert!((g - w).abs() < 1e-15, "{g} vs {w}");
    }
    // An input longer than the transform is folded, not cut.
    let fft = RealFft::new(2);
    let got = self_convolve_window(&fft, &probs, 1, 0, 2);
    assert!((got[0] - 0.7).abs() < 1e-15 && (got[1] - 0.3).abs() < 1e-15);
}

#[test]
fn power_by_squaring_matches_repeated_multiplication() {
    let z = Complex { re: 0.6, im: -0.7 };
    let mut want = Complex::ONE;
    for exponent in 0..40_u64 {
        let got = z.powu(exponent);
        assert!(
            (got.re - want.re).abs() < 1e-13 && (got.im - want.im).abs() < 1e-13,
            "{exponent}: {got:?} vs {want:?}"
        );
        want = want.mul(z);
    }
}

#[test]
fn transform_lengths_are_powers_of_two() {
    assert_eq!(transform_len(0), Some(2));
    assert_eq!(transform_len(1), Some(2));
    assert_eq!(transform_len(3), Some(4));
    assert_eq!(transform_len(1024), Some(1024));
    assert_eq!(transform_len(usize::MAX), None);
}
