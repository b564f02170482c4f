//! Load: config file + service tags file → compiled [`Policy`], used by every command.
//!
//! In: a config path (or none: the embedded profile; the files its
//! `[policy] include` names are read with it), `--var` values, a service
//! tags path. Out: a [`Loaded`] (config, source text, policy,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, seed};

    /// A reload (a second `load` of the same input) rereads included files,
    /// and the config hash changes with them.
    #[test]
    fn a_reload_rereads_included_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = dir.path().join("portcullis.toml");
        std::fs::write(
            &cfg,
            "[policy]\nprofile = \"none\"\ninclude = [\"rules.d/*.toml\"]\n",
        )
        .expect("write");
        std::fs::create_dir(dir.path().join("rules.d")).expect("mkdir");
        let rule = |host: &str| format!("[[rule]]\nname = \"r\"\nhosts = [\"{host}\"]\n");
        let inc = dir.path().join("rules.d/a.toml");
        std::fs::write(&inc, rule("a.example")).expect("write");
        let input = LoadInput {
            path: Some(cfg),
            ..LoadInput::default()
        };
        let first = input.load(1).expect("loads");
        std::fs::write(&inc, rule("b.example")).expect("write");
        let second = input.load(2).expect("loads");
        let hosts = |l: &Loaded| l.policy.rules()[0].hosts.clone();
        assert_eq!(hosts(&first), vec!["a.example".to_string()]);
        assert_eq!(hosts(&second), vec!["b.example".to_string()]);
        assert_ne!(first.policy.config_sha256(), second.policy.config_sha256());
    }

    /// Fragments a hostile or careless edit might put anywhere.
    const FRAGMENTS: &[&str] = &[
        "\n[[rule]]\nname = \"x\"\nhosts = [\"*\"]\n",
        "\nports = [\"70000\"]\n",
        "\nports = [\"9-1\"]\n",
        "\ncidrs = [\"10.0.0.0/33\"]\n",
        "\nhosts = [\"a.*.com\", \"\", \"<nope>\"]\n",
        "\nsni = \"any\"\n",
        "\nopaque = \"yes\"\n",
        "\n[policy]\n",
        "\"\u{0}\u{7f}é\"",
        "= = =",
        "[[expect]]\ndest = \"::::\"\nverdict = \"allow\"\n",
        "\n[limits]\nmax_head_bytes = -1\n",
        "\n[vars]\nregion = \"<region>\"\n",
        "]]]]",
    ];

    /// Mutates `text`: byte flips, cuts, deleted and doubled lines, fragments.
    fn mutate(text: &str, rng: &mut Rng) -> String {
        let mut s = text.to_string();
        for _ in 0..1 + rng.below(4) {
            let at = s
                .char_indices()
                .nth(rng.below(s.chars().count()))
                .map_or(0, |(i, _)| i);
            match rng.below(5) {
                0 => s.truncate(at),
                1 => s.insert_str(at, FRAGMENTS[rng.below(FRAGMENTS.len())]),
                2 => {
                    let end = s[at..].find('\n').map_or(s.len(), |i| at + i);
                    s.replace_range(at..end, "");
                }
                3 => {
                    let end = s[at..].find('\n').map_or(s.len(), |i| at + i);
                    let line = s[at..end].to_string();
                    s.insert_str(at, &line);
                }
                _ => {
                    let c = char::from(32 + rng.below(95) as u8);
                    s.insert(at, c);
                }
            }
        }
        s
    }

    /// Any edit of the shipped configs loads or fails with located errors,
    /// never a panic. The seed comes from `PORTCULLIS_SEED` or the clock
    /// and is printed on failure.
    #[test]
    fn mutated_configs_fail_with_located_errors_never_a_panic() {
        let seed = seed();
        let mut rng = Rng(seed);
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let bases: Vec<String> = ["config/azureml.toml", "config/minimal.toml"]
            .iter()
            .map(|p| std::fs::read_to_string(root.join(p)).expect("shipped config"))
            .collect();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("mutated.toml");
        for case in 0..300 {
            let text = mutate(&bases[case % bases.len()], &mut rng);
            std::fs::write(&path, &text).expect("write");
            let loaded = std::panic::catch_unwind(|| load(Some(&path), &[], None, 1));
            let Ok(result) = loaded else {
                panic!("seed {seed}, case {case}: load panicked on:\n{text}");
            };
            let message = match result {
                Ok(_) => continue,
                Err(LoadError::Config(e)) => e.to_string(),
                Err(LoadError::Invalid(d)) => {
                    let errors: Vec<String> = d
                        .iter()
                        .filter(|d| d.severity == Severity::Error)
                        .map(ToString::to_string)
                        .collect();
                    assert!(
                        !errors.is_empty(),
                        "seed {seed}, case {case}: invalid, no error"
                    );
                    errors.join("\n")
                }
                Err(LoadError::ServiceTags(e)) => e.to_string(),
            };
            // Errors point at the config or at the profile rule they are about.
            let located = message.lines().all(|l| {
                l.starts_with(&format!("{}:", path.display())) || l.starts_with("profile:azureml:")
            });
            assert!(
                located,
                "seed {seed}, case {case}: error without file:line: {message}\n{text}"
            );
        }
    }
}
