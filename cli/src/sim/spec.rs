//! What `meridian sim` simulates: its flags, and the job every simulated
//! site serves, sized to the model the flags ask for.

use std::path::PathBuf;

use anyhow::{Result, bail};

/// Inputs of the simulated sites' MLP (`x000` … `x099`).
pub(super) const INPUTS: usize = 100;

/// `meridian sim` options.
#[derive(clap::Args, Debug)]
pub struct SimArgs {
    /// Simulated hospitals, each with its own certificate and connection.
    #[arg(long, default_value_t = 100)]
    pub(super) sites: usize,
    /// Rounds of the job.
    #[arg(long, default_value_t = 5)]
    pub(super) rounds: u32,
    /// Model size in parameters (approximately: an MLP 100-h-2 with h chosen to match).
    #[arg(long, default_value_t = 100_000)]
    pub(super) params: u64,
    /// The coordinator's HTTP/2 receive window in KiB (`receive_window_kib`).
    #[arg(long, default_value_t = 1024)]
    pub(super) receive_window_kib: u32,
    /// Where the federation's files go (emptied first if it holds an earlier sim).
    #[arg(long, default_value = "meridian-sim")]
    pub(super) work_dir: PathBuf,
    /// Print the results as one JSON object.
    #[arg(long)]
    pub(super) json: bool,
}

impl SimArgs {
    /// Refuses a simulation with nothing to measure.
    pub(super) fn validate(&self) -> Result<()> {
        if self.sites == 0 || self.rounds == 0 || self.params < 1_000 {
            bail!("--sites and --rounds must be at least 1 and --params at least 1000");
        }
        Ok(())
    }
}

/// The names of the simulated inputs, `x000` …
pub(super) fn input_names() -> Vec<String> {
    (0..INPUTS).map(|i| format!("x{i:03}")).collect()
}

/// The job every simulated site serves: an MLP 100-h-2 of about `params`
/// parameters, or 100-h-h-2 when one hidden layer would be wider than a
/// job spec allows. Returns the spec's TOML and the model's exact size.
pub(super) fn job_spec(rounds: u32, params: u64) -> (String, u64) {
    let inputs = INPUTS as u64;
    // One layer: (inputs + 1)·h + 2·h + 2 parameters.
    let one = (params.saturating_sub(2) / (inputs + 3)).max(1);
    let (hidden, exact) = if one <= 65_536 {
        (format!("[{one}]"), (inputs + 3) * one + 2)
    } else {
        // Two layers: (inputs + 1)·h + (h + 1)·h + 2·h + 2 = h² + (inputs + 4)·h + 2.
        let b = (inputs + 4) as f64;
        let h = ((-b + (b * b + 4.0 * (params - 2) as f64).sqrt()) / 2.0).floor() as u64;
        (format!("[{h}, {h}]"), h * h + (inputs + 4) * h + 2)
    };
    let numeric = input_names();
    let text = format!(
        r#"name = "sim"
dataset = "sim"
[model]
kind = "mlp"
hidden = {hidden}
[features]
label = "y"
positive_label = "1"
negative_labels = ["0"]
numeric = {numeric:?}
[training]
rounds = {rounds}
local_epochs = 1.0
batch_size = 32
learning_rate = 0.1
server_learning_rate = 1.0
[privacy]
noise_multiplier = 1.0
clip_norm = 1.0
delta = 1e-5
[policy]
min_sites = 1
round_deadline_secs = 600
max_round_attempts = 1
"#
    );
    (text, exact)
}
