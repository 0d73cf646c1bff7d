//! How a sharded test step lists its units and runs one: the listing command run on a
//! buildlet, the parsing of its output, and the arguments appended to the step's command
//! for one unit. One match arm per [`Units`] kind; `go tool dist test -list` (the Go
//! toolchain's tests) is added as another kind with its own three arms.

use buildfarm_config::Units;

/// Why a listing could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitsError {
    #[error("unit listing is not UTF-8")]
    NotUtf8,
    #[error("line {line} of the unit listing is not a unit name: {text:?}")]
    BadName { line: usize, text: String },
    #[error("unit {0:?} is listed twice")]
    Duplicate(String),
}

/// The command (program and arguments) that prints the units, run in the source tree.
pub fn list_command(kind: Units) -> Vec<String> {
    match kind {
        // -e: a package that does not build is still a unit (its test then fails).
        Units::GoPackages => ["go", "list", "-e", "./..."].map(String::from).to_vec(),
    }
}

/// The units in the listing's stdout, in the order printed.
pub fn parse(kind: Units, stdout: &[u8]) -> Result<Vec<String>, UnitsError> {
    let text = std::str::from_utf8(stdout).map_err(|_| UnitsError::NotUtf8)?;
    match kind {
        Units::GoPackages => {
            let mut out: Vec<String> = Vec::new();
            for (i, line) in text.lines().enumerate() {
                let name = line.trim();
                if name.is_empty() {
                    continue;
                }
                if name.chars().any(|c| c.is_whitespace() || c.is_control())
                    || name.starts_with('-')
                {
                    return Err(UnitsError::BadName {
                        line: i + 1,
                        text: line.to_owned(),
                    });
                }
                if out.iter().any(|u| u == name) {
                    return Err(UnitsError::Duplicate(name.to_owned()));
                }
                out.push(name.to_owned());
            }
            Ok(out)
        }
    }
}

/// What is appended to the step's command to run just `unit`.
pub fn unit_args(kind: Units, unit: &str) -> Vec<String> {
    match kind {
        Units::GoPackages => vec![unit.to_owned()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_packages_are_listed_and_run_one_by_one() {
        assert_eq!(
            list_command(Units::GoPackages),
            ["go", "list", "-e", "./..."]
        );
        let out = b"example.com/t\nexample.com/t/a\n\nexample.com/t/b\n";
        assert_eq!(
            parse(Units::GoPackages, out).unwrap(),
            ["example.com/t", "example.com/t/a", "example.com/t/b"]
        );
        assert_eq!(
            unit_args(Units::GoPackages, "example.com/t/a"),
            ["example.com/t/a"]
        );
    }

    #[test]
    fn bad_listings_are_refused_with_the_offending_line() {
        assert_eq!(
            parse(Units::GoPackages, b"a\nb c\n"),
            Err(UnitsError::BadName {
                line: 2,
                text: "b c".into()
            })
        );
        assert!(matches!(
            parse(Units::GoPackages, b"-run\n"),
            Err(UnitsError::BadName { line: 1, .. })
        ));
        assert_eq!(
            parse(Units::GoPackages, b"a\na\n"),
            Err(UnitsError::Duplicate("a".into()))
        );
        assert_eq!(parse(Units::GoPackages, b"\xff"), Err(UnitsError::NotUtf8));
        assert_eq!(parse(Units::GoPackages, b""), Ok(vec![]));
    }
}
