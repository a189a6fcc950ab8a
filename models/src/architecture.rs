//! Layer stacks and parameter layouts: what a model is, independent of any
//! device, so the coordinator can size and hash a model without Burn.

use proto::job::ModelSpec;
use sha2::{Digest, Sha256};

/// One layer of a sequential network, at its index in the stack.
#[derive(Clone, Debug, PartialEq)]
pub enum Layer {
    /// `y = x Wᵀ + b`, weight `[out, in]`.
    Linear {
        /// Input width.
        inputs: usize,
        /// Output width.
        outputs: usize,
    },
    /// Square-kernel convolution, stride 1, no padding; weight `[out, in, k, k]`.
    Conv2d {
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Kernel side.
        kernel: usize,
    },
    /// Rectified linear unit.
    Relu,
    /// 2×2 max pooling, stride 2.
    MaxPool2,
    /// `[B, C, H, W]` to `[B, C·H·W]`.
    Flatten,
}

/// A network: its layers and the input it expects.
#[derive(Clone, Debug, PartialEq)]
pub struct Architecture {
    layers: Vec<Layer>,
    input_dim: usize,
    /// `Some(side)` for image models: inputs are `side × side` single-channel images.
    image_side: Option<usize>,
    kind: &'static str,
}

/// Number of classes every Meridian model predicts (binary diagnosis).
pub const CLASSES: usize = 2;

impl Architecture {
    /// Builds the layer stack for a job's model on inputs of `input_dim` features.
    pub fn new(spec: &ModelSpec, input_dim: usize) -> Result<Architecture, LayoutError> {
        if input_dim == 0 {
            return Err(LayoutError::NoInputs);
        }
        let (layers, image_side) = match spec {
            ModelSpec::LogisticRegression => (
                vec![Layer::Linear {
                    inputs: input_dim,
                    outputs: CLASSES,
                }],
                None,
            ),
            ModelSpec::Mlp { hidden } => {
                let mut layers = Vec::new();
                let mut width = input_dim;
                for &h in hidden {
                    layers.push(Layer::Linear {
                        inputs: width,
                        outputs: h,
                    });
                    layers.push(Layer::Relu);
                    width = h;
                }
                layers.push(Layer::Linear {
                    inputs: width,
                    outputs: CLASSES,
                });
                (layers, None)
            }
            ModelSpec::Cnn { image_side } => {
                let side = *image_side;
                if side * side != input_dim {
                    return Err(LayoutError::NotAnImage { input_dim, side });
                }
                let after = ((side.saturating_sub(4)) / 2).saturating_sub(4) / 2;
                if after == 0 {
                    return Err(LayoutError::ImageTooSmall { side });
                }
                (
                    vec![
                        Layer::Conv2d {
                            in_channels: 1,
                            out_channels: 16,
                            kernel: 5,
                        },
                        Layer::Relu,
                        Layer::MaxPool2,
                        Layer::Conv2d {
                            in_channels: 16,
                            out_channels: 32,
                            kernel: 5,
                        },
                        Layer::Relu,
                        Layer::MaxPool2,
                        Layer::Flatten,
                        Layer::Linear {
                            inputs: 32 * after * after,
                            outputs: 128,
                        },
                        Layer::Relu,
                        Layer::Linear {
                            inputs: 128,
                            outputs: CLASSES,
                        },
                    ],
                    Some(side),
                )
            }
        };
        Ok(Architecture {
            layers,
            input_dim,
            image_side,
            kind: spec.kind(),
        })
    }

    /// Builds an architecture from explicit layers (for tests and benches).
    pub fn from_layers(
        layers: Vec<Layer>,
        input_dim: usize,
        image_side: Option<usize>,
    ) -> Architecture {
        Architecture {
            layers,
            input_dim,
            image_side,
            kind: "custom",
        }
    }

    /// The layers, in order.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Features per input row.
    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    /// The image side for image models.
    pub fn image_side(&self) -> Option<usize> {
        self.image_side
    }

    /// The parameter tensors, in wire order.
    pub fn layout(&self) -> ParamLayout {
        let mut tensors = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            match *layer {
                Layer::Linear { inputs, outputs } => {
                    tensors.push(ParamTensor::new(format!("{i}.weight"), vec![outputs, inputs]));
                    tensors.push(ParamTensor::new(format!("{i}.bias"), vec![outputs]));
                }
                Layer::Conv2d {
                    in_channels,
                    out_channels,
                    kernel,
                } => {
                    tensors.push(ParamTensor::new(
                        format!("{i}.weight"),
                        vec![out_channels, in_channels, kernel, kernel],
                    ));
                    tensors.push(ParamTensor::new(format!("{i}.bias"), vec![out_channels]));
                }
                Layer::Relu | Layer::MaxPool2 | Layer::Flatten => {}
            }
        }
        ParamLayout {
            kind: self.kind,
            input_dim: self.input_dim,
            tensors,
        }
    }

    /// Initial parameters: PyTorch's default uniform(±1/√fan_in) for weights
    /// and biases, from a deterministic generator seeded by `seed`, so every
    /// party can rebuild the initial model of a job.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        let layout = self.layout();
        let mut params = Vec::with_capacity(layout.num_params());
        let mut counter = 0u64;
        for t in &layout.tensors {
            let fan_in: usize = if t.shape.len() == 1 {
                self.fan_in_of_bias(&t.name)
            } else {
                t.shape[1..].iter().product()
            };
            let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
            for _ in 0..t.numel() {
                counter += 1;
                let u = splitmix64(seed, counter) as f64 / u64::MAX as f64;
                params.push(((2.0 * u - 1.0) * bound) as f32);
            }
        }
        params
    }

    fn fan_in_of_bias(&self, bias_name: &str) -> usize {
        let index: usize = bias_name
            .split('.')
            .next()
            .and_then(|i| i.parse().ok())
            .unwrap_or(0);
        match self.layers.get(index) {
            Some(Layer::Linear { inputs, .. }) => *inputs,
            Some(Layer::Conv2d {
                in_channels,
                kernel,
                ..
            }) => in_channels * kernel * kernel,
            _ => 1,
        }
    }
}

/// SplitMix64 of `seed` at position `i`: a tiny deterministic generator for
/// initial weights (never for noise).
fn splitmix64(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A named parameter tensor in PyTorch layout.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamTensor {
    /// `torch.nn.Sequential` state-dict name, e.g. `0.weight`.
    pub name: String,
    /// PyTorch shape.
    pub shape: Vec<usize>,
}

impl ParamTensor {
    fn new(name: String, shape: Vec<usize>) -> ParamTensor {
        ParamTensor { name, shape }
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Names and shapes of a model's parameters, in wire order.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamLayout {
    kind: &'static str,
    input_dim: usize,
    tensors: Vec<ParamTensor>,
}

impl ParamLayout {
    /// The tensors, in order.
    pub fn tensors(&self) -> &[ParamTensor] {
        &self.tensors
    }

    /// Length of the flat vector.
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(ParamTensor::numel).sum()
    }

    /// SHA-256 over the model kind, input width and every tensor's name and
    /// shape, hex: two parties agree on a vector's meaning iff this matches.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!("meridian-layout-v1;{};{}", self.kind, self.input_dim));
        for t in &self.tensors {
            h.update(format!(";{}:{:?}", t.name, t.shape));
        }
        hex::encode(h.finalize())
    }

    /// Checks that a flat vector fits this layout and holds only finite values.
    pub fn check(&self, params: &[f32]) -> Result<(), LayoutError> {
        if params.len() != self.num_params() {
            return Err(LayoutError::WrongLength {
                expected: self.num_params(),
                got: params.len(),
            });
        }
        if let Some(index) = params.iter().position(|v| !v.is_finite()) {
            return Err(LayoutError::NotFinite { index });
        }
        Ok(())
    }
}

/// A model that cannot be built or a vector that does not fit it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LayoutError {
    /// The features give no inputs.
    #[error("the model has no input features")]
    NoInputs,
    /// A CNN whose input width is not side².
    #[error("model.image_side: {side}x{side} images need {} features, got {input_dim}", side * side)]
    NotAnImage {
        /// Features per row.
        input_dim: usize,
        /// Declared side.
        side: usize,
    },
    /// A CNN whose image vanishes after the convolutions.
    #[error("model.image_side: {side} pixels is too small for two conv5 + pool2 stages (need at least 16)")]
    ImageTooSmall {
        /// Declared side.
        side: usize,
    },
    /// A vector of the wrong length.
    #[error("parameter vector has {got} values, the layout needs {expected}")]
    WrongLength {
        /// Expected length.
        expected: usize,
        /// Received length.
        got: usize,
    },
    /// A NaN or infinite parameter.
    #[error("parameter {index} is not finite")]
    NotFinite {
        /// Position in the vector.
        index: usize,
    },
}

#[cfg(test)]
mod tests;
