//! Tests of layer stacks and layouts: shape checks, names, hashes, initial
//! values.

use super::*;

#[test]
fn mlp_layout_uses_sequential_names_and_pytorch_shapes() {
    let arch = Architecture::new(&ModelSpec::Mlp { hidden: vec![64, 64] }, 30).unwrap();
    let layout = arch.layout();
    let names: Vec<_> = layout.tensors().iter().map(|t| (t.name.as_str(), t.shape.clone())).collect();
    assert_eq!(
        names,
        vec![
            ("0.weight", vec![64, 30]),
            ("0.bias", vec![64]),
            ("2.weight", vec![64, 64]),
            ("2.bias", vec![64]),
            ("4.weight", vec![2, 64]),
            ("4.bias", vec![2]),
        ]
    );
    assert_eq!(layout.num_params(), 6274);
}

#[test]
fn cnn_of_the_benchmark_has_79170_params() {
    let arch = Architecture::new(&ModelSpec::Cnn { image_side: 28 }, 784).unwrap();
    assert_eq!(arch.layout().num_params(), 79_170);
    assert_eq!(
        Architecture::new(&ModelSpec::Cnn { image_side: 28 }, 700),
        Err(LayoutError::NotAnImage { input_dim: 700, side: 28 })
    );
}

#[test]
fn layout_hash_distinguishes_models() {
    let a = Architecture::new(&ModelSpec::LogisticRegression, 30).unwrap().layout().hash();
    let b = Architecture::new(&ModelSpec::LogisticRegression, 31).unwrap().layout().hash();
    let c = Architecture::new(&ModelSpec::Mlp { hidden: vec![2] }, 30).unwrap().layout().hash();
    assert_ne!(a, b);
    assert_ne!(a, c);
    assert_eq!(a, Architecture::new(&ModelSpec::LogisticRegression, 30).unwrap().layout().hash());
}

#[test]
fn init_is_deterministic_and_bounded() {
    let arch = Architecture::new(&ModelSpec::Mlp { hidden: vec![16] }, 9).unwrap();
    let p = arch.init_params(7);
    assert_eq!(p, arch.init_params(7));
    assert_ne!(p, arch.init_params(8));
    assert_eq!(p.len(), arch.layout().num_params());
    // first layer: fan_in 9 -> bound 1/3
    assert!(p[..16 * 9 + 16].iter().all(|v| v.abs() <= 1.0 / 3.0 + 1e-6));
    assert!(arch.layout().check(&p).is_ok());
    let mut bad = p.clone();
    bad[3] = f32::NAN;
    assert_eq!(arch.layout().check(&bad), Err(LayoutError::NotFinite { index: 3 }));
    assert_eq!(arch.layout().check(&p[1..]), Err(LayoutError::WrongLength { expected: p.len(), got: p.len() - 1 }));
}

#[test]
fn model_spec_layouts_and_hashes_are_unchanged() {
    let hash = |spec: ModelSpec, dim| Architecture::new(&spec, dim).unwrap().layout().hash();
    assert_eq!(
        hash(ModelSpec::LogisticRegression, 30),
        "509ef9e3a4f2f8f56918efaaa0603181b87839ea7c29b44bb1747f3602e4c693"
    );
    assert_eq!(
        hash(ModelSpec::Mlp { hidden: vec![64, 64] }, 30),
        "5cf643492a6354897c975daa413a6c600d46449e1d9137b36ce1c15121af5cc0"
    );
    assert_eq!(
        hash(ModelSpec::Cnn { image_side: 28 }, 784),
        "362f235da4a72268ef953b54bf8f573c96db9ce156e21d9267a2b8cbbae9eb82"
    );
    // Values computed independently from the SplitMix64 definition.
    let p = Architecture::new(&ModelSpec::Mlp { hidden: vec![3] }, 2).unwrap().init_params(7);
    let want: [f32; 17] = [
        -0.683_364_57,
        0.566_761_2,
        0.117_281_15,
        -0.067_257_315,
        -0.354_357_33,
        -0.045_321_297,
        -0.243_136_21,
        -0.517_236_9,
        -0.122_836_61,
        -0.457_769_54,
        0.531_016_8,
        0.482_687_44,
        0.428_776_98,
        0.420_319_86,
        0.055_757_508,
        0.438_340_13,
        -0.200_500_7,
    ];
    assert_eq!(p, want);
}

#[test]
fn from_layers_checks_every_layer_against_the_shape_before_it() {
    let linear = |inputs, outputs| Layer::Linear { inputs, outputs };
    assert_eq!(
        Architecture::from_layers(vec![linear(4, 3), linear(5, 2)], 4, None),
        Err(LayoutError::LayerMismatch { index: 1, layer: linear(5, 2), input: "[3]".into() })
    );
    let conv = Layer::Conv2d { in_channels: 1, out_channels: 2, kernel: 3 };
    let err = Architecture::from_layers(vec![conv, Layer::LayerNorm { features: 32 }], 36, Some(6)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "layer 1 (LayerNorm { features: 32 }) cannot take an input of shape [2, 4, 4] per example"
    );
    assert_eq!(
        Architecture::from_layers(vec![conv, Layer::GroupNorm { groups: 3, channels: 2 }], 36, Some(6)),
        Err(LayoutError::GroupsDoNotDivide { index: 1, groups: 3, channels: 2 })
    );
    assert_eq!(
        Architecture::from_layers(vec![conv, Layer::Flatten], 36, Some(6)).unwrap_err().to_string(),
        "the last layer gives [32] values per example, the model must end in 2 logits"
    );
    assert_eq!(
        Architecture::from_layers(vec![linear(4, 0), linear(0, 2)], 4, None),
        Err(LayoutError::EmptyLayer { index: 0, layer: linear(4, 0) })
    );
    assert_eq!(
        Architecture::from_layers(vec![linear(4, 2)], 4, Some(3)),
        Err(LayoutError::NotAnImage { input_dim: 4, side: 3 })
    );
}

#[test]
fn batch_norm_is_refused() {
    let err = Architecture::from_layers(
        vec![
            Layer::Linear { inputs: 4, outputs: 3 },
            Layer::BatchNorm { channels: 3 },
            Layer::Linear { inputs: 3, outputs: 2 },
        ],
        4,
        None,
    )
    .unwrap_err();
    assert_eq!(err, LayoutError::BatchNormMixesExamples { index: 1 });
    assert_eq!(
        err.to_string(),
        "layer 1: BatchNorm mixes examples within a batch, so per-example gradients are undefined; use GroupNorm or LayerNorm"
    );
}

#[test]
fn norm_layers_have_a_scale_and_shift_per_channel() {
    let arch = Architecture::from_layers(
        vec![
            Layer::Conv2d { in_channels: 1, out_channels: 4, kernel: 3 },
            Layer::GroupNorm { groups: 2, channels: 4 },
            Layer::Flatten,
            Layer::LayerNorm { features: 64 },
            Layer::Linear { inputs: 64, outputs: 2 },
        ],
        36,
        Some(6),
    )
    .unwrap();
    let layout = arch.layout();
    let names: Vec<_> = layout.tensors().iter().map(|t| (t.name.as_str(), t.shape.clone())).collect();
    assert_eq!(
        names,
        vec![
            ("0.weight", vec![4, 1, 3, 3]),
            ("0.bias", vec![4]),
            ("1.weight", vec![4]),
            ("1.bias", vec![4]),
            ("3.weight", vec![64]),
            ("3.bias", vec![64]),
            ("4.weight", vec![2, 64]),
            ("4.bias", vec![2]),
        ]
    );
    let p = arch.init_params(3);
    assert_eq!(p[40..44], [1.0; 4]);
    assert_eq!(p[44..48], [0.0; 4]);
    assert_eq!(p[48..112], [1.0; 64]);
    assert_eq!(p[112..176], [0.0; 64]);
}
