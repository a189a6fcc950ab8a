//! A round's metrics, derived from what the sites released: the pooled
//! held-out metrics of the sum of their noised evaluation histograms, each
//! site's own, the pooled clipped fraction of their released clip counts,
//! and, apart and marked, the exact metrics a site's policy releases.
//!
//! Nothing here is a new release: every number is post-processing of
//! values each site charged to its ledger, so a reviewer holding the
//! histograms (`job status --json`) recomputes every metric.

use std::collections::BTreeMap;

use meridian_spec::evaluation::{Histogram, ScoreBins};
use meridian_wire::pb;

use crate::store::{EvaluationRow, UpdateRow};

/// The prefix under which a round's stored training metrics keep the
/// exact ones a site's policy released, apart from the derived ones.
pub const EXACT: &str = "exact.";

/// A round's held-out evaluation, as the scientist reads it.
#[derive(Default)]
pub struct RoundEvaluation {
    /// Metrics of the sum of the sites' histograms.
    pub pooled: BTreeMap<String, f64>,
    /// Each site's release and its metrics.
    pub sites: Vec<pb::SiteEvaluation>,
    /// Example-weighted means of exact metrics, from sites that release them.
    pub exact: BTreeMap<String, f64>,
}

/// The evaluation of one round's model from the sites' `rows` of it.
pub fn evaluation(rows: &[&EvaluationRow], bins: &ScoreBins) -> RoundEvaluation {
    let fitting: Vec<&&EvaluationRow> = rows.iter().filter(|r| r.histogram.fits(bins)).collect();
    let sites = fitting
        .iter()
        .map(|r| pb::SiteEvaluation {
            site: r.site.clone(),
            negatives: r.histogram.negatives.clone(),
            positives: r.histogram.positives.clone(),
            noise_scale: r.noise_scale,
            metrics: r.histogram.metrics(bins, r.noise_scale * r.noise_scale).into_iter().collect(),
        })
        .collect();
    let pooled = Histogram::sum(fitting.iter().map(|r| &r.histogram))
        .map(|h| h.metrics(bins, fitting.iter().map(|r| r.noise_scale * r.noise_scale).sum()))
        .unwrap_or_default();
    let mut exact = WeightedMean::default();
    for r in rows {
        exact.add(&r.exact, r.exact.get("examples").copied().unwrap_or(1.0));
    }
    RoundEvaluation { pooled, sites, exact: exact.finish() }
}

/// A round's training metrics from its updates: the clipped fraction of
/// the pooled released clip counts, and the exact metrics of sites that
/// release them under [`EXACT`] names.
pub fn training(updates: &[UpdateRow]) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    let counted: Vec<(f64, f64)> =
        updates.iter().filter_map(|u| u.released.clipped.map(|c| (c as f64, u.released.clip_denominator))).collect();
    let denominator: f64 = counted.iter().map(|c| c.1).sum();
    if denominator > 0.0 {
        let clipped: f64 = counted.iter().map(|c| c.0).sum();
        m.insert("clipped_fraction".to_string(), (clipped / denominator).clamp(0.0, 1.0));
    }
    let mut exact = WeightedMean::default();
    for u in updates {
        exact.add(&u.released.exact, u.num_examples as f64);
    }
    m.extend(exact.finish().into_iter().map(|(k, v)| (format!("{EXACT}{k}"), v)));
    m
}

/// Sample-weighted mean of metric maps.
#[derive(Default)]
pub struct WeightedMean {
    sums: BTreeMap<String, (f64, f64)>,
}

impl WeightedMean {
    /// Adds one party's metrics with `weight`.
    pub fn add(&mut self, metrics: &BTreeMap<String, f64>, weight: f64) {
        for (k, v) in metrics {
            if v.is_finite() {
                let e = self.sums.entry(k.clone()).or_insert((0.0, 0.0));
                e.0 += weight * v;
                e.1 += weight;
            }
        }
    }

    /// The means.
    pub fn finish(&self) -> BTreeMap<String, f64> {
        self.sums.iter().filter(|(_, (_, w))| *w > 0.0).map(|(k, (s, w))| (k.clone(), s / w)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RoundRelease;

    fn update(site: &str, clipped: Option<i64>, denominator: f64) -> UpdateRow {
        UpdateRow {
            site: site.to_string(),
            num_examples: 100,
            released: RoundRelease { clipped, clip_denominator: denominator, exact: BTreeMap::new() },
            path: String::new(),
        }
    }

    #[test]
    fn the_clipped_fraction_pools_the_released_counts() {
        let m = training(&[update("a", Some(30), 100.0), update("b", Some(-5), 300.0), update("c", None, 0.0)]);
        assert!((m["clipped_fraction"] - 25.0 / 400.0).abs() < 1e-12, "{m:?}");
        assert!(!training(&[update("c", None, 0.0)]).contains_key("clipped_fraction"));
    }

    #[test]
    fn a_round_pools_the_sites_histograms_and_keeps_each() {
        let bins = ScoreBins { bins: 4, logit_min: -2.0, logit_max: 2.0 };
        let row = |site: &str, negatives: Vec<i64>, positives: Vec<i64>| EvaluationRow {
            round: 1,
            site: site.to_string(),
            histogram: Histogram { negatives, positives },
            noise_scale: 3.0,
            exact: BTreeMap::new(),
        };
        let a = row("a", vec![5, 3, 1, 0], vec![0, 0, 0, 0]);
        let b = row("b", vec![2, 1, 0, 0], vec![0, 1, 3, 6]);
        let stale = row("old", vec![1], vec![1]);
        let e = evaluation(&[&a, &b, &stale], &bins);
        assert_eq!(e.sites.len(), 2);
        assert!(!e.sites[0].metrics.contains_key("auc"), "site a holds one class only");
        let pooled = Histogram::sum([&a.histogram, &b.histogram]).unwrap().metrics(&bins, 18.0);
        assert_eq!(e.pooled, pooled);
        assert!(e.pooled["auc"] > 0.9);
    }
}
