//! The reconciler's rule, without I/O: which of the store's unfinished builds fell
//! between the store and the dispatcher (neither queued nor active) and must be queued
//! again. A build is only taken as stranded when two passes in a row find it so: work
//! in the short window between its store row and its queue entry, or between its
//! result and leaving the active set, is never touched.

use std::collections::HashSet;

/// Remembers the builds suspected at the last pass.
#[derive(Debug, Default)]
pub struct Reconciler {
    suspects: HashSet<String>,
}

impl Reconciler {
    /// `unfinished`: ids of the store's queued and running builds; `known`: whether the
    /// dispatcher has one queued or active. Returns the ids to queue again.
    pub fn pass<'a>(
        &mut self,
        unfinished: impl IntoIterator<Item = &'a str>,
        known: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let mut stranded = Vec::new();
        let mut suspects = HashSet::new();
        for id in unfinished {
            if known(id) {
                continue;
            }
            if self.suspects.contains(id) {
                stranded.push(id.to_owned());
            } else {
                suspects.insert(id.to_owned());
            }
        }
        self.suspects = suspects;
        stranded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_unknown_in_two_passes_in_a_row_is_stranded() {
        let mut r = Reconciler::default();
        let known = |id: &str| id == "queued";
        assert!(r.pass(["queued", "lost", "late"], known).is_empty());
        // "late" got queued meanwhile; "lost" did not.
        let known = |id: &str| id == "queued" || id == "late";
        assert_eq!(r.pass(["queued", "lost", "late"], known), vec!["lost"]);
        // Once requeued it is known and no longer a suspect.
        let known = |_: &str| true;
        assert!(r.pass(["queued", "lost", "late"], known).is_empty());
    }

    #[test]
    fn a_build_that_finished_between_passes_is_forgotten() {
        let mut r = Reconciler::default();
        assert!(r.pass(["done-soon"], |_| false).is_empty());
        assert!(r.pass([], |_| false).is_empty());
        // It reappearing unknown starts over: one pass is not enough.
        assert!(r.pass(["done-soon"], |_| false).is_empty());
        assert_eq!(r.pass(["done-soon"], |_| false), vec!["done-soon"]);
    }
}
