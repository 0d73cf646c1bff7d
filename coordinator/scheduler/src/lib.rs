//! The coordinator's scheduler: which queued work runs next on a free buildlet of a host
//! type, with priority interactive (gomote) > try > post-submit, FIFO within a class
//! (newest commit first for post-submit) and aging so no class starves.
//!
//! Pure data and functions: no I/O, no clock (callers pass `now`), no async runtime; a test
//! checks that this crate never depends on tokio.

mod item;
mod scheduler;

pub use item::{Timestamp, WorkClass, WorkId, WorkItem};
pub use scheduler::{Policy, PushError, QueueStat, Scheduler};
