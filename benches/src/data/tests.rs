//! The generator against values computed independently (Python integers,
//! reproduced in the comments), and the label rule.

use super::*;

// python3: M = 2**64 - 1
// def sm(seed, i):
//     z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & M
//     z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
//     z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
//     return z ^ (z >> 31)
#[test]
fn splitmix64_matches_reference_values() {
    // Seed 0's first output is SplitMix64's published first value.
    assert_eq!(splitmix64(0, 0), 0xe220_a839_7b1d_cdaf);
    assert_eq!(splitmix64(1, 0), 0x910a_2dec_8902_5cc1);
    assert_eq!(splitmix64(1, 1), 0xbeeb_8da1_658e_ec67);
    assert_eq!(splitmix64(2, 0), 0x9758_35de_1c97_56ce);
    assert_eq!(splitmix64(3, 12_345), 0x9934_0c48_6362_25c0);
}

#[test]
fn uniform_is_the_top_24_bits() {
    // (sm(1, 0) >> 40) * 2**-24
    assert_eq!(f64::from(uniform(1, 0)), 0.5665615200996399);
    assert_eq!(f64::from(uniform(0, 0)), 0.8833107948303223);
}

#[test]
fn features_match_reference_rows() {
    // [2 * u(seed, i * D + j) - 1 ...] in Python floats (f64, exact here)
    let widen = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    let a = Dataset::generate(1, 569, 30);
    assert_eq!(widen(&a.row(0)[..3]), [0.13312304019927979, 0.49156343936920166, 0.9420053958892822]);
    assert_eq!(f64::from(a.row(568)[29]), 0.22354066371917725);
    let b = Dataset::generate(3, 3, 784);
    assert_eq!(widen(&b.row(0)[..3]), [-0.773099422454834, 0.40058696269989014, 0.22594928741455078]);
    assert!(a.x.iter().all(|v| (-1.0..1.0).contains(v)));
}

#[test]
fn labels_match_reference_rows() {
    // int(sum(row(seed, i, D)[:5]) > 0) for i in range(12)
    let cases: [(u64, usize, [u8; 12]); 3] = [
        (1, 30, [1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1, 0]),
        (2, 17, [1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0]),
        (3, 784, [0, 1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 1]),
    ];
    for (seed, dim, want) in cases {
        assert_eq!(Dataset::generate(seed, 12, dim).y, want, "seed {seed}, D = {dim}");
    }
}

#[test]
fn labels_follow_the_rule() {
    let data = Dataset::generate(2, 2_000, 17);
    for i in 0..data.rows() {
        let sum: f64 = data.row(i)[..5].iter().map(|&v| f64::from(v)).sum();
        assert_eq!(data.y[i], u8::from(sum > 0.0), "row {i}");
    }
    assert_eq!(label(&[0.5, -0.5, 0.0, 0.0, 0.0, 9.0]), 0, "a zero sum is class 0; feature 6 is ignored");
    let positives = data.y.iter().filter(|&&l| l == 1).count();
    assert!((900..1100).contains(&positives), "{positives} positives of 2000");
}
