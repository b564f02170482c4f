//! Azure Service Tags: the `ServiceTags_Public_*.json` download, by tag name.
//!
//! In: the JSON text Microsoft publishes (`{changeNumber, cloud, values: [{name,
//! properties: {addressPrefixes}}]}`), as the weekly download (numbers) or as
//! `az network list-service-tags` prints it (numbers as strings, more
//! fields). Out: tag name (case-insensitive: the
//! file spells `AzureFrontDoor.Frontend`, the docs `AzureFrontDoor.FrontEnd`)
//! → its prefixes, and what the file was ([`TagsFile`]: path, change number,
//! cloud, modification time) for `check`, the log and metrics. It also reads
//! the refresh timer's outcome ([`RefreshStatus`], `FILE.status`). Policy
//! only looks up; nothing here writes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// Valid JSON without a single tag: an empty answer is never the real list.
    #[error("{path}: no service tags in the file (an empty 'values' list)")]
    Empty {
        /// Path given.
        path: String,
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
    use serde::de::Error;
    let bad = |shown: String| D::Error::custom(format!("changeNumber {shown} is not a number"));
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Number(n) => n.as_u64().ok_or_else(|| bad(n.to_string())),
        serde_json::Value::String(t) => t.trim().parse().map_err(|_| bad(format!("'{t}'"))),
        other => Err(bad(other.to_string())),
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
    /// The path it was read from (the name given to [`ServiceTags::parse`]).
    pub path: PathBuf,
    /// The file's modification time when it was read: when the refresh
    /// timer (or a person) wrote it. `None` for parsed text.
    pub modified: Option<SystemTime>,
    tags: HashMap<String, (String, Vec<IpNet>)>,
}

/// What a loaded tags file was, kept by the policy for `check`, the startup
/// log and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagsFile {
    /// Path it was read from.
    pub path: PathBuf,
    /// Top-level `changeNumber`.
    pub change_number: u64,
    /// `Public`, `AzureGovernment`, ... (empty when the file has none).
    pub cloud: String,
    /// Number of tags.
    pub tags: usize,
    /// Modification time when read.
    pub modified: Option<SystemTime>,
}

impl TagsFile {
    /// How long before `now` the file was written; `None` when unknown (or
    /// written in the future).
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        now.duration_since(self.modified?).ok()
    }

    /// Where the refresh script records its last outcome: `FILE.status`.
    pub fn status_path(&self) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(".status");
        name.into()
    }
}

/// The refresh timer's last outcome, from the `FILE.status` the refresh
/// script (`deploy/refresh-service-tags.sh`) writes next to the tags file:
/// `key=value` lines, `result=success|failure`, `finished=UNIX_SECONDS`,
/// `message=TEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshStatus {
    /// The last run replaced the file and reloaded the gateway.
    pub ok: bool,
    /// When it ended (Unix seconds).
    pub finished: u64,
    /// What went wrong (or what it loaded).
    pub message: String,
}

impl RefreshStatus {
    /// Parses the status text; `None` when `result` or `finished` is missing or malformed.
    pub fn parse(text: &str) -> Option<RefreshStatus> {
        let (mut ok, mut finished, mut message) = (None, None, String::new());
        for line in text.lines() {
            match line.split_once('=') {
                Some(("result", "success")) => ok = Some(true),
                Some(("result", "failure")) => ok = Some(false),
                Some(("finished", t)) => finished = t.trim().parse().ok(),
                Some(("message", m)) => message = m.trim().to_string(),
                _ => {}
            }
        }
        Some(RefreshStatus {
            ok: ok?,
            finished: finished?,
            message,
        })
    }

    /// Reads `file`'s status file; `None` when there is none (no refresh
    /// timer) or it cannot be read or parsed.
    pub fn read(file: &TagsFile) -> Option<RefreshStatus> {
        RefreshStatus::parse(&std::fs::read_to_string(file.status_path()).ok()?)
    }

    /// When it ended.
    pub fn finished_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.finished)
    }
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
        if tags.is_empty() {
            return Err(ServiceTagsError::Empty {
                path: path.to_string(),
            });
        }
        Ok(ServiceTags {
            change_number: file.change_number,
            cloud: file.cloud,
            path: PathBuf::from(path),
            modified: None,
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
        let mut tags = ServiceTags::parse(&shown, &text)?;
        tags.path = path.to_path_buf();
        tags.modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        Ok(tags)
    }

    /// What this file is, for reports and metrics.
    pub fn file(&self) -> TagsFile {
        TagsFile {
            path: self.path.clone(),
            change_number: self.change_number,
            cloud: self.cloud.clone(),
            tags: self.tags.len(),
            modified: self.modified,
        }
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
        let err = ServiceTags::parse("e.json", r#"{"changeNumber": "3", "values": []}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("e.json: no service tags in the file"), "{err}");
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
    fn wrong_types_are_refused_with_their_place() {
        for (text, want) in [
            (r#"{"values": {}}"#, "expected a sequence"),
            (
                r#"{"values": [{"name": 7, "properties": {}}]}"#,
                "expected a string",
            ),
            (
                r#"{"values": [{"name": "A", "properties": {"addressPrefixes": "10.0.0.0/8"}}]}"#,
                "expected a sequence",
            ),
            (r#"{"changeNumber": -1, "values": []}"#, "changeNumber"),
            (r#"{"cloud": "Public"}"#, "missing field `values`"),
            ("", "EOF"),
        ] {
            let err = ServiceTags::parse("w.json", text).unwrap_err().to_string();
            assert!(
                err.starts_with("w.json:") && err.contains(want),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn a_loaded_file_says_what_it_is_and_where_its_status_lives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tags.json");
        std::fs::write(&path, SUBSET).unwrap();
        let week_ago = SystemTime::now() - Duration::from_secs(7 * 86_400 + 60);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(week_ago)
            .unwrap();
        let file = ServiceTags::load(&path).unwrap().file();
        assert_eq!((file.change_number, file.tags), (376, 85));
        assert_eq!(file.cloud, "Public");
        assert_eq!(file.path, path);
        let days = file.age(SystemTime::now()).unwrap().as_secs() / 86_400;
        assert_eq!(days, 7);
        assert_eq!(file.status_path(), dir.path().join("tags.json.status"));
        assert_eq!(RefreshStatus::read(&file), None, "no status file yet");
        std::fs::write(
            file.status_path(),
            "result=failure\nfinished=1700000000\nmessage=az network list-service-tags failed\n",
        )
        .unwrap();
        let status = RefreshStatus::read(&file).unwrap();
        assert!(!status.ok);
        assert_eq!(
            status.finished_at(),
            UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
        assert_eq!(status.message, "az network list-service-tags failed");
        assert!(
            RefreshStatus::parse("result=success\nfinished=12\n")
                .unwrap()
                .ok
        );
        for bad in [
            "",
            "result=success\n",
            "result=maybe\nfinished=1\n",
            "result=failure\nfinished=x\n",
        ] {
            assert_eq!(RefreshStatus::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn bad_json_is_located() {
        let err = ServiceTags::parse("x.json", "{\n \"values\": [1]}").unwrap_err();
        assert!(err.to_string().starts_with("x.json:2:"), "{err}");
    }
}
