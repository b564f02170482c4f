//! Import: an Azure ML workspace's outbound-dependencies list (JSON) in,
//! `[[rule]]` blocks (TOML text) out.
//!
//! In: the body of the workspace's `outboundNetworkDependenciesEndpoints`
//! answer, in either shape seen: items wrapped in `properties`
//! (`value[].properties.{category, endpoints}`) or flat
//! (`value[].{category, endpoints}`). Out: one rule per category (split
//! where its endpoints differ in kind, protocol or ports, so no host gets a
//! port it was not listed with), every endpoint and port kept, ready for a
//! `[policy] include`. It does no I/O and never widens what the list says.

use std::fmt::Write as _;

use serde_json::Value;

use crate::policy::host::HostKey;

/// Why a dependencies file could not be turned into rules.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Not JSON.
    #[error("not JSON: {0}")]
    Json(String),
    /// JSON, but not of the API's shape; `path` is where (`value[3].endpoints[0].domainName`).
    #[error("{path}: {message}")]
    Shape {
        /// Where in the document.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// The generated rules, and what a person should know about them.
#[derive(Debug)]
pub struct Imported {
    /// TOML text: a comment header and the `[[rule]]` blocks.
    pub text: String,
    /// Rules written.
    pub rules: usize,
    /// Distinct endpoint:port pairs written.
    pub endpoints: usize,
    /// Entries left out or assumed, each a sentence naming the entry.
    pub notes: Vec<String>,
}

/// What an endpoint names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A host name (exact or `*.suffix`).
    Host,
    /// An address, range or service tag.
    Address,
}

/// One rule to write: a category's endpoints that share kind, protocol and ports.
#[derive(Debug)]
struct Group {
    category: String,
    kind: Kind,
    protocol: &'static str,
    ports: Vec<(u16, u16)>,
    hosts: Vec<String>,
    cidrs: Vec<String>,
    tags: Vec<String>,
}

/// One endpoint as read: what it names and its ports by protocol.
struct Endpoint {
    name: String,
    kind: Kind,
    tag: bool,
    ports: Vec<(&'static str, (u16, u16))>,
}

/// Turns the API's JSON into rule blocks; `origin` (the file name) goes into
/// each rule's description.
///
/// # Errors
/// [`ImportError`] naming the first entry that does not fit.
pub fn aml_dependencies(json: &str, origin: &str) -> Result<Imported, ImportError> {
    let doc: Value = serde_json::from_str(json).map_err(|e| ImportError::Json(e.to_string()))?;
    let items = match &doc {
        Value::Array(items) => items,
        Value::Object(o) => match o.get("value") {
            Some(Value::Array(items)) => items,
            _ => return Err(shape("", "expected an object with a 'value' array")),
        },
        _ => return Err(shape("", "expected an object with a 'value' array")),
    };
    let mut groups: Vec<Group> = Vec::new();
    let mut notes = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("value[{i}]");
        let body = item.get("properties").unwrap_or(item);
        let category = match body.get("category") {
            Some(Value::String(c)) if !c.trim().is_empty() => c.trim().to_string(),
            None | Some(Value::Null) => "uncategorised".to_string(),
            _ => return Err(shape(&format!("{path}.category"), "expected a string")),
        };
        let Some(Value::Array(endpoints)) = body.get("endpoints") else {
            return Err(shape(&path, "expected an 'endpoints' array"));
        };
        for (j, e) in endpoints.iter().enumerate() {
            let epath = format!("{path}.endpoints[{j}]");
            let endpoint = endpoint(e, &epath, &mut notes)?;
            add(&mut groups, &category, endpoint, &epath, &mut notes);
        }
    }
    if groups.is_empty() {
        return Err(shape("value", "lists no endpoint"));
    }
    let endpoints = groups
        .iter()
        .map(|g| (g.hosts.len() + g.cidrs.len() + g.tags.len()) * g.ports.len())
        .sum();
    Ok(Imported {
        text: render(&groups, origin),
        rules: groups.len(),
        endpoints,
        notes,
    })
}

fn shape(path: &str, message: &str) -> ImportError {
    ImportError::Shape {
        path: if path.is_empty() { "(top)" } else { path }.to_string(),
        message: message.to_string(),
    }
}

/// Reads one endpoint: `domainName` and `endpointDetails[].{port, protocol}`.
fn endpoint(e: &Value, path: &str, notes: &mut Vec<String>) -> Result<Endpoint, ImportError> {
    let Some(Value::String(raw)) = e.get("domainName") else {
        return Err(shape(path, "expected a 'domainName' string"));
    };
    let raw = raw.trim();
    let (name, kind, tag) = classify(raw).map_err(|m| shape(&format!("{path}.domainName"), &m))?;
    let details = match e.get("endpointDetails") {
        Some(Value::Array(d)) => d.as_slice(),
        None | Some(Value::Null) => &[],
        _ => {
            return Err(shape(
                &format!("{path}.endpointDetails"),
                "expected an array",
            ));
        }
    };
    let mut ports = Vec::new();
    for (k, d) in details.iter().enumerate() {
        let dpath = format!("{path}.endpointDetails[{k}]");
        ports.push((protocol(d, &dpath)?, port(d, &dpath)?));
    }
    if ports.is_empty() {
        notes.push(format!("{path}: '{raw}' lists no port; 443 assumed"));
        ports.push(("tcp", (443, 443)));
    }
    Ok(Endpoint {
        name,
        kind,
        tag,
        ports,
    })
}

/// A host name (lowercased, validated), an address or range, or a service
/// tag (`AzureMachineLearning`, `Storage.WestUS2`: letters and digits
/// starting with a capital, at most one dot, each part capitalised).
fn classify(raw: &str) -> Result<(String, Kind, bool), String> {
    if raw.parse::<ipnet::IpNet>().is_ok() || raw.parse::<std::net::IpAddr>().is_ok() {
        return Ok((raw.to_string(), Kind::Address, false));
    }
    let tag_part = |p: &str| {
        p.chars().next().is_some_and(|c| c.is_ascii_uppercase())
            && p.chars().all(|c| c.is_ascii_alphanumeric())
    };
    let parts: Vec<&str> = raw.split('.').collect();
    if parts.len() <= 2 && parts.iter().all(|p| tag_part(p)) {
        return Ok((raw.to_string(), Kind::Address, true));
    }
    let lower = raw.to_ascii_lowercase();
    HostKey::parse(&lower)
        .map_err(|e| format!("'{raw}' is not a host name, address or service tag: {e}"))?;
    Ok((lower, Kind::Host, false))
}

fn protocol(d: &Value, path: &str) -> Result<&'static str, ImportError> {
    match d.get("protocol") {
        None | Some(Value::Null) => Ok("tcp"),
        Some(Value::String(p)) => match p.to_ascii_lowercase().as_str() {
            "tcp" => Ok("tcp"),
            "udp" => Ok("udp"),
            "*" | "any" | "all" => Ok("any"),
            _ => Err(shape(&format!("{path}.protocol"), "expected TCP, UDP or *")),
        },
        Some(_) => Err(shape(&format!("{path}.protocol"), "expected a string")),
    }
}

/// A port number, or a `"lo-hi"` range as a string.
fn port(d: &Value, path: &str) -> Result<(u16, u16), ImportError> {
    let bad = || {
        shape(
            &format!("{path}.port"),
            "expected a port 1-65535 or \"lo-hi\"",
        )
    };
    let one = |n: u64| u16::try_from(n).ok().filter(|&p| p != 0);
    match d.get("port") {
        Some(Value::Number(n)) => n.as_u64().and_then(one).map(|p| (p, p)).ok_or_else(bad),
        Some(Value::String(s)) => {
            let s = s.trim();
            let (lo, hi) = s.split_once('-').unwrap_or((s, s));
            let lo = lo.trim().parse().ok().and_then(one).ok_or_else(bad)?;
            let hi = hi.trim().parse().ok().and_then(one).ok_or_else(bad)?;
            if lo <= hi { Ok((lo, hi)) } else { Err(bad()) }
        }
        _ => Err(bad()),
    }
}

/// Adds an endpoint to the group of its category, kind, protocol and ports.
/// A name on UDP is left out (a note says so): UDP carries no name to decide by.
fn add(groups: &mut Vec<Group>, category: &str, e: Endpoint, path: &str, notes: &mut Vec<String>) {
    let mut by_proto: Vec<(&'static str, Vec<(u16, u16)>)> = Vec::new();
    for (proto, range) in e.ports {
        let proto = match (e.kind, proto) {
            (Kind::Host, "udp") => {
                let (lo, hi) = range;
                notes.push(format!(
                    "{path}: '{}' on UDP {lo}-{hi} left out: UDP carries no name (allow its addresses instead)",
                    e.name
                ));
                continue;
            }
            // A name is decided on TCP only; its UDP half cannot be.
            (Kind::Host, "any") => "tcp",
            (_, p) => p,
        };
        match by_proto.iter_mut().find(|(p, _)| *p == proto) {
            Some((_, ports)) => ports.push(range),
            None => by_proto.push((proto, vec![range])),
        }
    }
    for (protocol, mut ports) in by_proto {
        ports.sort_unstable();
        ports.dedup();
        let found = groups.iter_mut().find(|g| {
            g.category == category && g.kind == e.kind && g.protocol == protocol && g.ports == ports
        });
        let group = match found {
            Some(g) => g,
            None => {
                groups.push(Group {
                    category: category.to_string(),
                    kind: e.kind,
                    protocol,
                    ports,
                    hosts: Vec::new(),
                    cidrs: Vec::new(),
                    tags: Vec::new(),
                });
                groups.last_mut().expect("just pushed")
            }
        };
        let list = match (e.kind, e.tag) {
            (Kind::Host, _) => &mut group.hosts,
            (Kind::Address, true) => &mut group.tags,
            (Kind::Address, false) => &mut group.cidrs,
        };
        if !list.contains(&e.name) {
            list.push(e.name.clone());
        }
    }
}

/// `aml-dep-` and the category in lowercase letters, digits and dashes.
fn slug(category: &str) -> String {
    let mut s = String::new();
    for c in category.chars() {
        if c.is_ascii_alphanumeric() {
            s.push(c.to_ascii_lowercase());
        } else if !s.ends_with('-') && !s.is_empty() {
            s.push('-');
        }
    }
    let s = s.trim_end_matches('-');
    let s: String = s.chars().take(48).collect();
    let s = s.trim_end_matches('-');
    format!("aml-dep-{}", if s.is_empty() { "uncategorised" } else { s })
}

/// Unique rule names: the category's slug, with what sets a group apart
/// when the category has more than one.
fn names(groups: &[Group]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for g in groups {
        let base = slug(&g.category);
        let split = groups.iter().filter(|o| o.category == g.category).count() > 1;
        let mut name = base.clone();
        if split {
            if g.kind == Kind::Address {
                name.push_str("-addresses");
            }
            if g.protocol != "tcp" {
                name.push('-');
                name.push_str(g.protocol);
            }
            name.push_str("-port");
            for (lo, hi) in &g.ports {
                let _ = if lo == hi {
                    write!(name, "-{lo}")
                } else {
                    write!(name, "-{lo}to{hi}")
                };
            }
        }
        let mut unique = name.clone();
        let mut n = 2;
        while out.contains(&unique) {
            unique = format!("{name}-{n}");
            n += 1;
        }
        out.push(unique);
    }
    out
}

/// A TOML basic string.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quoted(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// The rule blocks, with a header saying where they came from.
fn render(groups: &[Group], origin: &str) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# Generated by `portcullis import aml-dependencies` from {origin}:\n\
         # the workspace's outbound-dependencies list, one rule per category\n\
         # (split where its endpoints differ in ports or protocol). Include it\n\
         # with `[policy] include = [\"rules.d/*.toml\"]`; regenerate, don't edit."
    );
    for (g, name) in groups.iter().zip(names(groups)) {
        let _ = writeln!(t, "\n[[rule]]\nname = {}", quoted(&name));
        let description = format!(
            "Azure ML workspace outbound dependencies, category \"{}\" (from {origin}).",
            g.category
        );
        let _ = writeln!(t, "description = {}", quoted(&description));
        if !g.hosts.is_empty() {
            let _ = writeln!(t, "hosts = {}", list(&g.hosts));
        }
        if !g.cidrs.is_empty() {
            let _ = writeln!(t, "cidrs = {}", list(&g.cidrs));
        }
        if !g.tags.is_empty() {
            let _ = writeln!(t, "service_tags = {}", list(&g.tags));
        }
        let ports: Vec<String> = (g.ports.iter())
            .map(|&(lo, hi)| {
                if lo == hi {
                    lo.to_string()
                } else {
                    quoted(&format!("{lo}-{hi}"))
                }
            })
            .collect();
        let _ = writeln!(t, "ports = [{}]", ports.join(", "));
        if g.protocol != "tcp" {
            let _ = writeln!(t, "protocol = {}", quoted(g.protocol));
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shapes_give_the_same_rules() {
        let wrapped = r#"{"value": [{"properties": {"category": "Azure portal",
            "endpoints": [{"domainName": "management.azure.com", "endpointDetails": [{"port": 443}]}]}}]}"#;
        let flat = r#"{"value": [{"category": "Azure portal",
            "endpoints": [{"domainName": "management.azure.com", "endpointDetails": [{"port": 443}]}]}]}"#;
        let a = aml_dependencies(wrapped, "f.json").unwrap();
        let b = aml_dependencies(flat, "f.json").unwrap();
        assert_eq!(a.text, b.text);
        assert!(
            a.text.contains("name = \"aml-dep-azure-portal\"\n"),
            "{}",
            a.text
        );
        assert!(
            a.text
                .contains("hosts = [\"management.azure.com\"]\nports = [443]\n")
        );
        assert_eq!((a.rules, a.endpoints), (1, 1));
    }

    #[test]
    fn a_category_splits_by_ports_and_kind_and_repeats_merge() {
        let json = r#"{"value": [
          {"category": "Mixed", "endpoints": [
            {"domainName": "A.example.com", "endpointDetails": [{"port": 443}]},
            {"domainName": "b.example.com", "endpointDetails": [{"port": 80}, {"port": 443}]},
            {"domainName": "AzureMachineLearning", "endpointDetails": [{"port": 5831, "protocol": "UDP"}]},
            {"domainName": "Storage.WestUS2", "endpointDetails": [{"port": "445"}]},
            {"domainName": "20.1.0.0/16", "endpointDetails": [{"port": 445}]},
            {"domainName": "c.example.com", "endpointDetails": [{"port": 123, "protocol": "UDP"}]}]},
          {"category": "Mixed", "endpoints": [
            {"domainName": "d.example.com", "endpointDetails": [{"port": 443}]}]}]}"#;
        let out = aml_dependencies(json, "f.json").unwrap();
        let t = &out.text;
        assert!(t.contains("name = \"aml-dep-mixed-port-443\"\n"), "{t}");
        assert!(
            t.contains("hosts = [\"a.example.com\", \"d.example.com\"]\nports = [443]\n"),
            "{t}"
        );
        assert!(t.contains("name = \"aml-dep-mixed-port-80-443\"\n"), "{t}");
        assert!(
            t.contains("name = \"aml-dep-mixed-addresses-udp-port-5831\"\n"),
            "{t}"
        );
        assert!(
            t.contains(
                "service_tags = [\"AzureMachineLearning\"]\nports = [5831]\nprotocol = \"udp\"\n"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "cidrs = [\"20.1.0.0/16\"]\nservice_tags = [\"Storage.WestUS2\"]\nports = [445]\n"
            ),
            "{t}"
        );
        assert!(!t.contains("c.example.com"), "{t}");
        assert_eq!(out.notes.len(), 1, "{:?}", out.notes);
        assert!(out.notes[0].contains("c.example.com"), "{:?}", out.notes);
    }

    #[test]
    fn bad_entries_are_named() {
        let err = |json: &str| aml_dependencies(json, "f.json").unwrap_err().to_string();
        assert!(err("{").starts_with("not JSON"));
        assert_eq!(
            err("{\"values\": []}"),
            "(top): expected an object with a 'value' array"
        );
        assert_eq!(err("{\"value\": []}"), "value: lists no endpoint");
        let bad_host = r#"{"value": [{"category": "x", "endpoints": [{"domainName": "a b.com", "endpointDetails": [{"port": 443}]}]}]}"#;
        assert!(
            err(bad_host)
                .starts_with("value[0].endpoints[0].domainName: 'a b.com' is not a host name"),
            "{}",
            err(bad_host)
        );
        let bad_port = r#"{"value": [{"category": "x", "endpoints": [{"domainName": "a.com", "endpointDetails": [{"port": 70000}]}]}]}"#;
        assert_eq!(
            err(bad_port),
            "value[0].endpoints[0].endpointDetails[0].port: expected a port 1-65535 or \"lo-hi\""
        );
    }

    #[test]
    fn names_are_lowercase_words_and_descriptions_are_escaped() {
        assert_eq!(
            slug("Compute cluster/instance"),
            "aml-dep-compute-cluster-instance"
        );
        assert_eq!(slug("  ** "), "aml-dep-uncategorised");
        assert_eq!(slug("Microsoft Entra ID"), "aml-dep-microsoft-entra-id");
        let json = r#"{"value": [{"category": "say \"hi\"\\", "endpoints": [{"domainName": "a.com", "endpointDetails": [{"port": 443}]}]}]}"#;
        let out = aml_dependencies(json, "f.json").unwrap();
        let parsed: toml::Table = out.text.parse().expect("valid TOML");
        let rule = &parsed["rule"][0];
        assert_eq!(rule["name"].as_str(), Some("aml-dep-say-hi"));
        let description = rule["description"].as_str().unwrap();
        assert!(
            description.contains(r#"category "say "hi"\" (from"#),
            "{description}"
        );
    }
}
