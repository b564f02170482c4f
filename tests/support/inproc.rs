//! In-process gateway: `portcullis::serve::serve` in a task of the test's own runtime.
//!
//! In: a config's TOML text (listeners on `127.0.0.1:0`). Out: an
//! [`InProc`] with the bound addresses, the shared [`Gateway`] (metrics,
//! policy, shutdown state) and `stop`/`force` handles, so tests drive the
//! whole lifecycle without a process or signals, and under
//! `tokio::time::pause()` when they test timeouts.

#![allow(dead_code)] // each test binary uses a part of the harness

use std::net::SocketAddr;
use std::sync::Arc;

use portcullis::gateway::Gateway;
use portcullis::load::LoadInput;
use portcullis::reload::{ReloadError, Reloader};
use portcullis::serve::{Bound, Stopped, serve};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A config for in-process tests: an explicit proxy and an admin listener
/// on free loopback ports, `clients` (TOML array items), no profile, a rule
/// `allowed` for `hosts` on `origin`'s port (with `rule_extra` lines), the
/// address rule the origin needs (loopback is guarded), every host resolving
/// to the origin, then `extra` (more rules) and `[limits]` lines.
pub struct Site<'a> {
    /// The origin every name resolves to.
    pub origin: SocketAddr,
    /// `[clients] allow` items.
    pub clients: &'a str,
    /// Names the `allowed` rule lists (none: no such rule).
    pub hosts: &'a [&'a str],
    /// Extra lines inside the `allowed` rule (`opaque = true`, ...).
    pub rule_extra: &'a str,
    /// More TOML after the rules (other `[[rule]]`s).
    pub extra: &'a str,
    /// `[limits]` lines.
    pub limits: &'a str,
}

impl Default for Site<'_> {
    fn default() -> Self {
        Site {
            origin: SocketAddr::from(([127, 0, 0, 2], 0)),
            clients: "\"127.0.0.0/8\"",
            hosts: &["allowed.test"],
            rule_extra: "",
            extra: "",
            limits: "",
        }
    }
}

impl Site<'_> {
    /// The config text.
    pub fn toml(&self) -> String {
        let (ip, port) = (self.origin.ip(), self.origin.port());
        let list = |f: &dyn Fn(&str) -> String| -> Vec<String> {
            self.hosts.iter().map(|h| f(h)).collect()
        };
        let rule = if self.hosts.is_empty() {
            String::new()
        } else {
            let hosts = list(&|h| format!("{h:?}")).join(", ");
            format!(
                "[[rule]]\nname = \"allowed\"\nhosts = [{hosts}]\nports = [{port}]\n{}\n",
                self.rule_extra
            )
        };
        let resolve = list(&|h| format!("{h:?} = [\"{ip}\"]")).join("\n");
        format!(
            "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
             [clients]\nallow = [{clients}]\n\n[policy]\nprofile = \"none\"\n\n{rule}\
             [[rule]]\nname = \"origins\"\ncidrs = [\"{ip}/32\"]\nports = [{port}]\n\n{extra}\n\
             [resolve]\n{resolve}\n\n[limits]\n{limits}\n",
            clients = self.clients,
            extra = self.extra,
            limits = self.limits,
        )
    }
}

/// A gateway served by a task of the calling runtime.
pub struct InProc {
    /// The shared runtime state (metrics, policy, shutdown).
    pub gw: Arc<Gateway>,
    /// Bound listeners by name (`proxy`, `transparent`, `admin`).
    pub addrs: Vec<(&'static str, SocketAddr)>,
    reloader: Reloader,
    dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    force: Option<oneshot::Sender<()>>,
    task: JoinHandle<Stopped>,
}

impl InProc {
    /// Parses and compiles `toml`, binds its listeners and starts serving;
    /// returns once the gateway is ready.
    pub async fn start(toml: &str) -> InProc {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, toml).expect("write config");
        let input = LoadInput {
            path: Some(path),
            ..LoadInput::default()
        };
        let loaded = input.load(1).unwrap_or_else(|e| panic!("config: {e}"));
        let listen = &loaded.config.listen;
        let reloader = Reloader {
            input,
            listen: (listen.proxy, listen.transparent, listen.admin),
        };
        let bound = Bound::bind(listen).await.expect("bind");
        let addrs = bound.addrs();
        let own = addrs.iter().map(|(_, a)| *a).collect();
        let mut gw = Gateway::new(loaded.policy, loaded.config.limits, own);
        *gw.require_ruleset.get_mut() = loaded.config.admin.require_ruleset();
        let gw = Arc::new(gw);
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (force, force_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            bound,
            gw.clone(),
            move || {
                let _ = ready_tx.send(());
            },
            async move {
                let _ = stop_rx.await;
            },
            async move {
                let _ = force_rx.await;
            },
        ));
        ready_rx.await.expect("serve reports ready");
        InProc {
            gw,
            addrs,
            reloader,
            dir,
            stop: Some(stop),
            force: Some(force),
            task,
        }
    }

    /// The address of listener `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no {name} listener"))
    }

    /// Replaces the config file with `toml` and reloads (as SIGHUP does).
    pub async fn reload(&self, toml: &str) -> Result<(), ReloadError> {
        std::fs::write(self.dir.path().join("portcullis.toml"), toml).expect("write config");
        self.reloader.reload(&self.gw).await
    }

    /// Asks the gateway to stop (the first SIGTERM).
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Asks it to stop at once (the second SIGTERM).
    pub fn force(&mut self) {
        if let Some(tx) = self.force.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for `serve` to return.
    pub async fn stopped(self) -> Stopped {
        self.task.await.expect("serve task")
    }
}
