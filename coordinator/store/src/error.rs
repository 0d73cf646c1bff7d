//! `StoreError`: every way a store operation can fail, with the operation and id it concerns.

use crate::model::BuildState;

/// The boxed cause of a database or I/O failure; boxed so sqlx types stay out of our API.
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names no backend we have.
    #[error(
        "unsupported store url {url:?}: expected sqlite://PATH, sqlite:PATH, postgres://... or postgresql://..."
    )]
    UnsupportedUrl { url: String },

    /// Connecting to (or creating) the database failed. The url has its password removed.
    #[error("cannot open {backend} store at {url}")]
    Open {
        backend: &'static str,
        url: String,
        #[source]
        source: Source,
    },

    /// Applying the schema migrations at open failed.
    #[error("cannot migrate {backend} store schema")]
    Migrate {
        backend: &'static str,
        #[source]
        source: Source,
    },

    /// The row an operation needs does not exist.
    #[error("{entity} {id} not found")]
    NotFound { entity: &'static str, id: String },

    /// The build (or attempt) already has its final result; nothing was changed.
    #[error("{entity} {id} already finished ({state})")]
    AlreadyFinished {
        entity: &'static str,
        id: String,
        state: BuildState,
    },

    /// The caller passed something the store refuses to record.
    #[error("invalid argument to {operation}: {reason}")]
    InvalidArgument {
        operation: &'static str,
        reason: String,
    },

    /// The database failed (unreachable, constraint, I/O...).
    #[error("store {operation} failed{}", fmt_id(.id))]
    Database {
        operation: &'static str,
        id: Option<String>,
        #[source]
        source: Source,
    },

    /// A stored value is not one we could have written (e.g. an unknown state string).
    #[error("corrupt store data in {operation}{}: {reason}", fmt_id(.id))]
    Corrupt {
        operation: &'static str,
        id: Option<String>,
        reason: String,
    },

    /// Compressing or decompressing a build log failed.
    #[error("cannot {action} log of build {id}")]
    Log {
        action: &'static str,
        id: String,
        #[source]
        source: std::io::Error,
    },
}

fn fmt_id(id: &Option<String>) -> String {
    match id {
        Some(id) => format!(" for {id}"),
        None => String::new(),
    }
}

impl StoreError {
    pub(crate) fn db(operation: &'static str, id: Option<&str>, source: sqlx::Error) -> Self {
        StoreError::Database {
            operation,
            id: id.map(str::to_owned),
            source: Box::new(source),
        }
    }

    /// True when the store could not be reached at all, as opposed to refusing the request.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Open { .. } => true,
            StoreError::Database { source, .. } => matches!(
                source.downcast_ref::<sqlx::Error>(),
                Some(
                    sqlx::Error::Io(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::WorkerCrashed
                )
            ),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_context() {
        let e = StoreError::db("get_build", Some("b1"), sqlx::Error::PoolClosed);
        assert_eq!(e.to_string(), "store get_build failed for b1");
        assert!(e.is_unavailable());
        let e = StoreError::db("list_branches", None, sqlx::Error::RowNotFound);
        assert_eq!(e.to_string(), "store list_branches failed");
        assert!(!e.is_unavailable());
        let e = StoreError::AlreadyFinished {
            entity: "build",
            id: "b2".into(),
            state: BuildState::Ok,
        };
        assert_eq!(e.to_string(), "build b2 already finished (ok)");
    }
}
