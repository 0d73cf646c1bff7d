//! The buildlet: an agent that runs build steps for the coordinator. `server` serves
//! the gRPC service (listen or reverse mode), `client` is the typed async client the
//! coordinator and `gomote` use, `tarball` is the extraction policy.

pub mod auth;
pub mod bulk;
pub mod cgroup;
pub mod client;
pub mod contain;
pub mod exec;
pub mod fsops;
pub mod paths;
pub mod server;
pub mod shell;
pub mod tarball;
