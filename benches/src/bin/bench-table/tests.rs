//! The command line and the table's number formats.

use super::*;

fn args(line: &str) -> Result<Options, String> {
    parse(line.split_whitespace().map(String::from))
}

#[test]
fn defaults_are_a_full_cpu_run_of_every_workload() {
    let options = args("").unwrap();
    assert!(!options.quick);
    assert_eq!(options.device, DeviceChoice::Cpu);
    assert_eq!(options.workloads, Workload::ALL);
}

#[test]
fn flags_parse_with_spaces_or_equals() {
    let options = args("--quick --workload cnn --device=gpu").unwrap();
    assert!(options.quick);
    assert_eq!(options.device, DeviceChoice::Gpu);
    assert_eq!(options.workloads, [Workload::Cnn]);
    assert_eq!(args("--workload=mlp-b").unwrap().workloads, [Workload::MlpB]);
    assert_eq!(args("--workload all").unwrap().workloads, Workload::ALL);
    assert_eq!(args("").unwrap().python, None);
    assert_eq!(args("--python /opt/py/bin/python3").unwrap().python, Some(PathBuf::from("/opt/py/bin/python3")));
}

#[test]
fn the_python_reference_is_read_from_its_json() {
    let out = r#"{"torch": "2.15.0+cpu", "opacus": "1.6.0", "threads": 2, "rows": [{"workload": "CNN", "plain_examples_per_sec": 3950.5, "dp_examples_per_sec": 1800.25}]}"#;
    let run = parse_python_run(out).unwrap();
    assert_eq!(run.reference.plain_examples_per_sec, 3950.5);
    assert_eq!(run.reference.dp_examples_per_sec, 1800.25);
    assert_eq!(run.versions, "torch 2.15.0+cpu, opacus 1.6.0, 2 threads");
    assert_eq!(parse_python_run(r#"{"rows": []}"#).err().unwrap(), "output has no row (field `rows`)");
    assert_eq!(
        parse_python_run(r#"{"rows": [{"plain_examples_per_sec": 1.0, "dp_examples_per_sec": -3}]}"#).err().unwrap(),
        "`rows[0].dp_examples_per_sec` is not a positive number"
    );
    assert!(parse_python_run("Traceback").unwrap_err().starts_with("output is not JSON"));
}

#[test]
fn bad_flags_say_what_is_wrong() {
    assert_eq!(args("--workload mlp-c").unwrap_err(), "--workload: expected mlp-a, mlp-b, cnn or all, got 'mlp-c'");
    assert_eq!(args("--device tpu").unwrap_err(), "--device: expected cpu or gpu, got 'tpu'");
    assert_eq!(args("--device").unwrap_err(), "--device needs a value");
    assert_eq!(args("--fast").unwrap_err(), "unknown argument '--fast'");
    assert_eq!(args("--help").unwrap_err(), "");
}

#[test]
fn quick_plans_are_short_and_full_plans_are_whole_epochs() {
    let full = Plan::new(false, Workload::MlpB, 1_250);
    assert_eq!((full.warmup_steps, full.epochs, full.steps_per_epoch), (1_250, MEASURED_EPOCHS, 1_250));
    let quick = Plan::new(true, Workload::MlpB, 1_250);
    assert_eq!((quick.epochs, quick.steps_per_epoch), (1, QUICK_MLP_B_STEPS));
    let quick_cnn = Plan::new(true, Workload::Cnn, 157);
    assert_eq!((quick_cnn.epochs, quick_cnn.steps_per_epoch, quick_cnn.secs), (1, 157, 0.0));
}

#[test]
fn medians() {
    assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    assert!(median(&[]).is_nan());
}

#[test]
fn numbers_are_grouped_and_ratios_rounded() {
    assert_eq!(grouped(1_234_567.4), "1,234,567");
    assert_eq!(grouped(11_600.0), "11,600");
    assert_eq!(grouped(999.6), "1,000");
    assert_eq!(grouped(12.5), "12.5");
    assert_eq!(grouped(f64::NAN), "—");
    assert_eq!(ratio(5.4712), "5.47×");
    assert_eq!(ratio(13.19), "13×");
    assert_eq!(duration(Duration::from_micros(250)), "250.0 µs");
    assert_eq!(duration(Duration::from_millis(29)), "29.00 ms");
    assert_eq!(duration(Duration::from_millis(8_000)), "8.00 s");
}

#[test]
fn a_plan_without_warm_up_steps_warms_up_once_and_ends() {
    // The worker row's quick plan: no warm-up steps. The warm-up must not
    // loop until its time is up, calling `run(0)` forever.
    let plan = Plan { warmup_steps: 0, warmup_secs: 3600.0, epochs: 1, secs: 0.0, steps_per_epoch: 1 };
    let mut calls = Vec::new();
    let epochs = measure("plain", plan, |steps| {
        calls.push(steps);
        Ok(steps.max(1))
    })
    .unwrap();
    assert_eq!(calls, [0, 1], "one empty warm-up call, then one epoch");
    assert_eq!(epochs.rates.len(), 1);
}

#[test]
fn warm_up_repeats_whole_epochs_until_its_time_is_up() {
    let plan = Plan { warmup_steps: 5, warmup_secs: 0.05, epochs: 2, secs: 0.0, steps_per_epoch: 5 };
    let start = Instant::now();
    let mut calls = Vec::new();
    let epochs = measure("plain", plan, |steps| {
        calls.push(start.elapsed().as_secs_f64());
        std::thread::sleep(std::time::Duration::from_millis(10));
        Ok(steps)
    })
    .unwrap();
    assert_eq!(epochs.rates.len(), 2);
    // The two measured epochs start only once the warm-up's time is up,
    // which 10 ms calls reach in no fewer than five.
    let first_measured = calls[calls.len() - 2];
    assert!(first_measured >= 0.05, "measuring began at {first_measured} s");
    assert!(calls.len() >= 5 + 2, "{} calls", calls.len());
}
