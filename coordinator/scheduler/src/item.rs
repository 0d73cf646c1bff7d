//! What the scheduler queues: work items, their priority class, and the caller-supplied
//! timestamps it orders them by (the scheduler never reads a clock).

use std::fmt;
use std::time::{Duration, SystemTime};

/// Milliseconds since the Unix epoch, as passed in by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The time `millis` milliseconds after the Unix epoch.
    pub const fn from_millis(millis: u64) -> Self {
        Timestamp(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// Converts a wall-clock time; times before the epoch become the epoch.
    pub fn from_system_time(t: SystemTime) -> Self {
        let millis = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        Timestamp(u64::try_from(millis).unwrap_or(u64::MAX))
    }

    /// How long after `earlier` this is; zero if `earlier` is later (clocks do step back).
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// This time plus `d`, saturating at the far future.
    pub fn saturating_add(self, d: Duration) -> Timestamp {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(ms))
    }
}

/// Identifies one queued item (a build attempt, a test shard, a gomote request).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkId(pub String);

impl WorkId {
    /// Wraps an id.
    pub fn new(id: impl Into<String>) -> Self {
        WorkId(id.into())
    }
}

impl fmt::Display for WorkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Priority class; earlier variants run first (`Interactive < Try < PostSubmit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorkClass {
    /// A developer waiting at a terminal for a gomote instance.
    Interactive,
    /// A pre-submit try run; a developer waits for the verdict.
    Try,
    /// A post-submit build of a landed commit; nobody waits on it directly.
    PostSubmit,
}

impl WorkClass {
    /// Every class, most urgent first.
    pub const ALL: [WorkClass; 3] = [
        WorkClass::Interactive,
        WorkClass::Try,
        WorkClass::PostSubmit,
    ];

    /// A stable lowercase name for status pages and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkClass::Interactive => "interactive",
            WorkClass::Try => "try",
            WorkClass::PostSubmit => "postsubmit",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for WorkClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One unit of work waiting for a buildlet of `host_type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkItem {
    /// Unique among queued items.
    pub id: WorkId,
    /// The host type whose buildlets can run it.
    pub host_type: String,
    /// Its priority class.
    pub class: WorkClass,
    /// When it was queued (kept across coordinator restarts, so waits stay honest).
    pub enqueued_at: Timestamp,
    /// When the commit being built was made; orders post-submit work newest first.
    /// `None` falls back to `enqueued_at`, as the Go farm does.
    pub commit_time: Option<Timestamp>,
}

impl WorkItem {
    /// The time post-submit ordering uses: the commit time, else the enqueue time.
    pub fn sort_time(&self) -> Timestamp {
        self.commit_time.unwrap_or(self.enqueued_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_between_timestamps_saturate() {
        let a = Timestamp::from_millis(1_000);
        let b = a.saturating_add(Duration::from_secs(2));
        assert_eq!(b.as_millis(), 3_000);
        assert_eq!(b.saturating_duration_since(a), Duration::from_secs(2));
        assert_eq!(a.saturating_duration_since(b), Duration::ZERO);
        let epoch = Timestamp::from_system_time(SystemTime::UNIX_EPOCH - Duration::from_secs(1));
        assert_eq!(epoch.as_millis(), 0);
    }

    #[test]
    fn classes_order_most_urgent_first() {
        assert!(WorkClass::Interactive < WorkClass::Try);
        assert!(WorkClass::Try < WorkClass::PostSubmit);
        assert_eq!(WorkClass::PostSubmit.to_string(), "postsubmit");
    }
}
