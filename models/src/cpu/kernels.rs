//! The CPU matrix product beside the `gemm` crate's, for the benches only
//! (feature `kernels`).
//!
//! Meridian's convolutions multiply with their own kernel (`gemm.rs`)
//! rather than with the `gemm` crate that Burn's CPU backend already
//! builds; `cargo bench -p meridian-benches --features criterion -- gemm`
//! measures both on the products the benchmark CNN makes, so that the
//! choice stays a measured one. Both functions here take row-major
//! operands and check their lengths, so a bench cannot misuse either.

use super::gemm::{Strided, product};

/// `c` `[m, n]` `= a · b`, all row-major and contiguous, by Meridian's
/// kernel.
///
/// # Panics
/// If an operand is shorter than its shape.
pub fn own_product(c: &mut [f32], a: &[f32], b: &[f32], (m, n, k): (usize, usize, usize)) {
    check_lengths(c, a, b, (m, n, k));
    product(c, n, Strided { data: a, row_stride: k, col_stride: 1 }, b, n, (m, n, k), false);
}

/// `c` `[m, n]` `= a · b`, all row-major and contiguous, by the `gemm`
/// crate on one thread (as the convolutions' products run: one per
/// example, the examples spread over the cores).
///
/// # Panics
/// If an operand is shorter than its shape.
pub fn gemm_crate_product(c: &mut [f32], a: &[f32], b: &[f32], (m, n, k): (usize, usize, usize)) {
    check_lengths(c, a, b, (m, n, k));
    let stride = |s: usize| isize::try_from(s).expect("a slice's length fits an isize");
    // SAFETY: the three slices hold m·n, m·k and k·n values (checked
    // above), which is every index gemm reads or writes for these shapes and
    // row-major strides (row stride = columns, column stride = 1); `c` is
    // borrowed mutably, so it overlaps neither operand. With `read_dst`
    // false, `c`'s old values are not read.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            stride(n),
            false,
            a.as_ptr(),
            1,
            stride(k),
            b.as_ptr(),
            1,
            stride(n),
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

fn check_lengths(c: &[f32], a: &[f32], b: &[f32], (m, n, k): (usize, usize, usize)) {
    assert!(c.len() >= m * n, "C is shorter than [{m}, {n}]");
    assert!(a.len() >= m * k, "A is shorter than [{m}, {k}]");
    assert!(b.len() >= k * n, "B is shorter than [{k}, {n}]");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_products_agree_with_the_definition() {
        for (m, n, k) in [(1, 1, 1), (6, 16, 25), (7, 33, 50), (16, 64, 144)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
            let mut want = vec![0.0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                }
            }
            let (mut own, mut crate_c) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            own_product(&mut own, &a, &b, (m, n, k));
            gemm_crate_product(&mut crate_c, &a, &b, (m, n, k));
            // Small integers: every partial sum is exact in f32.
            assert_eq!(own, want, "own, {m}×{n}×{k}");
            assert_eq!(crate_c, want, "gemm crate, {m}×{n}×{k}");
        }
    }
}
