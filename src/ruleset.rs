//! Ruleset counters: the nftables forward chain's packet counters, for `/metrics`.
//!
//! In: the JSON that `nft -j list chain inet portcullis forward` prints,
//! dumped to a file every few seconds by the root-only
//! `portcullis-ruleset-counters` timer (the gateway itself has no
//! `CAP_NET_ADMIN` and cannot ask the kernel). Out: one total per counter
//! comment (`quic`, `dropped`, `rule NAME`, ...), with what its rule does to
//! the packets (`drop` or `accept`), and when the file was written. It only
//! reads: a missing or unreadable file means no series.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

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
    let path = std::env::var_os("PORTCULLIS_RULESET_COUNTERS")
        .map_or_else(|| Path::new(COUNTERS_FILE).to_path_buf(), Into::into);
    let text = std::fs::read_to_string(&path).ok()?;
    let written = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
    Some((parse(&text).ok()?, written))
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
}
