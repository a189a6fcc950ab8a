//! Property tests of the accountants: monotonicity, order-independence of
//! composition, and PLD never looser than RDP.

use proptest::prelude::*;

use super::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// More steps never cost less; more noise never costs more.
    #[test]
    fn epsilon_is_monotone(q in 0.001f64..0.2, sigma in 0.6f64..5.0, steps in 1u64..2000) {
        let e = |q: f64, s: f64, t: u64| dpsgd_epsilon(q, s, t, 1e-5).map(|e| e.epsilon);
        let base = e(q, sigma, steps)?;
        prop_assert!(e(q, sigma, steps + 1)? >= base - 1e-12);
        prop_assert!(e(q, sigma * 1.1, steps)? <= base + 1e-12);
        prop_assert!(e((q * 1.1).min(1.0), sigma, steps)? >= base - 1e-12);
    }

    /// Composition is order-independent: a ledger's ε does not depend on the order of its entries.
    #[test]
    fn composition_commutes(a in (0.001f64..0.5, 0.6f64..4.0, 1u64..500), b in (0.001f64..0.5, 0.6f64..4.0, 1u64..500)) {
        let mut ab = RdpAccountant::new();
        ab.compose_poisson_gaussian(a.0, a.1, a.2)?;
        ab.compose_poisson_gaussian(b.0, b.1, b.2)?;
        let mut ba = RdpAccountant::new();
        ba.compose_poisson_gaussian(b.0, b.1, b.2)?;
        ba.compose_poisson_gaussian(a.0, a.1, a.2)?;
        let (x, y) = (ab.epsilon(1e-5)?.epsilon, ba.epsilon(1e-5)?.epsilon);
        prop_assert!((x - y).abs() <= 1e-9 * x.max(1.0));
    }

    /// The PLD accountant is never looser than RDP.
    #[test]
    fn pld_is_at_most_rdp(q in 0.005f64..0.1, sigma in 0.8f64..3.0, steps in 1u64..300) {
        let rdp = dpsgd_epsilon(q, sigma, steps, 1e-5)?.epsilon;
        let pld = dpsgd_epsilon_pld(q, sigma, steps, 1e-5)?;
        prop_assert!(pld <= rdp * (1.0 + 1e-6), "pld {pld} > rdp {rdp}");
    }
}
