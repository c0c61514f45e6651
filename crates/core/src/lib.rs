//! keywarden-core: the pure domain of keywarden.
//!
//! Key format and hashing, the key model, the lifecycle state machine, scopes, and the
//! verify decision. Nothing here performs IO, spawns tasks or reads the clock: time is
//! always a parameter (see [`clock::Clock`] for the seam the server plugs a real clock into).

pub mod audit_chain;
pub mod base62;
pub mod clock;
pub mod duration;
pub mod gateway;
pub mod hashing;
pub mod key_format;
pub mod lifecycle;
pub mod model;
pub mod policy;
pub mod rate;
pub mod role;
pub mod scope;
pub mod usage_chain;
pub mod validate;
pub mod verify;
pub mod webhook;

pub use key_format::{KeyId, ParsedKey, PlainKey};
pub use model::{KeyRecord, KeyState};
pub use verify::VerifyCode;
