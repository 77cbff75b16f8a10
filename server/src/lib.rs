//! Berth's server and command line: configuration, the CLI over the embedded engine, and (as
//! they land) the control plane, proxy and dashboard.
//!
//! Architecture Invariant: this crate is the composition root, the only one that depends on
//! both `berth-agent` (the engine) and `berth-web` (the dashboard's presentation).
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod server;
