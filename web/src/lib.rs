//! Berth's dashboard presentation: page structs and static assets.
//!
//! Architecture Invariant: this crate knows nothing of SQL or the engine; the server hands it plain
//! view models. The dashboard itself arrives with the dashboard issue; until then the crate only
//! fixes the workspace layout and the dependency direction (`server -> web`).
#![forbid(unsafe_code)]
