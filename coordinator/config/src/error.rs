//! Config errors: each names the file, line, column and field path, and all of a file's
//! errors are returned together so an operator fixes them in one pass.

use std::fmt;
use std::path::PathBuf;

use crate::names::BuilderNameError;

/// A field's place in the config, e.g. `builders[2].host_type`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldPath(pub(crate) Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Key(String),
    Index(usize),
}

impl FieldPath {
    pub(crate) fn root() -> Self {
        FieldPath(Vec::new())
    }

    pub(crate) fn key(&self, key: &str) -> Self {
        let mut v = self.0.clone();
        v.push(Segment::Key(key.to_owned()));
        FieldPath(v)
    }

    pub(crate) fn index(&self, i: usize) -> Self {
        let mut v = self.0.clone();
        v.push(Segment::Index(i));
        FieldPath(v)
    }

    /// Whether this is the document root (no field).
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Segment::Key(k) if i == 0 => write!(f, "{k}")?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A 1-based line and column (in characters) in the config text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Line, counting from 1.
    pub line: usize,
    /// Column in characters, counting from 1.
    pub column: usize,
}

impl Location {
    /// The location of byte `offset` in `text` (clamped to the text).
    pub fn of_offset(text: &str, offset: usize) -> Location {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

/// What is wrong; the variants carry the offending value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ErrorKind {
    /// Not valid TOML, or a value of the wrong type, a missing or unknown field.
    #[error("{0}")]
    Parse(String),
    /// A builder names a host type that no `[[host_types]]` entry defines.
    #[error("unknown host type \"{0}\"")]
    UnknownHostType(String),
    /// A builder names a repo that no `[[repos]]` entry defines.
    #[error("unknown repo \"{0}\"")]
    UnknownRepo(String),
    /// A builder lists a branch that none of its repos watches.
    #[error("branch \"{0}\" is not watched by any of the builder's repos")]
    BranchNotWatched(String),
    /// A builder name that is not `GOOS-GOARCH[-suffix]`.
    #[error("bad builder name \"{name}\": {reason}")]
    BadBuilderName {
        /// The name as written.
        name: String,
        /// Which part is wrong.
        reason: BuilderNameError,
    },
    /// A name used twice where names must be unique.
    #[error("duplicate {what} name \"{name}\" (first defined at {first})")]
    Duplicate {
        /// What kind of thing, e.g. `builder`.
        what: &'static str,
        /// The repeated name.
        name: String,
        /// Where the first definition is, e.g. `builders[0].name`.
        first: FieldPath,
    },
    /// A count or duration that must be positive is zero.
    #[error("must be at least 1")]
    Zero,
    /// A string or list that must not be empty is.
    #[error("must not be empty")]
    Empty,
    /// Any other bad value.
    #[error("{0}")]
    Invalid(String),
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// The file name (or other source name) the text came from.
    pub source_name: String,
    /// Where in the text; `None` for configs not read from text (e.g. the built-in one).
    pub location: Option<Location>,
    /// The field at fault; empty for syntax errors outside any field.
    pub path: FieldPath,
    /// What is wrong.
    pub kind: ErrorKind,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source_name)?;
        if let Some(loc) = self.location {
            write!(f, ":{}:{}", loc.line, loc.column)?;
        }
        if !self.path.is_root() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.kind)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in one config, in file order; never empty.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigErrors {
    /// The problems, ordered by location.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Why [`crate::Config::from_file`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file was read but is not a valid config.
    #[error("{0}")]
    Invalid(#[from] ConfigErrors),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_map_to_line_and_column() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(
            Location::of_offset(text, 0),
            Location { line: 1, column: 1 }
        );
        // "bé = " is 6 bytes but 5 characters.
        assert_eq!(
            Location::of_offset(text, 12),
            Location { line: 2, column: 6 }
        );
        assert_eq!(Location::of_offset(text, 999).line, 3);
    }

    #[test]
    fn paths_render_like_toml_access() {
        let p = FieldPath::root().key("builders").index(2).key("host_type");
        assert_eq!(p.to_string(), "builders[2].host_type");
    }
}
