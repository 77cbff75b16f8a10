//! Berth's embedded container engine.
//!
//! Architecture Invariant: this crate knows nothing of HTTP routes, SQL, HTML, services or host
//! names. The control plane talks to it through [`Engine`] (see docs/ARCHITECTURE.md); the
//! kernel work for each container happens in a shim process ([`shim`]).

pub mod build;
pub mod config;
pub mod container;
pub mod digest;
pub mod engine;
pub mod image;
pub mod layer;
pub mod logs;
pub mod network;
pub mod reference;
pub mod registry;
pub mod runtime;
pub mod shim;
pub mod store;

pub use config::Config;
pub use digest::Digest;
pub use engine::{Engine, Exec, ExecOptions, Mount, RunOptions, ShimCommand};
