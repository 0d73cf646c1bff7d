//! Generated protobuf and gRPC types. This is the only crate with prost types: past a
//! gRPC handler, the rest of the workspace converts to its own types.

// Modules nest like the protobuf packages so cross-package references resolve.
mod generated {
    pub mod buildfarm {
        pub mod buildlet {
            pub mod v1 {
                tonic::include_proto!("buildfarm.buildlet.v1");
            }
        }
        pub mod coordinator {
            pub mod v1 {
                tonic::include_proto!("buildfarm.coordinator.v1");
            }
        }
        pub mod revdial {
            pub mod v1 {
                tonic::include_proto!("buildfarm.revdial.v1");
            }
        }
    }
}

/// The buildlet service.
pub use generated::buildfarm::buildlet::v1 as buildlet;
/// The coordinator's public API (gomote and try runs).
pub use generated::buildfarm::coordinator::v1 as coordinator;
/// The reverse-dial handshake frames.
pub use generated::buildfarm::revdial::v1 as revdial;

/// Default bound on one gRPC message, in bytes, for every service of the farm: the
/// coordinator's API (`[limits] max_message_bytes` overrides it), the buildlet service and
/// the clients of both. Bulk data (tarballs, files) travels as streams of smaller chunks.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;
