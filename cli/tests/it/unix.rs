//! The `meridian` command as a Unix tool: it ends quietly when its output
//! is cut short, says what happens as it happens when piped, writes JSON
//! Lines when asked, no terminal escapes off a terminal, and its exit code
//! says how it ended.

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use crate::util::{Federation, WdbcJob, example, meridian, wait_for};

fn started_federation() -> (Federation, std::path::PathBuf) {
    let mut fed = Federation::start(&["hospital-a"]);
    fed.start_worker(
        "hospital-a",
        "wdbc",
        &example("data/wdbc_breast_cancer.csv"),
        "diagnosis",
        crate::util::WDBC_NUMERIC,
    );
    let spec = WdbcJob { rounds: 2, ..Default::default() }.write(&fed, "job.toml");
    wait_for(Duration::from_secs(30), "the worker to register", || {
        let out = fed.client("rita", &["budget", "--json"]);
        String::from_utf8_lossy(&out.stdout).contains("hospital-a").then_some(())
    });
    (fed, spec)
}

/// `meridian ARGS` as `user` of `fed`, stdout piped and read to the end.
fn piped(fed: &Federation, user: &str, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let id = fed.identity(user);
    let mut child = meridian()
        .args(args)
        .args(["--coordinator", &fed.url, "--identity", id.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut out, mut err) = (String::new(), String::new());
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (child.wait().unwrap(), out, err)
}

#[test]
fn a_closed_pipe_ends_every_command_quietly() {
    let (fed, _) = started_federation();
    let id = fed.identity("rita");
    let connection = ["--coordinator", &fed.url, "--identity", id.to_str().unwrap()];
    for (args, client) in [
        (vec!["budget", "--json"], true),
        (vec!["budget", "ledger"], true),
        (vec!["job", "list"], true),
        (vec!["privacy", "epsilon", "--sample-rate", "0.01", "--noise", "1.1", "--steps", "1000"], false),
    ] {
        // The reading end is closed before the command writes: its first write fails with EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = meridian()
            .args(&args)
            .args(if client { &connection[..] } else { &[] })
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
        assert!(!stderr.contains("panicked") && !stderr.contains("error"), "{args:?}: {stderr}");
    }
}

#[test]
fn watching_off_a_terminal_prints_a_line_per_round_and_json_lines_on_request() {
    let (fed, spec) = started_federation();
    let (status, out, err) = piped(&fed, "alice", &["job", "submit", spec.to_str().unwrap(), "--watch"]);
    assert!(status.success(), "{out}{err}");
    let rounds: Vec<&str> = out.lines().filter(|l| l.starts_with("round ")).collect();
    assert_eq!(rounds.len(), 2, "{out}");
    assert!(rounds[1].starts_with("round   2/2 aggregated: 1 updates, clipped "), "{out}");
    assert!(rounds[1].contains("ε so far: hospital-a "), "{out}");
    assert!(!out.contains('\u{1b}') && !err.contains('\u{1b}'), "escape codes off a terminal: {out:?} {err:?}");

    let (status, out, _) = piped(&fed, "alice", &["job", "submit", spec.to_str().unwrap(), "--watch", "--json"]);
    assert!(status.success(), "{out}");
    let events: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "round").count(), 2, "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"final"), "{kinds:?}");
    let last = events.last().unwrap();
    assert_eq!(last["status"]["state"], "completed");
    assert!(events.iter().any(|e| e["event"] == "round" && e["epsilon"]["hospital-a"].as_f64().unwrap() > 0.0));
    // No daemon wrote escape codes into its log file.
    assert!(!fed.coordinator_log().contains('\u{1b}'));
}

#[test]
fn exit_codes_say_how_a_command_ended() {
    let (fed, _) = started_federation();
    // A job that ends cancelled: wide layers keep it running for many
    // seconds (its ε does not depend on them), so it cannot finish before
    // the cancel arrives, however fast the machine.
    let long = WdbcJob { rounds: 50, local_epochs: 5.0, hidden: "[512, 512]", ..Default::default() };
    let spec = long.write(&fed, "long.toml");
    let id = String::from_utf8_lossy(&fed.client("alice", &["job", "submit", spec.to_str().unwrap()]).stdout)
        .trim()
        .to_string();
    let cancel = fed.client("alice", &["job", "cancel", &id]);
    assert!(cancel.status.success(), "{}", String::from_utf8_lossy(&cancel.stderr));
    let (status, out, _) = piped(&fed, "alice", &["job", "watch", &id]);
    assert_eq!(status.code(), Some(3), "a job ended cancelled: {out}");
    assert!(out.contains("state      cancelled"), "{out}");
    // An error: a spec that does not exist.
    let (status, _, err) = piped(&fed, "alice", &["job", "submit", "/no/such/spec.toml"]);
    assert_eq!(status.code(), Some(1), "{err}");
    // A wrong command line.
    let out = crate::util::run(&["job", "frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn daemons_write_json_logs_on_request() {
    let fed = Federation::start(&[]);
    let config = fed.dir.join("coordinator.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace("coord-state", "json-state");
    let other = fed.dir.join("json.toml");
    std::fs::write(&other, text).unwrap();
    let mut child = meridian()
        .args(["coordinator", "--config", other.to_str().unwrap(), "--log-format", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let _ = child.kill();
    let _ = child.wait();
    let mut log = String::new();
    stderr.read_to_string(&mut log).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(!lines.is_empty(), "no log");
    for line in lines {
        let event: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(event["level"].is_string() && event["fields"].is_object(), "{line}");
    }
}

/// What `meridian ARGS` writes on a terminal (a pseudo-terminal from
/// util-linux `script`), with `env` set; `None` where `script` is missing.
fn on_a_terminal(args: &str, env: &[(&str, &str)]) -> Option<String> {
    let exe = env!("CARGO_BIN_EXE_meridian");
    let mut command = std::process::Command::new("script");
    command.args(["-q", "-e", "-c", &format!("{exe} {args}"), "/dev/null"]).stdin(Stdio::null());
    command.env_remove("NO_COLOR");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn no_colour_on_a_terminal_when_no_color_is_set() {
    // A coordinator run on a terminal for two seconds, stopped by `timeout`.
    let fed = Federation::start(&[]);
    let config = fed.dir.join("tty.toml");
    std::fs::write(
        &config,
        std::fs::read_to_string(fed.dir.join("coordinator.toml")).unwrap().replace("coord-state", "tty-state"),
    )
    .unwrap();
    let args = format!("coordinator --config {}", config.display());
    let Some(coloured) =
        on_a_terminal(&format!("--version && timeout 2 {} {args}", env!("CARGO_BIN_EXE_meridian")), &[])
    else {
        eprintln!("no `script` on this machine: skipped");
        return;
    };
    assert!(coloured.contains("listening") || coloured.contains("INFO"), "{coloured}");
    assert!(coloured.contains('\u{1b}'), "a terminal gets colour: {coloured:?}");
    let plain = on_a_terminal(
        &format!("--version && timeout 2 {} {args}", env!("CARGO_BIN_EXE_meridian")),
        &[("NO_COLOR", "1")],
    )
    .unwrap();
    assert!(plain.contains("INFO"), "{plain}");
    assert!(!plain.contains('\u{1b}'), "NO_COLOR: {plain:?}");
}
