//! Reverse-dialled gRPC tunnels: a host behind NAT dials out once over TLS, proves who
//! it is, and then serves gRPC on that connection while the listener side becomes the
//! client. Also home to the TLS helpers (`tls`) every binary of the farm uses.

pub mod tls;
