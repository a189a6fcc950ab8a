//! The unsafe copies of `meridian_sys::copy` and the ≥ 16 MiB streaming
//! path of `meridian_wire::tensor::ChunkAssembler` that uses them: whatever
//! the lengths, offsets, chunk boundaries and non-finite words, a copy is
//! byte for byte its source and touches nothing around it, an append is all
//! or nothing, a vector filled in parts is handed out only when every part
//! is whole, and a streamed vector is exactly what was sent.
//!
//! Input: byte 0 picks the check; the rest drives it (see each function).

#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use meridian_sys::copy::{UninitParts, all_finite, append_finite, copy_around_cache};
use meridian_wire::tensor::{CHUNK_VALUES, ChunkAssembler, STREAMING_FROM_BYTES};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => copy(rest),
        1 => append(rest),
        2 => parts(rest),
        _ => streamed(rest),
    }
});

/// `len` bytes cycling through `pattern` (zeros without one).
fn bytes(pattern: &[u8], len: usize) -> Vec<u8> {
    if pattern.is_empty() {
        return vec![0; len];
    }
    pattern.iter().copied().cycle().take(len).collect()
}

fn decode(words: &[u8]) -> Vec<f32> {
    words.chunks_exact(4).map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect()
}

/// Bytes 0–2: destination offset and length (up to 64 KiB); the rest is the source pattern.
fn copy(input: &[u8]) {
    let [offset, lo, hi, pattern @ ..] = input else { return };
    let (offset, len) = (usize::from(*offset % 64), usize::from(u16::from_le_bytes([*lo, *hi])));
    let src = bytes(pattern, len);
    let mut dst = vec![0xA5u8; offset + len + 64];
    copy_around_cache(&mut dst[offset..offset + len], &src);
    assert_eq!(&dst[offset..offset + len], &src[..], "copy differs from its source");
    assert!(dst[..offset].iter().chain(&dst[offset + len..]).all(|&b| b == 0xA5), "copy wrote outside");
}

/// Byte 0: values already in the vector; bytes 1–2: words to append; the rest the pattern.
fn append(input: &[u8]) {
    let [before, lo, hi, pattern @ ..] = input else { return };
    let words = bytes(pattern, usize::from(u16::from_le_bytes([*lo, *hi]) % 16_384) * 4);
    let prefix: Vec<f32> = (0..usize::from(*before % 7)).map(|i| i as f32).collect();
    let mut values = prefix.clone();
    let finite = append_finite(&mut values, &words);
    assert_eq!(finite, all_finite(&words));
    assert_eq!(finite, decode(&words).iter().all(|v| v.is_finite()));
    if finite {
        assert_eq!(&values[..prefix.len()], &prefix[..]);
        assert_eq!(values[prefix.len()..].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), bits(&words));
    } else {
        assert_eq!(values, prefix, "a refused append changed the vector");
    }
}

fn bits(words: &[u8]) -> Vec<u32> {
    decode(words).iter().map(|v| v.to_bits()).collect()
}

/// Bytes 0–1: values; byte 2: values per part; byte 3: a part left
/// unfinished (or none); byte 4: non-temporal stores; the rest: piece
/// sizes, then the pattern.
fn parts(input: &[u8]) {
    let [lo, hi, per_part, skip, around, pieces @ ..] = input else { return };
    let len = usize::from(u16::from_le_bytes([*lo, *hi]) % 8_192);
    let source: Vec<f32> = (0..len).map(|i| i as f32 * 0.25 - 3.0).collect();
    let words: Vec<u8> = source.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut filled = UninitParts::reusing(len, Vec::new()).expect("a few KiB");
    let mut cut = filled.cut(usize::from(*per_part) + 1);
    let count = cut.len();
    let skipped = usize::from(*skip) % (count + 1);
    let mut sizes = pieces.iter().map(|&b| usize::from(b) + 1).cycle();
    let mut whole = true;
    for (k, mut part) in cut.drain(..).enumerate() {
        let from = part.first_value();
        while part.written() < part.len() && (k != skipped || part.written() < part.len() / 2) {
            let take = sizes.next().unwrap_or(1).min(part.len() - part.written());
            let at = (from + part.written()) * 4;
            assert!(part.append_finite(&words[at..at + take * 4], *around % 2 == 1));
        }
        let complete = part.written() == part.len();
        whole &= complete;
        assert_eq!(part.finish(), complete);
    }
    match filled.finish() {
        Ok(values) => {
            assert!(whole, "a vector with an unfinished part was handed out");
            assert_eq!(values, source);
        }
        Err(_) => assert!(!whole, "a vector of whole parts was refused"),
    }
}

thread_local! {
    /// A buffer kept between runs, so that assembly is into memory used before (the streaming path).
    static REUSED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A vector of at least 16 MiB received into reused memory. Bytes 0–1:
/// values beyond 16 MiB; bytes 2–4: a value made NaN (past the end: none);
/// the rest: chunk sizes in words (at most a chunk's worth).
fn streamed(input: &[u8]) {
    let [extra_lo, extra_hi, n0, n1, n2, sizes @ ..] = input else { return };
    let expected = STREAMING_FROM_BYTES / 4 + usize::from(u16::from_le_bytes([*extra_lo, *extra_hi]));
    let bad = usize::from(*n0) | usize::from(*n1) << 8 | usize::from(*n2) << 16;
    let bad = bad * 257 % (expected + expected / 4);
    let mut buffer = REUSED.with(|r| std::mem::take(&mut *r.borrow_mut()));
    buffer.resize(expected.max(buffer.len()), 0.0);
    let mut assembler = ChunkAssembler::reusing(expected, buffer);
    let mut sizes = sizes.iter().map(|&b| (usize::from(b) + 1) * CHUNK_VALUES / 256).cycle();
    let (mut sent, mut refused) = (0usize, false);
    let mut chunk = Vec::with_capacity(CHUNK_VALUES * 4);
    while sent < expected {
        let take = sizes.next().unwrap_or(CHUNK_VALUES).min(expected - sent);
        chunk.clear();
        chunk.extend((sent..sent + take).flat_map(|i| if i == bad { f32::NAN } else { i as f32 }.to_le_bytes()));
        if assembler.push(&chunk).is_err() {
            refused = true;
            break;
        }
        sent += take;
    }
    assert_eq!(refused, bad < expected, "a NaN at {bad} of {expected}: refused {refused}");
    if refused {
        return;
    }
    let values = assembler.finish().expect("every value was sent");
    assert_eq!(values.len(), expected);
    assert!(values.iter().enumerate().all(|(i, &v)| v == i as f32), "streamed values differ");
    REUSED.with(|r| *r.borrow_mut() = values);
}
