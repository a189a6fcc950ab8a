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
    // The coordinator's way back from the chunks it serves.
    let decoded = decode_chunks(&chunks);
    assert_eq!(decoded, values);
    assert_eq!(decoded.capacity(), values.len());
    assert!(decode_chunks(&[]).is_empty());
}

#[test]
fn rejects_bad_streams() {
    let mut asm = ChunkAssembler::new(2);
    assert_eq!(asm.push(&[0u8; 3]), Err(ChunkError::Misaligned { index: 0, bytes: 3 }));
    let mut asm = ChunkAssembler::new(1);
    assert_eq!(asm.push(&[0u8; 8]), Err(ChunkError::TooLong { expected: 1 }));
    let mut asm = ChunkAssembler::new(3);
    asm.push(&1.0f32.to_le_bytes()).unwrap();
    assert_eq!(asm.finish(), Err(ChunkError::Truncated { received: 1, expected: 3 }));
    let mut asm = ChunkAssembler::new(1);
    let err = asm.push(&f32::NAN.to_le_bytes()).unwrap_err();
    assert!(matches!(err, ChunkError::NotFinite { index: 0, .. }));
    let mut asm = ChunkAssembler::new(CHUNK_VALUES * 4);
    assert_eq!(
        asm.push(&vec![0u8; MAX_CHUNK_BYTES + 4]),
        Err(ChunkError::Oversized { index: 0, bytes: MAX_CHUNK_BYTES + 4 })
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

#[test]
fn the_streaming_copy_is_the_plain_one_at_every_alignment_and_finds_every_bad_value() {
    let len = 16 * 5 + 3;
    let source: Vec<f32> = (0..len).map(|i| i as f32 * -1.25 + f32::MIN_POSITIVE).collect();
    let chunk = encode_chunk(&source);
    // 0 to 4 values already in place shift the destination through every
    // alignment of the 16-byte stores.
    for already in 0..5 {
        let mut values: Vec<f32> = vec![7.0; already];
        assert!(meridian_sys::copy::append_finite(&mut values, &chunk));
        assert_eq!(&values[..already], &vec![7.0; already][..]);
        assert_eq!(&values[already..], &source[..], "after {already} values");
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::from_bits(0xff80_0001)] {
            for at in [0, 1, 2, 3, 15, 16, 40, len - 4, len - 1] {
                let mut with_bad = source.clone();
                with_bad[at] = bad;
                let mut values: Vec<f32> = vec![7.0; already];
                assert!(!meridian_sys::copy::append_finite(&mut values, &encode_chunk(&with_bad)), "{bad} at {at}");
                assert_eq!(values, vec![7.0; already], "nothing is appended from a bad chunk");
            }
        }
    }
}

#[test]
fn a_large_vector_is_assembled_with_streaming_stores_and_checked_the_same() {
    let len = STREAMING_FROM_BYTES / 4 + 5;
    let values: Vec<f32> = (0..len).map(|i| (i % 1009) as f32 - 500.5).collect();
    // Fresh memory is written plainly; memory with room for all of it, as
    // the last model pulled has, with streaming stores.
    assert!(!ChunkAssembler::new(len).streaming);
    assert!(!ChunkAssembler::reusing(len, Vec::with_capacity(len - 1)).streaming);
    assert!(!ChunkAssembler::reusing(len / 2, Vec::with_capacity(len)).streaming);
    let mut asm = ChunkAssembler::reusing(len, vec![1.0; len]);
    assert!(asm.streaming);
    // Odd-sized chunks, so later ones land at every alignment.
    for piece in values.chunks(CHUNK_VALUES - 3) {
        asm.push(&encode_chunk(piece)).unwrap();
    }
    assert_eq!(asm.finish().unwrap(), values);

    let mut bad = values.clone();
    bad[CHUNK_VALUES + 1] = f32::NAN;
    let mut asm = ChunkAssembler::reusing(len, values);
    assert!(asm.streaming);
    let chunks: Vec<Bytes> = encode_chunks(&bad).collect();
    asm.push(&chunks[0]).unwrap();
    let err = asm.push(&chunks[1]).unwrap_err();
    assert!(matches!(err, ChunkError::NotFinite { index, .. } if index == CHUNK_VALUES + 1), "{err:?}");
    // The shape checks still come first.
    assert_eq!(asm.push(&[0u8; 6]), Err(ChunkError::Misaligned { index: 2, bytes: 6 }));
}

#[test]
fn the_copy_around_the_cache_is_a_copy_at_every_offset_and_length() {
    let src: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
    for offset in 0..17 {
        for len in [0, 1, 15, 16, 63, 64, 65, 127, 128, 200, 983 - offset] {
            let mut dst = vec![0xAAu8; 1000];
            meridian_sys::copy::copy_around_cache(&mut dst[offset..offset + len], &src[..len]);
            assert_eq!(&dst[offset..offset + len], &src[..len], "offset {offset}, length {len}");
            assert!(
                dst[..offset].iter().chain(&dst[offset + len..]).all(|&b| b == 0xAA),
                "offset {offset}, length {len}"
            );
        }
    }
}

/// Fills every part of `asm`'s cut into `count` parts from `values`' wire
/// chunks, in an interleaved order (as two streams would), and finishes each.
fn fill_parts(asm: &mut PartedAssembly, count: usize, values: &[f32]) -> Vec<(usize, usize)> {
    let mut parts = asm.parts(count);
    let bounds: Vec<(usize, usize)> = parts.iter().map(|p| (p.first_value(), p.len())).collect();
    let mut pieces: Vec<Vec<Bytes>> =
        bounds.iter().map(|&(first, len)| encode_chunks(&values[first..first + len]).collect()).collect();
    for round in 0..pieces.iter().map(Vec::len).max().unwrap_or(0) {
        for (part, chunks) in parts.iter_mut().zip(&mut pieces).rev() {
            if let Some(chunk) = chunks.get(round) {
                part.push(chunk).unwrap();
            }
        }
    }
    for part in parts {
        part.finish().unwrap();
    }
    bounds
}

#[test]
fn a_vector_in_parts_is_cut_on_chunks_and_assembled_whole() {
    for (len, count) in
        [(CHUNK_VALUES * 4, 2), (CHUNK_VALUES * 3 + 7, 2), (CHUNK_VALUES + 1, 4), (5, 2), (0, 2), (CHUNK_VALUES * 2, 1)]
    {
        let values: Vec<f32> = (0..len).map(|i| (i % 977) as f32 - 3.25).collect();
        let mut asm = PartedAssembly::reusing(len, Vec::new()).unwrap();
        let bounds = fill_parts(&mut asm, count, &values);
        // Whole chunks, in order, covering the vector, none empty but an empty vector's.
        let mut next = 0;
        for &(first, part_len) in &bounds {
            assert_eq!(first, next);
            assert!(first.is_multiple_of(CHUNK_VALUES));
            assert!(part_len > 0 || len == 0);
            next += part_len;
        }
        assert_eq!(next, len);
        assert!(bounds.len() <= count.max(1));
        assert_eq!(asm.finish().unwrap(), values, "{len} values in {count} parts");
    }
}

#[test]
fn a_large_vector_in_parts_is_written_around_the_cache_into_reused_memory() {
    let len = STREAMING_FROM_BYTES / 4 + 5;
    let values: Vec<f32> = (0..len).map(|i| (i % 1009) as f32 - 500.5).collect();
    assert!(!PartedAssembly::reusing(len, Vec::new()).unwrap().streaming);
    // More than any machine has is refused, not an abort.
    assert!(PartedAssembly::reusing(usize::MAX / 8, Vec::new()).is_err());
    let mut asm = PartedAssembly::reusing(len, vec![1.0; len]).unwrap();
    assert!(asm.streaming);
    fill_parts(&mut asm, 2, &values);
    assert_eq!(asm.finish().unwrap(), values);
}

#[test]
fn a_part_rejects_bad_chunks_and_an_unfinished_part_fails_the_vector() {
    let len = CHUNK_VALUES * 2 + 10;
    let mut asm = PartedAssembly::reusing(len, Vec::new()).unwrap();
    {
        let mut parts = asm.parts(2);
        let second = &mut parts[1];
        assert_eq!(second.first_value(), CHUNK_VALUES * 2);
        assert_eq!(second.len(), 10);
        // A NaN's index is its index in the whole vector.
        let mut bad = vec![0.5f32; 10];
        bad[3] = f32::NAN;
        let err = second.push(&encode_chunk(&bad)).unwrap_err();
        assert!(matches!(err, ChunkError::NotFinite { index, .. } if index == CHUNK_VALUES * 2 + 3), "{err:?}");
        assert_eq!(second.push(&[0u8; 6]), Err(ChunkError::Misaligned { index: 1, bytes: 6 }));
        assert_eq!(second.push(&encode_chunk(&[1.0; 11])), Err(ChunkError::TooLong { expected: 10 }));
        let first = parts.remove(0);
        // The first part never got its values.
        assert_eq!(first.finish(), Err(ChunkError::Truncated { received: 0, expected: CHUNK_VALUES * 2 }));
    }
    assert!(matches!(asm.finish(), Err(ChunkError::Truncated { received: 0, .. })));

    // Parts that finished under an earlier cut do not count for a new one.
    let values = vec![2.0f32; len];
    let mut asm = PartedAssembly::reusing(len, Vec::new()).unwrap();
    {
        let mut parts = asm.parts(2);
        for chunk in encode_chunks(&values[..CHUNK_VALUES * 2]) {
            parts[0].push(&chunk).unwrap();
        }
        parts.remove(0).finish().unwrap();
    }
    {
        let mut parts = asm.parts(2);
        parts[1].push(&encode_chunk(&values[..10])).unwrap();
        parts.remove(1).finish().unwrap();
    }
    assert_eq!(asm.finish(), Err(ChunkError::Truncated { received: 10, expected: len }));
}
