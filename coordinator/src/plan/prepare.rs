//! What a plan step does to a buildlet around its command: push the source, restore the
//! snapshots it needs and its cache before; save its snapshot and cache after. A cache
//! miss is never an error and a corrupt cache is discarded (and logged); a snapshot that
//! cannot be saved or restored is an infrastructure failure of the step.

use std::sync::Arc;

use buildfarm_config::Step;
use buildlet::client::{ExecSpec, ListOptions};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::warn;

use super::workspace::{CacheEntry, Pin, ReadError, Workspaces};
use super::{Ctx, StepEnd, StepLog};
use crate::pool::Lease;
use crate::runner::{Outcome, SRC_DIR, open_source};

/// The cache a step restored (or missed), for saving it after the step.
pub(crate) struct CacheState {
    key: String,
    /// After a hit, the restored directories' fingerprint: the cache is saved again
    /// only if the step changed them. `None` after a miss (always saved).
    restored: Option<String>,
}

/// The environment of `step`'s commands: the builder's, then the step's own.
pub(crate) fn step_env(ctx: &Ctx<'_>, step: &Step) -> Vec<(String, String)> {
    ctx.env
        .base_env
        .iter()
        .cloned()
        .chain(step.env.iter().map(|(k, v)| (k.clone(), v.clone())))
        .collect()
}

fn from_outcome(o: Outcome) -> StepEnd {
    match o {
        Outcome::Done(_, why) => StepEnd::Failed(why),
        Outcome::Infra(why) => StepEnd::Infra(why),
        Outcome::Cancelled => StepEnd::Cancelled,
    }
}

/// Pushes the source, restores the snapshots of the steps `step` restores, then its
/// cache. Returns the cache state for [`save_cache`].
pub(crate) async fn prepare(
    ctx: &Ctx<'_>,
    step: usize,
    lease: &Lease,
    log: &mut StepLog,
) -> Result<Option<CacheState>, StepEnd> {
    let file = open_source(ctx.env, ctx.build)
        .await
        .map_err(from_outcome)?;
    lease
        .client
        .put_tar(SRC_DIR, file, None)
        .await
        .map_err(|e| StepEnd::Infra(format!("pushing source: {e}")))?;
    for &from in ctx.dag.restores(step) {
        let digest = ctx.snapshot_digest(from).ok_or_else(|| {
            StepEnd::Infra(format!("step {} left no snapshot", ctx.dag.name(from)))
        })?;
        let dir = ctx.steps()[from].snapshot.clone().unwrap_or_default();
        let (_pin, file) =
            ctx.ws.open(&digest).await.map_err(|e| {
                StepEnd::Infra(format!("snapshot of step {}: {e}", ctx.dag.name(from)))
            })?;
        lease
            .client
            .put_tar(&dir, file, None)
            .await
            .map_err(|e| StepEnd::Infra(format!("restoring snapshot into {dir}: {e}")))?;
        log.note(&format!(
            "restored snapshot sha256:{digest} of step {} into {dir}/",
            ctx.dag.name(from)
        ));
    }
    if let Some(t) = &ctx.steps()[step].toolchain {
        restore_toolchain(ctx, step, t, lease, log).await?;
    }
    if ctx.steps()[step].cache.is_none() {
        return Ok(None);
    }
    let key = cache_key(ctx, step, lease).await;
    let restored = if restore_cache(&ctx.ws, &key, lease, log).await {
        fingerprint(lease, &ctx.steps()[step]).await
    } else {
        None
    };
    Ok(Some(CacheState { key, restored }))
}

/// A digest of the names, kinds and contents of every file under the step's cache
/// paths on the buildlet; `None` if any cannot be listed (then the cache is saved).
async fn fingerprint(lease: &Lease, step: &Step) -> Option<String> {
    let mut h = Sha256::new();
    for path in step.cache.iter().flat_map(|c| &c.paths) {
        let mut entries = lease
            .client
            .list(ListOptions {
                dir: path.clone(),
                recursive: true,
                digest: true,
                skip: Vec::new(),
            })
            .await
            .ok()?;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        h.update(format!("{path}\0").as_bytes());
        for e in entries {
            let content = e
                .sha256
                .as_deref()
                .unwrap_or(if e.is_symlink { "link" } else { "-" });
            h.update(format!("{}\0{}\0{:o}\0", e.name, content, e.mode).as_bytes());
        }
    }
    Some(hex::encode(h.finalize()))
}

/// Restores the toolchain the build paired with (see `toolchain`) into the step's
/// `toolchain.dir`, else where its step saved it.
async fn restore_toolchain(
    ctx: &Ctx<'_>,
    step: usize,
    t: &buildfarm_config::ToolchainRef,
    lease: &Lease,
    log: &mut StepLog,
) -> Result<(), StepEnd> {
    let r = ctx
        .toolchain(step)
        .ok_or_else(|| StepEnd::Infra("the toolchain was not resolved".into()))?;
    let gone = || {
        StepEnd::Infra(format!(
            "the toolchain of {} at {} (step {} of {}) is no longer kept",
            r.go_repo, r.go_rev, t.step, t.builder
        ))
    };
    let entry = match ctx.ws.cache_get(&r.key).await {
        Ok(Some(e)) => e,
        Ok(None) => return Err(gone()),
        Err(e) => {
            return Err(StepEnd::Infra(format!(
                "reading the toolchain pointer: {e:#}"
            )));
        }
    };
    let Some((digest, saved_at)) = entry.into_iter().next() else {
        return Err(gone());
    };
    let dir = t.dir.clone().unwrap_or(saved_at);
    let (_pin, file) = match ctx.ws.open(&digest).await {
        Ok(f) => f,
        Err(ReadError::Missing(_)) => return Err(gone()),
        Err(e) => return Err(StepEnd::Infra(format!("toolchain snapshot: {e}"))),
    };
    lease
        .client
        .put_tar(&dir, file, None)
        .await
        .map_err(|e| StepEnd::Infra(format!("restoring the toolchain into {dir}: {e}")))?;
    log.note(&format!(
        "restored the toolchain of {} at {} (sha256:{digest}) into {dir}/",
        r.go_repo, r.go_rev
    ));
    Ok(())
}

/// The cache key: the builder, the step, each key file's SHA-256 (or "missing") and the
/// Go version the step's environment runs (or "none").
async fn cache_key(ctx: &Ctx<'_>, step: usize, lease: &Lease) -> String {
    let s = &ctx.steps()[step];
    let mut h = Sha256::new();
    h.update(b"buildfarm step cache v1\0");
    for part in [ctx.env.builder.name.as_str(), s.name.as_str()] {
        h.update(part.as_bytes());
        h.update(b"\0");
    }
    for f in s.cache.iter().flat_map(|c| &c.key_files) {
        let full = format!("{SRC_DIR}/{f}");
        let (dir, name) = full.rsplit_once('/').unwrap_or((SRC_DIR, f.as_str()));
        let digest = lease
            .client
            .list(ListOptions {
                dir: dir.to_owned(),
                recursive: false,
                digest: true,
                skip: Vec::new(),
            })
            .await
            .ok()
            .and_then(|entries| {
                entries
                    .into_iter()
                    .find(|e| e.name == name && !e.is_dir)
                    .and_then(|e| e.sha256)
            })
            .unwrap_or_else(|| "missing".to_owned());
        h.update(format!("{f}\0{digest}\0").as_bytes());
    }
    let mut spec = ExecSpec::new("go")
        .args(["env", "GOVERSION"])
        .dir(SRC_DIR)
        .timeout(std::time::Duration::from_secs(60));
    spec.env = step_env(ctx, s);
    let mut out = Vec::new();
    let version = match lease
        .client
        .exec_collect(spec, |stream, data| {
            if stream == buildlet::client::OutputStream::Stdout {
                out.extend_from_slice(data)
            }
        })
        .await
    {
        Ok(st) if st.success() => String::from_utf8_lossy(&out).trim().to_owned(),
        _ => "none".to_owned(),
    };
    h.update(format!("go\0{version}\0").as_bytes());
    hex::encode(h.finalize())
}

/// Restores cache `key` onto the buildlet; false on a miss or a corrupt cache (which is
/// discarded).
async fn restore_cache(ws: &Arc<Workspaces>, key: &str, lease: &Lease, log: &mut StepLog) -> bool {
    let short = &key[..12.min(key.len())];
    let entry = match ws.cache_get(key).await {
        Ok(Some(e)) => e,
        Ok(None) => {
            log.note(&format!("cache {short}: miss"));
            return false;
        }
        Err(e) => {
            warn!(key, error = %format!("{e:#}"), "discarding an unreadable cache");
            log.note(&format!("cache {short}: unreadable, discarded: {e:#}"));
            ws.cache_discard(key).await;
            return false;
        }
    };
    for (digest, path) in &entry {
        let problem = match ws.open(digest).await {
            Ok((_pin, file)) => match lease.client.put_tar(path, file, None).await {
                Ok(_) => None,
                // A tarball the buildlet refuses is a corrupt cache; a lost buildlet is
                // noticed by the step itself.
                Err(e) if e.is_unavailable() => return false,
                Err(e) => Some(e.to_string()),
            },
            Err(ReadError::Missing(_)) => Some("a saved directory was pruned".to_owned()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = problem {
            warn!(key, path, why, "discarding a corrupt cache");
            log.note(&format!("cache {short}: corrupt, discarded: {why}"));
            ws.cache_discard(key).await;
            return false;
        }
    }
    let paths: Vec<&str> = entry.iter().map(|(_, p)| p.as_str()).collect();
    log.note(&format!(
        "cache {short}: hit, restored {}",
        paths.join(", ")
    ));
    true
}

/// Downloads `dir` from the buildlet into the workspace store.
async fn download(ws: &Arc<Workspaces>, lease: &Lease, dir: &str) -> anyhow::Result<Pin> {
    use anyhow::Context;
    let (tmp, mut file) = ws.temp_file().await?;
    lease
        .client
        .get_tar(dir, &mut file, None)
        .await
        .with_context(|| format!("downloading {dir}"))?;
    file.flush().await.context("writing a download")?;
    drop(file);
    ws.adopt(tmp).await
}

/// Saves the step's snapshot directory; a failure is an infrastructure failure.
pub(crate) async fn save_snapshot(
    ctx: &Ctx<'_>,
    step: usize,
    lease: &Lease,
    log: &mut StepLog,
) -> Result<(), StepEnd> {
    let Some(dir) = &ctx.steps()[step].snapshot else {
        return Ok(());
    };
    let pin = download(&ctx.ws, lease, dir)
        .await
        .map_err(|e| StepEnd::Infra(format!("saving snapshot of {dir}: {e:#}")))?;
    log.note(&format!(
        "snapshot of {dir}/ saved: sha256:{} ({} bytes)",
        pin.digest, pin.size
    ));
    // Published at once: other builders' builds may pair with it while this one goes on.
    super::toolchain::publish(ctx.env, ctx.build, ctx.dag.name(step), &pin.digest, dir).await;
    ctx.keep_snapshot(step, pin);
    Ok(())
}

/// Saves the step's cache after a miss, or after a hit when the step changed what was
/// restored (the same key then holds the newer contents); a failure is logged and
/// otherwise ignored.
pub(crate) async fn save_cache(
    ctx: &Ctx<'_>,
    step: usize,
    state: Option<CacheState>,
    lease: &Lease,
    log: &mut StepLog,
) {
    let (Some(state), Some(cache)) = (state, &ctx.steps()[step].cache) else {
        return;
    };
    let short = &state.key[..12];
    if let Some(before) = &state.restored {
        if fingerprint(lease, &ctx.steps()[step]).await.as_ref() == Some(before) {
            log.note(&format!("cache {short}: unchanged, not saved again"));
            return;
        }
        log.note(&format!(
            "cache {short}: changed by the step, saving it again"
        ));
    }
    let mut entry: CacheEntry = Vec::new();
    for path in &cache.paths {
        match download(&ctx.ws, lease, path).await {
            Ok(pin) => entry.push((pin.digest.clone(), path.clone())),
            Err(e) => {
                log.note(&format!("cache {short}: not saved: {e:#}"));
                return;
            }
        }
    }
    match ctx.ws.cache_put(&state.key, &entry).await {
        Ok(()) => log.note(&format!("cache {short}: saved {}", cache.paths.join(", "))),
        Err(e) => {
            warn!(error = %format!("{e:#}"), "saving a cache");
            log.note(&format!("cache {short}: not saved: {e:#}"));
        }
    }
}
