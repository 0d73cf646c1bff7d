//! Artifacts: files builds keep, stored once per content and served over HTTP.
//!
//! - `plan`: what an artifact request means (target, version, host type, the one build
//!   step and the files to keep); pure.
//! - `glob`: the path patterns of outputs; pure.
//! - `retention`: which artifacts to forget (age, total bytes); pure.
//! - `blobs`: the content-addressed files under `<data dir>/artifacts`.
//! - `collect`: copying a build's outputs from its buildlet into the blobs.
//!
//! [`Artifacts`] ties them to the store: the runner calls [`Artifacts::collect`] after a
//! build's steps pass, the farm runs [`Artifacts::sweep`] after builds that kept files and
//! every `artifacts.sweep_interval`. A sweep and a collection never overlap (a lock
//! between them), so a sweep never removes a content whose row is about to be written.

pub mod blobs;
pub mod collect;
pub mod glob;
pub mod plan;
pub mod retention;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use buildfarm_config::ArtifactsConfig;
use buildfarm_store::{NewArtifact, Store};
use buildlet::client::BuildletClient;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use blobs::BlobStore;
pub use collect::CollectError;
pub use plan::{ArtifactPlan, CollectSpec, RequestError, Target};

pub struct Artifacts {
    blobs: Arc<BlobStore>,
    store: Arc<dyn Store>,
    config: ArtifactsConfig,
    /// Collections hold it shared, a sweep exclusively.
    gate: tokio::sync::RwLock<()>,
}

/// What a sweep removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Swept {
    pub artifacts: u64,
    pub files: u64,
    pub bytes: u64,
}

impl Artifacts {
    pub fn new(data_dir: &std::path::Path, store: Arc<dyn Store>, config: ArtifactsConfig) -> Self {
        Artifacts {
            blobs: Arc::new(BlobStore::new(data_dir)),
            store,
            config,
            gate: tokio::sync::RwLock::new(()),
        }
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// Where the content with this digest is, if the store has it.
    pub fn content_path(&self, sha256: &str) -> Option<PathBuf> {
        self.blobs.path(sha256).ok().filter(|p| p.is_file())
    }

    /// Copies the files `spec` names from the buildlet into the blobs. The caller records
    /// them ([`Store::add_artifacts`]) before dropping the returned guard, so no sweep
    /// runs in between.
    pub async fn collect(
        &self,
        client: &BuildletClient,
        spec: &CollectSpec,
    ) -> Result<(Vec<NewArtifact>, tokio::sync::RwLockReadGuard<'_, ()>), CollectError> {
        let guard = self.gate.read().await;
        let files = collect::collect(
            client,
            spec,
            self.blobs.clone(),
            self.config.max_file_bytes.as_u64(),
        )
        .await?;
        Ok((files, guard))
    }

    /// Applies the retention policy at `now_ms`: forgets expired artifacts, then removes
    /// the contents no artifact points at any more.
    pub async fn sweep(&self, now_ms: i64) -> anyhow::Result<Swept> {
        let _exclusive = self.gate.write().await;
        let all = self
            .store
            .all_artifacts()
            .await
            .context("listing artifacts")?;
        let remove = retention::plan(
            &all,
            now_ms,
            self.config.max_age,
            self.config.max_bytes.as_u64(),
        );
        let artifacts = self
            .store
            .delete_artifacts(&remove)
            .await
            .context("deleting expired artifacts")?;
        let keep: HashSet<String> = self
            .store
            .all_artifacts()
            .await
            .context("listing artifacts")?
            .into_iter()
            .map(|a| a.sha256)
            .collect();
        let blobs = self.blobs.clone();
        let (files, bytes) = tokio::task::spawn_blocking(move || blobs.remove_unreferenced(&keep))
            .await
            .context("removing unreferenced artifact files")??;
        let swept = Swept {
            artifacts,
            files,
            bytes,
        };
        if swept != Swept::default() {
            info!(
                artifacts,
                files, bytes, "artifact retention removed old artifacts"
            );
        }
        Ok(swept)
    }

    /// Sweeps every `sweep_interval` until `shutdown`.
    pub async fn sweep_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.sweep(crate::farm::now_ms()).await {
                warn!(error = %format!("{e:#}"), "artifact retention sweep failed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.config.sweep_interval) => {}
            }
        }
    }
}
