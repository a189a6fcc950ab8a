//! Physical line numbers for the records of a CSV stream.
//!
//! Error messages must name the line a person sees in an editor, but the
//! `csv` crate's `Position::line` is only right for files with `\n` line
//! breaks and no blank lines: it counts `\n` bytes from where the reader
//! *started* looking for a record, so for a CRLF file (what Excel writes on
//! Windows) every data row is reported one line too early, a lone `\r` is
//! never counted, and a record after blank lines is reported on the first
//! blank line. [`LineTracker`] watches the bytes as the CSV reader pulls
//! them and answers, for the byte offset where the reader started on a
//! record (`Position::byte`), the line on which that record's first byte is.

use std::collections::VecDeque;
use std::io::{self, Read};

/// A maximal run of line-break bytes (`\r` and `\n`) in the stream.
///
/// The CSV reader skips such runs between records, so a record that starts
/// reading anywhere inside `start..=end` has its first byte at `end`.
#[derive(Clone, Copy, Debug)]
struct BreakRun {
    /// Offset of the first break byte.
    start: u64,
    /// Offset of the first byte after the run.
    end: u64,
    /// 1-based line of the byte at `end`.
    line_after: u64,
}

/// A reader that passes bytes through unchanged while remembering where
/// its line breaks are, so records can be given physical line numbers.
///
/// `\r\n`, a lone `\r` and a lone `\n` each end one line.
#[derive(Debug)]
pub(super) struct LineTracker<R> {
    /// The stream being read.
    inner: R,
    /// Bytes handed out so far; the offset of the next byte.
    offset: u64,
    /// Line breaks seen so far.
    breaks: u64,
    /// Whether the last byte seen was `\r`, so a `\n` now ends no new line.
    prev_cr: bool,
    /// Start of a run of break bytes that no other byte has closed yet.
    open_run: Option<u64>,
    /// Closed runs not yet behind the record being looked up; bounded by
    /// how far the CSV reader buffers ahead of the record it returns.
    runs: VecDeque<BreakRun>,
}

impl<R> LineTracker<R> {
    /// Wraps `inner`, whose first byte is on line 1.
    pub(super) fn new(inner: R) -> Self {
        LineTracker { inner, offset: 0, breaks: 0, prev_cr: false, open_run: None, runs: VecDeque::new() }
    }

    /// The line of the first byte of a record the CSV reader started reading
    /// at byte `start` (its `Position::byte`).
    ///
    /// Lookups must come with non-decreasing `start`, as records do: runs
    /// that end before `start` are forgotten. `None` when no run of line
    /// breaks leads up to `start`, which happens only at the start of the
    /// stream, i.e. for the header.
    pub(super) fn record_line(&mut self, start: u64) -> Option<u64> {
        while self.runs.front().is_some_and(|run| run.end < start) {
            self.runs.pop_front();
        }
        self.runs.front().filter(|run| run.start <= start).map(|run| run.line_after)
    }

    /// The line the stream has been read up to: where a read error struck.
    pub(super) fn current_line(&self) -> u64 {
        self.breaks + 1
    }

    /// Records the line breaks in `bytes`, the next bytes of the stream.
    fn scan(&mut self, bytes: &[u8]) {
        for (i, &byte) in bytes.iter().enumerate() {
            match byte {
                b'\r' | b'\n' => {
                    if byte == b'\r' || !self.prev_cr {
                        self.breaks += 1;
                    }
                    self.prev_cr = byte == b'\r';
                    if self.open_run.is_none() {
                        self.open_run = Some(self.offset + i as u64);
                    }
                }
                _ => {
                    self.prev_cr = false;
                    if let Some(start) = self.open_run.take() {
                        self.runs.push_back(BreakRun {
                            start,
                            end: self.offset + i as u64,
                            line_after: self.breaks + 1,
                        });
                    }
                }
            }
        }
        self.offset += bytes.len() as u64;
    }
}

impl<R: Read> Read for LineTracker<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.scan(&buf[..n]);
        Ok(n)
    }
}
