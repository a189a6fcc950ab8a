//! Reading a large parameter file around the page cache.
//!
//! A large file is written around the page cache (see [`super::sink`]), so
//! reading it back through the page cache brings every page in fresh and
//! copies it out again; for a large update that copy (`_copy_to_iter`) was
//! the largest part of the coordinator's step. An `O_DIRECT` read has the disk
//! place the bytes in the reader's own buffer instead: whole aligned blocks
//! into one aligned buffer, reused for the whole file.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use meridian_sys::file::{open_direct, unsupported};

use super::sink::{ALIGN, AlignedBlock, DIRECT_BLOCK_BYTES};

/// A file opened for `O_DIRECT` reads, with its aligned buffer.
pub(super) struct DirectReader {
    file: File,
    block: AlignedBlock,
}

/// How far a direct read got.
pub(super) enum Read {
    /// Every byte asked for was passed on.
    Whole,
    /// The file system refused a direct read (an alignment it needs beyond
    /// [`ALIGN`], or no direct reads at all) after this many bytes were
    /// passed on; the caller reads the rest through the page cache.
    RefusedAfter(u64),
}

impl DirectReader {
    /// Opens `path` for direct reads; `None` where the file system or the
    /// platform refuses them.
    pub(super) fn open(path: &Path) -> io::Result<Option<DirectReader>> {
        let Some(file) = open_direct(path, OpenOptions::new().read(true))? else {
            return Ok(None);
        };
        Ok(Some(DirectReader { file, block: AlignedBlock::new() }))
    }

    /// Passes the file's bytes `from..from + len` to `each`, in order, in
    /// pieces of at most `piece` bytes. With `from`, `len` and `piece`
    /// multiples of 4, every piece holds whole values (blocks are aligned
    /// to [`ALIGN`], a multiple of 4 too).
    ///
    /// A file that ends early is an `UnexpectedEof` error.
    pub(super) fn read(mut self, from: u64, len: u64, piece: usize, mut each: impl FnMut(&[u8])) -> io::Result<Read> {
        let end = from + len;
        // Blocks start at aligned offsets; the first may begin before `from`.
        let mut at = from / ALIGN as u64 * ALIGN as u64;
        let mut passed = 0u64;
        while from + passed < end {
            let want = DIRECT_BLOCK_BYTES.min((end - at).next_multiple_of(ALIGN as u64) as usize);
            let got = match self.read_block(at, want) {
                Ok(got) => got,
                Err(e) if unsupported(&e) => return Ok(Read::RefusedAfter(passed)),
                Err(e) => return Err(e),
            };
            let skip = (from + passed - at) as usize;
            // Whole values only: a file cut short mid-value ends before it.
            let usable = (got.min((end - at) as usize)).saturating_sub(skip) / 4 * 4;
            if usable == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let block = &self.block.bytes()[skip..skip + usable];
            for bytes in block.chunks(piece) {
                each(bytes);
            }
            passed += usable as u64;
            at += got as u64;
            if got < want && from + passed < end {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(Read::Whole)
    }

    /// Reads up to `want` bytes (a multiple of [`ALIGN`]) at `offset` (an
    /// aligned one) into the buffer; fewer only at the end of the file.
    fn read_block(&mut self, offset: u64, want: usize) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let buffer = &mut self.block.bytes_mut()[..want];
        let mut got = 0;
        while got < want {
            match self.file.read_at(&mut buffer[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    // A direct read stops short at the end of the file; the
                    // next offset would not be aligned anyway.
                    if !got.is_multiple_of(ALIGN) {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `len` bytes whose byte `i` is `i % 251`.
    fn file(dir: &Path, len: usize) -> (std::path::PathBuf, Vec<u8>) {
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let path = dir.join(format!("f{len}"));
        std::fs::write(&path, &bytes).unwrap();
        (path, bytes)
    }

    #[test]
    fn reads_any_range_in_whole_values_across_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let len = 2 * DIRECT_BLOCK_BYTES + 3 * ALIGN + 116;
        let (path, bytes) = file(dir.path(), len);
        if DirectReader::open(&path).unwrap().is_none() {
            eprintln!("this file system has no direct I/O; nothing to test");
            return;
        }
        for (from, to) in [(16, len), (0, len), (16, len - 100), (ALIGN + 4, 2 * DIRECT_BLOCK_BYTES + 8)] {
            let mut got = Vec::new();
            let mut pieces = 0;
            let read = DirectReader::open(&path)
                .unwrap()
                .unwrap()
                .read(from as u64, (to - from) as u64, 1 << 20, |piece| {
                    assert!(piece.len() <= 1 << 20 && piece.len().is_multiple_of(4));
                    pieces += 1;
                    got.extend_from_slice(piece);
                })
                .unwrap();
            assert!(matches!(read, Read::Whole));
            assert_eq!(got, bytes[from..to], "bytes {from}..{to}");
            assert!(pieces >= (to - from).div_ceil(1 << 20));
        }
    }

    #[test]
    fn a_file_shorter_than_asked_is_an_early_end() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = file(dir.path(), DIRECT_BLOCK_BYTES + 20);
        let Some(reader) = DirectReader::open(&path).unwrap() else {
            return;
        };
        let mut passed = 0;
        let err = reader.read(16, DIRECT_BLOCK_BYTES as u64 + 8, 1 << 20, |p| passed += p.len()).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        // What the file held was passed on before the error.
        assert_eq!(passed, DIRECT_BLOCK_BYTES + 4);
    }
}
