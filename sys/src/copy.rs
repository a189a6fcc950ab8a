//! Copying a large vector's values in and checking them in the same pass.
//!
//! A model of hundreds of megabytes lands in memory no cache holds. An
//! ordinary store first reads each destination line from memory (to own
//! it), then writes it back: twice the memory traffic of the copy.
//! Non-temporal stores write whole lines without reading them, which is why
//! large copies take them (measured in `docs/perf-log.md`, "Memory advice
//! and copies"). The finiteness test rides along on the loaded words, so
//! each chunk is read once instead of twice.

use std::collections::TryReserveError;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The exponent bits of an `f32`: all set means infinite or NaN.
const EXPONENT: u32 = 0x7f80_0000;

/// Whether every little-endian `f32` in `chunk` (whole words) is finite:
/// its exponent bits are not all ones. No early exit, so the loop is
/// vectorised; the rare bad chunk is scanned again for its index.
pub fn all_finite(chunk: &[u8]) -> bool {
    let special = |w: &[u8]| {
        let bits = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        u32::from(bits & EXPONENT == EXPONENT)
    };
    let mut any_special = 0u32;
    let blocks = chunk.chunks_exact(64);
    let rest = blocks.remainder();
    // The whole blocks and the rest are two loops on purpose: chained
    // into one, the block loop is no longer vectorised.
    for block in blocks {
        for w in block.chunks_exact(4) {
            any_special |= special(w);
        }
    }
    for w in rest.chunks_exact(4) {
        any_special |= special(w);
    }
    any_special == 0
}

/// A vector of `len` values filled in disjoint parts, possibly from
/// several threads at once, straight into memory no value was written to
/// before: no pass zeroes it first. A part counts as complete only once
/// every one of its slots was written, so [`UninitParts::finish`] hands
/// out the vector only when all of it is initialised.
#[derive(Debug)]
pub struct UninitParts {
    values: Vec<f32>,
    len: usize,
    /// Values of the parts (of the last cut) that finished whole.
    complete: AtomicUsize,
}

/// One part of an [`UninitParts`]: the values `[first_value, first_value + len)`,
/// written in order from the first.
#[derive(Debug)]
pub struct UninitPart<'a> {
    room: &'a mut [MaybeUninit<f32>],
    first_value: usize,
    written: usize,
    complete: &'a AtomicUsize,
}

impl UninitParts {
    /// Room for `len` values in `buffer`'s memory (its contents are
    /// discarded), reserved up front; an error where that much memory
    /// cannot be had.
    pub fn reusing(len: usize, mut buffer: Vec<f32>) -> Result<Self, TryReserveError> {
        buffer.clear();
        buffer.try_reserve_exact(len)?;
        Ok(UninitParts { values: buffer, len, complete: AtomicUsize::new(0) })
    }

    /// How many values the vector holds once complete.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the vector holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Cuts the vector into parts of `per_part` values (the last may be
    /// shorter; none is empty, and a vector of no values has one empty
    /// part). A new cut forgets the parts of the one before.
    pub fn cut(&mut self, per_part: usize) -> Vec<UninitPart<'_>> {
        let per_part = per_part.max(1);
        *self.complete.get_mut() = 0;
        let mut room = &mut self.values.spare_capacity_mut()[..self.len];
        let mut parts = Vec::new();
        let mut first_value = 0;
        loop {
            let len = per_part.min(room.len());
            let (part, rest) = room.split_at_mut(len);
            room = rest;
            parts.push(UninitPart { room: part, first_value, written: 0, complete: &self.complete });
            first_value += len;
            if room.is_empty() {
                return parts;
            }
        }
    }

    /// The complete vector, or (as the error) how many values the parts of
    /// the last cut completed.
    pub fn finish(mut self) -> Result<Vec<f32>, usize> {
        let complete = *self.complete.get_mut();
        if complete != self.len {
            return Err(complete);
        }
        // SAFETY: the parts of the last cut are disjoint, cover the first
        // `len` slots of the spare capacity, and each counted itself in
        // `complete` only once it had written every one of its slots
        // (`UninitPart::finish`); `complete` is reset at each cut. So all
        // `len` values are initialised.
        #[allow(unsafe_code)]
        unsafe {
            self.values.set_len(self.len)
        };
        Ok(self.values)
    }
}

impl UninitPart<'_> {
    /// The index of this part's first value in the vector.
    pub fn first_value(&self) -> usize {
        self.first_value
    }

    /// How many values this part holds.
    pub fn len(&self) -> usize {
        self.room.len()
    }

    /// Whether the part holds no values (only the one part of an empty vector).
    pub fn is_empty(&self) -> bool {
        self.room.is_empty()
    }

    /// How many values were written so far.
    pub fn written(&self) -> usize {
        self.written
    }

    /// Writes `words`' little-endian values (whole words) after those
    /// written so far if every one is finite, with non-temporal stores if
    /// `around_cache`, and says whether they were. On `false` the part is
    /// as before: the slots it may have touched still count as unwritten.
    ///
    /// # Panics
    /// If `words` is not whole words or holds more values than are left.
    pub fn append_finite(&mut self, words: &[u8], around_cache: bool) -> bool {
        assert!(words.len().is_multiple_of(4), "append_finite needs whole words");
        let count = words.len() / 4;
        let room = &mut self.room[self.written..self.written + count];
        if !write_finite(room, words, around_cache) {
            return false;
        }
        self.written += count;
        true
    }

    /// Counts the part complete if every one of its slots was written, and
    /// says whether it was.
    pub fn finish(self) -> bool {
        if self.written != self.room.len() {
            return false;
        }
        self.complete.fetch_add(self.room.len(), Ordering::AcqRel);
        true
    }
}

/// Appends `chunk`'s little-endian values (whole words; the caller
/// has checked its length) to `values` if every one is finite, and
/// says whether they were. On `false`, `values` is unchanged.
pub fn append_finite(values: &mut Vec<f32>, chunk: &[u8]) -> bool {
    let count = chunk.len() / 4;
    values.reserve(count);
    let finite = write_finite(&mut values.spare_capacity_mut()[..count], &chunk[..count * 4], true);
    if finite {
        // SAFETY: `write_finite` wrote each of the `count` reserved
        // slots after the first `len` (it says `true` only then).
        #[allow(unsafe_code)]
        unsafe {
            values.set_len(values.len() + count)
        };
    }
    finite
}

/// Writes `words`' little-endian values (whole words) into `room` (as
/// many slots) if every one is finite, with non-temporal stores if
/// `around_cache`, and says whether they were. On `false`, some slots
/// may have been written.
///
/// # Panics
/// If `room` does not hold exactly one slot per word.
fn write_finite(room: &mut [std::mem::MaybeUninit<f32>], words: &[u8], around_cache: bool) -> bool {
    assert_eq!(room.len() * 4, words.len(), "write_finite needs a slot per word");
    #[cfg(target_arch = "x86_64")]
    if around_cache {
        // SAFETY: `room` is `words.len()` writable bytes, 4-byte
        // aligned, and does not overlap `words` (one is borrowed mutably).
        #[allow(unsafe_code)]
        return unsafe { x86::copy_checking_finite(words, room.as_mut_ptr().cast::<u8>()) };
    }
    let _ = around_cache;
    if !all_finite(words) {
        return false;
    }
    for (slot, value) in
        room.iter_mut().zip(words.chunks_exact(4).map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]])))
    {
        slot.write(value);
    }
    true
}

/// Copies `src` into `dst` (equal lengths) with non-temporal stores
/// where the machine has them: for a destination nothing will read
/// soon through the cache, such as a block on its way to the disk.
///
/// # Panics
/// If the lengths differ.
pub fn copy_around_cache(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_around_cache needs equal lengths");
    #[cfg(target_arch = "x86_64")]
    {
        let head = dst.as_ptr().align_offset(16).min(dst.len());
        let body = (dst.len() - head) / 64 * 64;
        dst[..head].copy_from_slice(&src[..head]);
        if body > 0 {
            // SAFETY: `dst[head..head + body]` is writable, 16-byte
            // aligned (`body > 0`, so `head` is the full distance to the
            // boundary) and does not overlap `src` (one is borrowed
            // mutably).
            #[allow(unsafe_code)]
            unsafe {
                x86::stream::<false>(&src[head..head + body], dst[head..].as_mut_ptr())
            };
        }
        dst[head + body..].copy_from_slice(&src[head + body..]);
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::{
        __m128i, _mm_and_si128, _mm_cmpeq_epi32, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi32,
        _mm_setzero_si128, _mm_sfence, _mm_stream_si128,
    };

    use super::EXPONENT;

    /// Copies `src` (a whole number of 4-byte words) to `dst` with
    /// non-temporal stores (SSE2, which every x86-64 has) and says
    /// whether every word is a finite `f32`.
    ///
    /// # Safety
    /// `dst` must be valid for `src.len()` bytes of writes, aligned to
    /// 4 bytes, and not overlap `src`.
    pub(super) unsafe fn copy_checking_finite(src: &[u8], dst: *mut u8) -> bool {
        let n = src.len();
        let mut special = 0u32;
        let mut i = 0;
        let word = |i: usize, special: &mut u32| {
            let w = u32::from_le_bytes([src[i], src[i + 1], src[i + 2], src[i + 3]]);
            *special |= u32::from(w & EXPONENT == EXPONENT);
            // SAFETY: `i + 4 <= n` at every call, within `dst`'s bytes.
            unsafe { dst.add(i).cast::<u32>().write(w) };
        };
        // Word by word until the destination is aligned for the
        // 16-byte stores (at most three words).
        while i + 4 <= n && !(dst as usize + i).is_multiple_of(16) {
            word(i, &mut special);
            i += 4;
        }
        let body = (n - i) / 64 * 64;
        if body > 0 {
            // SAFETY: with a body left, the loop above stopped at the
            // 16-byte boundary; `src[i..i + body]` and `dst[i..i + body]`
            // are in bounds.
            special |= u32::from(unsafe { stream::<true>(&src[i..i + body], dst.add(i)) });
            i += body;
        }
        while i + 4 <= n {
            word(i, &mut special);
            i += 4;
        }
        special == 0
    }

    /// Copies `src` (a multiple of 64 bytes) to `dst` with
    /// non-temporal stores; with `CHECK`, says whether any 4-byte word
    /// is not a finite `f32` (without, `false`).
    ///
    /// # Safety
    /// `dst` must be valid for `src.len()` bytes of writes, aligned to
    /// 16 bytes, and not overlap `src`.
    pub(super) unsafe fn stream<const CHECK: bool>(src: &[u8], dst: *mut u8) -> bool {
        debug_assert!(src.len().is_multiple_of(64) && (dst as usize).is_multiple_of(16));
        // SAFETY: SSE2 is part of x86-64; every load and store is
        // within the first `src.len()` bytes of `src` and `dst`.
        unsafe {
            let exponent = _mm_set1_epi32(EXPONENT as i32);
            let mut any = _mm_setzero_si128();
            let mut i = 0;
            while i + 64 <= src.len() {
                let from = src.as_ptr().add(i).cast::<__m128i>();
                let to = dst.add(i).cast::<__m128i>();
                for k in 0..4 {
                    let v = _mm_loadu_si128(from.add(k));
                    if CHECK {
                        any = _mm_or_si128(any, _mm_cmpeq_epi32(_mm_and_si128(v, exponent), exponent));
                    }
                    _mm_stream_si128(to.add(k), v);
                }
                i += 64;
            }
            // Orders the streaming stores before whatever hands the
            // bytes to another thread.
            _mm_sfence();
            _mm_movemask_epi8(any) != 0
        }
    }
}
