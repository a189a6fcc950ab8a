//! The networks Meridian trains, and the exact per-example gradient clipping
//! DP-SGD needs, on Burn.
//!
//! # Brief overview
//! - [`Architecture`]: the layer stack a [`proto::job::ModelSpec`] names, and
//!   its [`ParamLayout`]: every parameter tensor's PyTorch-style name and
//!   shape, in the order of the flat `f32` vector that travels on the wire.
//!   Both ends check the layout's hash before they touch a vector.
//! - [`Network`]: parameters placed on a Burn device, with
//!   [`Network::clipped_gradient_sum`] (the DP-SGD step's gradient: each
//!   example's gradient clipped to norm C, summed) and [`Network::predict`].
//!
//! Parameters are stored the PyTorch way (a linear weight is `[out, in]`, a
//! convolution weight `[out, in, kh, kw]`) so that a pulled model loads into
//! `torch.nn.Sequential` by name, and reference values from PyTorch compare
//! directly.

#![deny(clippy::unwrap_used)]
#![deny(missing_docs)]

mod architecture;
mod network;

pub use architecture::{Architecture, Layer, LayoutError, ParamLayout, ParamTensor};
pub use network::{ClippedGradients, Network, default_device};
