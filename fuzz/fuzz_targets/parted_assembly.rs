//! `meridian_wire::tensor::PartedAssembly`, a vector received in parts
//! over several streams into one buffer that is never zeroed: whatever the
//! cut, the chunk sizes, the order the parts are fed in, a part left short
//! or a non-finite value, the vector is handed out only when every part of
//! the last cut is whole, and is then exactly what was sent.
//!
//! Input: byte 0: small vector (up to three chunks) or one of at least
//! 16 MiB into reused memory (the non-temporal path); bytes 1–2: length
//! (small) or values beyond 16 MiB; byte 3: the number of parts; byte 4: a
//! part left short (or none); byte 5: whether to cut twice; bytes 6–8: a
//! value made infinite (past the end: none); the rest: chunk sizes.

#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use meridian_wire::tensor::{CHUNK_VALUES, ChunkError, PartedAssembly, STREAMING_FROM_BYTES};

thread_local! {
    static REUSED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn value(i: usize, bad: usize) -> f32 {
    if i == bad { f32::INFINITY } else { i as f32 - 1000.5 }
}

fuzz_target!(|data: &[u8]| {
    let [large, lo, hi, count, short, recut, b0, b1, b2, sizes @ ..] = data else { return };
    let n = usize::from(u16::from_le_bytes([*lo, *hi]));
    let large = *large % 4 == 0;
    let expected = if large { STREAMING_FROM_BYTES / 4 + n } else { n % (3 * CHUNK_VALUES + 1) };
    let bad = (usize::from(*b0) | usize::from(*b1) << 8 | usize::from(*b2) << 16) * 257 % (expected + expected / 4 + 1);
    let buffer = if large {
        let mut b = REUSED.with(|r| std::mem::take(&mut *r.borrow_mut()));
        b.resize(expected.max(b.len()), 0.0);
        b
    } else {
        Vec::new()
    };
    let mut assembly = PartedAssembly::reusing(expected, buffer).expect("at most 17 MiB");
    let count = usize::from(*count % 4) + 1;
    if *recut % 2 == 1 {
        // A first cut whose parts are fed in part and dropped: forgotten by the next.
        for mut part in assembly.parts(count + 1) {
            let from = part.first_value();
            let chunk: Vec<u8> =
                (from..from + part.len().min(7)).flat_map(|i| value(i, usize::MAX).to_le_bytes()).collect();
            let _ = part.push(&chunk);
        }
    }
    let mut parts = assembly.parts(count);
    let cut = parts.len();
    assert!(cut >= 1 && cut <= count, "{cut} parts for at most {count}");
    let short = usize::from(*short) % (cut + 1);
    let mut sizes = sizes.iter().map(|&b| (usize::from(b) + 1) * CHUNK_VALUES / 256).cycle();
    let (mut whole, mut refused) = (true, false);
    // Fed from the last part to the first, as a second stream may finish first.
    for (k, part) in parts.iter_mut().enumerate().rev() {
        let (from, len) = (part.first_value(), part.len());
        let stop = if k == short { len / 2 } else { len };
        let mut sent = 0;
        while sent < stop {
            let take = sizes.next().unwrap_or(CHUNK_VALUES).min(stop - sent);
            let chunk: Vec<u8> = (from + sent..from + sent + take).flat_map(|i| value(i, bad).to_le_bytes()).collect();
            match part.push(&chunk) {
                Ok(()) => sent += take,
                Err(ChunkError::NotFinite { index, .. }) => {
                    assert_eq!(index, bad, "the error names the value's index in the whole vector");
                    refused = true;
                    break;
                }
                Err(e) => panic!("a well-formed chunk was refused: {e}"),
            }
        }
        whole &= sent == len;
    }
    let finished: Vec<bool> = parts.into_iter().map(|p| p.finish().is_ok()).collect();
    match assembly.finish() {
        Ok(values) => {
            assert!(whole && !refused && finished.iter().all(|&f| f), "handed out with a part not whole");
            assert_eq!(values.len(), expected);
            assert!(values.iter().enumerate().all(|(i, &v)| v == value(i, usize::MAX)), "values differ");
            if large {
                REUSED.with(|r| *r.borrow_mut() = values);
            }
        }
        Err(_) => assert!(!whole || refused, "a vector of whole parts was refused"),
    }
});
