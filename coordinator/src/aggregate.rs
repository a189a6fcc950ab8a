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

/// One round of client-level DP aggregation (DP-FedAvg with an optional
/// adaptive clip): updates are clipped to L2 norm `clip` and summed with
/// equal weights, the sum is noised once, then averaged over the updates.
pub struct ClientDpRound {
    sum: Vec<f64>,
    clip: f64,
    count: usize,
    unclipped: usize,
}

/// What a client-level DP round produced.
pub struct ClientDpOutcome {
    /// Updates folded.
    pub count: usize,
    /// Updates whose norm was at most the clip (before noise).
    pub unclipped: usize,
    /// The clip for the next round (unchanged unless adaptive).
    pub next_clip: f64,
}

impl ClientDpRound {
    /// An empty round over vectors of length `d` with clip `clip`.
    pub fn new(d: usize, clip: f64) -> ClientDpRound {
        ClientDpRound {
            sum: vec![0.0; d],
            clip,
            count: 0,
            unclipped: 0,
        }
    }

    /// Clips `update` to the round's clip and adds it.
    pub fn fold(&mut self, update: &[f32]) {
        let norm = update.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        if norm <= self.clip {
            self.unclipped += 1;
        }
        let factor = (self.clip / norm.max(f64::MIN_POSITIVE)).min(1.0);
        for (s, u) in self.sum.iter_mut().zip(update) {
            *s += factor * f64::from(*u);
        }
        self.count += 1;
    }

    /// Adds N(0, (z·clip)²) to the sum with the *current* clip, applies the
    /// mean to `global`, and only then computes the next clip from a noised
    /// count of unclipped updates (Andrew et al. 2021).
    pub fn apply(
        mut self,
        global: &mut [f32],
        eta: f64,
        spec: &proto::job::ClientDpSpec,
        noise: &mut privacy::noise::NoiseSource,
    ) -> Result<ClientDpOutcome, privacy::noise::NoiseError> {
        let mut draws = vec![0.0; self.sum.len()];
        noise.fill_gaussian(&mut draws, spec.update_noise_multiplier() * self.clip)?;
        let m = self.count.max(1) as f64;
        for ((g, s), n) in global.iter_mut().zip(&self.sum).zip(&draws) {
            *g = (f64::from(*g) + eta * (s + n) / m) as f32;
        }
        let next_clip = match &spec.adaptive {
            None => self.clip,
            Some(a) => {
                let mut count_noise = [0.0];
                noise.fill_gaussian(&mut count_noise, a.count_noise_multiplier)?;
                let fraction = (self.unclipped as f64 + count_noise[0]) / m;
                self.clip * (-a.learning_rate * (fraction - a.target_quantile)).exp()
            }
        };
        self.sum.clear();
        Ok(ClientDpOutcome {
            count: self.count,
            unclipped: self.unclipped,
            next_clip,
        })
    }
}

#[cfg(test)]
mod client_dp_tests {
    use super::*;
    use proto::job::{AdaptiveClipSpec, ClientDpSpec};

    #[test]
    fn clipping_bounds_each_site_and_adaptive_clip_moves_towards_the_quantile() {
        let spec = ClientDpSpec {
            clip: 1.0,
            noise_multiplier: 1e-9,
            adaptive: None,
        };
        let mut noise = privacy::noise::NoiseSource::from_seed_for_tests(1);
        let mut round = ClientDpRound::new(2, 1.0);
        round.fold(&[30.0, 40.0]); // norm 50 -> scaled to norm 1
        round.fold(&[0.3, 0.4]); // norm 0.5, unclipped
        let mut global = vec![0.0f32, 0.0];
        let out = round.apply(&mut global, 1.0, &spec, &mut noise).unwrap();
        assert_eq!((out.count, out.unclipped), (2, 1));
        assert!((global[0] - 0.45).abs() < 1e-6 && (global[1] - 0.6).abs() < 1e-6, "{global:?}");
        assert_eq!(out.next_clip, 1.0);

        // Every update is clipped (fraction 0 < target 0.5): the clip grows, by exp(0.2 * 0.5) without noise.
        let adaptive = ClientDpSpec {
            clip: 1.0,
            noise_multiplier: 1.0,
            adaptive: Some(AdaptiveClipSpec {
                target_quantile: 0.5,
                learning_rate: 0.2,
                count_noise_multiplier: 1e-9,
            }),
        };
        let mut round = ClientDpRound::new(1, 1.0);
        round.fold(&[5.0]);
        round.fold(&[-7.0]);
        let mut global = vec![0.0f32];
        let out = round.apply(&mut global, 1.0, &adaptive, &mut noise).unwrap();
        assert!((out.next_clip - (0.1f64).exp()).abs() < 1e-6, "{}", out.next_clip);
    }
}
