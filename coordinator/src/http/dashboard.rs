//! The developer's dashboard `/dashboard`: a commit x builder grid of one repo and
//! branch, newest commit first, one page at a time, with the latest try runs and their
//! verdicts; and `/try/{id}`, one try run's per-builder table.
//!
//! The grid costs two queries whatever the history's size: a page of commits, then the
//! builds of those commits only.

use std::collections::HashMap;

use askama::Template;
use buildfarm_store::{Build, BuildState, Commit, TryRun, Verdict, try_verdict};
use serde::{Deserialize, Serialize};

use super::{AppState, PageError, fmt_ago, url_component};
use crate::farm::short;

/// Commits per page.
pub const PAGE_SIZE: u32 = 30;
/// Try runs listed under the grid.
pub const TRY_RUNS: u32 = 20;

#[derive(Debug, Deserialize, Default)]
pub struct DashQuery {
    pub repo: Option<String>,
    pub branch: Option<String>,
    pub page: Option<u32>,
}

/// What the dashboard shows, as read from the store.
pub struct DashInput {
    pub repo: String,
    pub branch: String,
    pub branches: Vec<(String, String)>,
    pub page: u32,
    pub total_commits: u64,
    pub commits: Vec<Commit>,
    pub builds: Vec<Build>,
    /// Builders configured for this repo and branch, in config order.
    pub builders: Vec<String>,
    pub try_runs: Vec<(TryRun, Vec<Build>)>,
}

#[derive(Debug, Serialize)]
pub struct Cell {
    /// ok, failed, running, infra, queued, cancelled, or none.
    pub class: &'static str,
    pub state: Option<&'static str>,
    pub build_id: Option<String>,
    /// The Go commit whose toolchain the build used: a subrepo build's pairing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub go_rev: Option<String>,
    #[serde(skip)]
    pub go_short: Option<String>,
    #[serde(skip)]
    pub label: &'static str,
    #[serde(skip)]
    pub title: String,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub hash: String,
    #[serde(skip)]
    pub short: String,
    pub author: String,
    /// The first line of the message.
    pub subject: String,
    pub commit_time: i64,
    #[serde(skip)]
    pub when: String,
    pub cells: Vec<Cell>,
}

#[derive(Debug, Serialize)]
pub struct BranchLink {
    pub repo: String,
    pub branch: String,
    #[serde(skip)]
    pub href: String,
    #[serde(skip)]
    pub current: bool,
}

#[derive(Debug, Serialize)]
pub struct TryRow {
    pub id: String,
    pub repo: String,
    pub rev: String,
    pub user: String,
    pub created_at: i64,
    #[serde(skip)]
    pub created: String,
    pub verdict: &'static str,
    pub ok: usize,
    pub failed: usize,
    pub total: usize,
    pub patched: bool,
}

#[derive(Debug, Serialize, Template)]
#[template(path = "dashboard.html")]
pub struct DashboardView {
    pub repo: String,
    pub branch: String,
    pub page: u32,
    pub pages: u32,
    pub total_commits: u64,
    pub branches: Vec<BranchLink>,
    pub builders: Vec<String>,
    pub rows: Vec<Row>,
    pub try_runs: Vec<TryRow>,
    #[serde(skip)]
    pub newer: Option<String>,
    #[serde(skip)]
    pub older: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TryBuildRow {
    pub builder: String,
    pub build_id: String,
    pub state: &'static str,
    #[serde(skip)]
    pub class: &'static str,
    pub attempts: u32,
    pub summary: Option<String>,
}

#[derive(Debug, Serialize, Template)]
#[template(path = "try.html")]
pub struct TryView {
    pub id: String,
    pub repo: String,
    pub rev: String,
    pub user: String,
    pub created_at: i64,
    #[serde(skip)]
    pub created: String,
    pub patched: bool,
    pub verdict: &'static str,
    pub builds: Vec<TryBuildRow>,
}

/// The CSS class and short label of a build state.
pub fn state_class(s: BuildState) -> (&'static str, &'static str) {
    match s {
        BuildState::Ok => ("ok", "ok"),
        BuildState::Failed => ("failed", "FAIL"),
        BuildState::Running => ("running", "…"),
        BuildState::InfraFailure => ("infra", "infra"),
        BuildState::Queued => ("queued", "·"),
        BuildState::Cancelled => ("cancelled", "×"),
    }
}

pub fn verdict_str(v: Verdict) -> &'static str {
    match v {
        Verdict::Pending => "pending",
        Verdict::Ok => "ok",
        Verdict::Failed => "failed",
    }
}

fn subject(message: &str) -> String {
    message.lines().next().unwrap_or("").to_owned()
}

pub fn dashboard_href(repo: &str, branch: &str, page: u32) -> String {
    let mut s = format!(
        "/dashboard?repo={}&branch={}",
        url_component(repo),
        url_component(branch)
    );
    if page > 0 {
        s.push_str(&format!("&page={page}"));
    }
    s
}

/// The grid and try list from what was read, as of `now_ms`.
pub fn dashboard_view(input: DashInput, now_ms: i64) -> DashboardView {
    let mut builders = input.builders;
    // Builders no longer configured still have results worth showing.
    let mut extra: Vec<String> = input
        .builds
        .iter()
        .map(|b| b.builder.clone())
        .filter(|b| !builders.contains(b))
        .collect();
    extra.sort();
    extra.dedup();
    builders.extend(extra);
    let col: HashMap<&str, usize> = builders
        .iter()
        .enumerate()
        .map(|(i, b)| (b.as_str(), i))
        .collect();
    let mut by_rev: HashMap<&str, Vec<Option<&Build>>> =
        HashMap::with_capacity(input.commits.len());
    for b in &input.builds {
        let Some(&i) = col.get(b.builder.as_str()) else {
            continue;
        };
        let cells = by_rev
            .entry(b.rev.as_str())
            .or_insert_with(|| vec![None; builders.len()]);
        cells[i] = Some(b);
    }
    let rows = input
        .commits
        .iter()
        .map(|c| {
            let found = by_rev.get(c.hash.as_str());
            let cells = (0..builders.len())
                .map(|i| match found.and_then(|v| v[i]) {
                    Some(b) => {
                        let (class, label) = state_class(b.state);
                        Cell {
                            class,
                            state: Some(b.state.as_str()),
                            build_id: Some(b.id.clone()),
                            go_rev: b.go_rev.clone(),
                            go_short: b.go_rev.as_deref().map(|g| short(g).to_owned()),
                            label,
                            title: {
                                let mut t = format!("{}: {}", builders[i], b.state);
                                if let Some(s) = &b.summary {
                                    t.push_str(&format!(" ({s})"));
                                }
                                if let Some(g) = &b.go_rev {
                                    t.push_str(&format!(", with Go {g}"));
                                }
                                t
                            },
                        }
                    }
                    None => Cell {
                        class: "none",
                        state: None,
                        build_id: None,
                        go_rev: None,
                        go_short: None,
                        label: "",
                        title: String::new(),
                    },
                })
                .collect();
            Row {
                hash: c.hash.clone(),
                short: short(&c.hash).to_owned(),
                author: c.author.clone(),
                subject: subject(&c.message),
                commit_time: c.commit_time,
                when: fmt_ago(now_ms, c.commit_time),
                cells,
            }
        })
        .collect();
    let pages = input.total_commits.div_ceil(PAGE_SIZE as u64).max(1) as u32;
    let branches = input
        .branches
        .into_iter()
        .map(|(repo, branch)| BranchLink {
            href: dashboard_href(&repo, &branch, 0),
            current: repo == input.repo && branch == input.branch,
            repo,
            branch,
        })
        .collect();
    let try_runs = input
        .try_runs
        .iter()
        .map(|(t, builds)| TryRow {
            id: t.id.clone(),
            repo: t.repo.clone(),
            rev: short(&t.rev).to_owned(),
            user: t.user.clone(),
            created_at: t.created_at,
            created: fmt_ago(now_ms, t.created_at),
            verdict: verdict_str(try_verdict(builds)),
            ok: builds.iter().filter(|b| b.state == BuildState::Ok).count(),
            failed: builds
                .iter()
                .filter(|b| b.state.is_final() && b.state != BuildState::Ok)
                .count(),
            total: builds.len(),
            patched: t.patch.is_some(),
        })
        .collect();
    DashboardView {
        newer: (input.page > 0).then(|| dashboard_href(&input.repo, &input.branch, input.page - 1)),
        older: (input.page + 1 < pages)
            .then(|| dashboard_href(&input.repo, &input.branch, input.page + 1)),
        repo: input.repo,
        branch: input.branch,
        page: input.page,
        pages,
        total_commits: input.total_commits,
        branches,
        builders,
        rows,
        try_runs,
    }
}

/// One try run's page data.
pub fn try_view(t: &TryRun, builds: &[Build], now_ms: i64) -> TryView {
    let mut rows: Vec<TryBuildRow> = builds
        .iter()
        .map(|b| TryBuildRow {
            builder: b.builder.clone(),
            build_id: b.id.clone(),
            state: b.state.as_str(),
            class: state_class(b.state).0,
            attempts: b.attempts,
            summary: b.summary.clone(),
        })
        .collect();
    rows.sort_by(|a, b| a.builder.cmp(&b.builder));
    TryView {
        id: t.id.clone(),
        repo: t.repo.clone(),
        rev: t.rev.clone(),
        user: t.user.clone(),
        created_at: t.created_at,
        created: fmt_ago(now_ms, t.created_at),
        patched: t.patch.is_some(),
        verdict: verdict_str(try_verdict(builds)),
        builds: rows,
    }
}

/// Reads a dashboard page from the store. `builders` lists the configured builders of
/// a (repo, branch); the farm passes its config's.
pub async fn gather(
    store: &dyn buildfarm_store::Store,
    q: &DashQuery,
    builders: impl Fn(&str, &str) -> Vec<String>,
) -> Result<DashInput, PageError> {
    let branches = store.list_branches().await.map_err(PageError::store)?;
    let (repo, branch) = match (&q.repo, &q.branch) {
        (Some(r), Some(b)) => (r.clone(), b.clone()),
        (Some(r), None) => branches
            .iter()
            .find(|(br, _)| br == r)
            .cloned()
            .unwrap_or_else(|| (r.clone(), "main".into())),
        _ => branches
            .first()
            .cloned()
            .unwrap_or_else(|| (String::new(), String::new())),
    };
    let page = q.page.unwrap_or(0);
    let offset = page
        .checked_mul(PAGE_SIZE)
        .ok_or_else(|| PageError::BadRequest(format!("page {page} is too large")))?;
    let total_commits = if repo.is_empty() {
        0
    } else {
        store
            .count_commits(&repo, &branch)
            .await
            .map_err(PageError::store)?
    };
    let commits = if repo.is_empty() {
        Vec::new()
    } else {
        store
            .list_commits(&repo, &branch, PAGE_SIZE, offset)
            .await
            .map_err(PageError::store)?
    };
    let hashes: Vec<String> = commits.iter().map(|c| c.hash.clone()).collect();
    let builds = if hashes.is_empty() {
        Vec::new()
    } else {
        store
            .builds_for_commits(&repo, &hashes)
            .await
            .map_err(PageError::store)?
    };
    let mut try_runs = Vec::new();
    for t in store
        .list_try_runs(TRY_RUNS)
        .await
        .map_err(PageError::store)?
    {
        let builds = store
            .builds_for_try(&t.id)
            .await
            .map_err(PageError::store)?;
        try_runs.push((t, builds));
    }
    Ok(DashInput {
        builders: builders(&repo, &branch),
        repo,
        branch,
        branches,
        page,
        total_commits,
        commits,
        builds,
        try_runs,
    })
}

pub fn config_builders(state: &AppState) -> impl Fn(&str, &str) -> Vec<String> + '_ {
    |repo, branch| {
        state
            .farm
            .config()
            .builders_for(repo, branch)
            .into_iter()
            .map(|b| b.name.clone())
            .collect()
    }
}
