//! Weighted federated averaging over flat parameter vectors.
//!
//! Updates are folded into one running sum as they are read, so memory is
//! O(d) whatever the number of sites: `Σ nᵢ Δᵢ` accumulates in `f64`, then
//! `θ ← θ + η · Σ nᵢ Δᵢ / Σ nᵢ`.

use ndarray::{ArrayView1, Zip};

/// A running weighted sum of updates.
pub struct FedAvg {
    sum: ndarray::Array1<f64>,
    total_weight: f64,
    count: usize,
}

impl FedAvg {
    /// An empty sum over vectors of length `d`.
    pub fn new(d: usize) -> FedAvg {
        FedAvg {
            sum: ndarray::Array1::zeros(d),
            total_weight: 0.0,
            count: 0,
        }
    }

    /// Adds `weight · update`. The caller has checked the length.
    pub fn fold(&mut self, update: &[f32], weight: f64) {
        let view = ArrayView1::from(update);
        Zip::from(&mut self.sum).and(&view).for_each(|s, &u| *s += weight * f64::from(u));
        self.total_weight += weight;
        self.count += 1;
    }

    /// Updates folded so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Applies the weighted mean update to `global` with server learning rate `eta`.
    pub fn apply(&self, global: &mut [f32], eta: f64) {
        if self.total_weight <= 0.0 {
            return;
        }
        let scale = eta / self.total_weight;
        let mut view = ndarray::ArrayViewMut1::from(global);
        Zip::from(&mut view).and(&self.sum).for_each(|g, &s| *g = (f64::from(*g) + scale * s) as f32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_mean_of_updates() {
        let mut avg = FedAvg::new(2);
        avg.fold(&[1.0, 0.0], 1.0);
        avg.fold(&[0.0, 4.0], 3.0);
        let mut global = vec![10.0, 10.0];
        avg.apply(&mut global, 1.0);
        assert_eq!(global, vec![10.25, 13.0]);
        assert_eq!(avg.count(), 2);
    }
}
