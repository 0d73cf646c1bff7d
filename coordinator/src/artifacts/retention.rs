//! The retention policy: which artifacts to forget, given every artifact (oldest
//! first), `now`, the longest age and the most bytes to keep. Pure; the sweep around
//! it (`Artifacts::sweep`) deletes the rows and then the contents nothing points at.

use std::collections::HashMap;
use std::time::Duration;

use buildfarm_store::Artifact;

/// The (build id, name) of each artifact to remove: every one older than `max_age`,
/// then the oldest of the rest until the distinct contents they hold fit in
/// `max_bytes` (a content shared by several artifacts counts once, and frees its bytes
/// only when its last artifact goes).
pub fn plan(
    oldest_first: &[Artifact],
    now_ms: i64,
    max_age: Duration,
    max_bytes: u64,
) -> Vec<(String, String)> {
    let max_age_ms = i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
    let cutoff = now_ms.saturating_sub(max_age_ms);
    let mut remove = Vec::new();
    let mut kept: Vec<&Artifact> = Vec::new();
    for a in oldest_first {
        if a.created_at < cutoff {
            remove.push((a.build_id.clone(), a.name.clone()));
        } else {
            kept.push(a);
        }
    }
    let mut refs: HashMap<&str, (u32, u64)> = HashMap::new();
    for a in &kept {
        let e = refs.entry(a.sha256.as_str()).or_insert((0, a.size));
        e.0 += 1;
    }
    let mut total: u64 = refs.values().map(|(_, size)| size).sum();
    for a in kept {
        if total <= max_bytes {
            break;
        }
        remove.push((a.build_id.clone(), a.name.clone()));
        if let Some(e) = refs.get_mut(a.sha256.as_str()) {
            e.0 -= 1;
            if e.0 == 0 {
                total = total.saturating_sub(e.1);
            }
        }
    }
    remove
}

#[cfg(test)]
mod tests {
    use super::*;

    fn art(build: &str, sha: char, size: u64, at: i64) -> Artifact {
        Artifact {
            build_id: build.into(),
            name: "f".into(),
            sha256: sha.to_string().repeat(64),
            size,
            created_at: at,
        }
    }

    fn builds(keys: &[(String, String)]) -> Vec<&str> {
        keys.iter().map(|(b, _)| b.as_str()).collect()
    }

    #[test]
    fn old_ones_go() {
        let all = [art("a", '1', 10, 1_000), art("b", '2', 10, 5_000)];
        let r = plan(&all, 10_000, Duration::from_secs(6), u64::MAX);
        assert_eq!(builds(&r), ["a"]);
        assert!(plan(&all, 10_000, Duration::from_secs(60), u64::MAX).is_empty());
    }

    #[test]
    fn oldest_go_until_the_rest_fits() {
        let all = [
            art("a", '1', 100, 1),
            art("b", '2', 100, 2),
            art("c", '3', 100, 3),
        ];
        let long = Duration::from_secs(3600);
        assert!(plan(&all, 10, long, 300).is_empty());
        assert_eq!(builds(&plan(&all, 10, long, 299)), ["a"]);
        assert_eq!(builds(&plan(&all, 10, long, 100)), ["a", "b"]);
        assert_eq!(builds(&plan(&all, 10, long, 0)), ["a", "b", "c"]);
    }

    #[test]
    fn shared_content_counts_once() {
        // Two builds made the same bytes: 100 bytes in all, not 200.
        let all = [
            art("a", '1', 100, 1),
            art("b", '1', 100, 2),
            art("c", '2', 50, 3),
        ];
        let long = Duration::from_secs(3600);
        assert!(plan(&all, 10, long, 150).is_empty());
        // Freeing the shared content takes removing both of its artifacts.
        assert_eq!(builds(&plan(&all, 10, long, 149)), ["a", "b"]);
    }
}
