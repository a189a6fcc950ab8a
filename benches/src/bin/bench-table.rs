//! `bench-table`: trains each workload for whole epochs with Meridian's
//! DP-SGD and with plain SGD, times ε queries of both accountants, and
//! prints the markdown tables for `BENCHMARKS.md`, next to the Opacus
//! reference figures.
//!
//! Run with `cargo run --release -p meridian-benches --bin bench-table -- [--quick]
//! [--device cpu|gpu] [--workload mlp-a|mlp-b|cnn|all] [--python PATH]`.
//! Progress goes to stderr, the tables to stdout.
//!
//! With `--python`, the Opacus column is measured in the same run, on the same
//! machine: after each workload, that interpreter runs
//! `benches/python/opacus_reference.py` (plain PyTorch and Opacus on the same
//! rows and models). Without it, the column holds the reference figures of
//! another machine of this class, and the table says so.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use meridian_benches::workload::{
    ACCOUNTANT_DELTA, ACCOUNTANT_NOISE_MULTIPLIER, ACCOUNTANT_SAMPLE_RATE, ACCOUNTANT_STEPS,
};
use meridian_benches::{DpSgd, PlainSgd, Reference, StepError, WorkerRound, Workload};

const USAGE: &str = "usage: bench-table [--quick] [--device cpu|gpu] [--workload mlp-a|mlp-b|cnn|all] [--python PATH]";

/// The Python side of the comparison, run by `--python`.
const OPACUS_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/opacus_reference.py");

/// In a full run, whole warm-up epochs until this much time has passed (at
/// least one): criterion's default warm-up. After a single epoch the CNN's
/// next DP epochs still ran below the rest (`docs/perf-log.md`).
const WARMUP_SECS: f64 = 3.0;
/// Fewest measured epochs after the warm-up, in a full run...
const MEASURED_EPOCHS: usize = 5;
/// ...and more, whole ones, until this much time is measured (MLP-A's
/// epochs take milliseconds): long enough that a few seconds in which the
/// virtual machine runs slower (seen in long runs of every row;
/// `docs/perf-log.md`) move the median little...
const MEASURED_SECS: f64 = 10.0;
/// ...but no more than this many (enough for MLP-A's short epochs to fill
/// the measured time; `docs/perf-log.md`).
const MAX_EPOCHS: usize = 20_000;
/// Steps of MLP-B's one measured "epoch" with `--quick` (a tenth of one).
const QUICK_MLP_B_STEPS: usize = 125;
/// Warm-up steps with `--quick`.
const QUICK_WARMUP_STEPS: usize = 3;
/// Progress label of the `meridian_worker::train::train_round` cross-check.
const WORKER_LABEL: &str = "worker round";

/// Where the networks compute.
#[derive(Clone, Copy, Debug, PartialEq)]
enum DeviceChoice {
    Cpu,
    Gpu,
}

/// The command line, validated.
#[derive(Debug)]
struct Options {
    quick: bool,
    device: DeviceChoice,
    workloads: Vec<Workload>,
    /// A Python with torch and opacus, to measure the reference in this run.
    python: Option<PathBuf>,
}

fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
    let mut options =
        Options { quick: false, device: DeviceChoice::Cpu, workloads: Workload::ALL.to_vec(), python: None };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg, None),
        };
        let mut value = |name: &str| inline.clone().or_else(|| args.next()).ok_or(format!("{name} needs a value"));
        match flag.as_str() {
            "--quick" => options.quick = true,
            "--device" => {
                options.device = match value("--device")?.as_str() {
                    "cpu" => DeviceChoice::Cpu,
                    "gpu" => DeviceChoice::Gpu,
                    other => return Err(format!("--device: expected cpu or gpu, got '{other}'")),
                }
            }
            "--workload" => {
                let key = value("--workload")?;
                options.workloads = match key.as_str() {
                    "all" => Workload::ALL.to_vec(),
                    _ => vec![
                        Workload::from_key(&key)
                            .ok_or(format!("--workload: expected mlp-a, mlp-b, cnn or all, got '{key}'"))?,
                    ],
                };
            }
            "--python" => options.python = Some(PathBuf::from(value("--python")?)),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    Ok(options)
}

fn device(choice: DeviceChoice) -> Result<Device, String> {
    match choice {
        DeviceChoice::Cpu => meridian_models::default_device(false).map_err(|e| e.to_string()),
        #[cfg(feature = "wgpu")]
        DeviceChoice::Gpu => meridian_models::default_device(true).map_err(|e| e.to_string()),
        #[cfg(not(feature = "wgpu"))]
        DeviceChoice::Gpu => Err(
            "--device gpu needs the `wgpu` feature: cargo run --release -p meridian-benches --features wgpu --bin bench-table"
                .into(),
        ),
    }
}

/// How many steps to warm up with and to time, for one workload.
#[derive(Clone, Copy, Debug)]
struct Plan {
    warmup_steps: usize,
    /// Warm-up repeated until this much time has passed.
    warmup_secs: f64,
    /// At least this many epochs...
    epochs: usize,
    /// ...and as many more (up to [`MAX_EPOCHS`]) as fit in this time.
    secs: f64,
    steps_per_epoch: usize,
}

impl Plan {
    fn new(quick: bool, workload: Workload, steps_per_epoch: usize) -> Plan {
        match (quick, workload) {
            (false, _) => Plan {
                warmup_steps: steps_per_epoch,
                warmup_secs: WARMUP_SECS,
                epochs: MEASURED_EPOCHS,
                secs: MEASURED_SECS,
                steps_per_epoch,
            },
            (true, Workload::MlpB) => Plan {
                warmup_steps: QUICK_WARMUP_STEPS,
                warmup_secs: 0.0,
                epochs: 1,
                secs: 0.0,
                steps_per_epoch: QUICK_MLP_B_STEPS.min(steps_per_epoch),
            },
            (true, _) => {
                Plan { warmup_steps: QUICK_WARMUP_STEPS, warmup_secs: 0.0, epochs: 1, secs: 0.0, steps_per_epoch }
            }
        }
    }
}

/// Throughput of each measured epoch, examples per second.
#[derive(Clone, Debug)]
struct Epochs {
    rates: Vec<f64>,
    examples: Vec<usize>,
}

impl Epochs {
    fn median(&self) -> f64 {
        median(&self.rates)
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Warms up, then times epochs of `run(steps) -> examples` as `plan` says.
fn measure(
    label: &str,
    plan: Plan,
    mut run: impl FnMut(usize) -> Result<usize, StepError>,
) -> Result<Epochs, StepError> {
    // The worker's plan counts rounds, one local epoch each.
    let unit = if label == WORKER_LABEL { "rounds" } else { "steps" };
    let start = Instant::now();
    // At least one call (of `warmup_steps`, which may be 0: no warm-up),
    // then more until `warmup_secs` have passed.
    let mut warmup = 0;
    loop {
        run(plan.warmup_steps)?;
        warmup += plan.warmup_steps;
        if plan.warmup_steps == 0 || start.elapsed().as_secs_f64() >= plan.warmup_secs {
            break;
        }
    }
    eprintln!("  {label}: warm-up {warmup} {unit}, {:.1} s", start.elapsed().as_secs_f64());
    let mut epochs = Epochs { rates: Vec::new(), examples: Vec::new() };
    let mut measured = 0.0;
    while epochs.rates.len() < plan.epochs || (measured < plan.secs && epochs.rates.len() < MAX_EPOCHS) {
        let start = Instant::now();
        let examples = run(plan.steps_per_epoch)?;
        let secs = start.elapsed().as_secs_f64();
        measured += secs;
        epochs.rates.push(examples as f64 / secs);
        epochs.examples.push(examples);
    }
    eprintln!(
        "  {label}: {} epochs of {} {unit}, {:.1} s, median {:.0} ex/s",
        epochs.rates.len(),
        plan.steps_per_epoch,
        measured,
        epochs.median()
    );
    Ok(epochs)
}

/// A workload's results.
struct Row {
    workload: Workload,
    params: usize,
    dp: Epochs,
    dp_plan: Plan,
    plain: Epochs,
    plain_plan: Plan,
    /// `meridian_worker::train::train_round`, one round per epoch (examples expected).
    worker: Epochs,
    worker_plan: Plan,
    /// Plain PyTorch and Opacus, when measured in this run (`--python`).
    measured_reference: Option<Reference>,
}

fn bench_workload(workload: Workload, device: &Device, quick: bool) -> Result<Row, StepError> {
    eprintln!("{}: generating {} rows", workload.name(), workload.rows());
    let data = workload.dataset();
    let params = workload.architecture()?.layout().num_params();

    let dp_plan = Plan::new(quick, workload, workload.steps_per_epoch());
    let mut dp = DpSgd::new(workload, device)?;
    let dp_epochs = measure("DP-SGD", dp_plan, |steps| dp.run(&data, steps))?;

    let plain_plan = Plan::new(quick, workload, workload.plain_steps_per_epoch());
    let mut plain = PlainSgd::new(workload, device)?;
    let plain_epochs = measure("plain", plain_plan, |steps| plain.run(&data, steps))?;

    // One "step" of this plan is one round, i.e. one local epoch.
    let mut round = WorkerRound::new(workload, &data, device)?;
    let (round_steps, round_examples) = round.plan();
    let worker_plan = Plan { warmup_steps: usize::from(!quick), steps_per_epoch: 1, ..Plan::new(quick, workload, 1) };
    let worker_epochs = measure(WORKER_LABEL, worker_plan, |rounds| {
        for _ in 0..rounds {
            round.run()?;
        }
        Ok((rounds as f64 * round_examples).round() as usize)
    })?;
    Ok(Row {
        workload,
        params,
        dp: dp_epochs,
        dp_plan,
        plain: plain_epochs,
        plain_plan,
        worker: worker_epochs,
        worker_plan: Plan { steps_per_epoch: round_steps as usize, ..worker_plan },
        measured_reference: None,
    })
}

/// What `opacus_reference.py --json` measured of one workload.
#[derive(Debug)]
struct PythonRun {
    reference: Reference,
    /// `torch 2.15.0, opacus 1.6.0, 2 threads`, as the script reported them.
    versions: String,
}

/// Runs the Python reference for `workload` with `python`, its progress on
/// stderr, on as many threads as Meridian's kernels use here (one per core;
/// the setting is a 2-core machine).
fn measure_python(python: &Path, workload: Workload) -> Result<PythonRun, String> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).to_string();
    eprintln!("{}: plain PyTorch and Opacus ({}, {threads} threads)", workload.name(), python.display());
    let output = Command::new(python)
        .args([OPACUS_SCRIPT, "--json", "--threads", &threads, "--workload", workload.key()])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("--python {}: {e}", python.display()))?;
    if !output.status.success() {
        return Err(format!("{OPACUS_SCRIPT} failed ({})", output.status));
    }
    parse_python_run(&String::from_utf8_lossy(&output.stdout)).map_err(|e| format!("{OPACUS_SCRIPT}: {e}"))
}

/// Reads the script's one JSON object (one workload's row).
fn parse_python_run(stdout: &str) -> Result<PythonRun, String> {
    let value: serde_json::Value =
        serde_json::from_str(stdout.trim()).map_err(|e| format!("output is not JSON: {e}"))?;
    let row = value["rows"].get(0).ok_or("output has no row (field `rows`)")?;
    let rate = |field: &str| {
        row[field]
            .as_f64()
            .filter(|r| r.is_finite() && *r > 0.0)
            .ok_or(format!("`rows[0].{field}` is not a positive number"))
    };
    let version = |field: &str| value[field].as_str().unwrap_or("unknown").to_string();
    let threads = value["threads"].as_u64().map_or("? threads".to_string(), |n| format!("{n} threads"));
    Ok(PythonRun {
        reference: Reference {
            plain_examples_per_sec: rate("plain_examples_per_sec")?,
            dp_examples_per_sec: rate("dp_examples_per_sec")?,
        },
        versions: format!("torch {}, opacus {}, {threads}", version("torch"), version("opacus")),
    })
}

/// One accountant's ε and the median time of `runs` queries.
struct AccountantTiming {
    epsilon: f64,
    median: Duration,
    runs: usize,
}

fn time_accountant(
    label: &str,
    runs: usize,
    query: impl Fn() -> Result<f64, meridian_privacy::AccountantError>,
) -> Result<AccountantTiming, meridian_privacy::AccountantError> {
    let mut times = Vec::with_capacity(runs);
    let mut epsilon = f64::NAN;
    for _ in 0..runs {
        let start = Instant::now();
        epsilon = std::hint::black_box(query()?);
        times.push(start.elapsed().as_secs_f64());
    }
    let median = Duration::from_secs_f64(median(&times));
    eprintln!("{label}: ε = {epsilon:.4}, median {median:?} over {runs} runs");
    Ok(AccountantTiming { epsilon, median, runs })
}

/// `12345.6` as `12,346`; under 100 with three significant figures.
fn grouped(x: f64) -> String {
    if !x.is_finite() {
        return "—".into();
    }
    if x < 100.0 {
        return format!("{x:.3}").trim_end_matches('0').trim_end_matches('.').to_string();
    }
    let digits = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ratio(x: f64) -> String {
    if x >= 10.0 { format!("{x:.0}×") } else { format!("{x:.2}×") }
}

fn duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} µs", s * 1e6)
    }
}

fn model_label(w: Workload) -> String {
    match w {
        Workload::MlpA => "MLP-A 30-64-64-2, B = 64".into(),
        Workload::MlpB => "MLP-B 17-128-128-2, B = 256".into(),
        Workload::Cnn => "CNN (conv5 16, conv5 32, fc 128), B = 64".into(),
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Streaming FedAvg: bytes of update data folded per second, for 10 updates
/// of d = 1,000,000 parameters (the coordinator's `aggregate::FedAvg`).
fn time_fedavg(runs: usize) -> f64 {
    const D: usize = 1_000_000;
    const UPDATES: usize = 10;
    let updates: Vec<Vec<f32>> =
        (0..UPDATES).map(|k| (0..D).map(|i| ((i * 31 + k * 7) % 1000) as f32 * 1e-3).collect()).collect();
    let mut rates = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = std::time::Instant::now();
        let mut avg = meridian_coordinator::aggregate::FedAvg::new(D);
        for (k, u) in updates.iter().enumerate() {
            avg.fold(u, (k + 1) as f64);
        }
        let mut global = vec![0f32; D];
        avg.apply(&mut global, 1.0);
        std::hint::black_box(&global);
        rates.push((UPDATES * D * 4) as f64 / start.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// Prints every table of `BENCHMARKS.md`: throughput, the epochs behind
/// it, the accountants and the aggregation.
fn print_tables(
    options: &Options,
    rows: &[Row],
    python_versions: Option<&str>,
    rdp: &AccountantTiming,
    pld: &AccountantTiming,
) {
    print_throughput(options, rows, python_versions);
    print_epochs(rows);
    print_accountants(rdp, pld);
    print_aggregation(options);
}

/// The machine, the device and how epochs were measured, as one line.
fn run_description(options: &Options) -> String {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let device = match options.device {
        DeviceChoice::Cpu => {
            "cpu (Meridian's CPU kernels, `meridian_models::cpu`: the batch split across every core; noise drawn ahead on one or two more threads)"
        }
        DeviceChoice::Gpu => "gpu (Burn wgpu)",
    };
    let mode = if options.quick {
        format!(
            "QUICK smoke run ({QUICK_WARMUP_STEPS} warm-up steps, 1 measured epoch, MLP-B {QUICK_MLP_B_STEPS} steps): not for publication"
        )
    } else {
        format!(
            "warm-up epochs for {WARMUP_SECS} s (at least one), then median throughput of at least {MEASURED_EPOCHS} whole epochs (more until {MEASURED_SECS} s are measured)"
        )
    };
    format!("Machine: {} ({threads} threads available); device: {device}; {mode}.\n", cpu_model())
}

/// The throughput table, Meridian next to Opacus, and where the Opacus
/// figures come from.
fn print_throughput(options: &Options, rows: &[Row], python_versions: Option<&str>) {
    println!("## Meridian training throughput\n");
    println!("{}", run_description(options));
    println!(
        "| workload | params | Meridian DP-SGD ex/s | Meridian plain ex/s | DP cost | Opacus DP-SGD ex/s † | Meridian ÷ Opacus (DP) | PyTorch plain ex/s † | Opacus DP cost † |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let reference = row.measured_reference.unwrap_or_else(|| row.workload.opacus_reference());
        let dp = row.dp.median();
        let plain = row.plain.median();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            model_label(row.workload),
            grouped(row.params as f64),
            grouped(dp),
            grouped(plain),
            ratio(plain / dp),
            grouped(reference.dp_examples_per_sec),
            ratio(dp / reference.dp_examples_per_sec),
            grouped(reference.plain_examples_per_sec),
            ratio(reference.plain_examples_per_sec / reference.dp_examples_per_sec),
        );
    }
    match python_versions {
        Some(versions) => println!(
            "\n† measured in this run, on this machine, after each workload's Meridian rows: \
             benches/python/opacus_reference.py ({versions}; the same rows, models, sampling and epochs; \
             Opacus' GradSampleModule and DPOptimizer, batches index-selected from in-memory tensors).\n"
        ),
        None => println!(
            "\n† reference, measured on this machine class, not in this run: shared/fixtures/reference-throughput.md \
             (Opacus 1.6.0 + PyTorch 2.15.0, 2 vCPU AMD EPYC Zen 3, 2 threads, medians). Figures drift between \
             machines and sessions; ratios against them are indicative only (`--python` measures them in the run).\n"
        ),
    }
    println!(
        "DP-SGD: σ = 1.0, C = 1.0, Poisson sampling q = 1/ceil(N/B), ceil(N/B) steps per epoch, examples = sum of \
         sampled batch sizes; plain: floor(N/B) shuffled batches of exactly B, mean cross-entropy gradient; SGD lr 0.05.\n"
    );
}

/// Each run's epochs behind the throughput table, and what the worker-round
/// row checks.
fn print_epochs(rows: &[Row]) {
    println!("| workload | run | steps/epoch | measured epochs | mean examples/epoch | ex/s min / median / max |");
    println!("|---|---|---|---|---|---|");
    for row in rows {
        let runs = [
            ("DP-SGD", &row.dp, row.dp_plan),
            ("plain", &row.plain, row.plain_plan),
            ("DP-SGD, worker round ‡", &row.worker, row.worker_plan),
        ];
        for (run, epochs, plan) in runs {
            let n = epochs.rates.len();
            let mean_examples = epochs.examples.iter().sum::<usize>() as f64 / n.max(1) as f64;
            let min = epochs.rates.iter().copied().fold(f64::INFINITY, f64::min);
            let max = epochs.rates.iter().copied().fold(0.0, f64::max);
            println!(
                "| {} | {run} | {} | {} | {} | {} / {} / {} |",
                row.workload.name(),
                grouped(plan.steps_per_epoch as f64),
                grouped(n as f64),
                grouped(mean_examples),
                grouped(min),
                grouped(epochs.median()),
                grouped(max)
            );
        }
    }
    println!(
        "\n‡ `meridian_worker::train::train_round`, one local epoch per round (q = B/N, ceil(N/B) steps), examples counted as \
         the expected steps · B; a check that the DP-SGD row times what a site runs.\n"
    );
}

/// The accountants' ε and the time of one query.
fn print_accountants(rdp: &AccountantTiming, pld: &AccountantTiming) {
    println!("## Accountants\n");
    println!(
        "ε of {} DP-SGD steps, q = {ACCOUNTANT_SAMPLE_RATE}, σ = {ACCOUNTANT_NOISE_MULTIPLIER}, δ = {ACCOUNTANT_DELTA:e}.\n",
        grouped(ACCOUNTANT_STEPS as f64)
    );
    println!("| accountant | ε | time per query (median of runs) | Python reference † |");
    println!("|---|---|---|---|");
    println!(
        "| RDP `meridian_privacy::dpsgd_epsilon` | {:.4} | {} ({}) | dp_accounting RDP ≈ 0.1 s |",
        rdp.epsilon,
        duration(rdp.median),
        rdp.runs
    );
    println!(
        "| PLD `meridian_privacy::dpsgd_epsilon_pld` | {:.4} | {} ({}) | dp_accounting PLD ≈ 8 s; prv_accountant ≈ 0.8 s |",
        pld.epsilon,
        duration(pld.median),
        pld.runs
    );
}

/// The coordinator's streaming FedAvg, timed here.
fn print_aggregation(options: &Options) {
    let rate = time_fedavg(if options.quick { 1 } else { 7 });
    println!("\n## Aggregation\n");
    println!(
        "Streaming weighted FedAvg (`meridian_coordinator::aggregate::FedAvg`), 10 updates of d = 1,000,000 folded into an f64 running sum: {:.2} GB/s of update data (median).",
        rate / 1e9
    );
}

fn run(options: &Options) -> Result<(), String> {
    let device = device(options.device)?;
    let mut rows = Vec::new();
    let mut python_versions = None;
    for &workload in &options.workloads {
        let mut row =
            bench_workload(workload, &device, options.quick).map_err(|e| format!("{}: {e}", workload.name()))?;
        if let Some(python) = &options.python {
            let measured = measure_python(python, workload)?;
            row.measured_reference = Some(measured.reference);
            python_versions = Some(measured.versions);
        }
        rows.push(row);
    }
    let (rdp_runs, pld_runs) = if options.quick { (1, 1) } else { (5, 3) };
    let rdp = time_accountant("RDP", rdp_runs, || {
        meridian_privacy::dpsgd_epsilon(
            ACCOUNTANT_SAMPLE_RATE,
            ACCOUNTANT_NOISE_MULTIPLIER,
            ACCOUNTANT_STEPS,
            ACCOUNTANT_DELTA,
        )
        .map(|e| e.epsilon)
    })
    .map_err(|e| format!("RDP accountant: {e}"))?;
    let pld = time_accountant("PLD", pld_runs, || {
        meridian_privacy::dpsgd_epsilon_pld(
            ACCOUNTANT_SAMPLE_RATE,
            ACCOUNTANT_NOISE_MULTIPLIER,
            ACCOUNTANT_STEPS,
            ACCOUNTANT_DELTA,
        )
    })
    .map_err(|e| format!("PLD accountant: {e}"))?;
    print_tables(options, &rows, python_versions.as_deref(), &rdp, &pld);
    Ok(())
}

fn main() -> ExitCode {
    // The allocator settings of the `meridian` binary, whose code this times.
    meridian_sys::memory::keep_transfer_buffers();
    let options = match parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) if message.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("bench-table: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("bench-table: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
#[path = "bench-table/tests.rs"]
mod tests;
