//! Criterion benchmarks of single steps: Meridian's DP-SGD step and a plain
//! SGD step for each workload, the noise within the DP step, and the
//! accountants' ε for a long run.
//! `cargo bench -p benches`; whole-epoch throughput and the comparison with
//! Opacus come from the `bench-table` binary instead.
//!
//! Batches here have exactly B rows (drawn uniformly, untimed, by
//! `iter_batched`'s setup), so that DP and plain steps time the same work;
//! the DP step includes placing the parameters, the clipped sum, the noise
//! and the update, as in the worker.

use std::hint::black_box;

use benches::workload::{
    ACCOUNTANT_DELTA, ACCOUNTANT_NOISE_MULTIPLIER, ACCOUNTANT_SAMPLE_RATE, ACCOUNTANT_STEPS,
};
use benches::{Batch, DpSgd, PlainSgd, Workload};
use burn::tensor::Device;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn dpsgd_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("dpsgd_step");
    group.sample_size(20);
    for w in Workload::ALL {
        let data = w.dataset();
        let mut dp = DpSgd::new(w, &Device::flex()).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(w.seed());
        group.throughput(Throughput::Elements(w.batch_size() as u64));
        group.bench_function(w.key(), |b| {
            b.iter_batched(
                || Batch::random(&data, w.batch_size(), &mut rng),
                |batch| dp.step(&batch).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn plain_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("plain_step");
    group.sample_size(20);
    for w in Workload::ALL {
        let data = w.dataset();
        let mut plain = PlainSgd::new(w, &Device::flex()).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(w.seed());
        group.throughput(Throughput::Elements(w.batch_size() as u64));
        group.bench_function(w.key(), |b| {
            b.iter_batched(
                || Batch::random(&data, w.batch_size(), &mut rng),
                |batch| plain.step(&batch).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// The noise a DP-SGD step adds, one value per parameter: Meridian's
/// hardened sampler draws four Ziggurat normals from ChaCha12 per value
/// (measured here on one thread, without the prefetching DP-SGD uses).
fn noise(c: &mut Criterion) {
    let mut group = c.benchmark_group("noise");
    let mut source = privacy::NoiseSource::new().unwrap();
    for w in Workload::ALL {
        let params = w.initial_params().unwrap();
        group.throughput(Throughput::Elements(params.len() as u64));
        group.bench_function(w.key(), |b| {
            b.iter_batched_ref(
                || params.clone(),
                |values| source.add_gaussian_noise(values, 1.0).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn accountant(c: &mut Criterion) {
    let mut group = c.benchmark_group("accountant");
    group.sample_size(10);
    let steps = black_box(ACCOUNTANT_STEPS);
    group.bench_function("rdp_10k_steps", |b| {
        b.iter(|| {
            privacy::dpsgd_epsilon(
                ACCOUNTANT_SAMPLE_RATE,
                ACCOUNTANT_NOISE_MULTIPLIER,
                steps,
                ACCOUNTANT_DELTA,
            )
            .unwrap()
        })
    });
    group.bench_function("pld_10k_steps", |b| {
        b.iter(|| {
            privacy::dpsgd_epsilon_pld(
                ACCOUNTANT_SAMPLE_RATE,
                ACCOUNTANT_NOISE_MULTIPLIER,
                steps,
                ACCOUNTANT_DELTA,
            )
            .unwrap()
        })
    });
    group.finish();
}

criterion_group!(steps, dpsgd_step, plain_step, noise);
criterion_group!(accountants, accountant);
criterion_main!(steps, accountants);
