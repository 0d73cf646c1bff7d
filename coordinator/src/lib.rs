//! The coordinator: schedules post-submit and try builds across pools of buildlets,
//! records results in the dashboard store, and serves the status page and the public
//! API. See ARCHITECTURE.md at the repository root for how a build flows through it.

pub mod access;
pub mod api;
pub mod app;
pub mod artifacts;
pub mod client;
pub mod dispatcher;
pub mod farm;
pub mod git;
pub mod http;
pub mod logs;
pub mod notifications;
pub mod plan;
pub mod poller;
pub mod pool;
pub mod reconcile;
pub mod retry;
pub mod runner;
pub mod server;
pub mod sources;
pub mod tokens;
pub mod try_patch;
pub mod webhook;
