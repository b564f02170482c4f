//! Azure Service Tags: the `ServiceTags_Public_*.json` download, by tag name.
//!
//! In: the JSON text Microsoft publishes (`{changeNumber, cloud, values: [{name,
//! properties: {addressPrefixes}}]}`), as the weekly download (numbers) or as
//! `az network list-service-tags` prints it (numbers as strings, more
//! fields). Out: tag name (case-insensitive: the
//! file spells `AzureFrontDoor.Frontend`, the docs `AzureFrontDoor.FrontEnd`)
//! → its prefixes. Reading the file is the caller's job; policy only looks up.

use std::collections::HashMap;
use std::path::Path;

use ipnet::IpNet;
use serde::Deserialize;

/// A service tags file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ServiceTagsError {
    /// Not readable.
    #[error("cannot read service tags file {path}: {source}")]
    Read {
        /// Path given.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// Not the published JSON shape.
    #[error("{path}:{line}:{column}: not an Azure Service Tags file: {message}")]
    Json {
        /// Path given.
        path: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column.
        column: usize,
        /// serde_json's message.
        message: String,
    },
    /// Two tags with the same name (compared case-insensitively).
    #[error("{path}: tag {tag} appears twice")]
    Duplicate {
        /// Path given.
        path: String,
        /// The tag.
        tag: String,
    },
    /// A prefix that is not a CIDR.
    #[error("{path}: tag {tag}: '{prefix}' is not a CIDR")]
    Prefix {
        /// Path given.
        path: String,
        /// Tag holding it.
        tag: String,
        /// The text.
        prefix: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct File {
    #[serde(default, deserialize_with = "number_or_string")]
    change_number: u64,
    #[serde(default)]
    cloud: String,
    values: Vec<Value>,
}

/// `123` (the weekly download) or `"123"` (`az network list-service-tags`).
fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Number(u64),
        Text(String),
    }
    match Either::deserialize(d)? {
        Either::Number(n) => Ok(n),
        Either::Text(t) => t
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("changeNumber '{t}' is not a number"))),
    }
}

#[derive(Deserialize)]
struct Value {
    name: String,
    properties: Properties,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Properties {
    #[serde(default)]
    address_prefixes: Vec<String>,
}

/// Parsed service tags.
#[derive(Debug, Clone, Default)]
pub struct ServiceTags {
    /// The file's top-level `changeNumber` (exported as a metric).
    pub change_number: u64,
    /// `Public`, `AzureGovernment`, ...
    pub cloud: String,
    tags: HashMap<String, (String, Vec<IpNet>)>,
}

impl ServiceTags {
    /// Parses the JSON text; `path` is only used in messages.
    ///
    /// # Errors
    /// [`ServiceTagsError::Json`] or [`ServiceTagsError::Prefix`].
    pub fn parse(path: &str, text: &str) -> Result<ServiceTags, ServiceTagsError> {
        let file: File = serde_json::from_str(text).map_err(|e| ServiceTagsError::Json {
            path: path.to_string(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        let mut tags = HashMap::with_capacity(file.values.len());
        for value in file.values {
            let mut nets = Vec::with_capacity(value.properties.address_prefixes.len());
            for prefix in &value.properties.address_prefixes {
                let net = prefix
                    .parse::<IpNet>()
                    .map_err(|_| ServiceTagsError::Prefix {
                        path: path.to_string(),
                        tag: value.name.clone(),
                        prefix: prefix.clone(),
                    })?;
                nets.push(net.trunc());
            }
            let key = value.name.to_ascii_lowercase();
            if tags.contains_key(&key) {
                return Err(ServiceTagsError::Duplicate {
                    path: path.to_string(),
                    tag: value.name,
                });
            }
            tags.insert(key, (value.name, nets));
        }
        Ok(ServiceTags {
            change_number: file.change_number,
            cloud: file.cloud,
            tags,
        })
    }

    /// Reads and parses a file.
    ///
    /// # Errors
    /// Any [`ServiceTagsError`].
    pub fn load(path: &Path) -> Result<ServiceTags, ServiceTagsError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ServiceTagsError::Read {
            path: shown.clone(),
            source,
        })?;
        ServiceTags::parse(&shown, &text)
    }

    /// The prefixes of a tag, looked up case-insensitively.
    pub fn get(&self, name: &str) -> Option<&[IpNet]> {
        self.tags
            .get(&name.to_ascii_lowercase())
            .map(|(_, nets)| nets.as_slice())
    }

    /// Number of tags.
    pub fn len(&self) -> usize {
        self.tags.len()
    }

    /// Whether no tags were loaded.
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// Up to three published tag names that start like `name`, for "did you mean".
    pub fn similar(&self, name: &str) -> Vec<&str> {
        let lower = name.to_ascii_lowercase();
        let stem = lower.split('.').next().unwrap_or(&lower);
        let mut out: Vec<&str> = self
            .tags
            .iter()
            .filter(|(k, _)| k.starts_with(stem))
            .map(|(_, (name, _))| name.as_str())
            .collect();
        out.sort_unstable();
        out.truncate(3);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBSET: &str = include_str!("../tests/data/servicetags-public-subset.json");

    #[test]
    fn real_subset_loads_with_published_counts() {
        let tags = ServiceTags::parse("subset.json", SUBSET).unwrap();
        assert_eq!(tags.change_number, 376);
        assert_eq!(tags.len(), 85);
        // servicetags-counts.tsv: AzureMachineLearning 255 v4 + 81 v6.
        let aml = tags.get("azuremachinelearning").unwrap();
        assert_eq!(
            aml.iter().filter(|n| matches!(n, IpNet::V4(_))).count(),
            255
        );
        assert_eq!(aml.len(), 336);
        assert!(
            tags.get("AzureFrontDoor.FrontEnd").is_some(),
            "case-insensitive"
        );
        assert!(tags.get("NoSuchTag").is_none());
    }

    /// The subset as `az network list-service-tags` prints it: change numbers
    /// as strings, and the extra fields the CLI adds.
    fn az_shaped(subset: &str) -> String {
        let mut doc: serde_json::Value = serde_json::from_str(subset).unwrap();
        let n = doc["changeNumber"].as_u64().unwrap();
        doc["changeNumber"] = serde_json::json!(n.to_string());
        doc["id"] = serde_json::json!(
            "/subscriptions/00000000-0000-0000-0000-000000000000/providers/Microsoft.Network/serviceTags/Public"
        );
        doc["name"] = serde_json::json!("Public");
        doc["type"] = serde_json::json!("Microsoft.Network/serviceTags");
        doc["nextLink"] = serde_json::Value::Null;
        for v in doc["values"].as_array_mut().unwrap() {
            v["serviceTagChangeNumber"] = serde_json::json!("1");
            let p = &mut v["properties"];
            p["changeNumber"] = serde_json::json!("7");
            p["state"] = serde_json::json!("GA");
            p["networkFeatures"] = serde_json::json!(["API", "NSG"]);
        }
        serde_json::to_string_pretty(&doc).unwrap()
    }

    #[test]
    fn the_az_cli_shape_loads_like_the_download() {
        let tags = ServiceTags::parse("az.json", &az_shaped(SUBSET)).unwrap();
        assert_eq!(tags.change_number, 376);
        assert_eq!(tags.len(), 85);
        assert_eq!(tags.get("AzureMachineLearning").unwrap().len(), 336);
    }

    #[test]
    fn malformed_files_are_refused_with_a_reason() {
        let dup = r#"{"values": [
            {"name": "A", "properties": {"addressPrefixes": ["10.0.0.0/8"]}},
            {"name": "a", "properties": {"addressPrefixes": []}}]}"#;
        let err = ServiceTags::parse("d.json", dup).unwrap_err().to_string();
        assert!(err.contains("tag a appears twice"), "{err}");
        let bad_number = r#"{"changeNumber": "12x", "values": []}"#;
        let err = ServiceTags::parse("n.json", bad_number)
            .unwrap_err()
            .to_string();
        assert!(err.contains("changeNumber '12x' is not a number"), "{err}");
        let truncated = &SUBSET[..SUBSET.len() / 2];
        assert!(
            ServiceTags::parse("t.json", truncated)
                .unwrap_err()
                .to_string()
                .starts_with("t.json:")
        );
        let prefix =
            r#"{"values": [{"name": "A", "properties": {"addressPrefixes": ["10.0.0.0/33"]}}]}"#;
        let err = ServiceTags::parse("p.json", prefix)
            .unwrap_err()
            .to_string();
        assert!(err.contains("'10.0.0.0/33' is not a CIDR"), "{err}");
    }

    #[test]
    fn bad_json_is_located() {
        let err = ServiceTags::parse("x.json", "{\n \"values\": [1]}").unwrap_err();
        assert!(err.to_string().starts_with("x.json:2:"), "{err}");
    }
}
