//! A federation run as child processes on this machine, for `meridian demo`
//! and `meridian sim`: the work directory it lives in (emptied only when an
//! earlier run made it), the coordinator's configuration and process, and
//! stopping every daemon when the run ends, however it ends.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

/// Keeps the child processes and stops them when dropped.
pub struct Children(pub Vec<(String, Child)>);

impl Children {
    /// Asks every child to stop (SIGTERM), then kills any still running after 10 s.
    pub async fn stop(&mut self) {
        for (_, child) in &mut self.0 {
            if let Some(pid) = child.id() {
                // SIGTERM first: the daemons drain and exit.
                let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            }
        }
        for (name, child) in &mut self.0 {
            if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                eprintln!("{name} did not stop within 10 s; killing it");
                let _ = child.kill().await;
            }
        }
        self.0.clear();
    }
}

/// Makes `dir` an empty work directory for a `kind` run ("demo", "sim"),
/// marked as such; an existing one is emptied only if an earlier run of the
/// same kind made it, or it is empty. Returns its canonical path.
pub fn fresh_work_dir(dir: &Path, kind: &str) -> Result<PathBuf> {
    let marker = format!(".meridian-{kind}");
    if dir.exists() {
        if !dir.join(&marker).exists() && std::fs::read_dir(dir)?.next().is_some() {
            bail!("{} exists and is not an earlier {kind}; choose another --work-dir", dir.display());
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot empty {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(&marker), "")?;
    Ok(dir.canonicalize()?)
}

/// Starts `meridian` with `args` as a child that dies with this process,
/// its stdout and stderr going to `log`.
pub fn spawn(exe: &Path, args: &[&str], log: &Path, name: &str) -> Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true)
        .env("MERIDIAN_LOG", "info");
    meridian_sys::process::die_with_parent(cmd.as_std_mut());
    cmd.spawn().with_context(|| format!("cannot start the {name}"))
}

/// Writes a `coordinator.toml` listening on a free loopback port, with its
/// state in `state/` beside it, the identity in `identity`, and `settings`
/// (top-level keys) added.
pub fn write_coordinator_config(path: &Path, identity: &Path, settings: &str) -> Result<()> {
    std::fs::write(
        path,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"state\"\n{settings}\n\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            identity.join("ca.pem"),
            identity.join("cert.pem"),
            identity.join("key.pem")
        ),
    )
    .with_context(|| format!("cannot write {}", path.display()))
}

/// Starts the coordinator of `config` as the first child, logging to
/// `dir/coordinator.log`, and waits until it listens; returns its URL.
pub async fn start_coordinator(exe: &Path, dir: &Path, config: &Path, children: &mut Children) -> Result<String> {
    let ready = dir.join("address");
    let args = ["coordinator", "--config", path_str(config)?, "--ready-file", path_str(&ready)?];
    children.0.push(("coordinator".to_string(), spawn(exe, &args, &dir.join("coordinator.log"), "coordinator")?));
    let addr = wait_for_file(&ready, Duration::from_secs(30), children).await?;
    Ok(format!("https://{addr}"))
}

/// `p` as UTF-8, for a child's command line.
pub fn path_str(p: &Path) -> Result<&str> {
    p.to_str().with_context(|| format!("path {} is not UTF-8", p.display()))
}

/// Waits until `path` holds something (a daemon's ready file) and returns
/// it, failing if a child exits first or `limit` passes.
pub async fn wait_for_file(path: &Path, limit: Duration, children: &mut Children) -> Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.trim().is_empty()
        {
            return Ok(s.trim().to_string());
        }
        for (name, child) in &mut children.0 {
            if let Some(status) = child.try_wait()? {
                bail!("the {name} exited early ({status}); see its log");
            }
        }
        if Instant::now() > deadline {
            bail!("{} did not appear within {:?}", path.display(), limit);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
