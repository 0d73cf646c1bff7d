//! The coordinator's scheduler: which queued work runs next on a free buildlet of a host
//! type, with priority interactive (gomote) > try > post-submit, FIFO within a class
//! (newest commit first for post-submit), aging so no class starves, and a cap on the
//! share of a host type that interactive work may hold.
//!
//! Pure data and functions: no I/O, no clock (callers pass `now`), no async runtime; a test
//! checks that this crate never depends on tokio.

mod item;
mod scheduler;

pub use item::{Timestamp, WorkClass, WorkId, WorkItem};
pub use scheduler::{HostUsage, Policy, PushError, QueueStat, Scheduler};
