//! Chunk-stream reassembly (`meridian_wire::tensor::ChunkAssembler`): any sequence of
//! chunks either reassembles to exactly the announced number of finite
//! values, byte for byte what was sent, or is refused; never a panic.
//!
//! Input: byte 0 sets the announced length (0..=765 values); then each chunk
//! is a 2-byte little-endian length followed by that many bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian_wire::tensor::ChunkAssembler;

fuzz_target!(|data: &[u8]| {
    let Some((&announced, mut rest)) = data.split_first() else { return };
    let expected = announced as usize * 3;
    let mut assembler = ChunkAssembler::new(expected);
    let mut accepted: Vec<u8> = Vec::new();
    while rest.len() >= 2 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let tail = &rest[2..];
        let (chunk, tail) = tail.split_at(len.min(tail.len()));
        rest = tail;
        if assembler.push(chunk).is_err() {
            // A refused chunk refuses the stream; nothing more to check.
            return;
        }
        accepted.extend_from_slice(chunk);
        assert!(accepted.len() <= expected * 4, "more values accepted than announced");
    }
    match assembler.finish() {
        Ok(values) => {
            assert_eq!(values.len(), expected);
            assert!(values.iter().all(|v| v.is_finite()));
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            assert_eq!(bytes, accepted, "reassembly changed the data");
        }
        Err(e) => {
            assert_ne!(accepted.len(), expected * 4, "a complete stream was refused: {e}");
        }
    }
});
