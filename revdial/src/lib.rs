//! Reverse-dialled gRPC tunnels: a host behind NAT dials out once over TLS, proves who
//! it is, and then serves gRPC on that connection while the listener side becomes the
//! client. Also the bounded acceptor (`accept`) and the HTTP/2 settings and forward
//! channel (`h2`) every farm connection uses; TLS itself is `buildfarm_tls`.
//!
//! - [`handshake`]: the pure handshake (frames, validation, builder keys, proofs).
//! - [`Listener`] / [`serve`]: the coordinator's side; [`Registry`] lists the hosts.
//! - [`run_dialer`]: the host's side.
//! - [`DataStream`]: data connections, dialled back on the listener's request for bulk
//!   transfers that bypass HTTP/2 ([`TunnelChannel::open_data`],
//!   [`run_dialer_with_data`]).

pub mod accept;
mod auth;
mod backoff;
mod data;
mod dialer;
pub mod h2;
pub mod handshake;
mod link;
mod listener;
mod registry;
mod tunnel;
mod wire;

pub use auth::{Authenticator, HostToken};
pub use backoff::Backoff;
pub use data::{DataHandler, DataIo, DataStream};
pub use dialer::{
    Credential, DialerConfig, DialerError, parse_coordinator, run_dialer, run_dialer_with_data,
};
pub use handshake::{RefusalKind, builder_key};
pub use listener::{DialInError, Listener, ListenerConfig, ListenerMetrics, serve};
pub use registry::{ConnectedHost, HostEvent, HostId, HostInfo, Registry};
pub use tunnel::{TunnelChannel, TunnelService};
