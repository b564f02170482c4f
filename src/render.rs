//! Render: configuration for other tools, derived from the same config (nftables).
//!
//! In: a loaded config and its compiled policy. Out: text. Nothing is applied here.

use crate::reload::Loaded;

/// An nftables ruleset for the gateway host.
///
/// # Errors
/// When the config has no transparent listener to redirect to.
pub fn nftables(loaded: &Loaded) -> Result<String, String> {
    let _ = loaded;
    Err("not yet".into())
}
