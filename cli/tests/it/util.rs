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
    /// Provisions sites and users (alice scientist, rita reviewer, adam admin,
    /// sam the first site's steward) and starts the coordinator.
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
        // sam, the first site's data steward.
        let steward = sites.first().map(|site| format!("sam:steward@{site}"));
        if let Some(steward) = &steward {
            args.extend(["--user", steward.as_str()]);
        }
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
        Federation { url: format!("https://{addr}"), dir, daemons: vec![Daemon(child)], _tmp: tmp }
    }

    /// The identity directory of a site or user.
    pub fn identity(&self, name: &str) -> PathBuf {
        let fed = self.dir.join("fed");
        if fed.join("sites").join(name).exists() { fed.join("sites").join(name) } else { fed.join("users").join(name) }
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

    /// Kills the coordinator with SIGKILL (if it still runs) and starts it
    /// again with `failpoint` armed (`meridian_sys::failpoint`), without waiting for
    /// it to listen: it may reach the point and kill itself first.
    pub fn restart_coordinator_armed(&mut self, failpoint: &str) {
        let daemon = &mut self.daemons[0];
        let _ = daemon.0.kill();
        let _ = daemon.0.wait();
        let mut command = coordinator_command(&self.dir);
        command.env("MERIDIAN_FAILPOINT", failpoint);
        self.daemons[0].0 = command.spawn().unwrap();
    }

    /// Waits at most `limit` for the coordinator to exit by itself; its exit status, if it did.
    pub fn wait_for_coordinator_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.daemons[0].0.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
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

    /// Submits the job spec at `spec` as alice; panics with the CLI's error if
    /// it is refused. Returns the job's id.
    pub fn submit(&self, spec: &Path) -> String {
        let out = self.client("alice", &["job", "submit", spec.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
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
    let child = coordinator_command(dir).spawn().unwrap();
    let addr = wait_for(Duration::from_secs(30), "the coordinator", || {
        std::fs::read_to_string(&ready).ok().filter(|s| !s.is_empty())
    });
    (child, addr)
}

/// The command that starts the coordinator of `dir`, logging to its
/// `coordinator.log` and writing its address to `coordinator.addr`.
fn coordinator_command(dir: &Path) -> Command {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("coordinator.log")).unwrap();
    let config = dir.join("coordinator.toml");
    let ready = dir.join("coordinator.addr");
    let mut command = meridian();
    command
        .args(["coordinator", "--config", config.to_str().unwrap(), "--ready-file", ready.to_str().unwrap()])
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    command
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

/// A hospital that speaks the worker protocol by hand, for behaviour a real
/// worker never shows: hostile updates, stalled streams.
pub struct RawSite {
    pub rt: tokio::runtime::Runtime,
    pub client: meridian_wire::pb::worker_service_client::WorkerServiceClient<tonic::transport::Channel>,
    tasks: tonic::Streaming<meridian_wire::pb::Task>,
}

impl RawSite {
    /// Connects as `site` with its certificate, registers dataset `dataset`
    /// (columns `id`, `label`, then `numeric`) and opens its task stream.
    pub fn join(fed: &Federation, site: &str, dataset: &str, label: &str, numeric: &[&str]) -> RawSite {
        use meridian_wire::pb;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let identity = meridian_wire::identity::IdentityFiles::from_dir(&fed.identity(site)).unwrap();
        let url = fed.url.clone();
        let mut client = rt.block_on(async {
            let channel = tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .tls_config(identity.client_tls())
                .unwrap()
                .connect()
                .await
                .unwrap();
            pb::worker_service_client::WorkerServiceClient::new(channel)
        });
        let columns = ["id", label].iter().chain(numeric).map(|s| s.to_string()).collect();
        rt.block_on(client.register(pb::RegisterRequest {
            datasets: vec![pb::DatasetInfo {
                name: dataset.to_string(),
                columns,
                label: label.to_string(),
                numeric: numeric.iter().map(|s| s.to_string()).collect(),
                budget_epsilon: 100.0,
                budget_delta: 1e-5,
                job_epsilon_cap: 100.0,
                size: Some(pb::ReleasedSize { train_rows: 1_000, test_rows: 250, release: 1 }),
                ..Default::default()
            }],
            ..Default::default()
        }))
        .unwrap();
        let tasks = rt.block_on(client.receive_tasks(pb::ReceiveTasksRequest {})).unwrap().into_inner();
        RawSite { rt, client, tasks }
    }

    /// The next task, waiting at most `limit`.
    pub fn next_task(&mut self, limit: Duration) -> meridian_wire::pb::Task {
        use tokio_stream::StreamExt;
        let tasks = &mut self.tasks;
        self.rt
            .block_on(async { tokio::time::timeout(limit, tasks.next()).await })
            .expect("a task in time")
            .expect("the task stream is open")
            .expect("a task, not an error")
    }

    /// Accepts an offer, claiming `train_examples` rows.
    pub fn accept(&mut self, job_id: &str, offer: &meridian_wire::pb::JobOffer, train_examples: u64) {
        self.rt
            .block_on(self.client.answer_offer(meridian_wire::pb::OfferAnswer {
                job_id: job_id.to_string(),
                spec_hash: offer.spec_hash.clone(),
                accept: true,
                train_examples,
                ..Default::default()
            }))
            .unwrap();
    }

    /// Accepts every offer (claiming `train_examples` rows) until the first
    /// training task arrives; returns the accepted spec's hash and that task.
    pub fn accept_until_training(&mut self, train_examples: u64) -> (String, meridian_wire::pb::TrainTask) {
        let mut spec_hash = String::new();
        loop {
            let task = self.next_task(Duration::from_secs(30));
            match task.kind.unwrap() {
                meridian_wire::pb::task::Kind::Offer(offer) => {
                    spec_hash = offer.spec_hash.clone();
                    self.accept(&task.job_id, &offer, train_examples);
                }
                meridian_wire::pb::task::Kind::Train(t) => return (spec_hash, t),
                _ => {}
            }
        }
    }

    /// Sends an update of `values` for `round` of `job_id`, weighted as
    /// `num_examples`, with a ledger entry that matches it.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        site: &str,
        job_id: &str,
        spec_hash: &str,
        round: u32,
        layout: &str,
        num_examples: u64,
        values: &[f32],
    ) -> meridian_wire::pb::PushUpdateResponse {
        use meridian_wire::pb;
        let header = pb::UpdateHeader {
            job_id: job_id.to_string(),
            round,
            layout_hash: layout.to_string(),
            num_params: values.len() as u64,
            num_examples,

            ledger_entry: Some(pb::LedgerEntry {
                seq: u64::from(round),
                site: site.to_string(),
                job_id: job_id.to_string(),
                round,
                spec_hash: spec_hash.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let messages = meridian_worker::upload::update_messages(
            header,
            std::sync::Arc::new(values.to_vec()),
            0..values.len(),
            None,
        );
        self.rt.block_on(self.client.push_update(messages)).unwrap().into_inner()
    }
}

/// The five WDBC columns the fault tests train on.
pub const WDBC_NUMERIC: &[&str] = &["radius_mean", "texture_mean", "perimeter_mean", "area_mean", "smoothness_mean"];

/// A WDBC job spec for the fault tests: an MLP on [`WDBC_NUMERIC`] with σ = 1.5,
/// C = 1, batches of 32; the fields below vary from test to test.
pub struct WdbcJob<'a> {
    pub rounds: u32,
    pub local_epochs: f64,
    pub hidden: &'a str,
    pub min_sites: u32,
    pub deadline_secs: u32,
    pub max_round_attempts: u32,
    /// TOML appended at the end (e.g. an `[aggregation]` table).
    pub extra: &'a str,
}

/// An `[evaluation]` whose noised metrics read on a few hundred held-out
/// records: a few wide bins and little noise (each evaluation then costs
/// about ε 1, which the fault tests' budgets hold).
pub const SMALL_DATA_EVALUATION: &str =
    "[evaluation]\nbins = 8\nlogit_min = -8.0\nlogit_max = 8.0\nnoise_scale = 2.0\n";

impl Default for WdbcJob<'_> {
    fn default() -> Self {
        WdbcJob {
            rounds: 1,
            local_epochs: 1.0,
            hidden: "[16]",
            min_sites: 1,
            deadline_secs: 30,
            max_round_attempts: 5,
            extra: "",
        }
    }
}

impl WdbcJob<'_> {
    /// Writes the spec as `file` in the federation's directory; returns its path.
    pub fn write(&self, fed: &Federation, file: &str) -> PathBuf {
        let text = format!(
            r#"name = "{file}"
dataset = "wdbc"
[model]
kind = "mlp"
hidden = {hidden}
[features]
label = "diagnosis"
positive_label = "M"
negative_labels = ["B"]
numeric = {numeric:?}
[training]
rounds = {rounds}
local_epochs = {epochs}
batch_size = 32
learning_rate = 0.2
[privacy]
noise_multiplier = 1.5
clip_norm = 1.0
delta = 1e-5
[policy]
min_sites = {min_sites}
round_deadline_secs = {deadline}
max_round_attempts = {attempts}
{extra}
"#,
            hidden = self.hidden,
            numeric = WDBC_NUMERIC,
            rounds = self.rounds,
            epochs = self.local_epochs,
            min_sites = self.min_sites,
            deadline = self.deadline_secs,
            attempts = self.max_round_attempts,
            extra = self.extra,
        );
        let path = fed.dir.join(file);
        std::fs::write(&path, text).unwrap();
        path
    }
}
