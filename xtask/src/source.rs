//! Rust source as the checks need it: the code alone, with comments and
//! literals blanked out (newlines kept, so line numbers hold), and the
//! functions in it with their extents.
//!
//! A lexer this small cannot parse Rust, and need not: the checks look for
//! `fn`, braces and paths, which only comments and literals could fake.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, recursively, leaving out build output and
/// hidden directories, sorted.
pub fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                walk(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

/// `text` with every comment, string and character literal replaced by
/// spaces, newlines kept.
pub fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let skip = literal_or_comment_len(&chars, i);
        if skip == 0 {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        for &c in &chars[i..i + skip] {
            out.push(if c == '\n' { '\n' } else { ' ' });
        }
        i += skip;
    }
    out
}

/// How many characters from `i` are a comment or literal (0 if none starts here).
fn literal_or_comment_len(c: &[char], i: usize) -> usize {
    let at = |k: usize| c.get(i + k).copied().unwrap_or('\0');
    let ident_before = i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_');
    match (at(0), at(1)) {
        ('/', '/') => c[i..].iter().position(|&x| x == '\n').unwrap_or(c.len() - i),
        ('/', '*') => block_comment_len(c, i),
        ('"', _) => quoted_len(c, i, '"'),
        ('r', '"' | '#') if !ident_before => raw_string_len(c, i),
        ('b', '"') if !ident_before => 1 + quoted_len(c, i + 1, '"'),
        ('b', '\'') if !ident_before => 1 + quoted_len(c, i + 1, '\''),
        ('\'', _) => char_literal_len(c, i),
        _ => 0,
    }
}

fn block_comment_len(c: &[char], i: usize) -> usize {
    let (mut depth, mut k) = (0usize, i);
    while k + 1 < c.len() {
        if c[k] == '/' && c[k + 1] == '*' {
            depth += 1;
            k += 2;
        } else if c[k] == '*' && c[k + 1] == '/' {
            depth -= 1;
            k += 2;
            if depth == 0 {
                return k - i;
            }
        } else {
            k += 1;
        }
    }
    c.len() - i
}

/// A literal from the quote at `i` to its closing quote, escapes honoured.
fn quoted_len(c: &[char], i: usize, quote: char) -> usize {
    let mut k = i + 1;
    while k < c.len() {
        match c[k] {
            '\\' => k += 2,
            x if x == quote => return k + 1 - i,
            _ => k += 1,
        }
    }
    c.len() - i
}

/// `r"…"`, `r#"…"#` and so on; a bare `r#ident` is not a literal.
fn raw_string_len(c: &[char], i: usize) -> usize {
    let hashes = c[i + 1..].iter().take_while(|&&x| x == '#').count();
    if c.get(i + 1 + hashes) != Some(&'"') {
        return 0;
    }
    let mut k = i + 2 + hashes;
    while k < c.len() {
        if c[k] == '"' && c[k + 1..].iter().take(hashes).filter(|&&x| x == '#').count() == hashes {
            return k + 1 + hashes - i;
        }
        k += 1;
    }
    c.len() - i
}

/// `'x'` or `'\n'` is a literal; `'a` (a lifetime or label) is not.
fn char_literal_len(c: &[char], i: usize) -> usize {
    match (c.get(i + 1), c.get(i + 2)) {
        (Some('\\'), _) => quoted_len(c, i, '\''),
        (Some(_), Some('\'')) => 3,
        _ => 0,
    }
}

/// A function found in a file: its name, first line and length in lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// The function's name.
    pub name: String,
    /// The line of its `fn` keyword, from 1.
    pub line: usize,
    /// Lines from its `fn` keyword to its closing brace.
    pub lines: usize,
    /// Inside a `#[cfg(test)]` item or marked `#[test]`.
    pub test: bool,
}

/// The functions with a body in `code` (the output of [`code_only`]).
pub fn functions(code: &str) -> Vec<Function> {
    let bytes = code.as_bytes();
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let test_spans = test_spans(code);
    let mut found = Vec::new();
    for at in keyword_positions(code, "fn") {
        let rest = &code[at + 2..];
        let name: String = rest.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        if name.is_empty() {
            continue; // `fn(` types
        }
        let Some(open) = body_start(bytes, at + 2) else { continue };
        let Some(close) = matching_brace(bytes, open) else { continue };
        let test = test_spans.iter().any(|&(from, to)| from <= at && at < to) || attribute_before(code, at, "#[test]");
        found.push(Function { name, line: line_of(at), lines: line_of(close) - line_of(at) + 1, test });
    }
    found
}

/// Byte offsets of `word` as a whole identifier.
fn keyword_positions<'a>(code: &'a str, word: &'a str) -> impl Iterator<Item = usize> + 'a {
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = code.as_bytes();
    code.match_indices(word)
        .map(|(at, _)| at)
        .filter(move |&at| (at == 0 || !ident(bytes[at - 1])) && bytes.get(at + word.len()).is_none_or(|&b| !ident(b)))
}

/// The `{` opening the body of the item whose signature starts at `from`;
/// `None` when a `;` ends it first (a declaration without a body).
fn body_start(bytes: &[u8], from: usize) -> Option<usize> {
    let mut depth = 0i32;
    for (k, &b) in bytes.iter().enumerate().skip(from) {
        match b {
            b'(' | b'[' => depth += 1,
            b')' | b']' => depth -= 1,
            b'{' if depth == 0 => return Some(k),
            b';' if depth == 0 => return None,
            _ => {}
        }
    }
    None
}

fn matching_brace(bytes: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (k, &b) in bytes.iter().enumerate().skip(open) {
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(k);
                }
            }
            _ => {}
        }
    }
    None
}

/// Byte ranges of the items marked `#[cfg(test)]`.
fn test_spans(code: &str) -> Vec<(usize, usize)> {
    let bytes = code.as_bytes();
    code.match_indices("#[cfg(test)]")
        .filter_map(|(at, _)| {
            let open = body_start(bytes, at + "#[cfg(test)]".len())?;
            Some((at, matching_brace(bytes, open)?))
        })
        .collect()
}

/// Whether the attributes just before `at` include `attribute`.
fn attribute_before(code: &str, at: usize, attribute: &str) -> bool {
    // The lines above the `fn` line (which may start with `pub`, `async`...).
    let above = code[..at].rfind('\n').map_or("", |n| &code[..n]);
    above
        .lines()
        .rev()
        .map(str::trim)
        .take_while(|l| l.starts_with("#[") || l.is_empty())
        .any(|l| l.starts_with(attribute))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_literals_are_blanked_but_lines_kept() {
        let text = "let a = \"{ fn x() {\"; // fn y() {\nlet b = '{'; let c: &'static str = r#\"}\"#;\n/* fn z() { */";
        let code = code_only(text);
        assert_eq!(code.lines().count(), text.lines().count());
        assert!(!code.contains('{') && !code.contains('}') && !code.contains("fn"), "{code}");
        assert!(code.contains("&'static str"));
    }

    #[test]
    fn functions_are_measured_from_fn_to_closing_brace() {
        let text = "fn short() {}\n\npub async fn long(\n    a: u8,\n) -> u8 {\n    let s = \"}\";\n    a\n}\n\
                    trait T { fn declared(&self); }\n\
                    #[cfg(test)]\nmod tests {\n    fn helper() {\n    }\n}\n#[test]\nfn case() {\n}\n";
        let got = functions(&code_only(text));
        let summary: Vec<(&str, usize, usize, bool)> =
            got.iter().map(|f| (f.name.as_str(), f.line, f.lines, f.test)).collect();
        assert_eq!(
            summary,
            [("short", 1, 1, false), ("long", 3, 6, false), ("helper", 12, 2, true), ("case", 16, 2, true)]
        );
    }
}
