//! The convolutions' matrix products, read in place instead of packed.
//!
//! `matrixmultiply` (behind `ndarray`) copies both operands of every product
//! into panels before it multiplies them. That pays for large matrices. The
//! convolutions here make small products, one per example (K from 25 to
//! 576, N from 16 to 576), whose operands already sit in the core's L2
//! cache: in the benchmark CNN's DP step, packing took a large share of the
//! time beside the multiplications themselves (`docs/perf-log.md`), and the
//! weights were packed again for every example.
//!
//! [`product`] multiplies in place instead: `B` is row-major, so a kernel
//! loads 16 of its columns at a time, and `A` may have any strides, since
//! each of its values is broadcast. Six rows of `C` by 16 columns stay in
//! twelve AVX registers for the whole sum over `k`, in order, one fused
//! multiply-add per term. Where the CPU lacks AVX2 and FMA (checked once,
//! at run time) or is not x86-64, the same product goes to `matrixmultiply`.

use ndarray::{ArrayView2, ArrayViewMut2, ShapeBuilder};

/// A matrix read through strides: value `(i, p)` is
/// `data[i·row_stride + p·col_stride]`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Strided<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

/// `c` `[m, n]` (row stride `ldc`) `= a · b`, or `+= a · b` with
/// `accumulate`, where `a` is `[m, k]` and `b` is row-major `[k, n]` with row
/// stride `ldb`.
///
/// # Panics
/// If an operand is too short for its shape and strides.
#[allow(clippy::too_many_arguments)]
pub(super) fn product(
    c: &mut [f32],
    ldc: usize,
    a: Strided<'_>,
    b: &[f32],
    ldb: usize,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    // The offset of the last of `count` values `stride` apart, plus `then`;
    // overflow is a caller's error, not a wrap that could pass the checks.
    let end = |count: usize, stride: usize, then: usize| {
        (count - 1)
            .checked_mul(stride)
            .and_then(|offset| offset.checked_add(then))
            .expect("operand offsets overflow usize")
    };
    assert!(m == 1 || ldc >= n, "C's rows overlap: row stride {ldc} < {n} columns");
    assert!(c.len() >= end(m, ldc, n), "C is shorter than [{m}, {n}]");
    if k == 0 {
        // An empty sum: nothing of A or B is read.
        if !accumulate {
            for row in 0..m {
                c[row * ldc..row * ldc + n].fill(0.0);
            }
        }
        return;
    }
    let a_last = end(m, a.row_stride, 0).checked_add(end(k, a.col_stride, 0));
    assert!(a_last.is_some_and(|last| last < a.data.len()), "A is shorter than [{m}, {k}]");
    assert!(b.len() >= end(k, ldb, n), "B is shorter than [{k}, {n}]");
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: AVX2 and FMA are present (just checked); m, n and k are
        // positive, and the asserts above put every index the kernels
        // touch, and every block's first value, inside the three slices.
        #[allow(unsafe_code)]
        unsafe {
            x86::product(c, ldc, a, b, ldb, (m, n, k), accumulate)
        };
        return;
    }
    portable(c, ldc, a, b, ldb, (m, n, k), accumulate);
}

/// `out` `[cols, rows]` `=` `m`ᵀ, for `m` row-major `[rows, cols]`: a
/// convolution's output gradient turned position-major for its weight
/// gradient's product. Eight by eight in AVX registers where whole blocks
/// fit (a value at a time, with stores or loads `rows` apart, cost the CNN's
/// step measurably; `docs/perf-log.md`), a value at a time around them.
///
/// # Panics
/// If `m` or `out` is shorter than `rows · cols`.
pub(super) fn transpose(m: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    let (m, out) = (&m[..rows * cols], &mut out[..rows * cols]);
    let (whole_rows, whole_cols) = (rows / 8 * 8, cols / 8 * 8);
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        for r in (0..whole_rows).step_by(8) {
            for c in (0..whole_cols).step_by(8) {
                // SAFETY: AVX2 is present; rows r..r + 8 and columns
                // c..c + 8 of `m`, and their images in `out`, are inside
                // the slices (whole blocks only).
                #[allow(unsafe_code)]
                unsafe {
                    x86::transpose8(m.as_ptr().add(r * cols + c), cols, out.as_mut_ptr().add(c * rows + r), rows)
                };
            }
        }
    } else {
        scalar_transpose(m, rows, cols, out, (0, whole_rows), (0, whole_cols));
    }
    #[cfg(not(target_arch = "x86_64"))]
    scalar_transpose(m, rows, cols, out, (0, whole_rows), (0, whole_cols));
    // The strips right of and below the whole blocks.
    scalar_transpose(m, rows, cols, out, (0, rows), (whole_cols, cols));
    scalar_transpose(m, rows, cols, out, (whole_rows, rows), (0, whole_cols));
}

/// [`transpose`] of rows `r0..r1` and columns `c0..c1`, a value at a time.
fn scalar_transpose(
    m: &[f32],
    rows: usize,
    cols: usize,
    out: &mut [f32],
    (r0, r1): (usize, usize),
    (c0, c1): (usize, usize),
) {
    for c in c0..c1 {
        for r in r0..r1 {
            out[c * rows + r] = m[r * cols + c];
        }
    }
}

/// [`product`] through `matrixmultiply`.
#[allow(clippy::too_many_arguments)]
fn portable(
    c: &mut [f32],
    ldc: usize,
    a: Strided<'_>,
    b: &[f32],
    ldb: usize,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    let span = |count: usize, stride: usize| count.saturating_sub(1) * stride + 1;
    let mut c = ArrayViewMut2::from_shape((m, n).strides((ldc, 1)), &mut c[..span(m, ldc) + n - 1])
        .expect("checked by `product`");
    let beta = if accumulate { 1.0 } else { 0.0 };
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    let a_len = span(m, a.row_stride) + span(k, a.col_stride) - 1;
    let a = ArrayView2::from_shape((m, k).strides((a.row_stride, a.col_stride)), &a.data[..a_len])
        .expect("checked by `product`");
    let b = ArrayView2::from_shape((k, n).strides((ldb, 1)), &b[..span(k, ldb) + n - 1]).expect("checked by `product`");
    ndarray::linalg::general_mat_mul(1.0, &a, &b, beta, &mut c);
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::{
        __m256, __m256i, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_maskload_ps, _mm256_maskstore_ps,
        _mm256_permute2f128_ps, _mm256_set1_ps, _mm256_setr_epi32, _mm256_setzero_ps, _mm256_shuffle_ps,
        _mm256_storeu_ps, _mm256_unpackhi_ps, _mm256_unpacklo_ps,
    };
    use std::sync::OnceLock;

    use super::Strided;

    /// Rows of `C` per kernel call: with 16 columns, twelve accumulators,
    /// enough to keep both FMA units busy through each one's latency.
    const MR: usize = 6;
    /// Columns of `C` per kernel call: two AVX registers.
    const NR: usize = 16;

    /// Whether this CPU has AVX2 and FMA, asked once.
    pub(super) fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE
            .get_or_init(|| std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
    }

    /// Transposes the 8 × 8 block at `from` (row stride `from_stride`) into
    /// `to` (row stride `to_stride`).
    ///
    /// # Safety
    /// The CPU has AVX2; both blocks are inside their allocations.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn transpose8(from: *const f32, from_stride: usize, to: *mut f32, to_stride: usize) {
        // SAFETY: eight rows of eight values at each end, as the caller
        // vouched.
        unsafe {
            let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(from.add(i * from_stride)));
            // Pairs of rows interleaved, then pairs of pairs, then halves.
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let columns = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (i, column) in columns.into_iter().enumerate() {
                _mm256_storeu_ps(to.add(i * to_stride), column);
            }
        }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA, and the slices hold every index the
    /// shapes and strides name (as `super::product` asserts).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn product(
        c: &mut [f32],
        ldc: usize,
        a: Strided<'_>,
        b: &[f32],
        ldb: usize,
        (m, n, k): (usize, usize, usize),
        accumulate: bool,
    ) {
        let (cp, ap, bp) = (c.as_mut_ptr(), a.data.as_ptr(), b.as_ptr());
        let full_cols = n / NR * NR;
        let mut i = 0;
        while i < m {
            let rows = MR.min(m - i);
            let a_block = ap.wrapping_add(i * a.row_stride);
            let mut j = 0;
            while j < full_cols {
                // SAFETY: rows i..i + rows and columns j..j + NR are inside
                // C, and the kernel reads A's rows i.. and B's columns j..
                // over p < k, all inside their slices.
                unsafe {
                    let (c_block, b_block) = (cp.add(i * ldc + j), bp.add(j));
                    blocks::<false>(rows, c_block, ldc, a_block, a, b_block, ldb, k, NR, accumulate);
                }
                j += NR;
            }
            // The columns past the last whole block, through masks.
            if full_cols < n {
                // SAFETY: as above, for columns full_cols..n; the masked
                // loads and stores touch no lane past column n.
                unsafe {
                    let (c_block, b_block) = (cp.add(i * ldc + full_cols), bp.add(full_cols));
                    let cols = n - full_cols;
                    blocks::<true>(rows, c_block, ldc, a_block, a, b_block, ldb, k, cols, accumulate);
                }
            }
            i += rows;
        }
    }

    /// [`block`] for `rows` (1 to [`MR`]) rows.
    ///
    /// # Safety
    /// As [`block`].
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn blocks<const MASKED: bool>(
        rows: usize,
        c: *mut f32,
        ldc: usize,
        a_rows: *const f32,
        a: Strided<'_>,
        b: *const f32,
        ldb: usize,
        k: usize,
        cols: usize,
        accumulate: bool,
    ) {
        // SAFETY: the caller's promise, passed on.
        unsafe {
            match rows {
                6 => block::<6, MASKED>(c, ldc, a_rows, a, b, ldb, k, cols, accumulate),
                5 => block::<5, MASKED>(c, ldc, a_rows, a, b, ldb, k, cols, accumulate),
                4 => block::<4, MASKED>(c, ldc, a_rows, a, b, ldb, k, cols, accumulate),
                3 => block::<3, MASKED>(c, ldc, a_rows, a, b, ldb, k, cols, accumulate),
                2 => block::<2, MASKED>(c, ldc, a_rows, a, b, ldb, k, cols, accumulate),
                _ => block::<1, MASKED>(c, ldc, a_rows, a, b, ldb, k, cols, accumulate),
            }
        }
    }

    /// `R` rows by 16 columns of `C`, summed over `k` in registers; with
    /// `MASKED`, only the first `cols` (< 16) columns, the lanes past them
    /// neither read nor written (the last columns of a product).
    ///
    /// # Safety
    /// As [`product`]; `c`, `a_rows` and `b` point at the block's first
    /// value of `C`, first row of `A` and first column of `B`, and the
    /// block's `R` rows by 16 (or `cols`) columns lie inside `C` and `B`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn block<const R: usize, const MASKED: bool>(
        c: *mut f32,
        ldc: usize,
        a_rows: *const f32,
        a: Strided<'_>,
        b: *const f32,
        ldb: usize,
        k: usize,
        cols: usize,
        accumulate: bool,
    ) {
        debug_assert!(if MASKED { cols < NR } else { cols == NR });
        // Lane l of half h is live when 8·h + l < cols (every lane of an
        // unmasked block).
        let lanes = |h: i32| {
            let live = |l: i32| if 8 * h + l < cols as i32 { -1 } else { 0 };
            _mm256_setr_epi32(live(0), live(1), live(2), live(3), live(4), live(5), live(6), live(7))
        };
        let masks = [lanes(0), lanes(1)];
        // SAFETY (whole body): every value read or written is inside the
        // block the caller vouched for; masked, only live lanes are. The
        // second half's address may lie past the slice when no lane of it
        // is live, hence `wrapping_add` there.
        unsafe {
            let mut acc: [[__m256; 2]; R] = [[_mm256_setzero_ps(); 2]; R];
            if accumulate {
                for (r, row) in acc.iter_mut().enumerate() {
                    let at = c.add(r * ldc);
                    row[0] = load::<MASKED>(at, masks[0]);
                    row[1] = load::<MASKED>(at.wrapping_add(8), masks[1]);
                }
            }
            for p in 0..k {
                let at = b.add(p * ldb);
                let b0 = load::<MASKED>(at, masks[0]);
                let b1 = load::<MASKED>(at.wrapping_add(8), masks[1]);
                let a_col = a_rows.add(p * a.col_stride);
                for (r, row) in acc.iter_mut().enumerate() {
                    let v = _mm256_set1_ps(*a_col.add(r * a.row_stride));
                    row[0] = _mm256_fmadd_ps(v, b0, row[0]);
                    row[1] = _mm256_fmadd_ps(v, b1, row[1]);
                }
            }
            for (r, row) in acc.iter().enumerate() {
                let at = c.add(r * ldc);
                store::<MASKED>(at, masks[0], row[0]);
                store::<MASKED>(at.wrapping_add(8), masks[1], row[1]);
            }
        }
    }

    /// Eight values from `at`; with `MASKED`, only the lanes `mask` marks.
    ///
    /// # Safety
    /// AVX2; the eight values (or the marked ones) are readable.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load<const MASKED: bool>(at: *const f32, mask: __m256i) -> __m256 {
        // SAFETY: the caller's promise.
        unsafe { if MASKED { _mm256_maskload_ps(at, mask) } else { _mm256_loadu_ps(at) } }
    }

    /// Stores eight values at `at`; with `MASKED`, only the lanes `mask`
    /// marks.
    ///
    /// # Safety
    /// AVX2; the eight values (or the marked ones) are writable.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn store<const MASKED: bool>(at: *mut f32, mask: __m256i, values: __m256) {
        // SAFETY: the caller's promise.
        unsafe { if MASKED { _mm256_maskstore_ps(at, mask, values) } else { _mm256_storeu_ps(at, values) } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `a · b` in `f64`, one value at a time.
    fn reference(a: Strided<'_>, b: &[f32], ldb: usize, (m, n, k): (usize, usize, usize)) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| f64::from(a.data[i * a.row_stride + p * a.col_stride]) * f64::from(b[p * ldb + j]))
                    .sum();
            }
        }
        c
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        (0..len as u64)
            .map(|i| {
                let z = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
                ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn products_match_f64_for_every_edge_and_layout() {
        // Shapes around the kernel's 6 × 16 blocks (every count of rows
        // left over, columns left over in either half of the masked tail,
        // k of 0 and 1) and the benchmark CNN's own.
        let shapes = [
            (1, 1, 1),
            (2, 24, 5),
            (8, 31, 9),
            (14, 9, 3),
            (3, 15, 2),
            (4, 16, 7),
            (5, 17, 1),
            (7, 33, 0),
            (9, 40, 13),
            (16, 576, 25),
            (25, 16, 576),
            (400, 64, 32),
        ];
        for (m, n, k) in shapes {
            let b_pad = 3; // a row stride longer than the row
            let ldb = n + b_pad;
            // Operands exactly as long as their last value, so that a read
            // past it would be past the allocation (for Miri and sanitizers).
            let b = values(if k == 0 { 0 } else { (k - 1) * ldb + n }, 2);
            // A row-major, and A stored transposed (read as `Wᵀ`).
            let a_store = values(m * k, 1);
            let layouts = [
                Strided { data: &a_store, row_stride: k, col_stride: 1 },
                Strided { data: &a_store, row_stride: 1, col_stride: m },
            ];
            for a in layouts {
                let want = reference(a, &b, ldb, (m, n, k));
                for accumulate in [false, true] {
                    let ldc = n + 2;
                    let start = values((m - 1) * ldc + n, 3);
                    let mut c = start.clone();
                    product(&mut c, ldc, a, &b, ldb, (m, n, k), accumulate);
                    let mut ported = start.clone();
                    portable(&mut ported, ldc, a, &b, ldb, (m, n, k), accumulate);
                    for i in 0..m {
                        for j in (0..ldc).take_while(|j| i * ldc + j < start.len()) {
                            let (got, other) = (c[i * ldc + j], ported[i * ldc + j]);
                            if j >= n {
                                assert_eq!(got, start[i * ldc + j], "padding written at ({i}, {j})");
                                continue;
                            }
                            let base = if accumulate { f64::from(start[i * ldc + j]) } else { 0.0 };
                            let exact = base + want[i * n + j];
                            let tolerance = 1e-5 * (k as f64 + 1.0);
                            let what = format!(
                                "{m}×{n}×{k} ({}, {}) acc {accumulate} at ({i}, {j})",
                                a.row_stride, a.col_stride
                            );
                            assert!((f64::from(got) - exact).abs() <= tolerance, "{what}: {got} vs {exact}");
                            assert!(
                                (f64::from(other) - exact).abs() <= tolerance,
                                "{what}, portable: {other} vs {exact}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn transposes_match_value_by_value() {
        // Whole 8 × 8 blocks, strips right of and below them, and neither.
        for (rows, cols) in [(16, 576), (32, 64), (8, 8), (13, 21), (3, 5), (9, 1), (1, 17)] {
            let m = values(rows * cols, 4);
            let mut out = vec![f32::NAN; rows * cols];
            transpose(&m, rows, cols, &mut out);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(out[c * rows + r].to_bits(), m[r * cols + c].to_bits(), "{rows}×{cols} at ({r}, {c})");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "B is shorter")]
    fn a_short_operand_is_refused() {
        let a = vec![1.0; 4];
        let b = vec![1.0; 3];
        let mut c = vec![0.0; 4];
        product(&mut c, 2, Strided { data: &a, row_stride: 2, col_stride: 1 }, &b, 2, (2, 2, 2), false);
    }
}
