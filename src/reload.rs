//! Reload: config file → `Policy`, and swapping it into a running gateway on SIGHUP.
//!
//! In: a config path (or none: the embedded profile), `--var` values, a
//! service tags path. Out: a compiled policy and its warnings, or every error.
//! Reloads run one at a time (a single task awaits SIGHUPs), parse and compile
//! on a blocking thread, keep the old policy on any error, and never touch
//! listeners: a changed listen address needs a restart and is only warned about.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{Config, Source};
use crate::listen::Gateway;
use crate::policy::{CompileInput, Diagnostic, Policy, Severity};
use crate::servicetags::ServiceTags;

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

/// Why a config could not be loaded: an I/O or parse error, or compile diagnostics.
#[derive(Debug)]
pub enum LoadError {
    /// Could not read or parse.
    Other(anyhow::Error),
    /// Compile errors (with warnings).
    Invalid(Vec<Diagnostic>),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Other(e) => write!(f, "{e:#}"),
            LoadError::Invalid(diags) => {
                let errors: Vec<String> = diags
                    .iter()
                    .filter(|d| d.severity == Severity::Error)
                    .map(ToString::to_string)
                    .collect();
                write!(f, "{}", errors.join("\n"))
            }
        }
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
        Some(p) => Config::load(p).map_err(|e| LoadError::Other(e.into()))?,
        None => (
            Config::default(),
            Source {
                name: "<embedded azureml profile>".into(),
                text: String::new(),
            },
        ),
    };
    let tags_path = service_tags.map(Path::to_path_buf).or_else(|| {
        config.policy.service_tags.as_ref().map(|p| {
            let rel = PathBuf::from(p.get_ref());
            match path.and_then(Path::parent) {
                Some(dir) if rel.is_relative() => dir.join(rel),
                _ => rel,
            }
        })
    });
    let tags = match &tags_path {
        Some(p) => Some(ServiceTags::load(p).map_err(|e| LoadError::Other(e.into()))?),
        None => None,
    };
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

/// What a reload needs to redo the first load.
#[derive(Clone)]
pub struct Reloader {
    /// Config file; None for the embedded profile.
    pub path: Option<PathBuf>,
    /// `--var` overrides.
    pub vars: Vec<(String, String)>,
    /// `--service-tags` override.
    pub service_tags: Option<PathBuf>,
    /// The listen section the process was started with.
    pub listen: (
        Option<std::net::SocketAddr>,
        Option<std::net::SocketAddr>,
        Option<std::net::SocketAddr>,
    ),
}

impl Reloader {
    /// Loads, compiles and swaps. On error the running policy stays.
    ///
    /// # Errors
    /// The load error, already counted in metrics.
    pub async fn reload(&self, gw: &Arc<Gateway>) -> Result<(), String> {
        let generation = gw.policy.load().generation() + 1;
        let me = self.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            load(
                me.path.as_deref(),
                &me.vars,
                me.service_tags.as_deref(),
                generation,
            )
        })
        .await
        .map_err(|e| format!("reload task failed: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
        let loaded = match loaded {
            Ok(l) => l,
            Err(err) => {
                gw.metrics.reloads.with_label_values(&["failure"]).inc();
                gw.metrics.last_reload_successful.set(0);
                tracing::error!(error = %err, "config reload failed; keeping the running policy");
                return Err(err);
            }
        };
        let l = &loaded.config.listen;
        if (l.proxy, l.transparent, l.admin) != self.listen {
            tracing::warn!(
                "listen addresses changed in the config: restart portcullis to apply them"
            );
        }
        let old = gw.policy.load_full();
        let names =
            |p: &Policy| -> BTreeSet<String> { p.rules().iter().map(|r| r.name.clone()).collect() };
        let (before, after) = (names(&old), names(&loaded.policy));
        let added: Vec<&String> = after.difference(&before).collect();
        let removed: Vec<&String> = before.difference(&after).collect();
        gw.policy.store(Arc::new(loaded.policy.clone()));
        gw.metrics.reloads.with_label_values(&["success"]).inc();
        gw.metrics.policy_loaded(&loaded.policy);
        tracing::info!(
            generation,
            added = ?added,
            removed = ?removed,
            warnings = loaded.warnings.len(),
            "config reloaded"
        );
        Ok(())
    }
}
