//! Reload: swapping a freshly loaded policy into a running gateway on SIGHUP.
//!
//! In: the [`LoadInput`] the process started with and the running
//! [`Gateway`]. Out: the new policy swapped in whole (connections that
//! already took a snapshot keep theirs), counted and logged once, here; or
//! the old policy kept, the failure counted and logged once, here. Reloads
//! run one at a time (one task awaits SIGHUPs), load on a blocking thread, and
//! never touch listeners: a changed listen address needs a restart and is
//! only warned about.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::gateway::Gateway;
use crate::load::{LoadError, LoadInput};
use crate::metrics::ReloadResult;
use crate::policy::{Policy, diff};

/// Why a reload kept the running policy.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The config, tags file or compile failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The blocking load task panicked or was cancelled (a bug).
    #[error("reload task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The listen addresses a config names: `(proxy, transparent, admin)`.
pub type ListenAddrs = (Option<SocketAddr>, Option<SocketAddr>, Option<SocketAddr>);

/// What a reload needs to redo the first load.
#[derive(Clone)]
pub struct Reloader {
    /// The inputs of the first load.
    pub input: LoadInput,
    /// The listen section the process was started with.
    pub listen: ListenAddrs,
}

impl Reloader {
    /// Loads, compiles and swaps. On error the running policy stays. Either
    /// way the outcome is counted and logged here; callers need not log it.
    ///
    /// # Errors
    /// Why the running policy was kept.
    pub async fn reload(&self, gw: &Arc<Gateway>) -> Result<(), ReloadError> {
        let generation = gw.policy.load().generation() + 1;
        let input = self.input.clone();
        let loaded = tokio::task::spawn_blocking(move || input.load(generation))
            .await
            .map_err(ReloadError::from)
            .and_then(|r| r.map_err(ReloadError::from));
        let loaded = match loaded {
            Ok(l) => l,
            Err(err) => {
                gw.metrics
                    .reloads
                    .with_label_values(&[ReloadResult::Failure.as_str()])
                    .inc();
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
        gw.require_ruleset
            .store(loaded.config.admin.require_ruleset(), Ordering::Release);
        let old = gw.policy.load_full();
        let changes = diff::rule_changes(&old, &loaded.policy);
        gw.policy.store(Arc::new(loaded.policy.clone()));
        gw.metrics
            .reloads
            .with_label_values(&[ReloadResult::Success.as_str()])
            .inc();
        gw.metrics.policy_loaded(&loaded.policy);
        let tags = |p: &Policy| {
            p.service_tags_change()
                .map_or("none".into(), |n| n.to_string())
        };
        tracing::info!(
            generation,
            rules = %diff::summary(&changes),
            service_tags = %format!("{} → {}", tags(&old), tags(&loaded.policy)),
            config_sha256 = loaded.policy.config_sha256(),
            warnings = loaded.warnings.len(),
            service_tags_change = ?loaded.policy.service_tags_change(),
            "config reloaded"
        );
        // One line a changed rule, as `portcullis diff` prints it.
        for change in &changes {
            tracing::info!(generation, change = %change, "rule changed by reload");
        }
        Ok(())
    }
}
