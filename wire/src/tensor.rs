//! Flat `f32` parameter vectors on the wire: little-endian, cut into chunks of
//! at most [`MAX_CHUNK_BYTES`], reassembled with every length checked.
//!
//! A model of 100M parameters is 400 MB; sending it as one protobuf message
//! would need the whole message in memory twice on each side and would hit
//! gRPC's message limits. Chunks keep each message small and let a receiver
//! fold values in as they arrive.

use bytes::Bytes;
use meridian_sys::copy::{UninitPart, UninitParts, all_finite};

/// The largest chunk of tensor data one message carries: 1 MiB.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// Values per full chunk.
pub const CHUNK_VALUES: usize = MAX_CHUNK_BYTES / 4;

/// The largest HTTP/2 DATA frame each side of a Meridian connection accepts
/// (`SETTINGS_MAX_FRAME_SIZE`; the coordinator's server and every client set
/// it). At HTTP/2's default of 16 KiB a 400 MB transfer is about 24,000
/// frames, each its own trip through h2's tasks and the TLS writer; 256 KiB
/// frames make pulls and pushes measurably faster (`docs/perf-log.md`,
/// "Figures moved from rustdoc"). TLS still cuts records at 16 KiB; what
/// shrinks is the work and the wake-ups per frame.
pub const MAX_FRAME_BYTES: u32 = 256 << 10;

// HTTP/2's legal range for SETTINGS_MAX_FRAME_SIZE (RFC 9113, 6.5.2).
const _: () = assert!(MAX_FRAME_BYTES >= 16_384 && MAX_FRAME_BYTES <= 16_777_215);

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

/// The chunk of `values[range]`, without copying where the machine is
/// little-endian (the wire's byte order): the chunk is a view that keeps
/// `values` alive. An upload sends every value through gRPC's own encoding
/// buffer anyway; this saves the sender a copy and a fresh allocation per
/// chunk. Elsewhere it is [`encode_chunk`].
pub fn chunk_view(values: &std::sync::Arc<Vec<f32>>, range: std::ops::Range<usize>) -> Bytes {
    #[cfg(target_endian = "little")]
    {
        // Checked here, so that `as_ref` below cannot panic.
        let _ = &values[range.clone()];
        Bytes::from_owner(F32View { values: std::sync::Arc::clone(values), range })
    }
    #[cfg(not(target_endian = "little"))]
    {
        encode_chunk(&values[range])
    }
}

/// Shared `f32` values seen as their bytes (little-endian machines only).
#[cfg(target_endian = "little")]
struct F32View {
    values: std::sync::Arc<Vec<f32>>,
    range: std::ops::Range<usize>,
}

#[cfg(target_endian = "little")]
impl AsRef<[u8]> for F32View {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.values[self.range.clone()])
    }
}

/// The values of little-endian `bytes` (whole words; a trailing partial
/// word is ignored): the inverse of [`encode_chunk`].
pub fn decode_le(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes.chunks_exact(4).map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]]))
}

/// The values of whole chunks (as [`encode_chunks`] cut them), in one
/// vector allocated once.
pub fn decode_chunks(chunks: &[Bytes]) -> Vec<f32> {
    let mut values = Vec::with_capacity(chunks.iter().map(|c| c.len() / 4).sum());
    meridian_sys::memory::advise_huge_pages(&mut values);
    for chunk in chunks {
        values.extend(decode_le(chunk));
    }
    values
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
    /// A chunk that is empty or whose size is not a multiple of 4 bytes.
    #[error("chunk {index} has {bytes} bytes, not a whole number (at least one) of f32 values")]
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

/// Checks a chunked vector of a known length as it streams past, without
/// keeping it: sizes, alignment, the announced length and finiteness, and,
/// where a norm bound needs it, the running sum of squares. A receiver that
/// writes chunks straight to disk holds one chunk at a time, not the vector.
#[derive(Debug)]
pub struct ChunkValidator {
    expected: usize,
    received: usize,
    chunks: usize,
    /// Kept only by [`ChunkValidator::with_norm`].
    sum_of_squares: Option<f64>,
}

impl ChunkValidator {
    /// Prepares to check `expected` values.
    pub fn new(expected: usize) -> Self {
        ChunkValidator { expected, received: 0, chunks: 0, sum_of_squares: None }
    }

    /// [`ChunkValidator::new`], also summing the squares for
    /// [`ChunkValidator::norm`]. Finiteness alone is a test of each value's
    /// exponent bits, at memory speed; the sum converts every value to
    /// `f64`, a noticeable share of the coordinator's time receiving a large
    /// update (`docs/perf-log.md`), so it is kept only where a norm bound
    /// needs it.
    pub fn with_norm(expected: usize) -> Self {
        ChunkValidator { sum_of_squares: Some(0.0), ..ChunkValidator::new(expected) }
    }

    /// Checks one chunk; rejects oversized, misaligned, surplus and
    /// non-finite data.
    pub fn check(&mut self, chunk: &[u8]) -> Result<(), ChunkError> {
        self.check_shape(chunk.len())?;
        let finite = match &mut self.sum_of_squares {
            Some(sum) => {
                let (finite, squares) = finite_and_sum_of_squares(chunk);
                *sum += squares;
                finite
            }
            None => all_finite(chunk),
        };
        if !finite {
            return Err(self.not_finite(chunk));
        }
        self.received += chunk.len() / 4;
        Ok(())
    }

    /// The checks of [`ChunkValidator::check`] that need only the chunk's
    /// size: within [`MAX_CHUNK_BYTES`], whole values, not past the
    /// announced length. Counts the chunk, not its values.
    fn check_shape(&mut self, bytes: usize) -> Result<(), ChunkError> {
        let index = self.chunks;
        self.chunks += 1;
        if bytes > MAX_CHUNK_BYTES {
            return Err(ChunkError::Oversized { index, bytes });
        }
        // An empty chunk carries nothing; a peer could send them only to look busy.
        if bytes == 0 || !bytes.is_multiple_of(4) {
            return Err(ChunkError::Misaligned { index, bytes });
        }
        if self.received + bytes / 4 > self.expected {
            return Err(ChunkError::TooLong { expected: self.expected });
        }
        Ok(())
    }

    /// The error for `chunk`, known to hold a value that is not finite: the
    /// first such value and its index in the vector.
    fn not_finite(&self, chunk: &[u8]) -> ChunkError {
        let (i, value) = decode_le(chunk).enumerate().find(|(_, v)| !v.is_finite()).unwrap_or((0, f32::NAN));
        ChunkError::NotFinite { index: self.received + i, value }
    }

    /// The L2 norm of the values checked so far; `None` unless made
    /// [`ChunkValidator::with_norm`].
    pub fn norm(&self) -> Option<f64> {
        self.sum_of_squares.map(f64::sqrt)
    }

    /// The sum of the squares of the values checked so far; `None` unless
    /// made [`ChunkValidator::with_norm`].
    pub fn sum_of_squares(&self) -> Option<f64> {
        self.sum_of_squares
    }

    /// Confirms every announced value arrived.
    pub fn finish(&self) -> Result<(), ChunkError> {
        if self.received != self.expected {
            return Err(ChunkError::Truncated { received: self.received, expected: self.expected });
        }
        Ok(())
    }
}

/// Whether every value of `chunk` is finite, and the sum of their squares
/// in `f64`.
fn finite_and_sum_of_squares(chunk: &[u8]) -> (bool, f64) {
    // Eight partial sums and no early exit keep the loop vectorised (one
    // sequential sum is bound by the latency of each addition): measured
    // about 5× faster.
    let mut partial = [0.0f64; 8];
    let mut finite = true;
    let blocks = chunk.chunks_exact(32);
    let rest = blocks.remainder();
    // The whole blocks and the rest are two loops on purpose: chained
    // into one, the block loop is no longer vectorised (measured 5× slower).
    for block in blocks {
        for (p, value) in partial.iter_mut().zip(decode_le(block)) {
            finite &= value.is_finite();
            *p += f64::from(value) * f64::from(value);
        }
    }
    for (p, value) in partial.iter_mut().zip(decode_le(rest)) {
        finite &= value.is_finite();
        *p += f64::from(value) * f64::from(value);
    }
    (finite, partial.iter().sum())
}

/// Reassembles a vector of a known length from chunks, checking each one
/// with a [`ChunkValidator`].
#[derive(Debug)]
pub struct ChunkAssembler {
    values: Vec<f32>,
    validator: ChunkValidator,
    /// Whether values are written around the cache ([`meridian_sys::copy`]).
    streaming: bool,
}

/// From this many bytes a vector is assembled into reused memory with
/// [`meridian_sys::copy`] stores: far more than a core's cache, so the values would
/// be evicted before anyone read them.
pub const STREAMING_FROM_BYTES: usize = 16 << 20;

impl ChunkAssembler {
    /// Prepares to receive `expected` values.
    pub fn new(expected: usize) -> Self {
        ChunkAssembler::reusing(expected, Vec::new())
    }

    /// Prepares to receive `expected` values into `buffer`, whose contents
    /// are discarded and whose memory is kept.
    ///
    /// A receiver that pulls one model after another can pass the last one
    /// back in: writing into fresh memory costs a page fault every 4 KiB,
    /// which took a large part of a big pull's time on the receiving side.
    ///
    /// A `buffer` that already holds room for all `expected` values, at
    /// least [`STREAMING_FROM_BYTES`] of them, is written with [`meridian_sys::copy`]
    /// stores, which assemble faster (criterion `assemble_reused_40mb`).
    /// Fresh memory is not: the kernel has just zeroed each page through
    /// the cache, where ordinary stores find it (streaming made
    /// `assemble_40mb` slower). Nor is fresh memory asked for in huge
    /// pages: they sped up `assemble_40mb`, which allocates again and again,
    /// but not a process's first pull, which draws memory the host of a
    /// virtual machine may have taken back (see
    /// [`meridian_sys::memory::advise_huge_pages`]). The figures are in
    /// `docs/perf-log.md`, "Figures moved from rustdoc".
    pub fn reusing(expected: usize, mut buffer: Vec<f32>) -> Self {
        let streaming = buffer.capacity() >= expected && expected.saturating_mul(4) >= STREAMING_FROM_BYTES;
        buffer.clear();
        // Capped: a hostile header must not make us reserve gigabytes up front.
        buffer.reserve(expected.min(1 << 26));
        ChunkAssembler { values: buffer, validator: ChunkValidator::new(expected), streaming }
    }

    /// Appends one chunk; rejects oversized, misaligned, surplus and
    /// non-finite data.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), ChunkError> {
        if !self.streaming {
            self.validator.check(chunk)?;
            self.values.extend(decode_le(chunk));
            return Ok(());
        }
        self.validator.check_shape(chunk.len())?;
        if !meridian_sys::copy::append_finite(&mut self.values, chunk) {
            return Err(self.validator.not_finite(chunk));
        }
        self.validator.received += chunk.len() / 4;
        Ok(())
    }

    /// The complete vector, or an error if values are missing.
    pub fn finish(self) -> Result<Vec<f32>, ChunkError> {
        self.validator.finish()?;
        Ok(self.values)
    }
}

/// A vector of a known length received in parts, each over a stream of its
/// own, into one buffer: a large model pulled over two connections at once,
/// so that each part's TLS, HTTP/2 and copies can run on a core of their own.
///
/// [`PartedAssembly::parts`] cuts the buffer's room into disjoint ranges
/// that start on chunk boundaries, one [`PartAssembler`] each, which check
/// and copy their chunks as [`ChunkAssembler`] does;
/// [`PartedAssembly::finish`] gives the vector once every part of the last
/// cut has received all of its values.
#[derive(Debug)]
pub struct PartedAssembly {
    parts: UninitParts,
    /// As [`ChunkAssembler`]'s: only into memory used before.
    streaming: bool,
}

/// One part of a [`PartedAssembly`]: the values
/// `[first_value, first_value + len)`.
#[derive(Debug)]
pub struct PartAssembler<'a> {
    part: UninitPart<'a>,
    validator: ChunkValidator,
    streaming: bool,
}

impl PartedAssembly {
    /// Prepares to receive `expected` values into `buffer`'s memory (see
    /// [`ChunkAssembler::reusing`]), reserving room for all of them up
    /// front, since the parts write into it at once. Where that much memory
    /// cannot be had, says so rather than aborting: `expected` comes from
    /// the coordinator's task.
    pub fn reusing(expected: usize, buffer: Vec<f32>) -> Result<Self, std::collections::TryReserveError> {
        let streaming = buffer.capacity() >= expected && expected.saturating_mul(4) >= STREAMING_FROM_BYTES;
        Ok(PartedAssembly { parts: UninitParts::reusing(expected, buffer)?, streaming })
    }

    /// Cuts the vector into at most `count` parts of whole chunks (the last
    /// may be shorter; none is empty, and a vector of no values has one
    /// empty part). A new cut forgets the parts of the one before.
    pub fn parts(&mut self, count: usize) -> Vec<PartAssembler<'_>> {
        let per_part = self.parts.len().div_ceil(count.max(1)).div_ceil(CHUNK_VALUES).max(1) * CHUNK_VALUES;
        let streaming = self.streaming;
        self.parts
            .cut(per_part)
            .into_iter()
            .map(|part| PartAssembler { validator: ChunkValidator::new(part.len()), part, streaming })
            .collect()
    }

    /// The complete vector, or an error if a part of the last cut did not
    /// finish whole.
    pub fn finish(self) -> Result<Vec<f32>, ChunkError> {
        let expected = self.parts.len();
        self.parts.finish().map_err(|received| ChunkError::Truncated { received, expected })
    }
}

impl PartAssembler<'_> {
    /// The index of this part's first value in the vector.
    pub fn first_value(&self) -> usize {
        self.part.first_value()
    }

    /// How many values this part holds.
    pub fn len(&self) -> usize {
        self.part.len()
    }

    /// Whether the part holds no values (only the one part of an empty vector).
    pub fn is_empty(&self) -> bool {
        self.part.is_empty()
    }

    /// Appends one chunk; rejects oversized, misaligned, surplus and
    /// non-finite data (a value's index in the error is its index in the
    /// whole vector).
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), ChunkError> {
        self.validator.check_shape(chunk.len())?;
        let words = &chunk[..chunk.len() / 4 * 4];
        if !self.part.append_finite(words, self.streaming) {
            return Err(match self.validator.not_finite(chunk) {
                ChunkError::NotFinite { index, value } => {
                    ChunkError::NotFinite { index: index + self.part.first_value(), value }
                }
                other => other,
            });
        }
        self.validator.received += words.len() / 4;
        Ok(())
    }

    /// Confirms every value of this part arrived.
    pub fn finish(self) -> Result<(), ChunkError> {
        self.validator.finish()?;
        let expected = self.part.len();
        if !self.part.finish() {
            return Err(ChunkError::Truncated { received: self.validator.received, expected });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
