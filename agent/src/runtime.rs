//! The container runtime: the OCI spec Berth generates, user resolution, the default seccomp
//! profile. The process that drives youki's libcontainer is the shim ([`crate::shim`]).

pub mod oci;
pub mod seccomp;
pub mod user;
