//! What the `meridian` commands print, and how: a command writes its
//! result to stdout through here, so that output piped into `head` or a
//! closed file ends the command quietly (a broken pipe is not an error a
//! user should read), every line is flushed as it is made (a watcher
//! reading a pipe sees each round when it happens), and colour, progress
//! bars and other terminal decoration appear only on a terminal.

use std::io::{IsTerminal, Write};

/// Writes `text` and a newline to stdout and flushes.
pub fn line(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

/// Writes `text` as it is (a block that ends in its own newline).
pub fn block(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Writes one JSON value on one line (JSON Lines).
pub fn json_line(value: &serde_json::Value) -> std::io::Result<()> {
    line(&value.to_string())
}

/// Writes a JSON value, indented.
pub fn json(value: &serde_json::Value) -> std::io::Result<()> {
    line(&serde_json::to_string_pretty(value).unwrap_or_default())
}

/// Whether stdout is a terminal.
pub fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

/// Whether colour and other ANSI escapes may be written to stderr: only
/// on a terminal, and never when `NO_COLOR` is set (no-color.org).
pub fn stderr_colour() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

/// Whether a progress bar may be drawn: stdout and stderr are a terminal
/// and `NO_COLOR` is not set (a bar is cursor-moving escapes).
pub fn progress_bar() -> bool {
    stdout_is_terminal() && stderr_colour()
}

/// Whether `error` is, at its root, a write to a closed pipe.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe))
}

/// `println!` through [`line`](fn@line): `out!("{x}")?`.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::line(&format!($($arg)*))
    };
}
