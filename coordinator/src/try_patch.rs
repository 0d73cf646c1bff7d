//! Checks on a try run's patch that run when it is submitted, before any `git`: size,
//! shape (a unified or git diff whose hunks are complete) and the paths it touches (relative,
//! no `..`, nothing under `.git`). `git apply` still has the last word when the source
//! tarball is made; this gives the developer a clear error at once instead of a failed
//! build later, and keeps hostile paths away from the coordinator's checkout dir.
//!
//! Pure and std-only (never `crate::`): fuzzed by `fuzz/fuzz_targets/try_patch.rs`, which
//! compiles this file on its own, and by `coordinator/tests/fuzz_bodies.rs`.

use std::collections::BTreeSet;

/// What a patch that passed the checks touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchSummary {
    /// Every path the patch names (old and new sides), relative to the repo root, sorted.
    pub files: Vec<String>,
    /// Number of text hunks.
    pub hunks: usize,
}

/// Why a patch was refused; lines count from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error("patch is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("patch line {line} contains a NUL byte (binary changes need `git diff --binary`)")]
    NulByte { line: usize },
    // git's own words for this, so the message reads the same whichever check caught it.
    #[error("No valid patches in input: no `diff --git` or `---`/`+++` file header found")]
    NoFiles,
    #[error("patch line {line}: path {path:?} {reason}")]
    BadPath {
        line: usize,
        path: String,
        reason: &'static str,
    },
    #[error("patch line {line}: malformed hunk header")]
    BadHunkHeader { line: usize },
    #[error("patch line {line}: hunk before any file header")]
    HunkWithoutFile { line: usize },
    #[error(
        "patch line {line}: hunk has more lines than its header says, or a line that is not ' ', '+', '-' or '\\'"
    )]
    CorruptHunk { line: usize },
    #[error("patch ends inside the hunk that starts at line {line} (truncated?)")]
    TruncatedHunk { line: usize },
}

/// Checks `patch` (non-empty; an empty patch means "no patch" and is not checked).
pub fn check(patch: &[u8], limit: usize) -> Result<PatchSummary, PatchError> {
    if patch.len() > limit {
        return Err(PatchError::TooLarge {
            size: patch.len(),
            limit,
        });
    }
    let mut files = BTreeSet::new();
    let mut hunks = 0;
    let mut seen_file_header = false;
    // Lines still expected on the old and new side of the current hunk, and where it began.
    let mut hunk: Option<(u64, u64, usize)> = None;
    let lines: Vec<&[u8]> = patch.split(|&b| b == b'\n').collect();
    let mut i = 0;
    while i < lines.len() {
        let line_no = i + 1;
        let raw = lines[i];
        if raw.contains(&0) {
            return Err(PatchError::NulByte { line: line_no });
        }
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        i += 1;

        if let Some((old, new, start)) = hunk.as_mut() {
            let last_line = i == lines.len() && line.is_empty();
            match line.first() {
                // A bare empty line is context whose trailing space an editor stripped.
                None | Some(b' ') if !last_line && *old > 0 && *new > 0 => {
                    *old -= 1;
                    *new -= 1;
                }
                Some(b'-') if *old > 0 => *old -= 1,
                Some(b'+') if *new > 0 => *new -= 1,
                Some(b'\\') => {}
                _ if last_line => return Err(PatchError::TruncatedHunk { line: *start }),
                _ => return Err(PatchError::CorruptHunk { line: line_no }),
            }
            if *old == 0 && *new == 0 {
                hunk = None;
            }
            continue;
        }

        if let Some(rest) = line.strip_prefix(b"diff --git ") {
            seen_file_header = true;
            for path in git_header_paths(rest) {
                files.insert(checked_path(&path, line_no, true)?);
            }
        } else if let Some(rest) = line.strip_prefix(b"--- ")
            && let Some(next) = lines.get(i).map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            && let Some(new_rest) = next.strip_prefix(b"+++ ")
        {
            seen_file_header = true;
            for (text, at) in [(rest, line_no), (new_rest, line_no + 1)] {
                let path = header_path(text);
                if path != b"/dev/null" {
                    files.insert(checked_path(&path, at, true)?);
                }
            }
            i += 1;
        } else if let Some(path) = [
            b"rename from ".as_slice(),
            b"rename to ",
            b"copy from ",
            b"copy to ",
        ]
        .iter()
        .find_map(|p| line.strip_prefix(*p))
        {
            files.insert(checked_path(&unquote(path), line_no, false)?);
        } else if line.starts_with(b"@@ ") {
            if !seen_file_header {
                return Err(PatchError::HunkWithoutFile { line: line_no });
            }
            let (old, new) =
                hunk_counts(line).ok_or(PatchError::BadHunkHeader { line: line_no })?;
            hunks += 1;
            if old > 0 || new > 0 {
                hunk = Some((old, new, line_no));
            }
        }
        // Anything else (commit message, `index`, mode lines, binary data) is git's business.
    }
    if let Some((_, _, start)) = hunk {
        return Err(PatchError::TruncatedHunk { line: start });
    }
    if !seen_file_header {
        return Err(PatchError::NoFiles);
    }
    Ok(PatchSummary {
        files: files.into_iter().collect(),
        hunks,
    })
}

/// `@@ -a[,b] +c[,d] @@...` to (b, d); a missing count is 1.
fn hunk_counts(line: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.strip_prefix("@@ ")?.split(' ');
    let count = |word: Option<&str>, sign: char| -> Option<u64> {
        let range = word?.strip_prefix(sign)?;
        let (start, count) = range.split_once(',').unwrap_or((range, "1"));
        start.parse::<u64>().ok()?;
        count.parse::<u64>().ok()
    };
    let old = count(words.next(), '-')?;
    let new = count(words.next(), '+')?;
    (words.next()? == "@@").then_some((old, new))
}

/// The path of a `---`/`+++` line: quoted, or up to a tab (before a timestamp).
fn header_path(rest: &[u8]) -> Vec<u8> {
    if rest.starts_with(b"\"") {
        return unquote(rest);
    }
    let end = rest.iter().position(|&b| b == b'\t').unwrap_or(rest.len());
    rest[..end].to_vec()
}

/// The two paths of `diff --git a/x b/y` when they can be told apart: both quoted, or the
/// same unquoted name twice. Renames with spaces are named again by `rename` lines.
fn git_header_paths(rest: &[u8]) -> Vec<Vec<u8>> {
    if rest.starts_with(b"\"") {
        let first = unquote(rest);
        let used = quoted_len(rest);
        let second = rest.get(used..).map(|r| r.strip_prefix(b" ").unwrap_or(r));
        return match second {
            Some(s) if !s.is_empty() => vec![first, header_path(s)],
            _ => vec![first],
        };
    }
    // `a/P b/P`: the halves around the middle space are the same name.
    if rest.len() % 2 == 1 {
        let half = rest.len() / 2;
        let (left, right) = (&rest[..half], &rest[half + 1..]);
        if rest[half] == b' ' && left.get(1..) == right.get(1..) {
            return vec![left.to_vec(), right.to_vec()];
        }
    }
    Vec::new()
}

/// Length of the leading C-quoted string (with its quotes) in `s`.
fn quoted_len(s: &[u8]) -> usize {
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    s.len()
}

/// Undoes git's C-style quoting of a path (`"a\tb\303\251"`); unquoted input is returned as is.
fn unquote(s: &[u8]) -> Vec<u8> {
    let Some(inner) = s.strip_prefix(b"\"") else {
        return s.to_vec();
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < inner.len() {
        match inner[i] {
            b'"' => break,
            b'\\' => {
                let Some(&c) = inner.get(i + 1) else { break };
                i += 2;
                let byte = match c {
                    b'a' => 7,
                    b'b' => 8,
                    b't' => b'\t',
                    b'n' => b'\n',
                    b'v' => 11,
                    b'f' => 12,
                    b'r' => b'\r',
                    b'0'..=b'7' => {
                        let mut v = u32::from(c - b'0');
                        for _ in 0..2 {
                            match inner.get(i) {
                                Some(d @ b'0'..=b'7') => {
                                    v = v * 8 + u32::from(d - b'0');
                                    i += 1;
                                }
                                _ => break,
                            }
                        }
                        // Three octal digits can exceed a byte; keep the low byte.
                        (v & 0xff) as u8
                    }
                    other => other,
                };
                out.push(byte);
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Checks one path of the patch, dropping the `a/`-style prefix when `strip_prefix`
/// (`git apply` strips one leading component by default).
fn checked_path(raw: &[u8], line: usize, strip_prefix: bool) -> Result<String, PatchError> {
    let shown = String::from_utf8_lossy(raw).into_owned();
    let bad = |reason| PatchError::BadPath {
        line,
        path: shown.clone(),
        reason,
    };
    let path = if strip_prefix {
        let slash = raw
            .iter()
            .position(|&b| b == b'/')
            .ok_or_else(|| bad("has no a/ or b/ prefix"))?;
        &raw[slash + 1..]
    } else {
        raw
    };
    if path.is_empty() {
        return Err(bad("is empty"));
    }
    if path.starts_with(b"/") {
        return Err(bad("is absolute"));
    }
    if path.contains(&0) {
        return Err(bad("contains a NUL byte"));
    }
    for component in path.split(|&b| b == b'/') {
        if component == b".." {
            return Err(bad("leaves the repository (\"..\")"));
        }
        if component.eq_ignore_ascii_case(b".git") {
            return Err(bad("is inside .git"));
        }
    }
    Ok(String::from_utf8_lossy(path).into_owned())
}

/// Fuzz body of the patch checks (the `try_patch` cargo-fuzz target, and
/// `coordinator/tests/fuzz_bodies.rs` on stable), with a 64 KiB limit. Panics when the
/// contract breaks: an oversized input is refused for its size, an accepted patch names at
/// least one path and only relative paths without `..` or `.git`, and errors name a line
/// inside the input.
pub fn fuzz_check(data: &[u8]) -> Result<PatchSummary, PatchError> {
    const LIMIT: usize = 64 << 10;
    let result = check(data, LIMIT);
    let lines = data.split(|&b| b == b'\n').count();
    match &result {
        Ok(summary) => {
            assert!(data.len() <= LIMIT);
            for f in &summary.files {
                assert!(!f.is_empty() && !f.starts_with('/'), "accepted path {f:?}");
                assert!(
                    f.split('/')
                        .all(|c| c != ".." && !c.eq_ignore_ascii_case(".git")),
                    "accepted path {f:?}"
                );
            }
        }
        Err(PatchError::TooLarge { size, limit }) => {
            assert!(*size > *limit && *size == data.len())
        }
        Err(
            PatchError::NulByte { line }
            | PatchError::BadPath { line, .. }
            | PatchError::BadHunkHeader { line }
            | PatchError::HunkWithoutFile { line }
            | PatchError::CorruptHunk { line }
            | PatchError::TruncatedHunk { line },
        ) => assert!((1..=lines).contains(line), "line {line} of {lines}"),
        Err(PatchError::NoFiles) => {}
    }
    if data.len() > LIMIT {
        assert!(matches!(result, Err(PatchError::TooLarge { .. })));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &[u8] = b"diff --git a/hello.go b/hello.go\nindex 1..2 100644\n--- a/hello.go\n+++ b/hello.go\n@@ -1,2 +1,2 @@\n package main\n-// old\n+// new\n";

    #[test]
    fn a_git_diff_passes_and_names_its_file() {
        let s = check(OK, 1 << 20).unwrap();
        assert_eq!(s.files, vec!["hello.go"]);
        assert_eq!(s.hunks, 1);
    }

    #[test]
    fn refusals_name_the_line() {
        let cut = &OK[..OK.len() - 9];
        assert_eq!(
            check(cut, 1 << 20),
            Err(PatchError::TruncatedHunk { line: 5 })
        );
        let evil = b"--- a/../x\n+++ b/../x\n@@ -0,0 +1 @@\n+x\n";
        assert_eq!(
            check(evil, 1 << 20).unwrap_err().to_string(),
            "patch line 1: path \"a/../x\" leaves the repository (\"..\")"
        );
        assert_eq!(check(b"hello\n", 1 << 20), Err(PatchError::NoFiles));
        assert!(matches!(check(OK, 10), Err(PatchError::TooLarge { .. })));
    }

    #[test]
    fn quoted_names_are_unquoted() {
        assert_eq!(
            unquote(br#""a/caf\303\251 \"x\"""#),
            "a/café \"x\"".as_bytes()
        );
        let p = b"diff --git \"a/.GIT/hooks\" \"b/.GIT/hooks\"\n";
        assert!(matches!(
            check(p, 1 << 20),
            Err(PatchError::BadPath { line: 1, .. })
        ));
    }
}
