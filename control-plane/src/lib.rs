//! Switchyard control plane: the one authoritative view of the cluster.
//!
//! - [`config`]: YAML (nomyo-router compatible) validated into typed config.
//! - [`endpoint`], [`model_name`]: endpoint kinds and model-name rules.
//! - [`ids`], [`outcome`], [`decision`]: the vocabulary of leases and choices.
//! - [`cluster`]: the published cluster state (`WatchUsage`, CLI, degraded mode).

pub mod api;
pub mod cluster;
pub mod config;
pub mod decision;
pub mod endpoint;
pub mod ids;
pub mod model_name;
pub mod outcome;
pub mod policy;
pub mod state;
pub mod control_plane;
pub mod discovery;
pub mod grpc;
pub mod metrics;
pub mod server;
pub mod telemetry;
pub mod cli;
