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
        let gw = Arc::new(Gateway::new(loaded.policy, loaded.config.limits, own));
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
