//! Switchyard control plane: the one authoritative view of the cluster.
//!
//! - [`config`]: YAML (nomyo-router compatible) validated into typed config.
//! - [`endpoint`], [`model_name`]: endpoint kinds and model-name rules.
//! - [`ids`], [`outcome`], [`decision`]: the vocabulary of leases and choices.
//! - [`cluster`]: the published cluster state (`WatchUsage`, CLI, degraded mode).
//! - [`api`]: plain data in and out of the facade (probe reports, listings).
//! - [`control_plane`]: the facade every edge calls; [`state`] holds the
//!   lease table, sessions, health and affinity behind it; [`policy`] is the
//!   pure selection function.
//! - [`discovery`]: background probes of every endpoint.
//! - [`grpc`], [`server`]: the tonic services and the server (health,
//!   reflection); [`metrics`]: Prometheus text; [`telemetry`]: logging.
//! - [`cli`]: the `switchyard-control-plane` command line.

pub mod admin_file;
pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control_plane;
pub mod cores;
pub mod decision;
pub mod discovery;
pub mod endpoint;
pub mod grpc;
pub mod ids;
pub mod metrics;
pub mod model_name;
pub mod outcome;
pub mod policy;
pub mod server;
pub mod state;
pub mod telemetry;
