#!/usr/bin/env python3
"""The Python side of the DP-SGD comparison: plain PyTorch and Opacus on
the workloads `bench-table` runs, defined the same way (see
`benches/src/data.rs` and `benches/src/workload.rs`).

- Data: SplitMix64, x[i, j] = 2 * u(seed, i * D + j) - 1 as f32, label 1
  when the first five features sum to more than 0 (the generator is checked
  below against the values `benches/src/data/tests.rs` pins).
- Models: MLP-A 30-64-64-2 (N = 569, seed 1, B = 64), MLP-B 17-128-128-2
  (N = 320,000, seed 2, B = 256), CNN conv5(16)-pool-conv5(32)-pool-fc128-2
  on 1x28x28 (N = 10,000, seed 3, B = 64); ReLU, cross-entropy, SGD lr 0.05.
- DP-SGD: Opacus' GradSampleModule and DPOptimizer, sigma = 1, C = 1,
  Poisson sampling with q = 1 / ceil(N / B) drawn as a Bernoulli mask over
  the in-memory tensor (the fastest Python path: no DataLoader), ceil(N / B)
  steps an epoch.
- Plain: floor(N / B) shuffled batches of exactly B an epoch.
- Throughput: examples per second over whole epochs, warm-up epochs until 3 s
  have passed (at least one), then the median of at least 5 epochs (more until
  10 s are measured), 2 threads.

Usage (torch 2.15.0 and opacus 1.6.0 from PyPI, see requirements.txt):

    python3 benches/python/opacus_reference.py [--workload mlp-a|mlp-b|cnn|all] [--json]
"""

import argparse
import json
import platform
import statistics
import time
import warnings

import numpy as np
import torch
from torch import nn

MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(seed, idx):
    """SplitMix64's idx-th output from state seed (numpy uint64 wraps mod 2^64)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (idx + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def dataset(seed, n, dim):
    idx = np.arange(n * dim, dtype=np.uint64)
    u = (splitmix64(seed, idx) >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)
    x = (np.float32(2.0) * u - np.float32(1.0)).reshape(n, dim)
    y = (x[:, :5].astype(np.float64).sum(axis=1) > 0).astype(np.int64)
    return x, y


def check_generator():
    """The values benches/src/data/tests.rs pins, so both sides train on the same rows."""
    assert int(splitmix64(0, np.uint64(0))) == 0xE220A8397B1DCDAF
    assert int(splitmix64(3, np.uint64(12345))) == 0x99340C48636225C0
    x, y = dataset(1, 569, 30)
    assert [float(v) for v in x[0, :3]] == [0.13312304019927979, 0.49156343936920166, 0.9420053958892822]
    assert float(x[568, 29]) == 0.22354066371917725
    assert list(y[:12]) == [1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1, 0]
    _, y = dataset(3, 12, 784)
    assert list(y) == [0, 1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 1]


def mlp(widths):
    layers = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 2),
    )


WORKLOADS = {
    "mlp-a": dict(name="MLP-A", seed=1, n=569, dim=30, batch=64, model=lambda: mlp([30, 64, 64, 2]), shape=None),
    "mlp-b": dict(name="MLP-B", seed=2, n=320_000, dim=17, batch=256, model=lambda: mlp([17, 128, 128, 2]), shape=None),
    "cnn": dict(name="CNN", seed=3, n=10_000, dim=784, batch=64, model=cnn, shape=(1, 28, 28)),
}

LR = 0.05
SIGMA = 1.0
CLIP = 1.0
WARMUP_SECS = 3.0
MEASURED_EPOCHS = 5
MEASURED_SECS = 10.0


def measure(epoch):
    """Warm-up epochs for WARMUP_SECS (at least one), then epochs until both
    minimums are met; median ex/s."""
    start = time.perf_counter()
    epoch()
    while time.perf_counter() - start < WARMUP_SECS:
        epoch()
    rates, spent = [], 0.0
    while len(rates) < MEASURED_EPOCHS or spent < MEASURED_SECS:
        start = time.perf_counter()
        examples = epoch()
        secs = time.perf_counter() - start
        spent += secs
        rates.append(examples / secs)
    return statistics.median(rates), len(rates)


def plain(w, x, y):
    torch.manual_seed(w["seed"])
    model = w["model"]()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    n, b = len(y), w["batch"]
    steps = n // b
    gen = torch.Generator().manual_seed(w["seed"])

    def epoch():
        order = torch.randperm(n, generator=gen)
        for s in range(steps):
            idx = order[s * b:(s + 1) * b]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        return steps * b

    return measure(epoch)


def dp(w, x, y):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(w["seed"])
    model = GradSampleModule(w["model"]())
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR),
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        expected_batch_size=w["batch"],
    )
    loss_fn = nn.CrossEntropyLoss()
    n, b = len(y), w["batch"]
    steps = -(-n // b)
    q = 1.0 / steps
    gen = torch.Generator().manual_seed(w["seed"])

    def epoch():
        examples = 0
        for _ in range(steps):
            idx = (torch.rand(n, generator=gen) < q).nonzero(as_tuple=True)[0]
            if len(idx) == 0:
                # An empty Poisson batch still takes a step of pure noise
                # in DP-SGD; Opacus needs at least one row to run its hooks,
                # and with q = 1/ceil(N/B) this has probability < 1e-27.
                continue
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            examples += len(idx)
        return examples

    return measure(epoch)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="all", choices=["all", *WORKLOADS])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # Opacus' hooks fire on inputs that need no gradient; harmless here.
    warnings.filterwarnings("ignore", message="Full backward hook")
    check_generator()
    import opacus

    keys = list(WORKLOADS) if args.workload == "all" else [args.workload]
    rows = []
    for key in keys:
        w = WORKLOADS[key]
        xs, ys = dataset(w["seed"], w["n"], w["dim"])
        x = torch.from_numpy(xs)
        if w["shape"] is not None:
            x = x.reshape(-1, *w["shape"])
        y = torch.from_numpy(ys)
        plain_rate, plain_epochs = plain(w, x, y)
        dp_rate, dp_epochs = dp(w, x, y)
        rows.append(dict(
            workload=w["name"], plain_examples_per_sec=plain_rate, plain_epochs=plain_epochs,
            dp_examples_per_sec=dp_rate, dp_epochs=dp_epochs, dp_cost=plain_rate / dp_rate,
        ))
        if not args.json:
            print(f"{w['name']}: plain {plain_rate:,.0f} ex/s ({plain_epochs} epochs), "
                  f"Opacus DP-SGD {dp_rate:,.0f} ex/s ({dp_epochs} epochs), DP cost {plain_rate / dp_rate:.2f}x",
                  flush=True)

    meta = dict(torch=torch.__version__, opacus=opacus.__version__, threads=args.threads,
                cpu=platform.processor() or platform.machine())
    if args.json:
        print(json.dumps(dict(meta, rows=rows)))
    else:
        print(f"torch {meta['torch']}, opacus {meta['opacus']}, {args.threads} threads")


if __name__ == "__main__":
    main()
