//! The random bits behind every noise sample: an AES-256 counter-mode
//! keystream.
//!
//! AES in counter mode is a standard CSPRNG: it is the core of NIST SP
//! 800-90A's `CTR_DRBG`, without that standard's re-keying after every
//! request, so, as with the ChaCha generators before it, whoever reads the
//! key out of the process's memory can recompute the noise this source drew
//! (and could as well read the data it protects). We take the keystream from `ring`'s AES-256-GCM, which
//! is already in the build for TLS and runs on the AES-NI and carry-less
//! multiply instructions: sealing a buffer of zeros under a unique nonce
//! leaves exactly the counter-mode keystream in it (GCM encrypts by XOR with
//! AES-CTR; the tag it also computes is discarded). RustCrypto's `ctr`
//! over `aes` gives the same bytes (`Ctr32BE` from the counter block
//! `nonce ‖ 2`) with no tag to throw away, but two more crates and, measured,
//! a slower stream than `ring`'s stitched AES-NI code, so `ring` it stays
//! (`docs/perf-log.md`, "Noise"). It replaced ChaCha12,
//! which had replaced ChaCha20, each faster than the one before
//! (`docs/perf-log.md`, "Figures moved from rustdoc").
//!
//! Each refill seals [`BUFFER_BYTES`] under the next nonce of a 96-bit
//! counter, so no (key, nonce) pair is ever used twice, and inside one seal
//! GCM's own 32-bit block counter runs over 1,024 blocks, far below its
//! 2³² limit. The key is 256 bits from the operating system and is never
//! stored, logged or printed.

use std::convert::Infallible;

use rand::rngs::SysRng;
use rand::{TryCryptoRng, TryRng};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use super::NoiseError;

/// Keystream bytes produced per seal: large enough that the per-call cost
/// of GCM (nonce setup, tag) vanishes, small enough to stay in L1/L2
/// (chosen by measurement, `docs/perf-log.md`).
const BUFFER_BYTES: usize = 16 * 1024;

/// An AES-256-CTR keystream read as little-endian `u64` words.
pub(super) struct Keystream {
    key: LessSafeKey,
    /// The nonce of the next refill (the low 64 bits of the 96-bit nonce).
    next_nonce: u64,
    buffer: Box<[u8; BUFFER_BYTES]>,
    /// Next unread byte of `buffer`; `BUFFER_BYTES` when all are read.
    position: usize,
}

impl Keystream {
    /// A keystream under a 256-bit key from the operating system.
    pub(super) fn from_os() -> Result<Self, NoiseError> {
        let mut key = [0u8; 32];
        SysRng.try_fill_bytes(&mut key).map_err(NoiseError::OsRng)?;
        Ok(Self::with_key(&key))
    }

    /// A keystream under the given key (tests and seeded test sources).
    pub(super) fn with_key(key: &[u8; 32]) -> Self {
        let unbound = match UnboundKey::new(&AES_256_GCM, key) {
            Ok(key) => key,
            // `ring` refuses only keys of the wrong length; ours is 32 bytes.
            Err(_) => unreachable!("AES-256 takes a 32-byte key"),
        };
        Self {
            key: LessSafeKey::new(unbound),
            next_nonce: 0,
            buffer: Box::new([0; BUFFER_BYTES]),
            position: BUFFER_BYTES,
        }
    }

    /// Replaces the buffer with the next [`BUFFER_BYTES`] of keystream.
    #[cold]
    #[inline(never)]
    fn refill(&mut self) {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&self.next_nonce.to_be_bytes());
        // 2^64 refills of 16 KiB would take longer than the sun has left.
        self.next_nonce =
            self.next_nonce.checked_add(1).unwrap_or_else(|| unreachable!("AES keystream nonces exhausted"));
        self.buffer.fill(0);
        let sealed = self.key.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            &mut self.buffer[..],
        );
        if sealed.is_err() {
            // `ring` refuses only inputs over GCM's 64 GiB limit.
            unreachable!("a {BUFFER_BYTES}-byte seal is within AES-GCM's limit");
        }
        self.position = 0;
    }

    /// The next 64 bits of keystream.
    #[inline]
    pub(super) fn next_u64(&mut self) -> u64 {
        if self.position + 8 > BUFFER_BYTES {
            self.refill();
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.buffer[self.position..self.position + 8]);
        self.position += 8;
        u64::from_le_bytes(word)
    }
}

impl TryRng for Keystream {
    type Error = Infallible;

    #[inline]
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(self.next_u64() as u32)
    }

    #[inline]
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.next_u64())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for chunk in dst.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        Ok(())
    }
}

/// The keystream is unpredictable without the key.
impl TryCryptoRng for Keystream {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test Case 14 of the GCM specification (McGrew and Viega, 2005):
    /// AES-256, zero key, zero IV, 16 zero bytes encrypt to this, which is
    /// therefore the first block of our keystream under the zero key.
    #[test]
    fn first_block_matches_the_gcm_specification() {
        let mut stream = Keystream::with_key(&[0; 32]);
        let mut block = [0u8; 16];
        stream.try_fill_bytes(&mut block).unwrap();
        let hex: String = block.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "cea7403d4d606b6e074ec5d3baf39d18");
    }

    #[test]
    fn refills_continue_the_stream_under_fresh_nonces() {
        let mut stream = Keystream::with_key(&[7; 32]);
        let words: Vec<u64> = (0..3 * BUFFER_BYTES / 8).map(|_| stream.next_u64()).collect();
        let per_buffer = BUFFER_BYTES / 8;
        // Three buffers, under three nonces: no buffer repeats another.
        assert_ne!(words[..per_buffer], words[per_buffer..2 * per_buffer]);
        assert_ne!(words[per_buffer..2 * per_buffer], words[2 * per_buffer..]);
        // Same key, same stream; another key, another stream.
        let mut again = Keystream::with_key(&[7; 32]);
        assert!(words.iter().all(|&w| w == again.next_u64()));
        let mut other = Keystream::with_key(&[8; 32]);
        assert_ne!(words[0], other.next_u64());
        // Roughly half the bits set, as a keystream should.
        let ones: u32 = words.iter().map(|w| w.count_ones()).sum();
        let bits = 64.0 * words.len() as f64;
        assert!((f64::from(ones) / bits - 0.5).abs() < 0.01, "{ones} of {bits}");
    }

    #[test]
    fn os_keys_differ() {
        let mut a = Keystream::from_os().unwrap();
        let mut b = Keystream::from_os().unwrap();
        assert_ne!((a.next_u64(), a.next_u64()), (b.next_u64(), b.next_u64()));
    }
}
