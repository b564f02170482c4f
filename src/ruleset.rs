//! Ruleset counters: the nftables forward chain's packet counters, for `/metrics`.
//!
//! In: the JSON that `nft -j list chain inet portcullis forward` prints,
//! dumped to a file every few seconds by the root-only
//! `portcullis-ruleset-counters` timer (the gateway itself has no
//! `CAP_NET_ADMIN` and cannot ask the kernel). Out: one total per counter
//! comment (`quic`, `dropped`, `rule NAME`, ...), with what its rule does to
//! the packets (`drop` or `accept`), and when the file was written; and,
//! for `/readyz` under `[admin] require_ruleset`, whether that file shows
//! the ruleset loaded and fresh. It only reads: a missing or unreadable file
//! means no series (and, for readiness, no ruleset).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Where the counters unit writes, unless `PORTCULLIS_RULESET_COUNTERS` says otherwise.
pub const COUNTERS_FILE: &str = "/run/portcullis/ruleset-counters.json";

/// One counter of the forward chain, summed over rules with the same comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    /// The rule's comment (`quic`, `dropped`, `rule tag-...`).
    pub name: String,
    /// `drop` or `accept`: what happens to the packets it counts (the
    /// chain's final counter counts what the `drop` policy drops).
    pub action: &'static str,
    /// Packets counted.
    pub packets: u64,
}

/// The counters in `json` (`nft -j list chain ...`).
///
/// # Errors
/// Not JSON.
pub fn parse(json: &str) -> Result<Vec<Counter>, serde_json::Error> {
    let doc: serde_json::Value = serde_json::from_str(json)?;
    let mut totals: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
    let items = doc["nftables"].as_array().map_or(&[][..], Vec::as_slice);
    for rule in items.iter().filter_map(|item| item.get("rule")) {
        let exprs = rule["expr"].as_array().map_or(&[][..], Vec::as_slice);
        let Some(packets) = exprs
            .iter()
            .find_map(|e| e.get("counter")?.get("packets")?.as_u64())
        else {
            continue;
        };
        let accepts = exprs.iter().any(|e| e.get("accept").is_some());
        let action = if accepts { "accept" } else { "drop" };
        let name = rule["comment"].as_str().unwrap_or("unnamed").to_string();
        *totals.entry((name, action)).or_default() += packets;
    }
    Ok(totals
        .into_iter()
        .map(|((name, action), packets)| Counter {
            name,
            action,
            packets,
        })
        .collect())
}

/// The counters file's counters and when it was written; `None` when it
/// is missing or unreadable.
pub fn read() -> Option<(Vec<Counter>, SystemTime)> {
    let path = path();
    let text = std::fs::read_to_string(&path).ok()?;
    let written = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
    Some((parse(&text).ok()?, written))
}

/// The counters file: `PORTCULLIS_RULESET_COUNTERS`, else [`COUNTERS_FILE`].
pub fn path() -> PathBuf {
    std::env::var_os("PORTCULLIS_RULESET_COUNTERS")
        .map_or_else(|| Path::new(COUNTERS_FILE).to_path_buf(), Into::into)
}

/// Counters older than this mean the ruleset is no longer known to be
/// loaded: four intervals of the 15 s timer (one late run is not an outage,
/// a stopped timer or a removed table is).
pub const MAX_AGE: Duration = Duration::from_secs(60);

/// Why the counters file does not show the ruleset loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// No readable file: the timer never ran, or the table was gone when it
    /// last looked (it removes the file then).
    NoFile,
    /// The file does not list `chain inet portcullis forward`.
    NoChain,
    /// The file was last written this long ago (over [`MAX_AGE`]).
    Stale(Duration),
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let file = path();
        match self {
            Missing::NoFile => write!(
                f,
                "ruleset missing: no {} (written by portcullis-ruleset-counters.timer while table inet portcullis is loaded)",
                file.display()
            ),
            Missing::NoChain => write!(
                f,
                "ruleset missing: {} does not list chain inet portcullis forward",
                file.display()
            ),
            Missing::Stale(age) => write!(
                f,
                "ruleset counters stale: {} was written {} s ago (limit {} s; is portcullis-ruleset-counters.timer running?)",
                file.display(),
                age.as_secs(),
                MAX_AGE.as_secs()
            ),
        }
    }
}

/// Whether the counters file shows the portcullis forward chain, written
/// at most [`MAX_AGE`] before `now`.
///
/// # Errors
/// What is missing.
pub fn loaded(now: SystemTime) -> Result<(), Missing> {
    let file = path();
    let text = std::fs::read_to_string(&file).map_err(|_| Missing::NoFile)?;
    let written = std::fs::metadata(&file)
        .and_then(|m| m.modified())
        .map_err(|_| Missing::NoFile)?;
    if !names_forward_chain(&text) {
        return Err(Missing::NoChain);
    }
    // A clock stepped back makes the file look new: fine, it was just written.
    let age = now.duration_since(written).unwrap_or_default();
    if age > MAX_AGE {
        return Err(Missing::Stale(age));
    }
    Ok(())
}

/// Whether `json` (`nft -j list chain ...`) lists `chain inet portcullis forward`.
fn names_forward_chain(json: &str) -> bool {
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(json) else {
        return false;
    };
    let items = doc["nftables"].as_array().map_or(&[][..], Vec::as_slice);
    items
        .iter()
        .filter_map(|item| item.get("chain"))
        .any(|c| c["family"] == "inet" && c["table"] == "portcullis" && c["name"] == "forward")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_forward_chain_dump_gives_one_total_per_counter() {
        // `nft -j list chain inet portcullis forward` of the azureml ruleset.
        let json = include_str!("../tests/data/nft/forward-chain.json");
        let counters = parse(json).unwrap();
        let names: Vec<(&str, &str)> = counters
            .iter()
            .map(|c| (c.name.as_str(), c.action))
            .collect();
        assert!(names.contains(&("quic", "drop")), "{names:?}");
        assert!(names.contains(&("dropped", "drop")), "{names:?}");
        assert!(
            names.contains(&("rule tag-azure-machine-learning-udp", "accept")),
            "{names:?}"
        );
        // The v4 and v6 rules of one inbound rule are one counter.
        let inbound = names
            .iter()
            .filter(|(n, _)| n.starts_with("inbound rule"))
            .count();
        assert_eq!(inbound, 1, "{names:?}");
        assert!(parse("not json").is_err());
        assert!(parse("{}").unwrap().is_empty());
    }

    #[test]
    fn only_a_dump_of_the_portcullis_forward_chain_shows_the_ruleset() {
        let json = include_str!("../tests/data/nft/forward-chain.json");
        assert!(names_forward_chain(json));
        // A chain with no rules (nothing counted yet) is still the chain.
        let empty = r#"{"nftables": [{"metainfo": {}}, {"chain": {"family": "inet",
            "table": "portcullis", "name": "forward", "hook": "forward"}}]}"#;
        assert!(names_forward_chain(empty));
        let other = empty.replace("\"portcullis\"", "\"filter\"");
        assert!(!names_forward_chain(&other));
        assert!(!names_forward_chain("{}"));
        assert!(!names_forward_chain("nft: No such file or directory"));
    }
}
