//! The gRPC codec of every `meridian.v1` service: prost's, with a smaller
//! initial buffer.
//!
//! tonic gives each message stream a buffer of its own, 8 KiB to start
//! with, and a task stream keeps its buffer for as long as a site stays
//! connected. Nearly every Meridian message but a tensor chunk is a few
//! hundred bytes, and a chunk makes the buffer grow to fit it anyway, so
//! 8 KiB per stream only costs memory, and the coordinator pays it for every
//! connected site (`docs/perf-log.md`, "Figures moved from rustdoc"). A
//! buffer now starts at [`INITIAL_BUFFER_BYTES`] and grows as a message
//! needs.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// A stream's first buffer: a task, an answer or a header fits.
pub const INITIAL_BUFFER_BYTES: usize = 1024;

/// Encoded bytes a server-streaming response gathers before it hands them
/// to HTTP/2: tonic's default (`DEFAULT_YIELD_THRESHOLD`, not exported).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// Prost encoding with [`INITIAL_BUFFER_BYTES`] buffers; the generated
/// clients and servers use it through `build.rs`'s `codec_path`.
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER_BYTES, YIELD_THRESHOLD)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
