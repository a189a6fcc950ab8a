//! Starting real coordinators and workers for tests, and waiting on them
//! without sleeping blindly: every wait polls a condition with a deadline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn meridian() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meridian"));
    cmd.env("MERIDIAN_LOG", "info");
    cmd
}

/// Runs a meridian command to completion.
pub fn run(args: &[&str]) -> Output {
    meridian().args(args).stdin(Stdio::null()).output().expect("meridian runs")
}

/// Polls `f` until it returns `Some`, at most `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process killed when dropped.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A provisioned federation with a running coordinator.
pub struct Federation {
    pub dir: PathBuf,
    pub url: String,
    pub daemons: Vec<Daemon>,
    _tmp: tempfile::TempDir,
}

impl Federation {
    /// Provisions sites and users (alice scientist, rita reviewer, adam admin) and starts the coordinator.
    pub fn start(sites: &[&str]) -> Federation {
        Self::start_on(sites, 0)
    }

    /// Like [`Federation::start`] on a fixed port (0: any), so a restarted coordinator keeps its address.
    pub fn start_on(sites: &[&str], port: u16) -> Federation {
        Self::start_with(sites, port, "")
    }

    /// Like [`Federation::start_on`], with extra top-level keys for coordinator.toml.
    pub fn start_with(sites: &[&str], port: u16, extra: &str) -> Federation {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let fed = dir.join("fed");
        let mut args = vec!["provision", "--out", fed.to_str().unwrap()];
        for s in sites {
            args.extend(["--site", s]);
        }
        args.extend(["--user", "alice:scientist", "--user", "rita:reviewer", "--user", "adam:admin"]);
        let out = run(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let id = fed.join("coordinator");
        let config = dir.join("coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndata_dir = \"coord-state\"\n{extra}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
                id.join("ca.pem"),
                id.join("cert.pem"),
                id.join("key.pem")
            ),
        )
        .unwrap();
        let (child, addr) = spawn_coordinator(&dir);
        Federation {
            url: format!("https://{addr}"),
            dir,
            daemons: vec![Daemon(child)],
            _tmp: tmp,
        }
    }

    /// The identity directory of a site or user.
    pub fn identity(&self, name: &str) -> PathBuf {
        let fed = self.dir.join("fed");
        if fed.join("sites").join(name).exists() {
            fed.join("sites").join(name)
        } else {
            fed.join("users").join(name)
        }
    }

    /// Starts a worker for `site` serving `data` (a CSV) as dataset `name` with the given columns.
    pub fn start_worker(&mut self, site: &str, name: &str, data: &Path, label: &str, numeric: &[&str]) -> PathBuf {
        self.start_worker_with_budget(site, name, data, label, numeric, 40.0, 20.0)
    }

    /// Like [`Federation::start_worker`], with the dataset's total budget and per-job cap.
    #[allow(clippy::too_many_arguments)]
    pub fn start_worker_with_budget(
        &mut self,
        site: &str,
        name: &str,
        data: &Path,
        label: &str,
        numeric: &[&str],
        budget: f64,
        cap: f64,
    ) -> PathBuf {
        self.start_worker_with_toml(site, name, data, label, numeric, budget, cap, "")
    }

    /// Like [`Federation::start_worker_with_budget`], appending `extra` TOML to the worker's config.
    #[allow(clippy::too_many_arguments)]
    pub fn start_worker_with_toml(
        &mut self,
        site: &str,
        name: &str,
        data: &Path,
        label: &str,
        numeric: &[&str],
        budget: f64,
        cap: f64,
        extra: &str,
    ) -> PathBuf {
        let home = self.dir.join(site);
        std::fs::create_dir_all(&home).unwrap();
        let id = self.identity(site);
        let config = home.join("worker.toml");
        std::fs::write(
            &config,
            format!(
                "coordinator = {:?}\ndata_dir = \"state\"\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[[datasets]]\nname = {name:?}\npath = {:?}\nlabel = {label:?}\nnumeric = {numeric:?}\nbudget_epsilon = {budget:?}\njob_epsilon_cap = {cap:?}\n{extra}",
                self.url,
                id.join("ca.pem"),
                id.join("cert.pem"),
                id.join("key.pem"),
                data
            ),
        )
        .unwrap();
        self.daemons.push(Daemon(spawn_worker(&home)));
        home
    }

    /// Kills the coordinator with SIGKILL and starts it again on the same state and port.
    pub fn kill_and_restart_coordinator(&mut self) {
        let daemon = &mut self.daemons[0];
        daemon.0.kill().unwrap();
        daemon.0.wait().unwrap();
        let (child, addr) = spawn_coordinator(&self.dir);
        assert_eq!(format!("https://{addr}"), self.url);
        self.daemons[0].0 = child;
    }

    /// Kills daemon `index` with SIGKILL and starts the worker of `home` again in its place.
    pub fn kill_and_restart_worker(&mut self, index: usize, home: &Path) {
        let daemon = &mut self.daemons[index];
        daemon.0.kill().unwrap();
        daemon.0.wait().unwrap();
        daemon.0 = spawn_worker(home);
    }

    /// Runs a client command as `user`.
    pub fn client(&self, user: &str, args: &[&str]) -> Output {
        let id = self.identity(user);
        let mut all = args.to_vec();
        all.extend(["--coordinator", &self.url, "--identity", id.to_str().unwrap()]);
        run(&all)
    }

    /// The coordinator's log so far (for assertion messages).
    pub fn coordinator_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("coordinator.log")).unwrap_or_default()
    }
}

/// Starts the coordinator of `dir` and waits until it listens; returns it and its address.
fn spawn_coordinator(dir: &Path) -> (Child, String) {
    let ready = dir.join("coordinator.addr");
    let _ = std::fs::remove_file(&ready);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("coordinator.log")).unwrap();
    let config = dir.join("coordinator.toml");
    let child = meridian()
        .args(["coordinator", "--config", config.to_str().unwrap(), "--ready-file", ready.to_str().unwrap()])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let addr = wait_for(Duration::from_secs(30), "the coordinator", || {
        std::fs::read_to_string(&ready).ok().filter(|s| !s.is_empty())
    });
    (child, addr)
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts the worker whose `worker.toml` is in `home`, appending to its log.
fn spawn_worker(home: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(home.join("worker.log")).unwrap();
    meridian()
        .args(["worker", "--config", home.join("worker.toml").to_str().unwrap()])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Path of a file shipped in the repository's examples.
pub fn example(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("examples").join(path)
}
