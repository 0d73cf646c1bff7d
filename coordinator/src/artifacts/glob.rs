//! Path patterns of declared artifacts: `*` and `?` match within one `/`-separated
//! segment, `**` as a whole segment matches any number of segments (none included).
//! Pure; checked for shape by `buildfarm_config::pattern_problem` at config load.

/// Whether `path` (relative, `/`-separated, no trailing slash) matches `pattern`.
pub fn matches(pattern: &str, path: &str) -> bool {
    let pat: Vec<&str> = pattern.split('/').collect();
    let segs: Vec<&str> = path.split('/').collect();
    match_segments(&pat, &segs)
}

/// Whether `path` matches any of `patterns`.
pub fn matches_any(patterns: &[String], path: &str) -> bool {
    patterns.iter().any(|p| matches(p, path))
}

fn match_segments(pat: &[&str], segs: &[&str]) -> bool {
    match pat.split_first() {
        None => segs.is_empty(),
        Some((&"**", rest)) => (0..=segs.len()).any(|skip| match_segments(rest, &segs[skip..])),
        Some((p, rest)) => match segs.split_first() {
            Some((s, tail)) => {
                match_segment(p.as_bytes(), s.as_bytes()) && match_segments(rest, tail)
            }
            None => false,
        },
    }
}

/// `*` and `?` within one segment (byte-wise; `?` is one byte).
fn match_segment(p: &[u8], s: &[u8]) -> bool {
    // Iterative matcher with backtracking to the last star: linear in practice.
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// The fixed directory part of a pattern (its segments before the first with a
/// wildcard), where matching files can only live; `""` for the root.
pub fn fixed_prefix(pattern: &str) -> String {
    let segs: Vec<&str> = pattern.split('/').collect();
    let fixed: Vec<&str> = segs[..segs.len().saturating_sub(1)]
        .iter()
        .take_while(|s| !s.contains(['*', '?']))
        .copied()
        .collect();
    fixed.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments() {
        assert!(matches("bin/*", "bin/hello"));
        assert!(matches("bin/*", "bin/hello.exe"));
        assert!(!matches("bin/*", "bin/sub/hello"));
        assert!(!matches("bin/*", "hello"));
        assert!(matches("bin/hello?exe", "bin/hello.exe"));
        assert!(matches("*.exe", "a.exe"));
        assert!(!matches("*.exe", "a.exe.txt"));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(!matches("a*b*c", "aXXbYY"));
        assert!(matches("hello", "hello"));
        assert!(!matches("hello", "hello2"));
    }

    #[test]
    fn double_star() {
        assert!(matches("**/*.exe", "a.exe"));
        assert!(matches("**/*.exe", "x/y/a.exe"));
        assert!(matches("dist/**", "dist/a"));
        assert!(matches("dist/**", "dist/a/b"));
        assert!(!matches("dist/**", "other/a"));
        assert!(matches("a/**/z", "a/z"));
        assert!(matches("a/**/z", "a/b/c/z"));
        assert!(!matches("a/**/z", "a/b/c/y"));
    }

    #[test]
    fn prefixes() {
        assert_eq!(fixed_prefix("bin/*"), "bin");
        assert_eq!(fixed_prefix("dist/linux/*.tar.gz"), "dist/linux");
        assert_eq!(fixed_prefix("hello"), "");
        assert_eq!(fixed_prefix("**/x"), "");
        assert_eq!(fixed_prefix("a/*/b"), "a");
    }
}
