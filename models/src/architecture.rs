//! Layer stacks and parameter layouts: what a model is, independent of any
//! device, so the coordinator can size and hash a model without Burn.

use meridian_spec::job::ModelSpec;
use sha2::{Digest, Sha256};

/// One layer of a sequential network, at its index in the stack.
#[derive(Clone, Copy, Debug, PartialEq)]
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
    /// `[B, C, H, W]` to `[B, C·H·W]` (a flat input passes unchanged).
    Flatten,
    /// Layer normalisation of a flat vector (PyTorch `nn.LayerNorm(features)`,
    /// ε = [`NORM_EPSILON`]): each example is normalised over its `features`
    /// values, then scaled and shifted per feature; weight and bias `[features]`.
    LayerNorm {
        /// Width of the flat input.
        features: usize,
    },
    /// Group normalisation (PyTorch `nn.GroupNorm(groups, channels)`,
    /// ε = [`NORM_EPSILON`]): each example's channels are split into `groups`,
    /// each group normalised over its channels and pixels, then scaled and
    /// shifted per channel; weight and bias `[channels]`. On a flat input the
    /// features are the channels.
    GroupNorm {
        /// Number of groups; divides `channels`.
        groups: usize,
        /// Input channels.
        channels: usize,
    },
    /// Batch normalisation, named only to be refused:
    /// [`Architecture::from_layers`] rejects it with
    /// [`LayoutError::BatchNormMixesExamples`], because it normalises each
    /// example with statistics of the whole batch, so one example's gradient
    /// depends on the others and per-example clipping is undefined.
    BatchNorm {
        /// Input channels.
        channels: usize,
    },
}

/// The ε added to the variance by [`Layer::LayerNorm`] and
/// [`Layer::GroupNorm`], PyTorch's default.
pub const NORM_EPSILON: f64 = 1e-5;

/// What one example looks like between two layers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Activation {
    Flat(usize),
    Image { channels: usize, height: usize, width: usize },
}

impl std::fmt::Display for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Activation::Flat(n) => write!(f, "[{n}]"),
            Activation::Image { channels, height, width } => write!(f, "[{channels}, {height}, {width}]"),
        }
    }
}

impl Layer {
    /// The shape this layer gives for an example of shape `input`, or why it
    /// cannot take it; `index` is the layer's position, for the error.
    fn output(&self, index: usize, input: Activation) -> Result<Activation, LayoutError> {
        let mismatch = || LayoutError::LayerMismatch { index, layer: *self, input: input.to_string() };
        let empty = || LayoutError::EmptyLayer { index, layer: *self };
        match (*self, input) {
            (Layer::BatchNorm { .. }, _) => Err(LayoutError::BatchNormMixesExamples { index }),
            (Layer::Linear { inputs, outputs }, _) if inputs == 0 || outputs == 0 => Err(empty()),
            (Layer::Linear { inputs, outputs }, Activation::Flat(n)) if n == inputs => Ok(Activation::Flat(outputs)),
            (Layer::Conv2d { in_channels, out_channels, kernel }, _)
                if in_channels == 0 || out_channels == 0 || kernel == 0 =>
            {
                Err(empty())
            }
            (Layer::Conv2d { in_channels, out_channels, kernel }, Activation::Image { channels, height, width })
                if channels == in_channels && height >= kernel && width >= kernel =>
            {
                Ok(Activation::Image { channels: out_channels, height: height - kernel + 1, width: width - kernel + 1 })
            }
            (Layer::Relu, _) => Ok(input),
            (Layer::MaxPool2, Activation::Image { channels, height, width }) if height >= 2 && width >= 2 => {
                Ok(Activation::Image { channels, height: height / 2, width: width / 2 })
            }
            (Layer::Flatten, Activation::Image { channels, height, width }) => {
                Ok(Activation::Flat(channels * height * width))
            }
            (Layer::Flatten, Activation::Flat(_)) => Ok(input),
            (Layer::LayerNorm { features: 0 }, _) => Err(empty()),
            (Layer::LayerNorm { features }, Activation::Flat(n)) if n == features => Ok(input),
            (Layer::GroupNorm { groups, channels }, _) if groups == 0 || channels % groups != 0 => {
                Err(LayoutError::GroupsDoNotDivide { index, groups, channels })
            }
            (Layer::GroupNorm { channels, .. }, Activation::Flat(n)) if n == channels => Ok(input),
            (Layer::GroupNorm { channels, .. }, Activation::Image { channels: c, .. }) if c == channels => Ok(input),
            _ => Err(mismatch()),
        }
    }
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
            ModelSpec::LogisticRegression => (vec![Layer::Linear { inputs: input_dim, outputs: CLASSES }], None),
            ModelSpec::Mlp { hidden } => {
                let mut layers = Vec::new();
                let mut width = input_dim;
                for &h in hidden {
                    layers.push(Layer::Linear { inputs: width, outputs: h });
                    layers.push(Layer::Relu);
                    width = h;
                }
                layers.push(Layer::Linear { inputs: width, outputs: CLASSES });
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
                        Layer::Conv2d { in_channels: 1, out_channels: 16, kernel: 5 },
                        Layer::Relu,
                        Layer::MaxPool2,
                        Layer::Conv2d { in_channels: 16, out_channels: 32, kernel: 5 },
                        Layer::Relu,
                        Layer::MaxPool2,
                        Layer::Flatten,
                        Layer::Linear { inputs: 32 * after * after, outputs: 128 },
                        Layer::Relu,
                        Layer::Linear { inputs: 128, outputs: CLASSES },
                    ],
                    Some(side),
                )
            }
        };
        Ok(Architecture { layers, input_dim, image_side, kind: spec.kind() })
    }

    /// Builds an architecture from explicit layers on inputs of `input_dim`
    /// features, which are `side × side` single-channel images when
    /// `image_side` is `Some(side)`. Checks that every layer fits the shape
    /// the previous one gives and that the last gives [`CLASSES`] logits;
    /// refuses [`Layer::BatchNorm`].
    pub fn from_layers(
        layers: Vec<Layer>,
        input_dim: usize,
        image_side: Option<usize>,
    ) -> Result<Architecture, LayoutError> {
        if input_dim == 0 {
            return Err(LayoutError::NoInputs);
        }
        let mut shape = match image_side {
            Some(side) if side * side != input_dim => return Err(LayoutError::NotAnImage { input_dim, side }),
            Some(side) => Activation::Image { channels: 1, height: side, width: side },
            None => Activation::Flat(input_dim),
        };
        for (index, layer) in layers.iter().enumerate() {
            shape = layer.output(index, shape)?;
        }
        if shape != Activation::Flat(CLASSES) {
            return Err(LayoutError::WrongOutput { output: shape.to_string() });
        }
        Ok(Architecture { layers, input_dim, image_side, kind: "custom" })
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
                Layer::Conv2d { in_channels, out_channels, kernel } => {
                    tensors
                        .push(ParamTensor::new(format!("{i}.weight"), vec![out_channels, in_channels, kernel, kernel]));
                    tensors.push(ParamTensor::new(format!("{i}.bias"), vec![out_channels]));
                }
                Layer::LayerNorm { features: channels } | Layer::GroupNorm { channels, .. } => {
                    tensors.push(ParamTensor::new(format!("{i}.weight"), vec![channels]));
                    tensors.push(ParamTensor::new(format!("{i}.bias"), vec![channels]));
                }
                // BatchNorm never passes `from_layers`.
                Layer::Relu | Layer::MaxPool2 | Layer::Flatten | Layer::BatchNorm { .. } => {}
            }
        }
        ParamLayout { kind: self.kind, input_dim: self.input_dim, tensors }
    }

    /// Initial parameters: PyTorch's defaults, uniform(±1/√fan_in) for
    /// linear and convolution weights and biases, from a deterministic
    /// generator seeded by `seed`, so every party can rebuild the initial
    /// model of a job; scale 1 and shift 0 for normalisation layers.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        let layout = self.layout();
        let mut params = Vec::with_capacity(layout.num_params());
        let mut counter = 0u64;
        for t in &layout.tensors {
            if let Some(Layer::LayerNorm { .. } | Layer::GroupNorm { .. }) = self.layer_of(&t.name) {
                let value = if t.name.ends_with(".weight") { 1.0 } else { 0.0 };
                params.extend(std::iter::repeat_n(value, t.numel()));
                continue;
            }
            let fan_in: usize =
                if t.shape.len() == 1 { self.fan_in_of_bias(&t.name) } else { t.shape[1..].iter().product() };
            let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
            for _ in 0..t.numel() {
                counter += 1;
                let u = splitmix64(seed, counter) as f64 / u64::MAX as f64;
                params.push(((2.0 * u - 1.0) * bound) as f32);
            }
        }
        params
    }

    /// The layer a parameter named `{index}.{what}` belongs to.
    fn layer_of(&self, name: &str) -> Option<&Layer> {
        let index: usize = name.split('.').next().and_then(|i| i.parse().ok())?;
        self.layers.get(index)
    }

    fn fan_in_of_bias(&self, bias_name: &str) -> usize {
        match self.layer_of(bias_name) {
            Some(Layer::Linear { inputs, .. }) => *inputs,
            Some(Layer::Conv2d { in_channels, kernel, .. }) => in_channels * kernel * kernel,
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
        self.check_values(params)
    }

    /// [`ParamLayout::check`] for values of any float type.
    pub(crate) fn check_values<T: Copy + Into<f64>>(&self, params: &[T]) -> Result<(), LayoutError> {
        if params.len() != self.num_params() {
            return Err(LayoutError::WrongLength { expected: self.num_params(), got: params.len() });
        }
        if let Some(index) = params.iter().position(|&v| !v.into().is_finite()) {
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
    /// A layer that cannot take what the layer before it gives.
    #[error("layer {index} ({layer:?}) cannot take an input of shape {input} per example")]
    LayerMismatch {
        /// Position of the layer.
        index: usize,
        /// The layer.
        layer: Layer,
        /// Shape of one example at its input.
        input: String,
    },
    /// A layer with a zero width, channel count or kernel.
    #[error("layer {index} ({layer:?}) has a zero size")]
    EmptyLayer {
        /// Position of the layer.
        index: usize,
        /// The layer.
        layer: Layer,
    },
    /// A BatchNorm layer: it mixes the examples of a batch.
    #[error(
        "layer {index}: BatchNorm mixes examples within a batch, so per-example gradients are undefined; use GroupNorm or LayerNorm"
    )]
    BatchNormMixesExamples {
        /// Position of the layer.
        index: usize,
    },
    /// A GroupNorm whose groups do not divide its channels.
    #[error("layer {index}: GroupNorm cannot split {channels} channels into {groups} groups")]
    GroupsDoNotDivide {
        /// Position of the layer.
        index: usize,
        /// Declared groups.
        groups: usize,
        /// Declared channels.
        channels: usize,
    },
    /// A network that does not end in one logit per class.
    #[error("the last layer gives {output} values per example, the model must end in {CLASSES} logits")]
    WrongOutput {
        /// Shape of one example at the output.
        output: String,
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
