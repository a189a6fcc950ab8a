//! Parameter vectors on disk: the coordinator's global models and received
//! updates, a worker's outbox of sent updates.
//!
//! A file is written to a temporary name, fsynced, renamed into place and
//! its directory fsynced, so after a crash a file either exists whole or not
//! at all. Files start with a magic tag and the value count, so a truncated
//! or foreign file is refused rather than misread.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use meridian_wire::tensor::{MAX_CHUNK_BYTES, decode_le};

#[cfg(target_os = "linux")]
mod direct_read;
mod sink;

use sink::Sink;

const MAGIC: &[u8; 8] = b"MRDNv1\0\0";

/// The magic tag and the value count.
const HEADER_BYTES: u64 = MAGIC.len() as u64 + 8;

impl From<crate::atomic::ReplaceError> for CheckpointError {
    fn from(e: crate::atomic::ReplaceError) -> CheckpointError {
        CheckpointError::Io { path: e.path, source: e.source }
    }
}

/// A parameter file that cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// I/O failure.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Not a Meridian parameter file, or truncated.
    #[error("{path}: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// Writes `values` to `path` atomically and durably, encoding a piece at a
/// time (it holds no copy of `values`). A crash between the write and the
/// rename stops at the [`meridian_sys::failpoint`] `checkpoint.rename`.
pub fn write_atomic(path: &Path, values: &[f32]) -> Result<(), CheckpointError> {
    let mut writer = CheckpointWriter::create(path, values.len() as u64)?;
    for piece in values.chunks(1 << 16) {
        writer.write_le_bytes(&meridian_wire::tensor::encode_chunk(piece))?;
    }
    writer.commit("checkpoint.rename")
}

/// [`write_atomic`] from the wire chunks of `values`
/// ([`meridian_wire::tensor::encode_chunks`]), which it returns, naming the
/// [`meridian_sys::failpoint`] between the write and the rename `failpoint` (so a
/// fault-injection test can crash the process while one kind of file is
/// half written). The file and what a sender serves are then encoded once,
/// and the caller can serve the model without reading the file back; the
/// price is a copy of `values` for as long as the chunks live. Since the
/// caller serves the chunks, the file is written
/// [uncached](CheckpointWriter::create_uncached).
pub fn write_chunks_atomic(path: &Path, values: &[f32], failpoint: &str) -> Result<Vec<Bytes>, CheckpointError> {
    let chunks: Vec<Bytes> = meridian_wire::tensor::encode_chunks(values).collect();
    let mut writer = CheckpointWriter::create_uncached(path, values.len() as u64)?;
    for chunk in &chunks {
        writer.write_le_bytes(chunk)?;
    }
    writer.commit(failpoint)?;
    Ok(chunks)
}

/// A parameter file written piece by piece as its values arrive (an update
/// streaming in), then committed atomically: until [`CheckpointWriter::commit`]
/// the data sits in a temporary file that a crash leaves behind unreferenced.
pub struct CheckpointWriter {
    path: PathBuf,
    tmp: PathBuf,
    sink: Sink,
    announced: u64,
    written: u64,
    committed: bool,
}

/// Files written [uncached](CheckpointWriter::create_uncached) from this
/// size on bypass the page cache, or leave it behind the writer.
///
/// The coordinator does not read such a file soon, or at all: a live job's
/// model is served from memory (`meridian_coordinator::model_cache`; the file is
/// read after a restart, for an older round, or once the job has ended),
/// and an update is read once, when its round is aggregated. Through the
/// page cache, every large file took fresh memory as large as itself, and
/// the copy into it was a large share of the coordinator's time receiving a
/// large update (on this project's KVM guests, where fresh memory is what
/// the host has to back first, at a cost that varies widely; figures in
/// `docs/perf-log.md`). The price is that the round reads the update back
/// from the disk rather than from memory.
pub const UNCACHED_FROM_BYTES: u64 = 16 << 20;

impl CheckpointWriter {
    /// Starts the file for `path` (in a temporary file beside it), announcing `len` values.
    pub fn create(path: &Path, len: u64) -> Result<CheckpointWriter, CheckpointError> {
        CheckpointWriter::start(path, len, false)
    }

    /// [`CheckpointWriter::create`] for a file that will not be read back
    /// soon. From [`UNCACHED_FROM_BYTES`] on, it is written around the page
    /// cache (`O_DIRECT`), or, where the file system refuses that, dropped
    /// from the page cache behind the writer; either way its writes wait
    /// for the disk ([`CheckpointWriter::waits_for_disk`]).
    pub fn create_uncached(path: &Path, len: u64) -> Result<CheckpointWriter, CheckpointError> {
        CheckpointWriter::start(path, len, true)
    }

    fn start(path: &Path, len: u64, uncached: bool) -> Result<CheckpointWriter, CheckpointError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = crate::atomic::temporary(path);
        let large = HEADER_BYTES.saturating_add(len.saturating_mul(4)) >= UNCACHED_FROM_BYTES;
        let mut sink = Sink::create(&tmp, uncached && large).map_err(io_err(&tmp))?;
        sink.write(MAGIC).map_err(io_err(&tmp))?;
        sink.write(&len.to_le_bytes()).map_err(io_err(&tmp))?;
        Ok(CheckpointWriter { path: path.to_path_buf(), tmp, sink, announced: len, written: 0, committed: false })
    }

    /// Appends values given as little-endian `f32` bytes (a whole number of values).
    pub fn write_le_bytes(&mut self, bytes: &[u8]) -> Result<(), CheckpointError> {
        self.written += bytes.len() as u64 / 4;
        self.sink.write(bytes).map_err(io_err(&self.tmp))
    }

    /// Fsyncs the file, renames it into place and fsyncs the directory;
    /// refuses a file whose value count differs from the one announced.
    pub fn commit(mut self, failpoint: &str) -> Result<(), CheckpointError> {
        if self.written != self.announced {
            return Err(CheckpointError::Corrupt {
                path: self.path.clone(),
                detail: format!("{} values written, {} announced", self.written, self.announced),
            });
        }
        self.sink.sync().map_err(io_err(&self.tmp))?;
        meridian_sys::failpoint::hit(failpoint);
        let committed = crate::atomic::commit(&self.tmp, &self.path);
        // Once renamed, the temporary is gone whatever the directory's fsync said.
        self.committed = !self.tmp.exists();
        committed.map_err(CheckpointError::from)
    }

    /// Whether writes wait for the disk: an uncached file of
    /// [`UNCACHED_FROM_BYTES`] or more, written with `O_DIRECT` or dropped
    /// behind the writer. An async caller writes and commits such a file
    /// from a blocking thread.
    pub fn waits_for_disk(&self) -> bool {
        self.sink.waits_for_disk()
    }
}

impl Drop for CheckpointWriter {
    /// An uncommitted file (its stream broke, its writer was dropped) leaves nothing behind.
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Opens a parameter file and checks its header against its size, so that
/// a reader can allocate exactly once; returns the file positioned at the
/// values, and their count.
fn open_values(path: &Path) -> Result<(File, usize), CheckpointError> {
    let corrupt = |detail: String| CheckpointError::Corrupt { path: path.to_path_buf(), detail };
    let mut file = File::open(path).map_err(io_err(path))?;
    let size = file.metadata().map_err(io_err(path))?.len();
    let mut header = [0u8; HEADER_BYTES as usize];
    file.read_exact(&mut header).map_err(|_| corrupt("shorter than its header".to_string()))?;
    if &header[..MAGIC.len()] != MAGIC {
        return Err(corrupt("not a Meridian parameter file".to_string()));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&header[MAGIC.len()..]);
    let len = u64::from_le_bytes(len_bytes);
    let announced = len.saturating_mul(4);
    let held = size.saturating_sub(HEADER_BYTES);
    if held != announced {
        return Err(corrupt(format!("holds {held} bytes of values, its header announces {announced}")));
    }
    // In bytes first: `len * 4` must not overflow where usize is 32 bits.
    let bytes = usize::try_from(announced)
        .map_err(|_| corrupt(format!("announces {len} values, more than this machine can address")))?;
    Ok((file, bytes / 4))
}

/// Reads exactly `buf.len()` bytes of values; a file that shrank since its
/// size was checked is corrupt, not a short vector.
fn read_values(file: &mut File, path: &Path, buf: &mut [u8]) -> Result<(), CheckpointError> {
    file.read_exact(buf).map_err(read_err(path))
}

/// [`io_err`] for reading values, where an early end means a corrupt file.
fn read_err(path: &Path) -> impl FnOnce(io::Error) -> CheckpointError + '_ {
    move |e| match e.kind() {
        io::ErrorKind::UnexpectedEof => CheckpointError::Corrupt {
            path: path.to_path_buf(),
            detail: "ended before the values its header announces".to_string(),
        },
        _ => io_err(path)(e),
    }
}

/// Reads a file written by [`write_atomic`], checking its length.
pub fn read(path: &Path) -> Result<Vec<f32>, CheckpointError> {
    Pieces::open(path)?.read_all()
}

/// A parameter file read a piece at a time, for a reader that folds values
/// in as they come (the coordinator's FedAvg) and so never holds the whole
/// vector. The header is checked against the file's size on opening, so the
/// length is known before any value is read.
pub struct Pieces {
    parts: Vec<Part>,
    len: usize,
}

/// One parameter file of a [`Pieces`], positioned at its values.
struct Part {
    file: File,
    path: PathBuf,
    len: usize,
}

impl Pieces {
    /// Opens `path` and checks its header; a [parts file](write_parts)
    /// opens each of its parts and checks it holds the values listed.
    pub fn open(path: &Path) -> Result<Pieces, CheckpointError> {
        let parts = match read_parts(path)? {
            None => {
                let (file, len) = open_values(path)?;
                vec![Part { file, path: path.to_path_buf(), len }]
            }
            Some(listed) => {
                let mut parts = Vec::with_capacity(listed.len());
                for (part_path, listed_len) in listed {
                    let (file, len) = open_values(&part_path)?;
                    if len as u64 != listed_len {
                        return Err(CheckpointError::Corrupt {
                            path: path.to_path_buf(),
                            detail: format!("lists {listed_len} values for {}, which holds {len}", part_path.display()),
                        });
                    }
                    parts.push(Part { file, path: part_path, len });
                }
                parts
            }
        };
        let len = parts.iter().map(|p| p.len).sum();
        Ok(Pieces { parts, len })
    }

    /// Values the file holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the file holds no value.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `each(offset, values)` for consecutive pieces of at most
    /// [`meridian_wire::tensor::CHUNK_VALUES`] values, in order. An error part way
    /// (the file shrank, an I/O failure) comes after some pieces were seen.
    pub fn for_each(self, mut each: impl FnMut(usize, &[f32])) -> Result<(), CheckpointError> {
        let mut values = Vec::new();
        let mut offset = 0;
        self.for_each_bytes(|bytes| {
            values.clear();
            values.extend(decode_le(bytes));
            each(offset, &values);
            offset += values.len();
        })
    }

    /// Every value, in one vector allocated once.
    pub fn read_all(self) -> Result<Vec<f32>, CheckpointError> {
        let mut values = Vec::with_capacity(self.len);
        meridian_sys::memory::advise_huge_pages(&mut values);
        self.for_each_bytes(|bytes| values.extend(decode_le(bytes)))?;
        Ok(values)
    }

    /// Calls `each` with consecutive pieces of the values' bytes, at most
    /// [`MAX_CHUNK_BYTES`] each, part after part.
    fn for_each_bytes(self, mut each: impl FnMut(&[u8])) -> Result<(), CheckpointError> {
        for part in self.parts {
            part.for_each_bytes(&mut each)?;
        }
        Ok(())
    }
}

impl Part {
    /// Calls `each` with consecutive pieces of the values' bytes, at most
    /// [`MAX_CHUNK_BYTES`] each, read into one reused buffer.
    ///
    /// A file of [`UNCACHED_FROM_BYTES`] or more is read around the page
    /// cache where the file system allows (`direct_read`, Linux), which
    /// shortens a large model's round (`docs/perf-log.md`).
    fn for_each_bytes(mut self, each: &mut impl FnMut(&[u8])) -> Result<(), CheckpointError> {
        let mut remaining = self.len * 4;
        #[cfg(target_os = "linux")]
        if HEADER_BYTES + remaining as u64 >= UNCACHED_FROM_BYTES
            && let Some(direct) = direct_read::DirectReader::open(&self.path).map_err(io_err(&self.path))?
        {
            let read = direct
                .read(HEADER_BYTES, remaining as u64, MAX_CHUNK_BYTES, &mut *each)
                .map_err(read_err(&self.path))?;
            match read {
                direct_read::Read::Whole => return Ok(()),
                // The rest through the page cache.
                direct_read::Read::RefusedAfter(passed) => {
                    remaining -= passed as usize;
                    io::Seek::seek(&mut self.file, io::SeekFrom::Start(HEADER_BYTES + passed))
                        .map_err(io_err(&self.path))?;
                }
            }
        }
        let mut bytes = vec![0u8; MAX_CHUNK_BYTES.min(remaining)];
        while remaining > 0 {
            let piece = &mut bytes[..remaining.min(MAX_CHUNK_BYTES)];
            read_values(&mut self.file, &self.path, piece)?;
            each(piece);
            remaining -= piece.len();
        }
        Ok(())
    }
}

/// The first line of a parts file.
const PARTS_TAG: &str = "MRDN-parts v1";

/// The largest parts file read: a few lines per part.
const MAX_PARTS_FILE_BYTES: u64 = 64 << 10;

/// Writes `path`, atomically and durably, as the list of `parts`: an update
/// that arrived in parts, each a parameter file of its own in `path`'s
/// directory, given in order with its value count. [`Pieces::open`] reads
/// the parts as one vector; [`remove`] deletes the list and its parts.
///
/// The format is text: the line `MRDN-parts v1`, then one line per part,
/// its value count and its file name.
pub fn write_parts(path: &Path, parts: &[(PathBuf, u64)], failpoint: &str) -> Result<(), CheckpointError> {
    let mut text = format!("{PARTS_TAG}\n");
    for (part, len) in parts {
        let name = part.file_name().and_then(|n| n.to_str()).filter(|n| !n.contains(char::is_whitespace));
        match name {
            Some(name) if part.parent() == path.parent() => text.push_str(&format!("{len} {name}\n")),
            _ => {
                return Err(CheckpointError::Corrupt {
                    path: path.to_path_buf(),
                    detail: format!("part {} is not a plain file name beside the list", part.display()),
                });
            }
        }
    }
    crate::atomic::replace(
        path,
        text.as_bytes(),
        crate::atomic::Replace { failpoint: Some(failpoint), ..Default::default() },
    )
    .map_err(CheckpointError::from)
}

/// The parts `path` lists, if it is a [parts file](write_parts), with
/// their value counts; `None` for any other file.
fn read_parts(path: &Path) -> Result<Option<Vec<(PathBuf, u64)>>, CheckpointError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut tag = [0u8; PARTS_TAG.len()];
    match file.read_exact(&mut tag) {
        Ok(()) if tag == PARTS_TAG.as_bytes() => {}
        _ => return Ok(None),
    }
    let corrupt = |detail: String| CheckpointError::Corrupt { path: path.to_path_buf(), detail };
    let mut text = String::new();
    io::Read::take(file, MAX_PARTS_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| corrupt(format!("not a readable parts file: {e}")))?;
    if text.len() as u64 > MAX_PARTS_FILE_BYTES {
        return Err(corrupt(format!("longer than a parts file may be ({MAX_PARTS_FILE_BYTES} bytes)")));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut lines = text.lines();
    if lines.next() != Some("") {
        return Err(corrupt("its first line is not the parts tag".to_string()));
    }
    let mut parts = Vec::new();
    for (i, line) in lines.enumerate() {
        let (len, name) = line
            .split_once(' ')
            .and_then(|(len, name)| Some((len.parse::<u64>().ok()?, name)))
            .filter(|(_, name)| !name.is_empty() && !name.contains(['/', '\\']) && *name != "..")
            .ok_or_else(|| corrupt(format!("line {}: not a value count and a file name: {line:?}", i + 2)))?;
        parts.push((dir.join(name), len));
    }
    if parts.is_empty() {
        return Err(corrupt("lists no parts".to_string()));
    }
    Ok(Some(parts))
}

/// The parameter files `path` lists, if it is a [parts file](write_parts);
/// `None` for any other file.
pub fn listed_parts(path: &Path) -> Result<Option<Vec<PathBuf>>, CheckpointError> {
    Ok(read_parts(path)?.map(|parts| parts.into_iter().map(|(part, _)| part).collect()))
}

/// Removes the parameter file `path`, or a [parts file](write_parts) and
/// every part it lists. A file already gone is not an error.
pub fn remove(path: &Path) -> Result<(), CheckpointError> {
    let gone = |r: io::Result<()>, p: &Path| match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(p)(e)),
        _ => Ok(()),
    };
    match read_parts(path) {
        Ok(Some(parts)) => {
            for (part, _) in parts {
                gone(fs::remove_file(&part), &part)?;
            }
        }
        Err(CheckpointError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => return Ok(()),
        _ => {}
    }
    gone(fs::remove_file(path), path)
}

/// Reads a parameter file straight into wire chunks of at most
/// [`MAX_CHUNK_BYTES`]: the values are stored little-endian, as chunks
/// carry them, so a model is served without decoding and re-encoding it:
/// three fewer copies of the model per round (`docs/perf-log.md`).
pub fn read_chunks(path: &Path) -> Result<Vec<Bytes>, CheckpointError> {
    let (mut file, len) = open_values(path)?;
    let mut chunks = Vec::with_capacity((len * 4).div_ceil(MAX_CHUNK_BYTES));
    let mut remaining = len * 4;
    while remaining > 0 {
        let mut chunk = vec![0u8; remaining.min(MAX_CHUNK_BYTES)];
        read_values(&mut file, path, &mut chunk)?;
        remaining -= chunk.len();
        chunks.push(Bytes::from(chunk));
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_chunks_are_the_file_and_what_read_chunks_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.bin");
        let values: Vec<f32> = (0..meridian_wire::tensor::CHUNK_VALUES + 7).map(|i| i as f32 * 0.5).collect();
        let chunks = write_chunks_atomic(&path, &values, "test").unwrap();
        assert_eq!(chunks.len(), 2);
        assert_eq!(read(&path).unwrap(), values);
        assert_eq!(read_chunks(&path).unwrap(), chunks);
    }

    #[test]
    fn round_trip_and_corruption_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.bin");
        write_atomic(&path, &[1.0, -2.5, 3.25]).unwrap();
        assert_eq!(read(&path).unwrap(), vec![1.0, -2.5, 3.25]);
        let mut bytes = fs::read(&path).unwrap();
        bytes.pop();
        fs::write(&path, &bytes).unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.ends_with("holds 11 bytes of values, its header announces 12"), "{err}");
        let err = read_chunks(&path).unwrap_err().to_string();
        assert!(err.ends_with("holds 11 bytes of values, its header announces 12"), "{err}");
        // A header announcing more values than any file could hold.
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        fs::write(&path, &huge).unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("holds 0 bytes of values"), "{err}");
    }

    #[test]
    fn a_file_reads_back_as_the_wire_chunks_of_its_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.bin");
        // Two full chunks and a short one.
        let values: Vec<f32> = (0..2 * meridian_wire::tensor::CHUNK_VALUES + 5).map(|i| i as f32 * 0.5).collect();
        write_atomic(&path, &values).unwrap();
        let chunks = read_chunks(&path).unwrap();
        let want: Vec<Bytes> = meridian_wire::tensor::encode_chunks(&values).collect();
        assert_eq!(chunks, want);
        assert_eq!(read(&path).unwrap(), values);
        write_atomic(&path, &[]).unwrap();
        assert!(read_chunks(&path).unwrap().is_empty());
        assert!(read(&path).unwrap().is_empty());
    }

    #[test]
    fn a_large_uncached_file_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.bin");
        let n = (UNCACHED_FROM_BYTES / 4) as usize + 1_001;
        let values: Vec<f32> = (0..n).map(|i| (i as f32).sin()).collect();
        let chunks = write_chunks_atomic(&path, &values, "test").unwrap();
        assert_eq!(read(&path).unwrap(), values);
        assert_eq!(read_chunks(&path).unwrap(), chunks);
        assert!(!crate::atomic::temporary(&path).exists());
    }

    #[test]
    fn a_large_file_is_read_in_pieces_and_a_file_that_shrank_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.bin");
        let n = (UNCACHED_FROM_BYTES / 4) as usize + 1_001;
        let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
        write_chunks_atomic(&path, &values, "test").unwrap();
        let mut seen = Vec::new();
        Pieces::open(&path)
            .unwrap()
            .for_each(|offset, piece| {
                assert_eq!(offset, seen.len());
                assert!(piece.len() <= meridian_wire::tensor::CHUNK_VALUES);
                seen.extend_from_slice(piece);
            })
            .unwrap();
        assert_eq!(seen, values);
        // Opened whole, then cut short before it is read.
        let pieces = Pieces::open(&path).unwrap();
        File::options().write(true).open(&path).unwrap().set_len(HEADER_BYTES + 4 * (n as u64 / 2) + 2).unwrap();
        let err = pieces.for_each(|_, _| {}).unwrap_err().to_string();
        assert!(err.ends_with("ended before the values its header announces"), "{err}");
    }

    #[test]
    fn a_streamed_file_commits_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.bin");
        let bytes = |values: &[f32]| values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        let mut w = CheckpointWriter::create(&path, 3).unwrap();
        w.write_le_bytes(&bytes(&[1.0, 2.0])).unwrap();
        w.write_le_bytes(&bytes(&[3.0])).unwrap();
        w.commit("test").unwrap();
        assert_eq!(read(&path).unwrap(), vec![1.0, 2.0, 3.0]);
        // Fewer values than announced: refused, nothing left behind.
        let short = dir.path().join("short.bin");
        let mut w = CheckpointWriter::create(&short, 3).unwrap();
        w.write_le_bytes(&bytes(&[1.0])).unwrap();
        assert!(w.commit("test").unwrap_err().to_string().ends_with("1 values written, 3 announced"));
        assert!(!short.exists() && !crate::atomic::temporary(&short).exists());
        // Abandoned: the temporary file is gone and the target never appears.
        let dropped = dir.path().join("dropped.bin");
        let w = CheckpointWriter::create(&dropped, 1).unwrap();
        assert!(crate::atomic::temporary(&dropped).exists());
        drop(w);
        assert!(!dropped.exists() && !crate::atomic::temporary(&dropped).exists());
    }

    #[test]
    fn a_parts_file_reads_as_its_parts_in_order_and_is_removed_with_them() {
        let dir = tempfile::tempdir().unwrap();
        // A large part (read around the page cache) and a small one.
        let values: Vec<f32> = (0..(UNCACHED_FROM_BYTES as usize / 4 + 9)).map(|i| (i % 4099) as f32).collect();
        let cut = meridian_wire::tensor::CHUNK_VALUES * 4;
        let (a, b) = (dir.path().join("u.p0.bin"), dir.path().join("u.p1.bin"));
        write_atomic(&a, &values[..cut]).unwrap();
        write_atomic(&b, &values[cut..]).unwrap();
        let list = dir.path().join("u.bin");
        write_parts(&list, &[(a.clone(), cut as u64), (b.clone(), (values.len() - cut) as u64)], "test").unwrap();
        assert!(!crate::atomic::temporary(&list).exists());
        assert_eq!(Pieces::open(&list).unwrap().len(), values.len());
        assert_eq!(read(&list).unwrap(), values);
        let mut seen = Vec::new();
        Pieces::open(&list)
            .unwrap()
            .for_each(|offset, piece| {
                assert_eq!(offset, seen.len());
                seen.extend_from_slice(piece);
            })
            .unwrap();
        assert_eq!(seen, values);
        remove(&list).unwrap();
        assert!(!list.exists() && !a.exists() && !b.exists());
        remove(&list).unwrap();
    }

    #[test]
    fn a_parts_file_that_lies_or_points_elsewhere_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("p0.bin");
        write_atomic(&part, &[1.0, 2.0]).unwrap();
        let list = dir.path().join("u.bin");
        // A part outside the list's directory is not written.
        let elsewhere = tempfile::tempdir().unwrap();
        assert!(write_parts(&list, &[(elsewhere.path().join("p.bin"), 1)], "test").is_err());
        let long = format!("MRDN-parts v1\n2 p0.bin\n{}", "\n".repeat(70_000));
        for (text, why) in [
            ("MRDN-parts v1\n3 p0.bin\n", "lists 3 values"),
            ("MRDN-parts v1\n2 ../p0.bin\n", "line 2"),
            ("MRDN-parts v1\nx p0.bin\n", "line 2"),
            ("MRDN-parts v1\n", "no parts"),
            ("MRDN-parts v1 2 p0.bin\n", "first line"),
            (long.as_str(), "longer than a parts file"),
        ] {
            std::fs::write(&list, text).unwrap();
            let err = Pieces::open(&list).err().unwrap().to_string();
            assert!(err.contains(why), "{text:?}: {err}");
        }
        std::fs::write(&list, "MRDN-parts v1\n2 missing.bin\n").unwrap();
        assert!(Pieces::open(&list).is_err());
        // The good list reads; a plain parameter file is not a parts file.
        std::fs::write(&list, "MRDN-parts v1\n2 p0.bin\n").unwrap();
        assert_eq!(read(&list).unwrap(), vec![1.0, 2.0]);
        assert_eq!(read(&part).unwrap(), vec![1.0, 2.0]);
    }
}
