//! Convolution of probability mass functions by a real-input FFT, in pure
//! Rust.
//!
//! Composing a privacy loss distribution `T` times is a `T`-fold
//! convolution of its mass function with itself; in the Fourier domain it is
//! a pointwise `T`-th power, which is how dp_accounting's `self_convolve`
//! does it with NumPy. No FFT crate is a dependency of the workspace, and the
//! accountant needs only power-of-two lengths of real data, so this module
//! carries its own: an iterative complex transform doing two radix-2 stages
//! per pass over the data, and the usual packing of a real sequence of
//! length `N` into a complex one of length `N/2`, which halves the work. Both
//! directions work in place on that one buffer (the spectrum is stored
//! "packed": the real coefficients at 0 and `N/2` share slot 0), so a
//! composition allocates one buffer and one twiddle table.
//!
//! The transforms are exact up to rounding (each twiddle is computed
//! directly, not by recurrence), so masses come back with an absolute error
//! of a few multiples of 1e-16 times the total mass; callers clamp the
//! resulting tiny negative values.

#[cfg(test)]
mod tests;

/// A complex number; only what the transforms need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Complex {
    /// Real part.
    pub(super) re: f64,
    /// Imaginary part.
    pub(super) im: f64,
}

impl Complex {
    const ZERO: Self = Self { re: 0.0, im: 0.0 };
    const ONE: Self = Self { re: 1.0, im: 0.0 };

    fn add(self, other: Self) -> Self {
        Self { re: self.re + other.re, im: self.im + other.im }
    }

    fn sub(self, other: Self) -> Self {
        Self { re: self.re - other.re, im: self.im - other.im }
    }

    fn mul(self, other: Self) -> Self {
        Self { re: self.re * other.re - self.im * other.im, im: self.re * other.im + self.im * other.re }
    }

    fn conj(self) -> Self {
        Self { re: self.re, im: -self.im }
    }

    fn scale(self, factor: f64) -> Self {
        Self { re: self.re * factor, im: self.im * factor }
    }

    /// `self^exponent` by binary exponentiation: about `2·log2(exponent)`
    /// multiplications, with a relative error that grows like
    /// `exponent·1e-16`, as for the polar form, but without its logarithm,
    /// arctangent, exponential and sine per call.
    fn powu(self, mut exponent: u64) -> Self {
        let mut base = self;
        let mut result = Self::ONE;
        while exponent > 0 {
            if exponent & 1 == 1 {
                result = result.mul(base);
            }
            exponent >>= 1;
            if exponent > 0 {
                base = base.mul(base);
            }
        }
        result
    }
}

/// A real FFT plan for one power-of-two length `len >= 2`.
///
/// Buffers hold `len/2` complex numbers: a real sequence `x` as
/// `x[2j] + i·x[2j + 1]`, and its spectrum `X` (Hermitian, so only
/// `X[0..=len/2]` matters) as `(X[0], X[len/2])` in slot 0, both real, and
/// `X[k]` in slot `k` for `0 < k < len/2`.
pub(super) struct RealFft {
    /// The real length; the complex transform has length `len/2`.
    len: usize,
    /// `twiddles[k] = exp(−2πi·k/len)` for `k < len/2`; the butterflies of
    /// span `h` of the complex transform use every `len/(4h)`-th entry.
    twiddles: Vec<Complex>,
}

impl RealFft {
    /// A plan for real sequences of length `len`, a power of two >= 2.
    pub(super) fn new(len: usize) -> Self {
        debug_assert!(len >= 2 && len.is_power_of_two());
        let half = len / 2;
        let mut twiddles = vec![Complex::ZERO; half];
        let step = -2.0 * std::f64::consts::PI / len as f64;
        let quarter = half / 2;
        if quarter < 2 {
            for (k, w) in twiddles.iter_mut().enumerate() {
                let (sin, cos) = (step * k as f64).sin_cos();
                *w = Complex { re: cos, im: sin };
            }
        } else {
            // Angles −a, −(π/2 − a), −(π/2 + a) and −(π − a) for a <= π/4,
            // so that only an eighth of the sines and cosines are evaluated.
            for k in 0..=quarter / 2 {
                let (sin, cos) = (step * k as f64).sin_cos();
                twiddles[k] = Complex { re: cos, im: sin };
                twiddles[quarter - k] = Complex { re: -sin, im: -cos };
                twiddles[quarter + k] = Complex { re: sin, im: -cos };
                if k > 0 {
                    twiddles[half - k] = Complex { re: -cos, im: sin };
                }
            }
        }
        Self { len, twiddles }
    }

    /// The real length this plan transforms.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// A zeroed buffer for this plan.
    pub(super) fn buffer(&self) -> Vec<Complex> {
        vec![Complex::ZERO; self.len / 2]
    }

    /// Replaces a packed real sequence by its packed spectrum.
    pub(super) fn forward(&self, data: &mut [Complex]) {
        let half = self.len / 2;
        debug_assert_eq!(data.len(), half);
        self.complex_transform::<false>(data);
        // Z = E + i·O, with E and O the DFTs of the even and odd samples;
        // X[k] = E[k] + W^k·O[k] and X[half − k] = conj(E[k] − W^k·O[k]).
        let z0 = data[0];
        data[0] = Complex { re: z0.re + z0.im, im: z0.re - z0.im };
        for k in 1..half.div_ceil(2) {
            let z = data[k];
            let z_mirror = data[half - k].conj();
            let even = z.add(z_mirror).scale(0.5);
            let odd = z.sub(z_mirror).scale(0.5);
            // odd/i = −i·odd
            let odd = Complex { re: odd.im, im: -odd.re };
            let turned = self.twiddles[k].mul(odd);
            data[k] = even.add(turned);
            data[half - k] = even.sub(turned).conj();
        }
        if half >= 2 {
            data[half / 2] = data[half / 2].conj();
        }
    }

    /// Replaces a packed spectrum by its packed real sequence: the inverse
    /// of [`RealFft::forward`].
    pub(super) fn inverse(&self, data: &mut [Complex]) {
        let half = self.len / 2;
        debug_assert_eq!(data.len(), half);
        let x0 = data[0];
        data[0] = Complex { re: 0.5 * (x0.re + x0.im), im: 0.5 * (x0.re - x0.im) };
        for k in 1..half.div_ceil(2) {
            let x = data[k];
            let x_mirror = data[half - k].conj();
            let even = x.add(x_mirror).scale(0.5);
            let odd = x.sub(x_mirror).mul(self.twiddles[k].conj()).scale(0.5);
            // Z[k] = E + i·O and Z[half − k] = conj(E) + i·conj(O).
            data[k] = Complex { re: even.re - odd.im, im: even.im + odd.re };
            data[half - k] = Complex { re: even.re + odd.im, im: odd.re - even.im };
        }
        if half >= 2 {
            data[half / 2] = data[half / 2].conj();
        }
        self.complex_transform::<true>(data);
        let norm = 1.0 / half as f64;
        for z in data.iter_mut() {
            *z = z.scale(norm);
        }
    }

    /// In-place unnormalised complex DFT of length `len/2` (a power of two),
    /// or its conjugate (`INVERSE`), by decimation in time.
    fn complex_transform<const INVERSE: bool>(&self, data: &mut [Complex]) {
        let n = data.len();
        if n <= 1 {
            return;
        }
        // Bit-reversal permutation.
        let mut j = 0;
        for i in 1..n {
            let mut bit = n >> 1;
            while j & bit != 0 {
                j ^= bit;
                bit >>= 1;
            }
            j |= bit;
            if i < j {
                data.swap(i, j);
            }
        }
        let mut half = 1;
        if n.trailing_zeros() % 2 == 1 {
            // An odd number of stages: one plain radix-2 stage (w = 1) first.
            for pair in data.chunks_exact_mut(2) {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a.add(b);
                pair[1] = a.sub(b);
            }
            half = 2;
        }
        // Two radix-2 stages per pass over the data (radix 2²): spans `half`
        // and `2·half`, whose twiddle for the odd half is the even one's
        // times −i. The twiddle of span h at j is exp(−iπ·j/h).
        while half < n {
            let inner_stride = n / half;
            let outer_stride = n / (2 * half);
            for block in data.chunks_exact_mut(4 * half) {
                let (low, high) = block.split_at_mut(2 * half);
                let (x0, x1) = low.split_at_mut(half);
                let (x2, x3) = high.split_at_mut(half);
                for j in 0..half {
                    let w1 = self.twiddles[j * inner_stride];
                    let w2 = self.twiddles[j * outer_stride];
                    let (w1, w2) = if INVERSE { (w1.conj(), w2.conj()) } else { (w1, w2) };
                    let t1 = x1[j].mul(w1);
                    let t3 = x3[j].mul(w1);
                    let (b0, b1) = (x0[j].add(t1), x0[j].sub(t1));
                    let (b2, b3) = (x2[j].add(t3), x2[j].sub(t3));
                    let u2 = b2.mul(w2);
                    // w2·(∓i)·b3: the twiddle of the odd half.
                    let v = b3.mul(w2);
                    let u3 = if INVERSE { Complex { re: -v.im, im: v.re } } else { Complex { re: v.im, im: -v.re } };
                    x0[j] = b0.add(u2);
                    x2[j] = b0.sub(u2);
                    x1[j] = b1.add(u3);
                    x3[j] = b1.sub(u3);
                }
            }
            half *= 4;
        }
    }
}

/// The smallest power of two >= `len`, at least 2, or `None` on overflow.
pub(super) fn transform_len(len: usize) -> Option<usize> {
    len.max(2).checked_next_power_of_two()
}

/// Adds the real `values` into a packed buffer at positions `offset..`,
/// modulo the buffer's real length.
fn fold_into(buffer: &mut [Complex], values: &[f64], offset: usize) {
    let len = 2 * buffer.len();
    for (i, &v) in values.iter().enumerate() {
        let position = (offset + i) % len;
        let slot = &mut buffer[position / 2];
        if position.is_multiple_of(2) {
            slot.re += v;
        } else {
            slot.im += v;
        }
    }
}

/// The real sample at `position` of a packed buffer.
fn sample(buffer: &[Complex], position: usize) -> f64 {
    let slot = buffer[position / 2];
    if position.is_multiple_of(2) { slot.re } else { slot.im }
}

/// Entries `window_start .. window_start + window_len` of the `times`-fold
/// convolution of `probs` with itself (whose full length is
/// `times·(probs.len() − 1) + 1`), by one FFT of length `fft.len()`, a
/// pointwise power and one inverse FFT.
///
/// The transform is cyclic: mass outside the window folds into it modulo
/// `fft.len()`, so `fft.len() >= window_len` and the caller must bound the
/// mass outside the window (dp_accounting does the same, with Chernoff
/// bounds).
pub(super) fn self_convolve_window(
    fft: &RealFft,
    probs: &[f64],
    times: u64,
    window_start: u128,
    window_len: usize,
) -> Vec<f64> {
    let len = fft.len();
    debug_assert!(window_len <= len);
    let mut buffer = fft.buffer();
    fold_into(&mut buffer, probs, 0);
    fft.forward(&mut buffer);
    // |x|^times underflows to zero below this |x|² (e^−745 is the smallest
    // subnormal); for a spread-out distribution that is most frequencies.
    let underflow_sq = (-1490.0 / times as f64).exp();
    for x in &mut buffer[1..] {
        *x = if x.re * x.re + x.im * x.im < underflow_sq { Complex::ZERO } else { x.powu(times) };
    }
    // Slot 0 holds the real coefficients X[0] and X[len/2].
    let real_power = |x: f64| {
        if x * x < underflow_sq { 0.0 } else { Complex { re: x, im: 0.0 }.powu(times).re }
    };
    buffer[0] = Complex { re: real_power(buffer[0].re), im: real_power(buffer[0].im) };
    fft.inverse(&mut buffer);
    let start = (window_start % len as u128) as usize;
    (0..window_len).map(|i| sample(&buffer, (start + i) % len)).collect()
}

/// The full linear convolution of `a` and `b` (length `a.len() + b.len() −
/// 1`), both non-empty.
pub(super) fn convolve(fft: &RealFft, a: &[f64], b: &[f64]) -> Vec<f64> {
    let out_len = a.len() + b.len() - 1;
    debug_assert!(out_len <= fft.len());
    let mut buffer_a = fft.buffer();
    fold_into(&mut buffer_a, a, 0);
    fft.forward(&mut buffer_a);
    let mut buffer_b = fft.buffer();
    fold_into(&mut buffer_b, b, 0);
    fft.forward(&mut buffer_b);
    let (a0, b0) = (buffer_a[0], buffer_b[0]);
    for (x, &y) in buffer_a.iter_mut().zip(&buffer_b).skip(1) {
        *x = x.mul(y);
    }
    buffer_a[0] = Complex { re: a0.re * b0.re, im: a0.im * b0.im };
    fft.inverse(&mut buffer_a);
    (0..out_len).map(|i| sample(&buffer_a, i)).collect()
}
