//! Where a [`super::CheckpointWriter`]'s bytes go: through the page cache,
//! moved to the disk in steps as they are written, or around it.
//!
//! - [`Cached`]: buffered writes. Each step's writeback starts as soon as
//!   the step is written (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`,
//!   which does not wait for the writes, though it may block while the
//!   device's queue is full), as PostgreSQL's `*_flush_after` settings do,
//!   so `commit`'s fsync waits for the tail only: without it, a large
//!   update still waited on the disk after its last byte arrived
//!   (`docs/perf-log.md`). An uncached file whose file system refuses
//!   `O_DIRECT` is also dropped from the page cache behind the writer
//!   (`POSIX_FADV_DONTNEED`, once an earlier step is on the disk).
//! - [`Direct`]: `O_DIRECT` writes of whole 4 MiB blocks, copied into an
//!   aligned buffer, the last partial block through the page cache. No
//!   page cache to fill; each write waits for the disk. A file system that
//!   accepts `O_DIRECT` at open but refuses a write (an alignment it needs
//!   beyond 4 KiB) gets the rest of the file through the page cache.
//!
//! Durability comes from the fsync in [`Sink::sync`] in both cases. Off
//! Linux the page cache keeps everything and the fsync writes it out.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use meridian_sys::file::{drop_cached, open_direct, start_writeback, unsupported, wait_and_drop};

/// A step of the page cache's writeback.
const STEP_BYTES: u64 = 8 << 20;

/// The alignment `O_DIRECT` needs of buffers, offsets and lengths (the
/// largest logical block size in common use).
pub(super) const ALIGN: usize = 4096;

/// Bytes an `O_DIRECT` write carries: large enough that the disk, not the
/// number of writes, sets the pace (chosen by measurement, `docs/perf-log.md`).
pub(super) const DIRECT_BLOCK_BYTES: usize = 4 << 20;

/// A checkpoint file's bytes on their way to the disk.
pub(super) enum Sink {
    Cached(Cached),
    Direct(Direct),
}

impl Sink {
    /// Creates `path`; `uncached` asks for `O_DIRECT`, or for dropping
    /// the file from the page cache where `O_DIRECT` is refused.
    pub(super) fn create(path: &Path, uncached: bool) -> io::Result<Sink> {
        if uncached && let Some(direct) = Direct::create(path)? {
            return Ok(Sink::Direct(direct));
        }
        Ok(Sink::Cached(Cached::create(path, uncached)?))
    }

    pub(super) fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Sink::Cached(c) => c.write(bytes),
            Sink::Direct(d) => d.write(bytes),
        }
    }

    /// Whether writes wait for the disk (see `CheckpointWriter::waits_for_disk`).
    pub(super) fn waits_for_disk(&self) -> bool {
        match self {
            Sink::Cached(c) => c.drop_behind,
            Sink::Direct(_) => true,
        }
    }

    /// Writes out what is buffered and fsyncs the file.
    pub(super) fn sync(&mut self) -> io::Result<()> {
        match self {
            Sink::Cached(c) => c.sync(),
            Sink::Direct(d) => d.sync(),
        }
    }
}

/// Buffered writes, written back in steps.
pub(super) struct Cached {
    out: BufWriter<File>,
    /// Bytes handed to the file so far (the buffer's excluded).
    in_file: u64,
    /// File offset up to which writeback has been started.
    writeback_from: u64,
    /// Where the last step whose writeback was started began.
    previous_step_from: u64,
    /// File offset up to which the file has left the page cache.
    dropped_to: u64,
    drop_behind: bool,
}

impl Cached {
    fn create(path: &Path, drop_behind: bool) -> io::Result<Cached> {
        Ok(Cached {
            // Batches a slow sender's small chunks; a chunk of 64 KiB or more
            // goes straight to the file. (A 1 MiB buffer per upload was 15 MB
            // of the coordinator's peak with 1,000 sites, for no gain.)
            out: BufWriter::with_capacity(64 << 10, File::create(path)?),
            in_file: 0,
            writeback_from: 0,
            previous_step_from: 0,
            dropped_to: 0,
            drop_behind,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let buffered = self.out.buffer().len() as u64;
        self.out.write_all(bytes)?;
        self.in_file = self.in_file + buffered + bytes.len() as u64 - self.out.buffer().len() as u64;
        if self.in_file - self.writeback_from >= STEP_BYTES {
            let file = self.out.get_ref();
            let step_from = self.writeback_from;
            start_writeback(file, step_from, self.in_file);
            // Everything before the previous step: its writeback started a step ago.
            if self.drop_behind && self.previous_step_from > self.dropped_to {
                match wait_and_drop(file, self.dropped_to, self.previous_step_from) {
                    Ok(()) => self.dropped_to = self.previous_step_from,
                    // A file system without `sync_file_range`: keep the pages;
                    // the fsync still writes them. A write error is returned:
                    // the wait consumed it, so the fsync would not report it.
                    Err(e) if unsupported(&e) => self.drop_behind = false,
                    Err(e) => return Err(e),
                }
            }
            self.previous_step_from = step_from;
            self.writeback_from = self.in_file;
        }
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        if self.drop_behind {
            drop_cached(self.out.get_ref());
        }
        Ok(())
    }
}

/// `O_DIRECT` writes from an aligned buffer.
pub(super) struct Direct {
    file: File,
    path: PathBuf,
    block: AlignedBlock,
    filled: usize,
    /// Bytes in the file so far.
    written: u64,
    /// The file without `O_DIRECT`, once a direct write was refused.
    buffered: Option<File>,
}

impl Direct {
    /// Creates `path` for `O_DIRECT` writes; `None` where the file system
    /// or the platform refuses them.
    fn create(path: &Path) -> io::Result<Option<Direct>> {
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        let Some(file) = open_direct(path, &options)? else {
            return Ok(None);
        };
        Ok(Some(Direct {
            file,
            path: path.to_path_buf(),
            block: AlignedBlock::new(),
            filled: 0,
            written: 0,
            buffered: None,
        }))
    }

    fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let take = bytes.len().min(DIRECT_BLOCK_BYTES - self.filled);
            let at = self.filled;
            // The block goes to the disk, not back through this core's cache.
            meridian_sys::copy::copy_around_cache(&mut self.block.bytes_mut()[at..at + take], &bytes[..take]);
            self.filled += take;
            bytes = &bytes[take..];
            if self.filled == DIRECT_BLOCK_BYTES {
                self.flush_block(DIRECT_BLOCK_BYTES)?;
            }
        }
        Ok(())
    }

    /// Writes the buffer's first `len` bytes (a multiple of [`ALIGN`]).
    fn flush_block(&mut self, len: usize) -> io::Result<()> {
        let block = &self.block.bytes()[..len];
        if let Some(file) = &mut self.buffered {
            file.write_all(block)?;
        } else if let Err(e) = self.file.write_all(block) {
            if !meridian_sys::file::invalid_argument(&e) {
                return Err(e);
            }
            // Refused (or cut short) as misaligned: the whole block again,
            // and the rest of the file, through the page cache.
            let mut file = OpenOptions::new().write(true).open(&self.path)?;
            file.set_len(self.written)?;
            file.seek(SeekFrom::Start(self.written))?;
            file.write_all(block)?;
            self.buffered = Some(file);
        }
        self.written += len as u64;
        self.filled -= len;
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        let whole = self.filled / ALIGN * ALIGN;
        let tail_len = self.filled - whole;
        if whole > 0 {
            self.flush_block(whole)?;
        }
        let tail = &self.block.bytes()[whole..whole + tail_len];
        if !tail.is_empty() {
            match &mut self.buffered {
                Some(file) => file.write_all(tail)?,
                // `O_DIRECT` writes whole blocks only: the last partial one goes
                // through the page cache, appended by a second descriptor.
                None => OpenOptions::new().append(true).open(&self.path)?.write_all(tail)?,
            }
        }
        self.filled = 0;
        // An fsync writes out the file's data whichever descriptor wrote it,
        // and reports errors since this descriptor was opened.
        self.file.sync_all()
    }
}

/// A buffer of [`DIRECT_BLOCK_BYTES`] aligned to [`ALIGN`], as `O_DIRECT`
/// transfers need.
pub(super) struct AlignedBlock {
    buffer: Vec<u8>,
    start: usize,
}

impl AlignedBlock {
    pub(super) fn new() -> AlignedBlock {
        let buffer = vec![0u8; DIRECT_BLOCK_BYTES + ALIGN];
        // The distance to the next multiple of `ALIGN`: less than `ALIGN`.
        let start = (ALIGN - buffer.as_ptr() as usize % ALIGN) % ALIGN;
        AlignedBlock { buffer, start }
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.buffer[self.start..self.start + DIRECT_BLOCK_BYTES]
    }

    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buffer[self.start..self.start + DIRECT_BLOCK_BYTES]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `len` bytes that differ from block to block and within each.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ (i / 4096) as u8).collect()
    }

    /// Writes `data` through `sink` in pieces of uneven sizes, then syncs.
    fn write_unevenly(mut sink: Sink, data: &[u8]) {
        let mut rest = data;
        for size in [16, 1, 4095, 70_000].into_iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let take = size.min(rest.len());
            sink.write(&rest[..take]).unwrap();
            rest = &rest[take..];
        }
        sink.sync().unwrap();
    }

    #[test]
    fn a_direct_file_holds_every_byte_including_the_partial_last_block() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0, 5, ALIGN, DIRECT_BLOCK_BYTES, 2 * DIRECT_BLOCK_BYTES + ALIGN + 13] {
            let path = dir.path().join(format!("d{len}"));
            let Some(direct) = Direct::create(&path).unwrap() else {
                eprintln!("{}: no O_DIRECT on this file system; nothing to check", dir.path().display());
                return;
            };
            let data = pattern(len);
            write_unevenly(Sink::Direct(direct), &data);
            assert!(std::fs::read(&path).unwrap() == data, "{len} bytes");
        }
    }

    #[test]
    fn a_file_dropped_behind_its_writer_holds_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        // Past three writeback steps, so that earlier ones are waited for and dropped.
        let data = pattern(4 * STEP_BYTES as usize + 17);
        write_unevenly(Sink::Cached(Cached::create(&path, true).unwrap()), &data);
        assert!(std::fs::read(&path).unwrap() == data);
    }
}
