//! The `portcullis` binary as a child process of a test: `run -c FILE` on
//! port-0 listeners, read back from its `listening KIND ADDR` lines once it
//! prints `ready`; then its metrics, logs, reload (SIGHUP) and shutdown
//! (SIGTERM).
//!
//! The child is killed when its [`Proxy`] drops; every wait has a deadline.
//! The network-namespace variant (`netns::Portcullis`) starts the same
//! command line and reads the same lines through [`portcullis_run`] and
//! [`Listening`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::http::http_get;
use super::metrics::{metric_sum, wait_value};
use super::process::{Lines, client_command, pipes, printed, send_signal, wait_child};

/// Longest portcullis may take to print `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// `portcullis run -c CONFIG` with the proxy environment and `RUST_LOG`
/// removed (the config alone sets the log level).
pub fn portcullis_run(config: &Path) -> Command {
    let mut cmd = client_command(env!("CARGO_BIN_EXE_portcullis"));
    cmd.arg("run").arg("-c").arg(config).env_remove("RUST_LOG");
    cmd
}

/// Waits (bounded) for the `ready` line on portcullis's stdout.
pub fn wait_ready(stdout: &Lines) -> bool {
    stdout.wait(READY_TIMEOUT, |lines| {
        lines.iter().any(|l| l.trim() == "ready")
    })
}

/// The listeners a `portcullis run` announced (`listening KIND ADDR`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Listening {
    /// The explicit proxy listener.
    pub proxy: Option<SocketAddr>,
    /// The admin listener.
    pub admin: Option<SocketAddr>,
    /// The transparent listener.
    pub transparent: Option<SocketAddr>,
}

impl Listening {
    /// Reads every `listening KIND ADDR` line; `Err` on an address that does
    /// not parse. Other lines and kinds are ignored.
    pub fn parse(lines: &[String]) -> Result<Listening, String> {
        let mut found = Listening::default();
        for line in lines {
            let mut words = line.split_whitespace();
            if words.next() != Some("listening") {
                continue;
            }
            let (Some(kind), Some(a)) = (words.next(), words.next()) else {
                continue;
            };
            let a: SocketAddr = a
                .parse()
                .map_err(|e| format!("bad address in {line:?}: {e}"))?;
            match kind {
                "proxy" => found.proxy = Some(a),
                "admin" => found.admin = Some(a),
                "transparent" => found.transparent = Some(a),
                _ => {}
            }
        }
        Ok(found)
    }
}

/// The `portcullis` binary running `run -c CONFIG` on port-0 listeners.
pub struct Proxy {
    child: Child,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    transparent: Option<SocketAddr>,
    stdout: Lines,
    stderr: Lines,
}

impl Proxy {
    /// Starts the proxy; panics (with its stderr) if it does not print `ready`.
    pub fn start(config: &str) -> Proxy {
        Proxy::try_start(config).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts the proxy; `Err` with its output if it exits or stalls before `ready`.
    pub fn try_start(config: &str) -> Result<Proxy, String> {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("portcullis.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut child = portcullis_run(&config_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn portcullis: {e}"))?;
        let (stdout, stderr) = pipes(&mut child);
        if !wait_ready(&stdout) {
            let _ = child.kill();
            let status = child.wait().ok();
            return Err(format!(
                "portcullis did not print `ready` (exit: {status:?})\nconfig:\n{config}\n{}",
                printed(&stdout, &stderr)
            ));
        }
        let listening = Listening::parse(&stdout.snapshot())?;
        let addr = listening.proxy.ok_or_else(|| {
            format!(
                "no `listening proxy ADDR` line before `ready`: {:?}",
                stdout.snapshot()
            )
        })?;
        Ok(Proxy {
            child,
            dir,
            config_path,
            addr,
            admin: listening.admin,
            transparent: listening.transparent,
            stdout,
            stderr,
        })
    }

    /// Explicit proxy listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for `-x`, `HTTPS_PROXY` and friends.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.expect("no `listening admin ADDR` line")
    }

    /// Transparent listener, if configured.
    pub fn transparent_addr(&self) -> Option<SocketAddr> {
        self.transparent
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Directory holding the config file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `/metrics` text (panics on transport errors or non-200).
    pub fn metrics_text(&self) -> String {
        let resp = http_get(self.admin_addr(), "/metrics").expect("GET /metrics");
        assert_eq!(resp.status, 200, "GET /metrics: {}", resp.text());
        resp.text()
    }

    /// Sum of the samples named `name` carrying all of `labels`; 0 when none.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics_text(), name, labels).unwrap_or(0.0)
    }

    /// Polls `metric(name, labels)` until `pred` holds or `timeout` passes;
    /// returns the last value read.
    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        timeout: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        wait_value(timeout, pred, || self.metric(name, labels))
    }

    /// stdout lines so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.snapshot()
    }

    /// stderr lines (logs) so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.snapshot()
    }

    /// The stderr line reader, to wait on log lines.
    pub fn stderr(&self) -> &Lines {
        &self.stderr
    }

    /// Rewrites the config file and sends SIGHUP.
    pub fn reload(&self, new_config: &str) {
        std::fs::write(&self.config_path, new_config).unwrap();
        send_signal(self.pid(), "HUP");
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        send_signal(self.pid(), "TERM");
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, timeout)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM, then wait (up to 60 s) for the exit status.
    pub fn shutdown(&mut self) -> ExitStatus {
        if let Some(status) = self.child.try_wait().unwrap() {
            return status;
        }
        self.terminate();
        self.wait_exit(Duration::from_secs(60))
            .expect("portcullis did not exit within 60 s of SIGTERM")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
