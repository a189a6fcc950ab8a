//! Criterion benchmarks of single steps: Meridian's DP-SGD step and a plain
//! SGD step for each workload, the noise within the DP step, the
//! accountants' ε for a long run, the coordinator's FedAvg fold, and the
//! CPU side of a model transfer (encoding into ≤ 1 MiB chunks, checking and
//! assembling them), and the convolutions' matrix products by Meridian's
//! kernel against the `gemm` crate's. Whole rounds and transfers over mTLS are measured by
//! `meridian sim` (see `BENCHMARKS.md`): they need two processes and a
//! socket, not a loop criterion can repeat in-process.
//! `cargo bench -p meridian-benches --features criterion`; whole-epoch
//! throughput and the comparison with Opacus come from the `bench-table`
//! binary instead.
//!
//! Batches here have exactly B rows (drawn uniformly, untimed, by
//! `iter_batched`'s setup), so that DP and plain steps time the same work;
//! the DP step includes placing the parameters, the clipped sum, the noise
//! and the update, as in the worker.

#![allow(clippy::unwrap_used, reason = "a benchmark harness: a failed set-up step should stop the run")]

use std::hint::black_box;

use burn::tensor::Device;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use meridian_benches::workload::{
    ACCOUNTANT_DELTA, ACCOUNTANT_NOISE_MULTIPLIER, ACCOUNTANT_SAMPLE_RATE, ACCOUNTANT_STEPS,
};
use meridian_benches::{Batch, DpSgd, PlainSgd, Workload};
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
/// hardened sampler draws four Ziggurat normals from AES-256-CTR per value
/// (measured here on one thread, without the prefetching DP-SGD uses).
fn noise(c: &mut Criterion) {
    let mut group = c.benchmark_group("noise");
    let mut source = meridian_privacy::NoiseSource::new().unwrap();
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
            meridian_privacy::dpsgd_epsilon(
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
            meridian_privacy::dpsgd_epsilon_pld(
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

/// The coordinator's streaming FedAvg: one update of d = 1,000,000 folded
/// into the `f64` running sum, in bytes of update data per second.
fn fedavg_fold(c: &mut Criterion) {
    const D: usize = 1_000_000;
    let mut group = c.benchmark_group("aggregation");
    let update: Vec<f32> = (0..D).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let mut avg = meridian_coordinator::aggregate::FedAvg::new(D);
    group.throughput(Throughput::Bytes((D * 4) as u64));
    group.bench_function("fedavg_fold_1m", |b| b.iter(|| avg.fold(black_box(&update), 3.0)));
    group.finish();
}

/// The benchmark CNN's per-example matrix products (forward of each
/// convolution, the second's weight and patch gradients, the first's weight
/// gradient), by Meridian's own kernel and by the `gemm` crate Burn builds,
/// one thread each, in multiply-adds per second.
fn gemm_products(c: &mut Criterion) {
    use meridian_models::kernels::{gemm_crate_product, own_product};
    let mut group = c.benchmark_group("gemm");
    let shapes = [
        ("conv1_forward", (16, 576, 25)),
        ("conv2_forward", (32, 64, 400)),
        ("conv2_weight_grad", (400, 32, 64)),
        ("conv2_patch_grad", (400, 64, 32)),
        ("conv1_weight_grad", (25, 16, 576)),
    ];
    for (name, (m, n, k)) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 97) as f32 * 1e-2).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 89) as f32 * 1e-2).collect();
        let mut out = vec![0.0f32; m * n];
        group.throughput(Throughput::Elements((m * n * k) as u64));
        group.bench_function(format!("own/{name}"), |bench| {
            bench.iter(|| own_product(black_box(&mut out), black_box(&a), black_box(&b), (m, n, k)))
        });
        group.bench_function(format!("gemm_crate/{name}"), |bench| {
            bench.iter(|| gemm_crate_product(black_box(&mut out), black_box(&a), black_box(&b), (m, n, k)))
        });
    }
    group.finish();
}

/// A 10M-parameter (40 MB) model through the wire format, without the
/// socket: encoded into chunks as the coordinator serves it, then each
/// chunk checked and assembled as a site receives it.
fn transfer_codec(c: &mut Criterion) {
    const D: usize = 10_000_000;
    let mut group = c.benchmark_group("transfer");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((D * 4) as u64));
    let model: Vec<f32> = (0..D).map(|i| (i % 997) as f32 * 1e-3).collect();
    group.bench_function("encode_40mb", |b| {
        b.iter(|| meridian_wire::tensor::encode_chunks(black_box(&model)).map(|c| c.len()).sum::<usize>())
    });
    let chunks: Vec<_> = meridian_wire::tensor::encode_chunks(&model).collect();
    // What the coordinator does with an update (checks, then writes each
    // chunk out) and what a site does with a model (checks and assembles).
    let check_all = |mut check: meridian_wire::tensor::ChunkValidator| {
        for chunk in &chunks {
            check.check(chunk).unwrap();
        }
        check.finish().unwrap();
        check
    };
    group.bench_function("check_40mb", |b| {
        b.iter(|| check_all(meridian_wire::tensor::ChunkValidator::with_norm(D)).norm())
    });
    group.bench_function("check_finite_40mb", |b| b.iter(|| check_all(meridian_wire::tensor::ChunkValidator::new(D))));
    group.bench_function("assemble_40mb", |b| {
        b.iter(|| {
            let mut assemble = meridian_wire::tensor::ChunkAssembler::new(D);
            for chunk in &chunks {
                assemble.push(chunk).unwrap();
            }
            assemble.finish().unwrap()
        })
    });
    // The same into memory the receiver used before, as a site pulling one
    // model after another does: the copy without the page faults.
    let mut buffer = Some(Vec::new());
    group.bench_function("assemble_reused_40mb", |b| {
        b.iter(|| {
            let mut assemble = meridian_wire::tensor::ChunkAssembler::reusing(D, buffer.take().unwrap_or_default());
            for chunk in &chunks {
                assemble.push(chunk).unwrap();
            }
            buffer = Some(assemble.finish().unwrap());
        })
    });
    group.finish();
}

criterion_group!(steps, dpsgd_step, plain_step, noise, gemm_products);
criterion_group!(accountants, accountant);
criterion_group!(coordination, fedavg_fold, transfer_codec);
criterion_main!(steps, accountants, coordination);
