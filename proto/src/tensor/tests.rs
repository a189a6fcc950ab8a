use super::*;

#[test]
fn round_trip_across_chunk_boundaries() {
    let values: Vec<f32> = (0..CHUNK_VALUES * 2 + 3).map(|i| i as f32 * 0.5).collect();
    let chunks: Vec<Bytes> = encode_chunks(&values).collect();
    assert_eq!(chunks.len(), 3);
    assert!(chunks.iter().all(|c| c.len() <= MAX_CHUNK_BYTES));
    let mut asm = ChunkAssembler::new(values.len());
    for c in &chunks {
        asm.push(c).unwrap();
    }
    assert_eq!(asm.finish().unwrap(), values);
}

#[test]
fn rejects_bad_streams() {
    let mut asm = ChunkAssembler::new(2);
    assert_eq!(
        asm.push(&[0u8; 3]),
        Err(ChunkError::Misaligned { index: 0, bytes: 3 })
    );
    let mut asm = ChunkAssembler::new(1);
    assert_eq!(asm.push(&[0u8; 8]), Err(ChunkError::TooLong { expected: 1 }));
    let mut asm = ChunkAssembler::new(3);
    asm.push(&1.0f32.to_le_bytes()).unwrap();
    assert_eq!(
        asm.finish(),
        Err(ChunkError::Truncated {
            received: 1,
            expected: 3
        })
    );
    let mut asm = ChunkAssembler::new(1);
    let err = asm.push(&f32::NAN.to_le_bytes()).unwrap_err();
    assert!(matches!(err, ChunkError::NotFinite { index: 0, .. }));
    let mut asm = ChunkAssembler::new(CHUNK_VALUES * 4);
    assert_eq!(
        asm.push(&vec![0u8; MAX_CHUNK_BYTES + 4]),
        Err(ChunkError::Oversized {
            index: 0,
            bytes: MAX_CHUNK_BYTES + 4
        })
    );
}

#[test]
fn the_validator_keeps_nothing_but_the_norm() {
    let mut v = ChunkValidator::with_norm(3);
    v.check(&[3.0f32, 0.0].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    assert!(v.finish().is_err());
    v.check(&4.0f32.to_le_bytes()).unwrap();
    assert_eq!(v.finish(), Ok(()));
    assert_eq!(v.norm(), Some(5.0));
    let mut plain = ChunkValidator::new(1);
    plain.check(&4.0f32.to_le_bytes()).unwrap();
    assert_eq!(plain.norm(), None);
    // A value past a NaN is never counted: the error names the NaN's index in the vector.
    let mut v = ChunkValidator::new(4);
    v.check(&1.0f32.to_le_bytes()).unwrap();
    let err = v.check(&[2.0f32, f32::NAN].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap_err();
    assert!(matches!(err, ChunkError::NotFinite { index: 2, .. }), "{err:?}");
}

#[test]
fn a_chunk_view_is_the_encoded_chunk_and_keeps_its_values_alive() {
    let values = std::sync::Arc::new(vec![1.5f32, -0.0, f32::MIN_POSITIVE, 3e38, -7.25]);
    let view = chunk_view(&values, 1..4);
    assert_eq!(view, encode_chunk(&values[1..4]));
    assert_eq!(chunk_view(&values, 0..0).len(), 0);
    drop(values);
    // The view owns what it shows.
    assert_eq!(decode_le(&view).collect::<Vec<_>>(), vec![-0.0, f32::MIN_POSITIVE, 3e38]);
}

#[test]
fn both_checks_find_every_kind_of_non_finite_value_wherever_it_sits() {
    // Past the 64-byte blocks of the exponent test and inside them, at both ends.
    let len = 16 * 5 + 3;
    for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::from_bits(0x7f80_0001)] {
        for at in [0, 1, 15, 16, 40, len - 4, len - 1] {
            let mut values = vec![f32::MAX; len];
            values[at] = bad;
            let chunk = encode_chunk(&values);
            for mut v in [ChunkValidator::new(len), ChunkValidator::with_norm(len)] {
                let err = v.check(&chunk).unwrap_err();
                assert!(matches!(err, ChunkError::NotFinite { index, .. } if index == at), "{bad} at {at}: {err:?}");
            }
        }
    }
    // The largest finite values, subnormals and both zeros pass.
    let edge = [f32::MAX, f32::MIN, f32::MIN_POSITIVE, f32::from_bits(1), 0.0, -0.0];
    assert!(ChunkValidator::new(edge.len()).check(&encode_chunk(&edge)).is_ok());
}
