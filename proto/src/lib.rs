//! Switchyard's gRPC API (`switchyard.v1`), generated from
//! `proto/switchyard/v1/switchyard.proto` at build time.
//!
//! Only this crate holds generated types; the control plane converts them to
//! domain types at its gRPC edge.

/// Generated code for package `switchyard.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, reason = "generated code")]
    tonic::include_proto!("switchyard.v1");
}

/// Encoded `FileDescriptorSet` of the API, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/switchyard_descriptor.bin"));
