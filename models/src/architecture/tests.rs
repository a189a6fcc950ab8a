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
    assert_eq!(
        arch.layout().check(&p[1..]),
        Err(LayoutError::WrongLength { expected: p.len(), got: p.len() - 1 })
    );
}
