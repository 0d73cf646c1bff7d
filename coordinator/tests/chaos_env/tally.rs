//! The chaos suite's verdict, from plain data: which builds a scenario expected, what
//! the store and the API say happened to them, and the counts of the table. No I/O.

use std::collections::BTreeMap;

use serde::Serialize;

/// One build the stream should produce: a commit on a builder, and the marker its step
/// prints (`begin-<marker>` first, `done-<marker>` when it finished).
#[derive(Debug, Clone)]
pub struct Expected {
    pub rev: String,
    pub builder: String,
    pub marker: String,
}

/// One build row as observed at the end of a scenario.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub id: String,
    pub rev: String,
    pub builder: String,
    /// The store's state (`queued`, `running`, `ok`, `failed`, `infra-failure`, ...).
    pub state: String,
    pub attempts: u32,
    /// Attempts the store recorded as `ok` (a result stored twice would show two).
    pub ok_attempts: u32,
    /// The stored log (PostgreSQL, read directly); `None` when there is none.
    pub store_log: Option<String>,
    /// The state `/api/builds/{id}` reports.
    pub api_state: Option<String>,
    /// The log `/log/{id}` serves.
    pub api_log: Option<String>,
}

/// What happened to one scenario's builds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Expected builds.
    pub builds: usize,
    pub ok: usize,
    /// Final but not ok (a step failed, or infrastructure failed every attempt).
    pub failed: usize,
    /// Builds that needed more than one attempt.
    pub retried: usize,
    /// Expected builds with no row, no final state, or a final state whose log lacks
    /// its marker (in the store or through the API).
    pub lost: usize,
    /// Extra rows for one (commit, builder), more than one `ok` attempt, or a finished
    /// marker printed more than once in the kept log.
    pub duplicated: usize,
    /// Builds whose API state differs from the store's.
    pub mismatched: usize,
    /// A line per lost, duplicated or mismatched build, for the failure message.
    pub problems: Vec<String>,
}

pub fn is_final(state: &str) -> bool {
    matches!(state, "ok" | "failed" | "infra-failure" | "cancelled")
}

/// Counts `observed` against `expected` (rows of other commits are ignored).
pub fn tally(expected: &[Expected], observed: &[Observed]) -> Counts {
    let mut by_key: BTreeMap<(&str, &str), Vec<&Observed>> = BTreeMap::new();
    for o in observed {
        by_key
            .entry((o.rev.as_str(), o.builder.as_str()))
            .or_default()
            .push(o);
    }
    let mut c = Counts {
        builds: expected.len(),
        ..Counts::default()
    };
    for e in expected {
        let short = &e.rev[..e.rev.len().min(10)];
        let rows = by_key
            .get(&(e.rev.as_str(), e.builder.as_str()))
            .cloned()
            .unwrap_or_default();
        let Some(first) = rows.first() else {
            c.lost += 1;
            c.problems
                .push(format!("{short} on {}: never recorded", e.builder));
            continue;
        };
        if rows.len() > 1 {
            c.duplicated += 1;
            c.problems.push(format!(
                "{short} on {}: {} build rows",
                e.builder,
                rows.len()
            ));
        }
        let o = *first;
        if o.attempts > 1 {
            c.retried += 1;
        }
        if !is_final(&o.state) {
            c.lost += 1;
            c.problems.push(format!(
                "{short} on {} ({}): still {} at the end",
                e.builder, o.id, o.state
            ));
            continue;
        }
        if o.state == "ok" {
            c.ok += 1;
        } else {
            c.failed += 1;
        }
        if o.ok_attempts > 1 {
            c.duplicated += 1;
            c.problems.push(format!(
                "{short} on {} ({}): {} ok attempts",
                e.builder, o.id, o.ok_attempts
            ));
        }
        let begin = format!("begin-{}", e.marker);
        let done = format!("done-{}", e.marker);
        let mut log_lost = false;
        for (source, log) in [("store", &o.store_log), ("api", &o.api_log)] {
            let log = log.as_deref().unwrap_or("");
            // Every final build ran its step at least once, except one whose every
            // attempt failed before the step (then its log says why, not the marker).
            let ran = o.state != "infra-failure" || log.contains(&begin);
            if !ran {
                continue;
            }
            if !log.contains(&begin) || (o.state == "ok" && !log.contains(&done)) {
                log_lost = true;
                c.problems.push(format!(
                    "{short} on {} ({}, {}): the {source} log lacks its marker",
                    e.builder, o.id, o.state
                ));
            }
            if log.matches(&done).count() > 1 {
                c.duplicated += 1;
                c.problems.push(format!(
                    "{short} on {} ({}): the {source} log holds {done} {} times",
                    e.builder,
                    o.id,
                    log.matches(&done).count()
                ));
            }
        }
        if log_lost {
            c.lost += 1;
        }
        if o.api_state.as_deref() != Some(o.state.as_str()) {
            c.mismatched += 1;
            c.problems.push(format!(
                "{short} on {} ({}): store says {}, API says {:?}",
                e.builder, o.id, o.state, o.api_state
            ));
        }
    }
    c
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub scenario: String,
    #[serde(flatten)]
    pub counts: Counts,
    /// Seconds from the fault to the first sign the farm noticed it (see `detected_by`).
    pub detect_secs: Option<f64>,
    pub detected_by: String,
    /// Seconds from the fault until every build of the scenario was final.
    pub settle_secs: f64,
}

/// The table printed at the end of a run.
pub fn render(reports: &[ScenarioReport]) -> String {
    let mut out = format!(
        "{:<22} {:>6} {:>4} {:>6} {:>7} {:>4} {:>10} {:>9} {:>9}  {}\n",
        "scenario",
        "builds",
        "ok",
        "failed",
        "retried",
        "lost",
        "duplicated",
        "detect_s",
        "settle_s",
        "detected by"
    );
    for r in reports {
        let detect = r
            .detect_secs
            .map(|d| format!("{d:.1}"))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<22} {:>6} {:>4} {:>6} {:>7} {:>4} {:>10} {:>9} {:>9.1}  {}\n",
            r.scenario,
            r.counts.builds,
            r.counts.ok,
            r.counts.failed,
            r.counts.retried,
            r.counts.lost,
            r.counts.duplicated,
            detect,
            r.settle_secs,
            r.detected_by
        ));
    }
    out
}
