//! How a sharded test step lists its units and runs one: the listing command run on a
//! buildlet, the parsing of its output, and the arguments appended to the step's command
//! for one unit, plus the pure choice of a named subset (`only_units`). One match arm per
//! [`Units`] kind: `go list ./...` for a module's packages, `go tool dist test -list` for
//! the Go toolchain's tests.

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
    #[error("unit {0:?} (in only_units) is not in the listing")]
    NotListed(String),
}

/// The command (program and arguments) that prints the units, run in the source tree.
pub fn list_command(kind: Units) -> Vec<String> {
    match kind {
        // -e: a package that does not build is still a unit (its test then fails).
        Units::GoPackages => ["go", "list", "-e", "./..."].map(String::from).to_vec(),
        // The `go` on the step's PATH: the toolchain under test, not the host's.
        Units::DistTest => ["go", "tool", "dist", "test", "-list"]
            .map(String::from)
            .to_vec(),
    }
}

/// The units in the listing's stdout, in the order printed.
pub fn parse(kind: Units, stdout: &[u8]) -> Result<Vec<String>, UnitsError> {
    let text = std::str::from_utf8(stdout).map_err(|_| UnitsError::NotUtf8)?;
    match kind {
        // Both print one name per line; a name never holds blanks or starts like a flag
        // (it is passed as an argument).
        Units::GoPackages | Units::DistTest => {
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
        // Go 1.19's dist runs exactly the named tests (and skips listing the packages
        // first); `-run` would need the name quoted as a regular expression.
        Units::DistTest => vec![unit.to_owned()],
    }
}

/// The units to run: all of `listed`, or those of `only` (an empty `only` means all), in
/// listing order. A name in `only` that `listed` lacks is an error.
pub fn select(listed: Vec<String>, only: &[String]) -> Result<Vec<String>, UnitsError> {
    if only.is_empty() {
        return Ok(listed);
    }
    if let Some(missing) = only.iter().find(|u| !listed.contains(u)) {
        return Err(UnitsError::NotListed(missing.clone()));
    }
    Ok(listed.into_iter().filter(|u| only.contains(u)).collect())
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
    fn dist_tests_are_listed_by_the_toolchain_under_test_and_run_by_name() {
        assert_eq!(
            list_command(Units::DistTest),
            ["go", "tool", "dist", "test", "-list"]
        );
        // The head of Go 1.19's `go tool dist test -list` on linux/amd64.
        let out = b"go_test:archive/tar\ngo_test:sort\nosusergo\nruntime:cpu124\nnolibgcc:net\ntest:0_5\napi\n";
        let names = parse(Units::DistTest, out).unwrap();
        assert_eq!(
            names,
            [
                "go_test:archive/tar",
                "go_test:sort",
                "osusergo",
                "runtime:cpu124",
                "nolibgcc:net",
                "test:0_5",
                "api"
            ]
        );
        assert_eq!(
            unit_args(Units::DistTest, "runtime:cpu124"),
            ["runtime:cpu124"]
        );
        assert!(matches!(
            parse(Units::DistTest, b"go_test:sort\n-k\n"),
            Err(UnitsError::BadName { line: 2, .. })
        ));
        assert_eq!(
            parse(Units::DistTest, b"api\napi\n"),
            Err(UnitsError::Duplicate("api".into()))
        );
    }

    #[test]
    fn a_named_subset_keeps_listing_order_and_must_be_listed() {
        let listed: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        assert_eq!(select(listed.clone(), &[]).unwrap(), listed);
        assert_eq!(
            select(listed.clone(), &["d".into(), "b".into()]).unwrap(),
            ["b", "d"]
        );
        assert_eq!(
            select(listed, &["b".into(), "zz".into()]),
            Err(UnitsError::NotListed("zz".into()))
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
