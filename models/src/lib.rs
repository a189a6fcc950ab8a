//! The networks Meridian trains, and the exact per-example gradient clipping
//! DP-SGD needs, on Burn.
//!
//! # Brief overview
//! - [`Architecture`]: the layer stack a [`meridian_spec::job::ModelSpec`] names (or
//!   an explicit, checked list of [`Layer`]s: linear, convolution, ReLU,
//!   pooling, flatten, LayerNorm, GroupNorm; BatchNorm is refused because it
//!   mixes examples), and its [`ParamLayout`]: every parameter tensor's
//!   PyTorch-style name and shape, in the order of the flat `f32` vector that
//!   travels on the wire. Both ends check the layout's hash before they touch
//!   a vector.
//! - [`Network`]: parameters placed on a Burn device, in `f32` or (for
//!   reference checks) `f64`, with [`Network::clipped_gradient_sum`] (the
//!   DP-SGD step's gradient: each example's exact gradient clipped to norm C,
//!   summed, from one batched backward pass), [`Network::gradient_sum`] (the
//!   plain step's) and [`Network::predict`]. On the `flex` CPU device the
//!   layers every `ModelSpec` uses run on Meridian's own kernels (`cpu`:
//!   im2col + GEMM, all cores), several times faster than Burn's there;
//!   GPUs, `f64` and norm layers run on Burn.
//!
//! Parameters are stored the PyTorch way (a linear weight is `[out, in]`, a
//! convolution weight `[out, in, kh, kw]`) so that a pulled model loads into
//! `torch.nn.Sequential` by name, and reference values from PyTorch compare
//! directly.

mod architecture;
mod cpu;
mod network;

pub use architecture::{Architecture, CLASSES, Layer, LayoutError, NORM_EPSILON, ParamLayout, ParamTensor};
#[cfg(feature = "kernels")]
pub use cpu::kernels;
pub use cpu::limit_cpu_threads;
pub use network::{ClippedGradients, DeviceError, GradientSum, Network, default_device};
