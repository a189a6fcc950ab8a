//! Flat `f32` parameter vectors on the wire: little-endian, cut into chunks of
//! at most [`MAX_CHUNK_BYTES`], reassembled with every length checked.
//!
//! A model of 100M parameters is 400 MB; sending it as one protobuf message
//! would need the whole message in memory twice on each side and would hit
//! gRPC's message limits. Chunks keep each message small and let a receiver
//! fold values in as they arrive.

use bytes::Bytes;

/// The largest chunk of tensor data one message carries: 1 MiB.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// Values per full chunk.
pub const CHUNK_VALUES: usize = MAX_CHUNK_BYTES / 4;

/// Splits `values` into little-endian chunks of at most [`MAX_CHUNK_BYTES`].
pub fn encode_chunks(values: &[f32]) -> impl Iterator<Item = Bytes> + '_ {
    values.chunks(CHUNK_VALUES).map(encode_chunk)
}

/// One chunk: `values` little-endian. The caller keeps it within
/// [`CHUNK_VALUES`] values; a smaller chunk is how a sender paces itself.
pub fn encode_chunk(values: &[f32]) -> Bytes {
    let mut buf = Vec::with_capacity(values.len() * 4);
    for v in values {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    Bytes::from(buf)
}

/// What can go wrong while reassembling a chunked tensor.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ChunkError {
    /// A chunk larger than [`MAX_CHUNK_BYTES`].
    #[error("chunk {index} has {bytes} bytes, more than the limit of {MAX_CHUNK_BYTES}")]
    Oversized {
        /// 0-based index of the chunk.
        index: usize,
        /// Its size.
        bytes: usize,
    },
    /// A chunk whose size is not a multiple of 4 bytes.
    #[error("chunk {index} has {bytes} bytes, not a whole number of f32 values")]
    Misaligned {
        /// 0-based index of the chunk.
        index: usize,
        /// Its size.
        bytes: usize,
    },
    /// More values arrived than the header announced.
    #[error("received more than the {expected} values the header announced")]
    TooLong {
        /// Announced length.
        expected: usize,
    },
    /// The stream ended before all announced values arrived.
    #[error("stream ended after {received} of {expected} values")]
    Truncated {
        /// Values received.
        received: usize,
        /// Announced length.
        expected: usize,
    },
    /// A value that is NaN or infinite.
    #[error("value {index} is not finite ({value})")]
    NotFinite {
        /// Index of the value in the vector.
        index: usize,
        /// The value.
        value: f32,
    },
}

/// Reassembles a vector of a known length from chunks, checking each one.
#[derive(Debug)]
pub struct ChunkAssembler {
    values: Vec<f32>,
    expected: usize,
    chunks: usize,
}

impl ChunkAssembler {
    /// Prepares to receive `expected` values.
    pub fn new(expected: usize) -> Self {
        ChunkAssembler {
            values: Vec::with_capacity(expected),
            expected,
            chunks: 0,
        }
    }

    /// Appends one chunk; rejects oversized, misaligned, surplus and
    /// non-finite data.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), ChunkError> {
        let index = self.chunks;
        self.chunks += 1;
        if chunk.len() > MAX_CHUNK_BYTES {
            return Err(ChunkError::Oversized {
                index,
                bytes: chunk.len(),
            });
        }
        if !chunk.len().is_multiple_of(4) {
            return Err(ChunkError::Misaligned {
                index,
                bytes: chunk.len(),
            });
        }
        if self.values.len() + chunk.len() / 4 > self.expected {
            return Err(ChunkError::TooLong {
                expected: self.expected,
            });
        }
        for word in chunk.chunks_exact(4) {
            let value = f32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            if !value.is_finite() {
                return Err(ChunkError::NotFinite {
                    index: self.values.len(),
                    value,
                });
            }
            self.values.push(value);
        }
        Ok(())
    }

    /// The complete vector, or an error if values are missing.
    pub fn finish(self) -> Result<Vec<f32>, ChunkError> {
        if self.values.len() != self.expected {
            return Err(ChunkError::Truncated {
                received: self.values.len(),
                expected: self.expected,
            });
        }
        Ok(self.values)
    }
}

#[cfg(test)]
mod tests;
