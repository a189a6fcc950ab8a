//! Gaussian noise for differential privacy: the only place Meridian draws it.
//!
//! # Randomness
//!
//! A [`NoiseSource`] reads an AES-256 counter-mode keystream (a CSPRNG; see
//! `noise/keystream.rs`) under a 256-bit key from the operating system
//! (`getrandom`). AES-CTR is the core of NIST's `CTR_DRBG`; it is taken
//! from `ring`'s AES-GCM, already in the build for TLS, which runs on the
//! CPU's AES instructions. It replaced ChaCha12, which had replaced
//! ChaCha20, each time because noise was the largest cost of a DP-SGD step. The key is never stored, logged or printed:
//! [`NoiseSource`]'s `Debug` shows no state. The only deterministic
//! constructor, [`NoiseSource::from_seed_for_tests`], says what it is for in
//! its name. Predictable noise gives no privacy at all.
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
//! pattern of the sum no longer follows the lattice of one base sample,
//! which is what the attacks exploit. Each base normal comes from the
//! Ziggurat method (Doornik's ZIGNOR, exact in distribution up to the
//! resolution of its uniforms) in `f64`: `rand_distr`'s `StandardNormal`,
//! copied in `noise/ziggurat.rs` so that its common case inlines, and tested to
//! return the very same samples from the same bits. Ziggurat replaced
//! Box–Muller here because it needs no logarithm, square root or sine for
//! 98.8 % of draws. This is a mitigation, not a proof; an exact discrete
//! Gaussian would be the principled fix.
//!
//! Each change of keystream and of sampler above made a noised value (four
//! normals, 32 bytes of keystream) cheaper to draw; the figures are in `docs/perf-log.md`,
//! "Figures moved from rustdoc".
//!
//! # Performance
//!
//! Noise is drawn for every parameter at every DP-SGD step. The methods work
//! in place on caller buffers and allocate nothing. [`PrefetchedNoise`]
//! draws the next step's noise on a second thread while the current step
//! computes its gradients, so on a machine with a spare core the noise costs
//! the training loop one multiply-add per parameter.

use std::sync::mpsc;

use keystream::Keystream;

mod keystream;
#[cfg(test)]
mod tests;
mod ziggurat;

/// Errors from drawing noise.
#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    /// The operating system could not provide a seed.
    #[error("cannot seed the noise generator from the operating system: {0}")]
    OsRng(#[source] rand::rngs::SysError),
    /// The standard deviation is negative, infinite or NaN.
    #[error("std_dev must be finite and >= 0, got {0}")]
    StdDev(f64),
    /// A [`PrefetchedNoise`] was given a vector of another length.
    #[error("noise prefetched for {expected} values, asked for {got}")]
    Length {
        /// The length it draws for.
        expected: usize,
        /// The length asked for.
        got: usize,
    },
    /// The noise thread is gone (it panicked).
    #[error("the noise thread stopped")]
    Stopped,
    /// The noise thread could not be started.
    #[error("cannot start the noise thread: {0}")]
    Thread(String),
}

/// A source of Gaussian noise backed by an AES-256-CTR keystream keyed from
/// the operating system. See the [module docs](self) for the sampler.
pub struct NoiseSource {
    stream: Keystream,
}

impl std::fmt::Debug for NoiseSource {
    /// Shows no generator state: the state determines all future noise.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoiseSource { .. }")
    }
}

impl NoiseSource {
    /// A noise source keyed with 256 bits from the operating system.
    pub fn new() -> Result<Self, NoiseError> {
        Ok(Self { stream: Keystream::from_os()? })
    }

    /// A deterministic noise source, for tests only.
    ///
    /// Noise from a known seed protects nothing. Never use this outside
    /// tests; production code calls [`NoiseSource::new`].
    pub fn from_seed_for_tests(seed: u64) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        Self { stream: Keystream::with_key(&key) }
    }

    /// One hardened standard normal: four Ziggurat normals summed and
    /// halved (Opacus' secure mode).
    #[inline]
    fn hardened_normal(&mut self) -> f64 {
        let a = ziggurat::standard_normal(&mut self.stream);
        let b = ziggurat::standard_normal(&mut self.stream);
        let c = ziggurat::standard_normal(&mut self.stream);
        let d = ziggurat::standard_normal(&mut self.stream);
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
    pub fn add_gaussian_noise(&mut self, values: &mut [f32], std_dev: f64) -> Result<(), NoiseError> {
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

fn check_std_dev(std_dev: f64) -> Result<(), NoiseError> {
    if std_dev.is_finite() && std_dev >= 0.0 { Ok(()) } else { Err(NoiseError::StdDev(std_dev)) }
}

/// Standard normals for the next DP-SGD steps, drawn ahead on threads of
/// their own, each with a [`NoiseSource`] of its own (keyed from the OS).
///
/// The vector is cut into one contiguous part per thread. Each step takes
/// one buffer per part, scales and adds it, and hands the buffers back to
/// be refilled while the next step computes. Every buffer is used exactly
/// once and in order, so the noise is the same i.i.d. Gaussian a
/// [`NoiseSource`] gives, only drawn earlier and in parallel.
pub struct PrefetchedNoise {
    len: usize,
    parts: Vec<Part>,
}

/// One thread's share of the vector and its buffers.
struct Part {
    range: std::ops::Range<usize>,
    ready: mpsc::Receiver<Vec<f64>>,
    recycle: mpsc::Sender<Vec<f64>>,
}

impl std::fmt::Debug for PrefetchedNoise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefetchedNoise")
            .field("len", &self.len)
            .field("threads", &self.parts.len())
            .finish_non_exhaustive()
    }
}

/// Buffers in flight per part: one being used, one being filled.
const PREFETCH_DEPTH: usize = 2;

/// Below this many values one thread draws everything: splitting costs more
/// than it saves. This many values take about as long to draw as a whole
/// MLP-A step, and MLP-A's DP step, with fewer parameters, was slower on two
/// noise threads than on one (`docs/perf-log.md`).
const SPLIT_ABOVE: usize = 16_384;

/// Fewest cores for a second noise thread. The step's own kernels take one
/// thread per core, so on two cores a second noise thread only preempts
/// them: there MLP-B's DP step was costlier with two noise threads than
/// with one, and the CNN's the same or better with one (`docs/perf-log.md`).
const SPLIT_FROM_CORES: usize = 4;

/// Noise threads for `len` values per step on a machine of `cores` cores.
fn noise_threads(cores: usize, len: usize) -> usize {
    if cores >= SPLIT_FROM_CORES && len > SPLIT_ABOVE { 2 } else { 1 }
}

impl PrefetchedNoise {
    /// Starts drawing `len` standard normals per step: on two threads when
    /// the machine has `SPLIT_FROM_CORES` cores or more and the vector is
    /// large enough to split, else on one.
    pub fn new(len: usize) -> Result<Self, NoiseError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = noise_threads(cores, len);
        let sources = (0..threads).map(|_| NoiseSource::new()).collect::<Result<Vec<_>, _>>()?;
        Self::start(sources, len)
    }

    /// A deterministic prefetcher on `threads` threads, for tests only:
    /// thread `i` draws from `NoiseSource::from_seed_for_tests(seed + i)`.
    pub fn from_seed_for_tests(seed: u64, len: usize, threads: usize) -> Result<Self, NoiseError> {
        let sources = (0..threads.max(1) as u64).map(|i| NoiseSource::from_seed_for_tests(seed + i)).collect();
        Self::start(sources, len)
    }

    fn start(sources: Vec<NoiseSource>, len: usize) -> Result<Self, NoiseError> {
        let per_part = len.div_ceil(sources.len()).max(1);
        let mut parts = Vec::with_capacity(sources.len());
        for (i, mut source) in sources.into_iter().enumerate() {
            let range = (i * per_part).min(len)..((i + 1) * per_part).min(len);
            let (ready_tx, ready) = mpsc::sync_channel::<Vec<f64>>(PREFETCH_DEPTH);
            let (recycle, recycle_rx) = mpsc::channel::<Vec<f64>>();
            for _ in 0..PREFETCH_DEPTH {
                // Cannot fail: the receiver is alive.
                let _ = recycle.send(vec![0.0; range.len()]);
            }
            std::thread::Builder::new()
                .name(format!("dp-noise-{i}"))
                .spawn(move || {
                    // Ends when the PrefetchedNoise is dropped (both channels close).
                    while let Ok(mut buffer) = recycle_rx.recv() {
                        for z in buffer.iter_mut() {
                            *z = source.hardened_normal();
                        }
                        if ready_tx.send(buffer).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| NoiseError::Thread(e.to_string()))?;
            parts.push(Part { range, ready, recycle });
        }
        Ok(PrefetchedNoise { len, parts })
    }

    /// Adds independent N(0, `std_dev`²) noise to `values` (exactly the
    /// length given at construction), drawn in `f64` and rounded to `f32`
    /// once, as [`NoiseSource::add_gaussian_noise`] does.
    pub fn add_gaussian_noise(&mut self, values: &mut [f32], std_dev: f64) -> Result<(), NoiseError> {
        check_std_dev(std_dev)?;
        if values.len() != self.len {
            return Err(NoiseError::Length { expected: self.len, got: values.len() });
        }
        for part in &self.parts {
            let buffer = part.ready.recv().map_err(|_| NoiseError::Stopped)?;
            for (v, z) in values[part.range.clone()].iter_mut().zip(&buffer) {
                *v = (f64::from(*v) + std_dev * z) as f32;
            }
            // Refill it for a later step; the thread only stops once we are dropped.
            let _ = part.recycle.send(buffer);
        }
        Ok(())
    }
}
