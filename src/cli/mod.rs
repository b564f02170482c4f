//! The command line: parse, dispatch, and wire the real process (signals, runtime, stdout) to the library.
//!
//! In: parsed arguments. Out: an exit code (0 ok, 1 a policy answer of
//! "denied" or a failed `[[expect]]`, 2 an error). This module and
//! `report` are the only ones (with `main.rs`) that use `anyhow` and print
//! for humans; `run` hands the gateway's lifecycle to [`crate::serve`].

mod diff;
mod init;
mod learn;
mod report;
mod seen;

pub use report::{DestArg, parse_dest};

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

use crate::config::{LogConfig, LogFormat, Protocol};
use crate::gateway::Gateway;
use crate::load::{LoadError, LoadInput, Loaded};
use crate::policy::{RuleState, Severity};
use crate::reload::Reloader;
use crate::serve::{Bound, serve};

/// portcullis: an egress gateway that allows only what its policy names.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Common {
    /// Config file (TOML). Default: the embedded Azure ML profile with its default scenarios.
    #[arg(short, long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Placeholder value, e.g. --var region=westus2 (repeatable; overrides [vars]).
    #[arg(long = "var", global = true, value_name = "KEY=VALUE", value_parser = parse_var)]
    vars: Vec<(String, String)>,
    /// Azure Service Tags JSON file (overrides [policy] service_tags).
    #[arg(long, global = true, value_name = "FILE")]
    service_tags: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Run,
    /// Validate the config, print every error and warning, and run its [[expect]] tests.
    Check,
    /// Print the decision for each destination (host[:port] or ip[:port]; port defaults to 443).
    Explain {
        /// Destinations.
        #[arg(required = true, value_name = "DEST")]
        dests: Vec<String>,
        /// Protocol of the destinations.
        #[arg(long, default_value = "tcp", value_parser = parse_proto)]
        proto: Protocol,
        /// Decide for this client address (its client groups). Without it,
        /// every client group whose verdict differs gets its own line.
        #[arg(long, value_name = "ADDR")]
        client: Option<std::net::IpAddr>,
    },
    /// Print configuration for other tools.
    #[command(subcommand)]
    Render(Render),
    /// Inspect the built-in Azure ML profile.
    #[command(subcommand)]
    Profile(ProfileCmd),
    /// Compare two configs: rules added, removed and changed, and every
    /// [[expect]] and logged destination whose verdict changes (exit 1 when
    /// anything differs).
    Diff {
        /// The config in force.
        old: PathBuf,
        /// The config to compare with it.
        new: PathBuf,
        /// Access-log file(s) whose destinations are decided by both (`-`: stdin).
        #[arg(long = "log", value_name = "FILE")]
        logs: Vec<PathBuf>,
    },
    /// Propose [[rule]] blocks from access-log lines (files, or stdin:
    /// `journalctl -u portcullis -o cat | portcullis learn`).
    Learn {
        /// Access-log files (`-` or none: stdin).
        files: Vec<PathBuf>,
        /// Print only what this config does not allow yet.
        #[arg(long, value_name = "CONFIG")]
        against: Option<PathBuf>,
        /// Names under this suffix become one `*.SUFFIX` (repeatable).
        #[arg(long, value_name = "SUFFIX")]
        collapse: Vec<String>,
        /// Learn refused connections too (default: what passed, in audit mode or by a rule).
        #[arg(long)]
        include_denied: bool,
    },
    /// Write a complete, commented config for an Azure ML workspace (passes `check`).
    Init(init::InitArgs),
    /// Turn what Azure lists into rules a config can include.
    #[command(subcommand)]
    Import(init::ImportCmd),
}

#[derive(Debug, Subcommand)]
enum Render {
    /// An nftables ruleset for the gateway host (transparent mode).
    Nftables,
}

#[derive(Debug, Subcommand)]
enum ProfileCmd {
    /// List scenarios: name, on/off, rule count, what each covers.
    List,
    /// Print the rules of one scenario (or all), with the source document's wording.
    Show {
        /// Scenario name.
        scenario: Option<String>,
    },
}

fn parse_var(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("'{text}' is not KEY=VALUE (e.g. region=westus2)")),
    }
}

fn parse_proto(text: &str) -> Result<Protocol, String> {
    match text.to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        _ => Err(format!("'{text}' is not a protocol (tcp or udp)")),
    }
}

/// Runs a parsed command line.
///
/// # Errors
/// Anything that should end the process with exit code 2.
pub fn run(cli: Cli) -> Result<ExitCode> {
    let writes = matches!(cli.command, Command::Init(_) | Command::Import(_));
    let import_tags =
        matches!(cli.command, Command::Import(_)) && cli.common.service_tags.is_some();
    if writes && (cli.common.config.is_some() || !cli.common.vars.is_empty() || import_tags) {
        bail!(
            "init and import read no config and take no --var (import no --service-tags either): they write one (--out FILE)"
        );
    }
    match &cli.command {
        Command::Init(args) => return init::init(args, cli.common.service_tags.as_deref()),
        Command::Import(cmd) => return init::import(cmd),
        _ => {}
    }
    if let Some(code) = run_offline(&cli)? {
        return Ok(code);
    }
    let input = cli.common.load_input();
    let loaded = match (&cli.command, input.load(1)) {
        (_, Ok(l)) => l,
        (Command::Check, Err(LoadError::Invalid(diags))) => {
            let mut out = std::io::stdout().lock();
            for d in &diags {
                writeln!(out, "{d}")?;
            }
            let n = diags
                .iter()
                .filter(|d| d.severity == Severity::Error)
                .count();
            writeln!(out, "invalid: {n} error(s)")?;
            return Ok(ExitCode::from(2));
        }
        (_, Err(e)) => bail!("{e}"),
    };
    match &cli.command {
        Command::Run => run_gateway(loaded, input),
        Command::Check => report::check(&loaded),
        Command::Explain {
            dests,
            proto,
            client,
        } => report::explain(&loaded.policy, dests, *proto, *client),
        Command::Render(Render::Nftables) => {
            let text = crate::render::nftables(&loaded).map_err(anyhow::Error::msg)?;
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Profile(ProfileCmd::List) => report::profile_list(&loaded.policy),
        Command::Profile(ProfileCmd::Show { scenario }) => {
            report::profile_show(&loaded.policy, scenario.as_deref())
        }
        Command::Diff { .. } | Command::Learn { .. } | Command::Init(_) | Command::Import(_) => {
            bail!("diff, learn, init and import load their own configs")
        }
    }
}

/// The commands that load configs of their own (`diff`, `learn`), not `-c`.
fn run_offline(cli: &Cli) -> Result<Option<ExitCode>> {
    let load = |path: &PathBuf| -> Result<Loaded> {
        let input = LoadInput {
            path: Some(path.clone()),
            ..cli.common.load_input()
        };
        input
            .load(1)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    };
    match &cli.command {
        Command::Diff { old, new, logs } => diff::diff(&load(old)?, &load(new)?, logs).map(Some),
        Command::Learn {
            files,
            against,
            collapse,
            include_denied,
        } => {
            let against = against.as_ref().map(load).transpose()?;
            let log = seen::Log::read(files)?;
            let ask = learn::Ask {
                against: against.as_ref().map(|l| &l.policy),
                collapse,
                include_denied: *include_denied,
            };
            print!("{}", learn::learn(&log, &ask)?);
            Ok(Some(ExitCode::SUCCESS))
        }
        _ => Ok(None),
    }
}

impl Common {
    fn load_input(&self) -> LoadInput {
        LoadInput {
            path: self.config.clone(),
            vars: self.vars.clone(),
            service_tags: self.service_tags.clone(),
        }
    }
}

fn run_gateway(loaded: Loaded, input: LoadInput) -> Result<ExitCode> {
    init_tracing(&loaded.config.log)?;
    crate::spare::raise_open_file_limit();
    if loaded.policy.clients().is_empty() {
        bail!(
            "[clients] allow is empty: portcullis will not run as an open proxy; list the CIDRs of the subnets it serves"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let result = runtime.block_on(run_process(loaded, input));
    // Every log line handed over is on stderr before the process exits,
    // unless the sink is stalled: then exiting wins.
    crate::logwriter::flush(std::time::Duration::from_secs(2));
    result
}

/// Binds, prints where it listens, and serves until SIGTERM/SIGINT (a
/// second one cuts the drain short); SIGHUP reloads.
async fn run_process(loaded: Loaded, input: LoadInput) -> Result<ExitCode> {
    let listen = &loaded.config.listen;
    let bound = Bound::bind(listen).await?;
    let reloader = Reloader {
        input,
        listen: (listen.proxy, listen.transparent, listen.admin),
    };
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    let own = bound.addrs().iter().map(|(_, a)| *a).collect();
    let mut gw = Gateway::new(loaded.policy, loaded.config.limits.clone(), own);
    gw.json_log = loaded.config.log.format == LogFormat::Json;
    *gw.require_ruleset.get_mut() = loaded.config.admin.require_ruleset();
    let gw = Arc::new(gw);
    log_started(&gw, &loaded.source.name);
    let (stop, force) = stop_signals()?;
    spawn_reloads(reloader, gw.clone())?;
    let lines: Vec<String> = bound
        .addrs()
        .iter()
        .map(|(name, addr)| format!("listening {name} {addr}"))
        .collect();
    let on_ready = move || {
        let mut out = std::io::stdout().lock();
        for line in &lines {
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(out, "ready");
        let _ = out.flush();
        tell_manager("READY=1\nSTATUS=serving");
    };
    spawn_watchdog();
    // systemd waits this long for the stop: the grace period, the drain's
    // 2 s cut allowance and a margin (so TimeoutStopSec need not know it).
    let stop_usec = (loaded.config.limits.grace_period_ms + 5_000) * 1_000;
    let stop = async move {
        let _ = stop.await;
        tell_manager(&format!(
            "STOPPING=1\nSTATUS=draining\nEXTEND_TIMEOUT_USEC={stop_usec}"
        ));
    };
    let force = async move {
        let _ = force.await;
    };
    serve(bound, gw, on_ready, stop, force).await;
    Ok(ExitCode::SUCCESS)
}

/// Tells systemd (`Type=notify`) what state the gateway is in; outside
/// systemd there is no socket and nothing happens.
fn tell_manager(state: &str) {
    if let Err(err) = crate::notify::notify(state) {
        tracing::warn!(error = %err, "cannot notify the service manager");
    }
}

/// Pets systemd's watchdog (`WatchdogSec=`) from the runtime, so a stalled
/// runtime is restarted.
fn spawn_watchdog() {
    if let Some(every) = crate::notify::watchdog_interval() {
        tokio::spawn(async move {
            loop {
                tell_manager("WATCHDOG=1");
                tokio::time::sleep(every).await;
            }
        });
    }
}

fn log_started(gw: &Gateway, config_name: &str) {
    let p = gw.policy.load();
    let active = p
        .rules()
        .iter()
        .filter(|r| r.state == RuleState::Active)
        .count();
    tracing::info!(
        config = %config_name,
        rules = active,
        mode = ?p.mode(),
        "portcullis {} started", env!("CARGO_PKG_VERSION")
    );
    log_service_tags(&p);
}

/// Which service tags file the gateway runs with, and a warning when it is
/// stale (the same threshold as `check`) or its last refresh failed.
fn log_service_tags(p: &crate::policy::Policy) {
    let Some(file) = p.service_tags_file() else {
        tracing::info!("no service tags file: rules naming service tags are inactive");
        return;
    };
    let age_days = file
        .age(std::time::SystemTime::now())
        .map(|d| d.as_secs() / 86_400);
    tracing::info!(
        path = %file.path.display(),
        change_number = file.change_number,
        cloud = %file.cloud,
        tags = file.tags,
        // -1: the file's modification time is unknown.
        age_days = age_days.map_or(-1, |d| d as i64),
        "service tags loaded"
    );
    if let Some(status) = crate::servicetags::RefreshStatus::read(file).filter(|s| !s.ok) {
        tracing::warn!(
            status = %file.status_path().display(),
            reason = %status.message,
            "the last service tags refresh failed; running with the file it left in place"
        );
    }
    if let Some(d) = age_days.filter(|d| *d > report::SERVICE_TAGS_STALE_DAYS) {
        tracing::warn!(
            path = %file.path.display(),
            age_days = d,
            "the service tags file is {d} days old: Azure's address ranges change weekly; \
             enable portcullis-service-tags.timer"
        );
    }
}

/// Two one-shot channels: the first SIGTERM/SIGINT, and the second.
fn stop_signals() -> Result<(oneshot::Receiver<()>, oneshot::Receiver<()>)> {
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let (first_tx, first_rx) = oneshot::channel();
    let (second_tx, second_rx) = oneshot::channel();
    tokio::spawn(async move {
        for tx in [first_tx, second_tx] {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            let _ = tx.send(());
        }
    });
    Ok((first_rx, second_rx))
}

/// One task awaits SIGHUPs, so reloads run one at a time.
fn spawn_reloads(reloader: Reloader, gw: Arc<Gateway>) -> Result<()> {
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tell_manager("RELOADING=1");
            // Counted and logged by `reload` itself.
            let _ = reloader.reload(&gw).await;
            tell_manager("READY=1\nSTATUS=serving");
        }
    });
    Ok(())
}

fn init_tracing(log: &LogConfig) -> Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .with_context(|| format!("[log] level '{}' is not a valid filter", log.level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::logwriter::MakeWriter);
    let result = match log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot initialise logging: {e}"))?;
    crate::logwriter::start().context("cannot start the log writer thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dest_forms() {
        let d = |t| parse_dest(t, 443);
        assert_eq!(
            d("pypi.org").unwrap(),
            DestArg {
                host: "pypi.org".into(),
                port: 443
            }
        );
        assert_eq!(
            d("PyPI.org.:80").unwrap(),
            DestArg {
                host: "pypi.org".into(),
                port: 80
            }
        );
        assert_eq!(
            d("10.0.0.1:8080").unwrap(),
            DestArg {
                host: "10.0.0.1".into(),
                port: 8080
            }
        );
        assert_eq!(
            d("[2001:db8::1]:22").unwrap(),
            DestArg {
                host: "2001:db8::1".into(),
                port: 22
            }
        );
        assert_eq!(
            d("2001:db8::1").unwrap(),
            DestArg {
                host: "2001:db8::1".into(),
                port: 443
            }
        );
        assert_eq!(d("bücher.example").unwrap().host, "xn--bcher-kva.example");
        assert!(d("pypi.org:0").unwrap_err().contains("not a port"));
        assert!(d("pypi.org:65536").unwrap_err().contains("not a port"));
        assert!(d("[::1").is_err());
    }

    #[test]
    fn var_parse() {
        assert_eq!(
            parse_var("region=westus2").unwrap(),
            ("region".into(), "westus2".into())
        );
        assert!(parse_var("region").is_err());
        assert!(parse_var("=x").is_err());
    }
}
