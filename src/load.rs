//! Load: config file + service tags file → compiled [`Policy`], used by every command.
//!
//! In: a config path (or none: the embedded profile), `--var` values, a
//! service tags path. Out: a [`Loaded`] (config, source text, policy,
//! warnings) or a typed [`LoadError`] carrying every error. It does no
//! logging and touches no running gateway: `reload` swaps what it returns.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError, Source};
use crate::policy::{CompileInput, Diagnostic, Policy, Severity};
use crate::servicetags::{ServiceTags, ServiceTagsError};

/// A loaded, compiled configuration.
pub struct Loaded {
    /// Parsed config.
    pub config: Config,
    /// Its text and name.
    pub source: Source,
    /// The compiled policy.
    pub policy: Policy,
    /// Warnings from compile.
    pub warnings: Vec<Diagnostic>,
    /// Service tags file path used, if any.
    pub service_tags_path: Option<PathBuf>,
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The config file could not be read or parsed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The service tags file could not be read or parsed.
    #[error(transparent)]
    ServiceTags(#[from] ServiceTagsError),
    /// Compile errors (every one, with file:line:col), plus warnings.
    #[error("{}", errors_text(.0))]
    Invalid(Vec<Diagnostic>),
}

/// The error diagnostics, one per line (warnings left out).
fn errors_text(diags: &[Diagnostic]) -> String {
    diags
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// What to load: the same inputs serve the first load and every reload.
#[derive(Debug, Clone, Default)]
pub struct LoadInput {
    /// Config file; None for the embedded profile.
    pub path: Option<PathBuf>,
    /// `--var` overrides.
    pub vars: Vec<(String, String)>,
    /// `--service-tags` override.
    pub service_tags: Option<PathBuf>,
}

impl LoadInput {
    /// Loads and compiles, stamping the policy with `generation`.
    ///
    /// # Errors
    /// [`LoadError`] with every compile error.
    pub fn load(&self, generation: u64) -> Result<Loaded, LoadError> {
        load(
            self.path.as_deref(),
            &self.vars,
            self.service_tags.as_deref(),
            generation,
        )
    }
}

/// Loads and compiles a config file (or the embedded default when `path` is None).
///
/// # Errors
/// [`LoadError`] with every compile error.
pub fn load(
    path: Option<&Path>,
    vars: &[(String, String)],
    service_tags: Option<&Path>,
    generation: u64,
) -> Result<Loaded, LoadError> {
    let (config, source) = match path {
        Some(p) => Config::load(p)?,
        None => (
            Config::default(),
            Source {
                name: "<embedded azureml profile>".into(),
                text: String::new(),
            },
        ),
    };
    let tags_path = service_tags
        .map(Path::to_path_buf)
        .or_else(|| tags_path_from_config(&config, path));
    let tags = tags_path.as_deref().map(ServiceTags::load).transpose()?;
    let input = CompileInput {
        var_overrides: vars,
        service_tags: tags.as_ref(),
        lenient_placeholders: path.is_none(),
        generation,
    };
    let (policy, warnings) =
        Policy::compile(&config, &source, &input).map_err(LoadError::Invalid)?;
    Ok(Loaded {
        config,
        source,
        policy,
        warnings,
        service_tags_path: tags_path,
    })
}

/// `[policy] service_tags`, relative to the config file's folder.
fn tags_path_from_config(config: &Config, config_path: Option<&Path>) -> Option<PathBuf> {
    let rel = PathBuf::from(config.policy.service_tags.as_ref()?.get_ref());
    Some(match config_path.and_then(Path::parent) {
        Some(dir) if rel.is_relative() => dir.join(rel),
        _ => rel,
    })
}
