//! Meridian's own `f32` CPU kernels for the layer stacks most models are
//! made of (linear, 2-D convolution, ReLU, 2×2 max pooling, flatten), used
//! instead of Burn whenever a [`crate::Network`] computes in `f32` on the
//! `flex` CPU device.
//!
//! # Why not Burn here
//! Profiled on the benchmark CNN, Burn's direct convolution and max pooling
//! took much of a plain training step (`docs/perf-log.md`), its probes add
//! a second pass over the patches for the per-example gradients, and the
//! workspace builds Burn single-threaded. These kernels compute the same
//! values (the tests compare them with Burn's kernels, with a one example at
//! a time oracle in `f64` and with PyTorch's reference values) with less
//! work:
//!
//! - **Convolution as GEMM.** Each example's input is unfolded into its
//!   patches `U` `[C_in·k·k, L]` (im2col, rows in PyTorch's weight order, each
//!   row a run of contiguous copies), so the forward pass is one matrix
//!   product `W U` `[C_out, L]`, the weight gradient `dZ Uᵀ`, and the input
//!   gradient `Wᵀ dZ` folded back (col2im). These products are small and
//!   made per example, so they go to [`gemm`], which reads its operands in
//!   place (AVX2/FMA, chosen at run time): packing them for
//!   `matrixmultiply` was a large share of the CNN's step. A linear layer's
//!   backward products (made per chunk) go there too; its forward product
//!   still goes to `ndarray`'s packed GEMM.
//! - **Per-example gradients for free.** Summed over the batch, a
//!   convolution's weight gradient is `Σᵢ dZᵢ Uᵢᵀ`; DP-SGD needs each term on
//!   its own, which is the same arithmetic kept apart. So the DP step does
//!   what the plain step does plus, per example, a squared norm and a
//!   weighted add of `C_out·C_in·k·k` values. A linear layer never builds its
//!   per-example gradients: their squared norms are `‖aᵢ‖²‖dzᵢ‖²` plus the
//!   bias's `‖dzᵢ‖²` ("ghost norm"), and the clipped sum is one product
//!   `(f ⊙ dZ)ᵀ A`.
//! - **Chunks of examples across cores.** An example's clip factor depends on
//!   that example alone, so the batch is cut into chunks (when it is big
//!   enough to pay for threads), one thread per core claims chunk after
//!   chunk, and each chunk runs forward, backward, clipping and its part of
//!   the clipped sum with no synchronisation; the parts are added in chunk
//!   order, so the result does not depend on which thread ran what.
//!
//! Layers it does not implement (LayerNorm, GroupNorm) leave the network on
//! Burn, whose probes handle every layer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use meridian_privacy::clip_factor;
use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, ShapeBuilder};

use crate::architecture::{Architecture, CLASSES, Layer};
use crate::network::norm_of_squared;

mod gemm;
#[cfg(feature = "kernels")]
pub mod kernels;

use gemm::{Strided, product, transpose};

/// Forward multiply-adds below which a batch is not split across threads:
/// a thread costs tens of microseconds to start.
const MACS_PER_THREAD: usize = 2_000_000;

/// Chunks a batch is cut into, whatever the number of cores, so that sums
/// (added in chunk order) do not depend on it; several per thread on the
/// small machines hospitals train on, so that a core that loses time to
/// another process (or to the noise prefetcher) takes fewer chunks instead
/// of holding up the step. Sixteen rather than eight keep a chunk of the
/// benchmark CNN's batch (four examples, their patches and per-example
/// gradients) within about a megabyte, and kept the DP step's throughput
/// steady where eight let it fall in half the runs; figures in
/// `docs/perf-log.md`. It also caps a batch at sixteen threads...
const CHUNKS_PER_BATCH: usize = 16;

/// ...but no chunk smaller than this many forward multiply-adds.
const MACS_PER_CHUNK: usize = 500_000;

/// Most threads one batch may use (the worker's `cpu_threads`); 0: one per
/// core.
static THREAD_LIMIT: AtomicUsize = AtomicUsize::new(0);

/// Caps the threads Meridian's CPU kernels use for one batch, for the whole
/// process (a site that shares its machine sets the worker's `cpu_threads`);
/// `None` lifts the cap. Results do not depend on it: a batch is cut the
/// same way whatever the number of threads.
pub fn limit_cpu_threads(limit: Option<std::num::NonZeroUsize>) {
    THREAD_LIMIT.store(limit.map_or(0, usize::from), Ordering::Relaxed);
}

/// The most a chunk may keep (activations, gradients flowing down and
/// per-example gradients), whatever the batch size: larger batches run as
/// more chunks.
const WORKSPACE_BYTES: usize = 64 << 20;

/// One layer as these kernels run it, with its input shape resolved.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// `z = a Wᵀ + b`; weight at `offset` `[outputs, inputs]`, bias after it.
    Linear {
        inputs: usize,
        outputs: usize,
        offset: usize,
    },
    /// Stride 1, no padding; input `[in_channels, height, width]`, weight at
    /// `offset` `[out_channels, in_channels, kernel, kernel]`, bias after it.
    Conv {
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        height: usize,
        width: usize,
        offset: usize,
    },
    Relu,
    /// 2×2, stride 2, rounding down; input `[channels, height, width]`.
    MaxPool {
        channels: usize,
        height: usize,
        width: usize,
    },
}

impl Op {
    /// Values per example of this op's output, given its input's.
    fn output_len(&self, input_len: usize) -> usize {
        match *self {
            Op::Linear { outputs, .. } => outputs,
            Op::Conv { out_channels, kernel, height, width, .. } => {
                out_channels * (height + 1 - kernel) * (width + 1 - kernel)
            }
            Op::Relu => input_len,
            Op::MaxPool { channels, height, width } => channels * (height / 2) * (width / 2),
        }
    }

    /// Forward multiply-adds per example.
    fn macs(&self, output_len: usize) -> usize {
        match *self {
            Op::Linear { inputs, outputs, .. } => inputs * outputs,
            Op::Conv { in_channels, kernel, .. } => output_len * in_channels * kernel * kernel,
            Op::Relu | Op::MaxPool { .. } => 0,
        }
    }
}

/// A network's parameters on the host and the plan that runs them.
#[derive(Clone, Debug)]
pub(crate) struct CpuNet {
    ops: Vec<Op>,
    /// Values per example of each activation: `lens[0]` is the input,
    /// `lens[j + 1]` op `j`'s output.
    lens: Vec<usize>,
    params: Vec<f32>,
    /// The first op with parameters: no input gradient is needed below it.
    first_trainable: usize,
    macs_per_example: usize,
    /// The most examples one chunk may hold within [`WORKSPACE_BYTES`].
    max_chunk: usize,
}

/// What a batch (or one chunk of it) gives back.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Σᵢ clip(gᵢ), or Σᵢ gᵢ without clipping, in the layout's order.
    pub sum: Vec<f32>,
    /// Each example's gradient norm (with clipping only).
    pub norms: Vec<f32>,
    pub loss_sum: f64,
    pub correct: usize,
    pub clipped: usize,
}

/// How a batch is cut: chunks of `size` examples (the last one shorter),
/// run on up to `threads` threads.
#[derive(Clone, Copy, Debug)]
struct Split {
    threads: usize,
    size: usize,
}

/// Runs `work(start, end)` over the chunks of `0..n` and hands each result
/// to `fold` in chunk order, so that what `fold` sums does not depend on
/// which thread ran what.
///
/// With several threads each claims the next chunk when it finishes one; a
/// result that finishes early waits until the chunks before it are folded.
/// A thread the OS refuses to start is simply not there: the others claim
/// its chunks.
fn in_chunks<T: Send>(n: usize, split: Split, work: impl Fn(usize, usize) -> T + Sync, fold: impl FnMut(T) + Send) {
    let size = split.size.max(1);
    let chunks = n.div_ceil(size).max(1);
    let bounds = |c: usize| (c * size, ((c + 1) * size).min(n));
    let threads = split.threads.min(chunks);
    if threads <= 1 {
        let mut fold = fold;
        for c in 0..chunks {
            let (start, end) = bounds(c);
            fold(work(start, end));
        }
        return;
    }
    let next = AtomicUsize::new(0);
    // The next chunk to fold, the results waiting for it, and the fold.
    let order = Mutex::new((0usize, BTreeMap::new(), fold));
    let claim = || {
        // If `work` or `fold` panics, the other threads stop claiming chunks.
        let stop = StopOnPanic(&next, chunks);
        loop {
            let c = next.fetch_add(1, Ordering::Relaxed);
            if c >= chunks {
                break;
            }
            let (start, end) = bounds(c);
            let result = work(start, end);
            let mut guard = order.lock().unwrap_or_else(PoisonError::into_inner);
            let (next_fold, waiting, fold) = &mut *guard;
            waiting.insert(c, result);
            while let Some(result) = waiting.remove(next_fold) {
                fold(result);
                *next_fold += 1;
            }
        }
        std::mem::forget(stop);
    };
    std::thread::scope(|scope| {
        let helpers: Vec<_> =
            (1..threads).filter_map(|_| std::thread::Builder::new().spawn_scoped(scope, claim).ok()).collect();
        claim();
        // Joined here, not by the scope, so that a helper's panic reaches
        // the caller with its own message.
        for helper in helpers {
            if let Err(panic) = helper.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
}

/// Ends the claiming of chunks when dropped, i.e. when the thread holding
/// it unwinds from a panic (a finished thread forgets it).
struct StopOnPanic<'a>(&'a AtomicUsize, usize);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        self.0.store(self.1, Ordering::Relaxed);
    }
}

/// Buffers one chunk's computation reuses from batch to batch. Allocating
/// them afresh each step faulted in, and gave back, megabytes of pages per
/// step, a measurable cost to the CNN step, mostly TLB shootdowns between
/// the two threads (`docs/perf-log.md`).
#[derive(Default)]
struct Workspace {
    /// Activations: `tape[0]` the input, `tape[j + 1]` op `j`'s output.
    tape: Vec<Vec<f32>>,
    /// Max pooling's winners per op, as offsets into the example's input.
    argmax: Vec<Vec<u32>>,
    /// Per convolution op, every example's patches `[n, C_in·k·k, L]`,
    /// unfolded once in the forward pass and read again by the backward
    /// pass (unfolding twice cost the CNN step measurably; `docs/perf-log.md`)...
    unfolded: Vec<Vec<f32>>,
    /// ...and one example's patch gradient.
    patch_grad: Vec<f32>,
    /// One example's output gradient of a convolution, transposed
    /// `[L, C_out]`, and a chunk's weight gradient of one convolution in the
    /// same order, `[C_in·k·k, C_out]`: so that the weight gradient's
    /// product reads both its operands row by row ([`gemm`]).
    dz_t: Vec<f32>,
    weight_t: Vec<f32>,
    /// The gradient flowing down, at an op's output; `down` receives it at
    /// the op's input, then the two swap.
    delta: Vec<f32>,
    down: Vec<f32>,
    /// Per trainable op, what clipping needs once every norm is known: a
    /// linear layer's output gradient `[n, outputs]` (its input is on the
    /// tape), a convolution's per-example weight gradients, each transposed
    /// (`[n, C_in·k·k, C_out]`)...
    kept: Vec<Vec<f32>>,
    /// ...and its per-example bias gradients `[n, C_out]`.
    kept_bias: Vec<Vec<f32>>,
    /// Each example's squared gradient norm so far.
    norm2: Vec<f64>,
}

/// Idle workspaces, kept for the next batch: at most [`KEPT_WORKSPACES`]
/// (as many as threads one batch can use), each within about
/// [`WORKSPACE_BYTES`].
static WORKSPACES: Mutex<Vec<Workspace>> = Mutex::new(Vec::new());
const KEPT_WORKSPACES: usize = CHUNKS_PER_BATCH;

/// Runs `work` with an idle workspace (a new one when none is idle), then
/// returns it to the pool.
fn with_workspace<T>(work: impl FnOnce(&mut Workspace) -> T) -> T {
    let idle = WORKSPACES.lock().unwrap_or_else(PoisonError::into_inner).pop();
    let mut ws = idle.unwrap_or_default();
    let result = work(&mut ws);
    let mut pool = WORKSPACES.lock().unwrap_or_else(PoisonError::into_inner);
    if pool.len() < KEPT_WORKSPACES {
        pool.push(ws);
    }
    result
}

/// Makes `v` `len` zeros, keeping its allocation.
fn zeroed(v: &mut Vec<f32>, len: usize) {
    v.clear();
    v.resize(len, 0.0);
}

/// Makes `v` `len` values long, keeping its allocation and whatever values
/// it held (zeros past them): for buffers the caller overwrites whole.
fn sized<T: Clone + Default>(v: &mut Vec<T>, len: usize) {
    v.truncate(len);
    v.resize(len, T::default());
}

impl CpuNet {
    /// The plan for `arch` with `params` (checked against its layout by the
    /// caller), or `None` when a layer is not one these kernels implement.
    pub(crate) fn new(arch: &Architecture, params: &[f32]) -> Option<CpuNet> {
        // (channels, height, width) of an image activation, None when flat.
        let mut image = arch.image_side().map(|side| (1, side, side));
        let mut lens = vec![arch.input_dim()];
        let mut ops = Vec::new();
        let mut offset = 0;
        for layer in arch.layers() {
            let op = match (*layer, image) {
                (Layer::Linear { inputs, outputs }, None) => {
                    let op = Op::Linear { inputs, outputs, offset };
                    offset += outputs * inputs + outputs;
                    op
                }
                (Layer::Conv2d { in_channels, out_channels, kernel }, Some((_, height, width))) => {
                    let op = Op::Conv { in_channels, out_channels, kernel, height, width, offset };
                    offset += out_channels * in_channels * kernel * kernel + out_channels;
                    image = Some((out_channels, height + 1 - kernel, width + 1 - kernel));
                    op
                }
                (Layer::Relu, _) => Op::Relu,
                (Layer::MaxPool2, Some((channels, height, width))) => {
                    image = Some((channels, height / 2, width / 2));
                    Op::MaxPool { channels, height, width }
                }
                // Row-major [C, H, W] is already the flattened order.
                (Layer::Flatten, _) => {
                    image = None;
                    continue;
                }
                _ => return None,
            };
            let input_len = lens[lens.len() - 1];
            lens.push(op.output_len(input_len));
            ops.push(op);
        }
        if offset != params.len() || lens[lens.len() - 1] != CLASSES {
            return None;
        }
        let first_trainable =
            ops.iter().position(|op| matches!(op, Op::Linear { .. } | Op::Conv { .. })).unwrap_or(ops.len());
        let macs_per_example = ops.iter().zip(&lens[1..]).map(|(op, &len)| op.macs(len)).sum();
        // Activations, plus what clipping keeps per example.
        let kept: usize = ops
            .iter()
            .map(|op| match *op {
                Op::Linear { outputs, .. } => outputs,
                Op::Conv { in_channels, out_channels, kernel, .. } => {
                    out_channels * (in_channels * kernel * kernel + 1)
                }
                Op::Relu | Op::MaxPool { .. } => 0,
            })
            .sum();
        // Each convolution's unfolded patches.
        let unfolded: usize = ops
            .iter()
            .zip(&lens[1..])
            .map(|(op, &len)| match *op {
                Op::Conv { in_channels, out_channels, kernel, .. } => {
                    in_channels * kernel * kernel * (len / out_channels)
                }
                _ => 0,
            })
            .sum();
        let widest = lens.iter().copied().max().unwrap_or(0);
        // The tape, `delta` and `down` (each at most the widest activation),
        // the unfolded patches and what clipping keeps.
        let bytes_per_example = 4 * (lens.iter().sum::<usize>() + 2 * widest + unfolded + kept);
        Some(CpuNet {
            ops,
            lens,
            params: params.to_vec(),
            first_trainable,
            macs_per_example,
            max_chunk: (WORKSPACE_BYTES / bytes_per_example.max(1)).max(1),
        })
    }

    /// Logits `[n, CLASSES]` of the `n` rows of `x`.
    pub(crate) fn logits(&self, x: &[f32]) -> Vec<f32> {
        let d = self.lens[0];
        let n = x.len() / d;
        let mut out = Vec::with_capacity(n * CLASSES);
        let work = |start: usize, end: usize| {
            with_workspace(|ws| {
                self.forward(ws, &x[start * d..end * d], end - start);
                ws.tape[self.ops.len()].clone()
            })
        };
        in_chunks(n, self.split(n), work, |part: Vec<f32>| out.extend(part));
        out
    }

    /// The gradient of the summed cross-entropy of the `y.len()` rows of `x`,
    /// each example's clipped to `clip` (Opacus' rule) when `clip` is given.
    pub(crate) fn gradient_sum(&self, x: &[f32], y: &[u8], clip: Option<f64>) -> Outcome {
        self.gradient_sum_split(x, y, clip, self.split(y.len()))
    }

    /// [`CpuNet::gradient_sum`] with the batch cut as `split` says.
    fn gradient_sum_split(&self, x: &[f32], y: &[u8], clip: Option<f64>, split: Split) -> Outcome {
        let d = self.lens[0];
        let mut total = Outcome { sum: vec![0.0; self.params.len()], ..Outcome::default() };
        let work = |start: usize, end: usize| {
            with_workspace(|ws| self.chunk_gradient(ws, &x[start * d..end * d], &y[start..end], clip))
        };
        in_chunks(y.len(), split, work, |part: Outcome| {
            for (t, p) in total.sum.iter_mut().zip(&part.sum) {
                *t += p;
            }
            total.norms.extend(part.norms);
            total.loss_sum += part.loss_sum;
            total.correct += part.correct;
            total.clipped += part.clipped;
        });
        total
    }

    /// How to cut a batch of `n`: chunks of a size that depends on the model
    /// and `n` only, on one thread per core when the batch is big enough to
    /// pay for threads.
    fn split(&self, n: usize) -> Split {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let cores = match THREAD_LIMIT.load(Ordering::Relaxed) {
            0 => cores,
            limit => cores.min(limit),
        };
        let by_work = MACS_PER_CHUNK.div_ceil(self.macs_per_example.max(1));
        Split {
            threads: cores.min(n.saturating_mul(self.macs_per_example) / MACS_PER_THREAD).max(1),
            size: n.div_ceil(CHUNKS_PER_BATCH).max(by_work).min(self.max_chunk).max(1),
        }
    }

    /// Fills `ws.tape` with every activation of the `n` rows of `x`, input
    /// first, logits last, and `ws.argmax` with max pooling's winners.
    fn forward(&self, ws: &mut Workspace, x: &[f32], n: usize) {
        let Workspace { tape, argmax, unfolded, .. } = ws;
        tape.resize_with(self.ops.len() + 1, Vec::new);
        argmax.resize_with(self.ops.len(), Vec::new);
        unfolded.resize_with(self.ops.len(), Vec::new);
        tape[0].clear();
        tape[0].extend_from_slice(x);
        for (j, op) in self.ops.iter().enumerate() {
            let (done, next) = tape.split_at_mut(j + 1);
            let (input, out) = (&done[j], &mut next[0]);
            let (in_len, out_len) = (self.lens[j], self.lens[j + 1]);
            // Every op below writes each output value (a product with
            // β = 0 reads nothing of its destination), so no zeroing.
            sized(out, n * out_len);
            match *op {
                Op::Linear { inputs, outputs, offset } => {
                    let (weight, bias) = self.weight_and_bias(offset, outputs, inputs);
                    let a = view(input, n, inputs);
                    let w = view(weight, outputs, inputs);
                    matmul(out, n, outputs, &a, &w.t(), false);
                    for row in out.chunks_exact_mut(outputs) {
                        for (z, b) in row.iter_mut().zip(bias) {
                            *z += b;
                        }
                    }
                }
                Op::Conv { in_channels, out_channels, kernel, height, width, offset } => {
                    let rows = in_channels * kernel * kernel;
                    let (weight, bias) = self.weight_and_bias(offset, out_channels, rows);
                    let w = Strided { data: weight, row_stride: rows, col_stride: 1 };
                    let positions = out_len / out_channels;
                    let patches = &mut unfolded[j];
                    sized(patches, n * rows * positions);
                    for ((xi, zi), ui) in input
                        .chunks_exact(in_len)
                        .zip(out.chunks_exact_mut(out_len))
                        .zip(patches.chunks_exact_mut(rows * positions))
                    {
                        im2col(xi, in_channels, height, width, kernel, ui);
                        let shape = (out_channels, positions, rows);
                        product(zi, positions, w, ui, positions, shape, false);
                        for (row, b) in zi.chunks_exact_mut(positions).zip(bias) {
                            row.iter_mut().for_each(|z| *z += b);
                        }
                    }
                }
                Op::Relu => {
                    // NaN stays NaN (as in PyTorch), for the divergence check.
                    for (o, &v) in out.iter_mut().zip(input) {
                        *o = if v < 0.0 { 0.0 } else { v };
                    }
                }
                Op::MaxPool { channels, height, width } => {
                    let winners = &mut argmax[j];
                    winners.clear();
                    winners.resize(n * out_len, 0);
                    for ((xi, oi), wi) in input
                        .chunks_exact(in_len)
                        .zip(out.chunks_exact_mut(out_len))
                        .zip(winners.chunks_exact_mut(out_len))
                    {
                        max_pool(xi, channels, height, width, oi, wi);
                    }
                }
            }
        }
    }

    /// One chunk's part of [`CpuNet::gradient_sum`].
    fn chunk_gradient(&self, ws: &mut Workspace, x: &[f32], y: &[u8], clip: Option<f64>) -> Outcome {
        let n = y.len();
        let mut sum = vec![0f32; self.params.len()];
        if n == 0 {
            return Outcome { sum, ..Outcome::default() };
        }
        self.forward(ws, x, n);
        let (loss_sum, correct) = cross_entropy(&ws.tape[self.ops.len()], y, &mut ws.delta);
        ws.norm2.clear();
        ws.norm2.resize(n, 0.0);
        ws.kept.resize_with(self.ops.len(), Vec::new);
        ws.kept_bias.resize_with(self.ops.len(), Vec::new);
        for j in (self.first_trainable..self.ops.len()).rev() {
            match self.ops[j] {
                Op::Relu => relu_backward(&mut ws.delta, &ws.tape[j + 1]),
                Op::MaxPool { .. } => self.max_pool_backward(ws, j, n),
                Op::Linear { .. } => self.linear_backward(ws, j, n, clip.is_some(), &mut sum),
                Op::Conv { .. } => self.conv_backward(ws, j, n, clip.is_some(), &mut sum),
            }
        }
        let Some(clip) = clip else {
            return Outcome { sum, norms: Vec::new(), loss_sum, correct, clipped: 0 };
        };
        let (norms, clipped) = self.add_clipped(ws, clip, n, &mut sum);
        Outcome { sum, norms, loss_sum, correct, clipped }
    }

    /// Max pooling's backward pass: each output gradient goes to its
    /// window's winner.
    fn max_pool_backward(&self, ws: &mut Workspace, j: usize, n: usize) {
        let Workspace { argmax, delta, down, .. } = ws;
        let (in_len, out_len) = (self.lens[j], self.lens[j + 1]);
        zeroed(down, n * in_len);
        for ((gi, di), wi) in
            delta.chunks_exact(out_len).zip(down.chunks_exact_mut(in_len)).zip(argmax[j].chunks_exact(out_len))
        {
            for (&g, &w) in gi.iter().zip(wi) {
                di[w as usize] += g;
            }
        }
        std::mem::swap(delta, down);
    }

    /// A linear layer's backward pass: the input gradient `dZ W` (above the
    /// first trainable op), then with `clipping` each example's ghost norm
    /// and its output gradient kept for the clipped sum, without it the
    /// gradient added to `sum` at once.
    fn linear_backward(&self, ws: &mut Workspace, j: usize, n: usize, clipping: bool, sum: &mut [f32]) {
        let Op::Linear { inputs, outputs, offset } = self.ops[j] else {
            return;
        };
        let Workspace { tape, delta, down, kept, norm2, .. } = ws;
        let input = &tape[j];
        let needs_input_grad = j > self.first_trainable;
        if needs_input_grad {
            sized(down, n * inputs);
            let dz = Strided { data: delta, row_stride: outputs, col_stride: 1 };
            let w = &self.params[offset..offset + outputs * inputs];
            product(down, inputs, dz, w, inputs, (n, inputs, outputs), false);
        }
        if clipping {
            for ((nn, dz), a) in norm2.iter_mut().zip(delta.chunks_exact(outputs)).zip(input.chunks_exact(inputs)) {
                *nn += squared_norm(dz) * (squared_norm(a) + 1.0);
            }
            kept[j].clear();
            kept[j].extend_from_slice(&delta[..n * outputs]);
        } else {
            self.add_linear(sum, j, delta, input, n);
        }
        if needs_input_grad {
            std::mem::swap(delta, down);
        }
    }

    /// A convolution's backward pass, example by example: with `clipping`
    /// each example's weight and bias gradients are kept (and their squared
    /// norm added to the example's), without it they are summed into
    /// `sum`; above the first trainable op, the input gradient follows.
    /// Weight gradients are made transposed, `[C_in·k·k, C_out]`
    /// (`weight_t`, `kept`), and turned round once per chunk.
    fn conv_backward(&self, ws: &mut Workspace, j: usize, n: usize, clipping: bool, sum: &mut [f32]) {
        let Op::Conv { in_channels, out_channels, kernel, offset, .. } = self.ops[j] else {
            return;
        };
        let Workspace { unfolded, patch_grad, dz_t, weight_t, delta, down, kept, kept_bias, norm2, .. } = ws;
        let (in_len, out_len) = (self.lens[j], self.lens[j + 1]);
        let needs_input_grad = j > self.first_trainable;
        let rows = in_channels * kernel * kernel;
        let positions = out_len / out_channels;
        let weights = out_channels * rows;
        let weight = &self.params[offset..offset + weights];
        if needs_input_grad {
            zeroed(down, n * in_len);
        }
        if clipping {
            // Both written whole below, each example's in turn.
            sized(&mut kept[j], n * weights);
            sized(&mut kept_bias[j], n * out_channels);
        } else {
            zeroed(weight_t, weights);
        }
        // Overwritten whole for each example.
        sized(dz_t, positions * out_channels);
        for i in 0..n {
            let dzi = &delta[i * out_len..(i + 1) * out_len];
            let ui = &unfolded[j][i * rows * positions..(i + 1) * rows * positions];
            transpose(dzi, out_channels, positions, dz_t);
            let patches = Strided { data: ui, row_stride: positions, col_stride: 1 };
            let shape = (rows, out_channels, positions);
            if clipping {
                let gw = &mut kept[j][i * weights..(i + 1) * weights];
                let gb = &mut kept_bias[j][i * out_channels..(i + 1) * out_channels];
                product(gw, out_channels, patches, dz_t, out_channels, shape, false);
                for (b, row) in gb.iter_mut().zip(dzi.chunks_exact(positions)) {
                    *b = lane_sum(row);
                }
                norm2[i] += squared_norm(gw) + squared_norm(gb);
            } else {
                product(weight_t, out_channels, patches, dz_t, out_channels, shape, true);
                let gb = &mut sum[offset + weights..offset + weights + out_channels];
                for (b, row) in gb.iter_mut().zip(dzi.chunks_exact(positions)) {
                    *b += lane_sum(row);
                }
            }
            if needs_input_grad {
                let down_i = &mut down[i * in_len..(i + 1) * in_len];
                conv_input_grad(self.ops[j], weight, dzi, patch_grad, down_i);
            }
        }
        if !clipping {
            add_transposed(&mut sum[offset..offset + weights], weight_t, rows, out_channels);
        }
        if needs_input_grad {
            std::mem::swap(delta, down);
        }
    }

    /// Once every norm is known: scales what each trainable op kept of each
    /// example by its clip factor and adds it to `sum`. Returns each
    /// example's gradient norm and how many were clipped.
    fn add_clipped(&self, ws: &mut Workspace, clip: f64, n: usize, sum: &mut [f32]) -> (Vec<f32>, usize) {
        let norms: Vec<f64> = ws.norm2.iter().copied().map(norm_of_squared).collect();
        let factors: Vec<f64> = norms.iter().map(|&norm| clip_factor(norm, clip)).collect();
        let clipped = factors.iter().filter(|&&f| f < 1.0).count();
        let factors: Vec<f32> = factors.into_iter().map(|f| f as f32).collect();
        let Workspace { tape, weight_t, kept, kept_bias, .. } = ws;
        for (j, op) in self.ops.iter().enumerate().skip(self.first_trainable) {
            match *op {
                Op::Linear { outputs, .. } => {
                    for (row, &f) in kept[j].chunks_exact_mut(outputs).zip(&factors) {
                        row.iter_mut().for_each(|g| *g *= f);
                    }
                    self.add_linear(sum, j, &kept[j], &tape[j], n);
                }
                Op::Conv { in_channels, out_channels, kernel, offset, .. } => {
                    let rows = in_channels * kernel * kernel;
                    let weights = out_channels * rows;
                    let (gw, gb) = sum[offset..offset + weights + out_channels].split_at_mut(weights);
                    zeroed(weight_t, weights);
                    for ((w, b), &f) in
                        kept[j].chunks_exact(weights).zip(kept_bias[j].chunks_exact(out_channels)).zip(&factors)
                    {
                        weight_t.iter_mut().zip(w).for_each(|(s, v)| *s += f * v);
                        gb.iter_mut().zip(b).for_each(|(s, v)| *s += f * v);
                    }
                    add_transposed(gw, weight_t, rows, out_channels);
                }
                Op::Relu | Op::MaxPool { .. } => {}
            }
        }
        (norms.into_iter().map(|v| v as f32).collect(), clipped)
    }

    /// Adds a linear layer's weight gradient `dZᵀ A` and bias gradient
    /// `Σ dz` to `sum`.
    fn add_linear(&self, sum: &mut [f32], op: usize, dz: &[f32], input: &[f32], n: usize) {
        let Op::Linear { inputs, outputs, offset } = self.ops[op] else {
            return;
        };
        let weights = outputs * inputs;
        let (gw, gb) = sum[offset..offset + weights + outputs].split_at_mut(weights);
        // dZᵀ: dZ read down its columns.
        let dz_t = Strided { data: dz, row_stride: 1, col_stride: outputs };
        product(gw, inputs, dz_t, input, inputs, (outputs, inputs, n), true);
        for row in dz.chunks_exact(outputs) {
            gb.iter_mut().zip(row).for_each(|(b, g)| *b += g);
        }
    }

    fn weight_and_bias(&self, offset: usize, outputs: usize, fan_in: usize) -> (&[f32], &[f32]) {
        let weights = outputs * fan_in;
        self.params[offset..offset + weights + outputs].split_at(weights)
    }
}

/// ReLU's backward pass, in place: no gradient where the output is 0. A
/// select, not a conditional store, so that it vectorises (the branchy
/// form cost the CNN step measurably; `docs/perf-log.md`). A NaN output
/// keeps its gradient.
#[inline]
fn relu_backward(delta: &mut [f32], output: &[f32]) {
    for (g, &o) in delta.iter_mut().zip(output) {
        *g = if o <= 0.0 { 0.0 } else { *g };
    }
}

/// Adds one example's input gradient of `conv` (a convolution, its
/// weight `weight`) to `down`: the patch gradient `Wᵀ dZ` into
/// `patch_grad`, folded back (col2im).
#[inline]
fn conv_input_grad(conv: Op, weight: &[f32], dz: &[f32], patch_grad: &mut Vec<f32>, down: &mut [f32]) {
    let Op::Conv { in_channels, out_channels, kernel, height, width, .. } = conv else {
        return;
    };
    let rows = in_channels * kernel * kernel;
    let positions = dz.len() / out_channels;
    sized(patch_grad, rows * positions);
    // Wᵀ dZ: W read down its columns.
    let w_t = Strided { data: weight, row_stride: 1, col_stride: rows };
    product(patch_grad, positions, w_t, dz, positions, (rows, positions, out_channels), false);
    col2im(patch_grad, in_channels, height, width, kernel, down);
}

/// `Σ v²` in `f64`, over eight independent partial sums (one sequential
/// sum is bound by the latency of each addition).
fn squared_norm(values: &[f32]) -> f64 {
    let mut partial = [0f64; 8];
    let chunks = values.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    for chunk in chunks {
        for (p, &v) in partial.iter_mut().zip(chunk) {
            *p += f64::from(v) * f64::from(v);
        }
    }
    partial.iter().sum::<f64>() + rest
}

/// `Σ v` over eight independent partial sums, so that it vectorises (a
/// sequential `f32` sum waits on each addition in turn).
fn lane_sum(values: &[f32]) -> f32 {
    let mut partial = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (p, &v) in partial.iter_mut().zip(chunk) {
            *p += v;
        }
    }
    partial.iter().sum::<f32>() + rest
}

/// Writes to `delta` the gradient of `Σᵢ −log softmax(zᵢ)[yᵢ]` with respect
/// to the logits `[n, CLASSES]` (`softmax − onehot`); returns the loss sum
/// and how many examples were classified right (class 1 when its logit is
/// larger).
fn cross_entropy(logits: &[f32], y: &[u8], delta: &mut Vec<f32>) -> (f64, usize) {
    zeroed(delta, logits.len());
    let mut loss_sum = 0.0;
    let mut correct = 0;
    for ((z, d), &label) in logits.chunks_exact(CLASSES).zip(delta.chunks_exact_mut(CLASSES)).zip(y) {
        let raw = label;
        let label = usize::from(label.min(1));
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: [f64; CLASSES] = std::array::from_fn(|k| f64::from(z[k] - max).exp());
        let total: f64 = exp.iter().sum();
        loss_sum += total.ln() - f64::from(z[label] - max);
        for (k, (dk, e)) in d.iter_mut().zip(&exp).enumerate() {
            *dk = (e / total) as f32 - f32::from(u8::from(k == label));
        }
        if u8::from(z[1] > z[0]) == raw {
            correct += 1;
        }
    }
    (loss_sum, correct)
}

/// A row-major `[rows, cols]` view of `data`.
fn view(data: &[f32], rows: usize, cols: usize) -> ArrayView2<'_, f32> {
    ArrayView2::from_shape((rows, cols).strides((cols, 1)), &data[..rows * cols])
        .expect("callers size the slice as rows · cols")
}

/// `dst` `[m, n]` (row-major) `= a · b`, or `+= a · b` with `accumulate`.
fn matmul(dst: &mut [f32], m: usize, n: usize, a: &ArrayView2<'_, f32>, b: &ArrayView2<'_, f32>, accumulate: bool) {
    let mut c = ArrayViewMut2::from_shape((m, n), &mut dst[..m * n]).expect("callers size the destination as m · n");
    general_mat_mul(1.0, a, b, if accumulate { 1.0 } else { 0.0 }, &mut c);
}

/// `dst` `[cols, rows]` `+=` `src`ᵀ, for `src` row-major `[rows, cols]`.
fn add_transposed(dst: &mut [f32], src: &[f32], rows: usize, cols: usize) {
    for (r, row) in src.chunks_exact(cols).take(rows).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            dst[c * rows + r] += v;
        }
    }
}

/// Calls `run(start)` for each run of an example's patches, in patch order:
/// for row `(c, ki, kj)` of the patches and output row `r`, the
/// `width + 1 - k` input values under kernel tap `(ki, kj)` of channel `c`
/// start at `(c, r + ki, kj)` of the example `[channels, height, width]`.
/// (Nested loops and a callback: an iterator of `flat_map`s made the CNN
/// step slower; `docs/perf-log.md`.)
fn for_each_patch_run(channels: usize, height: usize, width: usize, k: usize, mut run: impl FnMut(usize)) {
    for c in 0..channels {
        for ki in 0..k {
            for kj in 0..k {
                for row in 0..height + 1 - k {
                    run(c * height * width + (row + ki) * width + kj);
                }
            }
        }
    }
}

/// Unfolds one example `[channels, height, width]` into its patches
/// `[channels·k·k, L]` (`out`, exactly that long), row `(c, ki, kj)`
/// holding the input values under kernel tap `(ki, kj)` of channel `c` at
/// each of the `L` output positions.
fn im2col(x: &[f32], channels: usize, height: usize, width: usize, k: usize, out: &mut [f32]) {
    let ow = width + 1 - k;
    let mut runs = out.chunks_exact_mut(ow);
    for_each_patch_run(channels, height, width, k, |start| {
        let Some(run) = runs.next() else { return };
        // Runs are short (8 values in the benchmark CNN's second layer):
        // copied as fixed-size blocks they stay inline, where a copy of a
        // run's length called `memmove` per run (8 % of the CNN step).
        let mut to = run.chunks_exact_mut(8);
        let mut from = x[start..start + ow].chunks_exact(8);
        for (to, from) in (&mut to).zip(&mut from) {
            if let (Ok(to), Ok(from)) = (<&mut [f32; 8]>::try_from(to), <&[f32; 8]>::try_from(from)) {
                *to = *from;
            }
        }
        for (t, &f) in to.into_remainder().iter_mut().zip(from.remainder()) {
            *t = f;
        }
    });
}

/// The adjoint of [`im2col`]: adds each patch value back onto the input
/// position it was copied from.
fn col2im(patches: &[f32], channels: usize, height: usize, width: usize, k: usize, dx: &mut [f32]) {
    let ow = width + 1 - k;
    let mut rows = patches.chunks_exact(ow);
    for_each_patch_run(channels, height, width, k, |start| {
        if let Some(values) = rows.next() {
            dx[start..start + ow].iter_mut().zip(values).for_each(|(d, v)| *d += v);
        }
    });
}

/// 2×2 max pooling of one example; `winners` gets each maximum's offset in
/// `x` (the first in scan order on ties, as PyTorch; a NaN wins, as there).
fn max_pool(x: &[f32], channels: usize, height: usize, width: usize, out: &mut [f32], winners: &mut [u32]) {
    let (oh, ow) = (height / 2, width / 2);
    // Offsets fit in u32: callers' activations are far below 2³² values.
    let (right, below) = (1u32, width as u32);
    let rows = out.chunks_exact_mut(ow).zip(winners.chunks_exact_mut(ow)).take(channels * oh);
    for (r, (out_row, winner_row)) in rows.enumerate() {
        let (c, row) = (r / oh, r % oh);
        let top = c * height * width + 2 * row * width;
        let upper = &x[top..top + 2 * ow];
        let lower = &x[top + width..top + width + 2 * ow];
        // Branch-free selects over slices of known length, so that the
        // loop vectorises (the branchy scan was most of the forward
        // pass's own time). Candidates in scan order: a b / c d.
        for col in 0..ow {
            let (a, b) = (upper[2 * col], upper[2 * col + 1]);
            let (c, d) = (lower[2 * col], lower[2 * col + 1]);
            let take = b > a || b.is_nan();
            let (best, at) = (if take { b } else { a }, if take { right } else { 0 });
            let take = c > best || c.is_nan();
            let (best, at) = (if take { c } else { best }, if take { below } else { at });
            let take = d > best || d.is_nan();
            let (best, at) = (if take { d } else { best }, if take { below + right } else { at });
            out_row[col] = best;
            winner_row[col] = (top + 2 * col) as u32 + at;
        }
    }
}

#[cfg(test)]
mod tests;
