//! Meridian's performance, measured: how fast a site trains with DP-SGD,
//! what privacy costs against plain SGD, and how long the accountants take,
//! on workloads defined so that the figures compare like for like with the
//! Python stack (Opacus) on the same machines.
//!
//! # Brief overview
//! - [`data`]: the SplitMix64 dataset generator (bit-exact with the Python
//!   reference scripts) and the label rule.
//! - [`workload`]: the three training workloads ([`Workload`]: MLP-A,
//!   MLP-B, CNN), the DP-SGD constants and the accountant query, with the
//!   Opacus reference figures.
//! - [`sgd`]: [`DpSgd`], the worker's DP-SGD step on a workload, and
//!   [`PlainSgd`], a non-private minibatch step on the same network.
//! - [`round`]: [`WorkerRound`], the worker's own `train_round` on a
//!   workload, to check that [`DpSgd`] times what a site runs.
//!
//! Two front ends use them: `benches/meridian.rs` (criterion, one step at a
//! time: `cargo bench -p meridian-benches --features criterion`) and the
//! `bench-table` binary, which trains whole epochs and prints the table for
//! `BENCHMARKS.md`.
//!
//! # Example
//! ```
//! use meridian_benches::{DpSgd, Workload};
//!
//! let workload = Workload::MlpA;
//! let data = workload.dataset();
//! let mut dp = DpSgd::new(workload, &burn::tensor::Device::flex())?;
//! let examples = dp.run(&data, 2)?; // two Poisson-sampled steps
//! assert!(examples > 0);
//! # Ok::<(), meridian_benches::StepError>(())
//! ```

pub mod data;
pub mod round;
pub mod sgd;
pub mod workload;

pub use data::Dataset;
pub use round::WorkerRound;
pub use sgd::{Batch, DpSgd, PlainSgd, StepError};
pub use workload::{Reference, Workload};
