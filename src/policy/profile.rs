//! Built-in profiles: rule sets compiled into the binary (today `azureml`).
//!
//! In: the embedded TOML (`azureml.toml`, transcribed from Microsoft's Azure ML
//! network document). Out: its scenarios and rules, parsed once with the same
//! rule model as a config file, so the profile is checked like user rules.

use std::sync::OnceLock;

use serde::Deserialize;

use crate::config::{RuleConfig, Source};

/// A named group of profile rules that can be switched on or off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name used in `[policy] scenarios`.
    pub name: String,
    /// What it covers.
    pub description: String,
    /// Enabled when `[policy] scenarios` is not given.
    #[serde(default)]
    pub default: bool,
    /// What the scenario assumes or where its rules come from, shown by
    /// `portcullis profile show`. Default: none.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// A parsed built-in profile.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Scenarios, in document order.
    #[serde(rename = "scenario")]
    pub scenarios: Vec<Scenario>,
    /// Rules, in document order.
    #[serde(rename = "rule")]
    pub rules: Vec<RuleConfig>,
    /// The text, for locations in messages.
    #[serde(skip_deserializing, default = "empty_source")]
    pub source: Source,
}

fn empty_source() -> Source {
    Source {
        name: String::new(),
        text: String::new(),
    }
}

const AZUREML: &str = include_str!("azureml.toml");

/// The Azure ML profile.
pub fn azureml() -> &'static Profile {
    static PROFILE: OnceLock<Profile> = OnceLock::new();
    PROFILE.get_or_init(|| {
        let mut p: Profile =
            toml::from_str(AZUREML).expect("embedded azureml profile parses (tested)");
        p.source = Source {
            name: "profile:azureml".into(),
            text: AZUREML.into(),
        };
        p
    })
}

/// A profile by name; `none` and unknown names give `None`.
pub fn by_name(name: &str) -> Option<&'static Profile> {
    match name {
        "azureml" => Some(azureml()),
        _ => None,
    }
}
