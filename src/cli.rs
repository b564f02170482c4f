//! The command line: `run`, `check`, `explain`, `render`, `profile`.
//!
//! In: parsed arguments. Out: an exit code (0 ok, 1 a policy answer of
//! "denied" or a failed `[[expect]]`, 2 an error). This is the only module
//! (with `main.rs`) that uses `anyhow` and prints for humans.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::admin;
use crate::config::{ExpectVerdict, LogConfig, LogFormat, Protocol};
use crate::listen::{self, Gateway, explicit, transparent};
use crate::metrics::Listener;
use crate::policy::{Decision, Dest, Policy, RuleState, Severity, Target, Verdict, host};
use crate::reload::{LoadError, Loaded, Reloader, load};

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
    },
    /// Print configuration for other tools.
    #[command(subcommand)]
    Render(Render),
    /// Inspect the built-in Azure ML profile.
    #[command(subcommand)]
    Profile(ProfileCmd),
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
    let c = &cli.common;
    let loaded = load(c.config.as_deref(), &c.vars, c.service_tags.as_deref(), 1);
    let loaded = match (&cli.command, loaded) {
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
        Command::Run => run_gateway(loaded, &cli.common),
        Command::Check => check(&loaded),
        Command::Explain { dests, proto } => explain(&loaded.policy, dests, *proto),
        Command::Render(Render::Nftables) => render_nftables(&loaded),
        Command::Profile(ProfileCmd::List) => profile_list(&loaded.policy),
        Command::Profile(ProfileCmd::Show { scenario }) => {
            profile_show(&loaded.policy, scenario.as_deref())
        }
    }
}

fn run_gateway(loaded: Loaded, common: &Common) -> Result<ExitCode> {
    init_tracing(&loaded.config.log)?;
    if loaded.policy.clients().is_empty() {
        bail!(
            "[clients] allow is empty: portcullis will not run as an open proxy; list the CIDRs of the subnets it serves"
        );
    }
    let reloader = Reloader {
        path: common.config.clone(),
        vars: common.vars.clone(),
        service_tags: common.service_tags.clone(),
        listen: (
            loaded.config.listen.proxy,
            loaded.config.listen.transparent,
            loaded.config.listen.admin,
        ),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let result = runtime.block_on(serve(loaded, reloader));
    // Every log line handed over is on stderr before the process exits.
    crate::logwriter::flush();
    result
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

async fn bind(what: &str, addr: Option<SocketAddr>) -> Result<Option<TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to bind {what} listener on {addr}"))?;
    Ok(Some(listener))
}

async fn serve(loaded: Loaded, reloader: Reloader) -> Result<ExitCode> {
    let listen = &loaded.config.listen;
    let proxy = bind("proxy", listen.proxy).await?;
    let transparent = bind("transparent", listen.transparent).await?;
    let admin = bind("admin", listen.admin).await?;
    let mut own = Vec::new();
    let mut lines = Vec::new();
    for (name, l) in [
        ("proxy", &proxy),
        ("transparent", &transparent),
        ("admin", &admin),
    ] {
        if let Some(l) = l {
            let addr = l.local_addr()?;
            own.push(addr);
            lines.push(format!("listening {name} {addr}"));
        }
    }
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    let policy = loaded.policy.clone();
    let grace = Duration::from_millis(loaded.config.limits.grace_period_ms);
    let mut gw = Gateway::new(policy, loaded.config.limits.clone(), own);
    gw.json_log = loaded.config.log.format == LogFormat::Json;
    let gw = Arc::new(gw);
    if let Some(l) = proxy {
        tokio::spawn(listen::accept_loop(
            l,
            Listener::Proxy,
            gw.clone(),
            explicit::serve,
            explicit::refuse,
        ));
    }
    if let Some(l) = transparent {
        tokio::spawn(listen::accept_loop(
            l,
            Listener::Transparent,
            gw.clone(),
            transparent::serve,
            transparent::refuse,
        ));
    }
    if let Some(l) = admin {
        tokio::spawn(admin::serve(l, gw.clone()));
    }
    gw.ready.store(true, Ordering::Release);
    {
        let p = gw.policy.load();
        let active = p
            .rules()
            .iter()
            .filter(|r| r.state == RuleState::Active)
            .count();
        tracing::info!(
            config = %loaded.source.name,
            rules = active,
            mode = ?p.mode(),
            "portcullis {} started", env!("CARGO_PKG_VERSION")
        );
    }
    {
        let mut out = std::io::stdout().lock();
        for line in &lines {
            writeln!(out, "{line}")?;
        }
        writeln!(out, "ready")?;
        out.flush()?;
    }

    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let _ = reloader.reload(&gw).await;
            }
        }
    }
    let open = gw.shutdown.active();
    tracing::info!(
        open,
        grace_ms = grace.as_millis() as u64,
        "shutting down: draining connections"
    );
    gw.shutdown.drain();
    let cut_at = tokio::time::sleep(grace);
    tokio::pin!(cut_at);
    tokio::select! {
        () = gw.shutdown.idle() => {
            tracing::info!("all connections finished; exiting");
            return Ok(ExitCode::SUCCESS);
        }
        () = &mut cut_at => {}
        _ = term.recv() => tracing::warn!("second signal: exiting now"),
        _ = int.recv() => tracing::warn!("second signal: exiting now"),
    }
    let cut = gw.shutdown.active();
    gw.shutdown.cut();
    tracing::warn!(cut, "grace period over: open tunnels cut");
    let _ = tokio::time::timeout(Duration::from_secs(2), gw.shutdown.idle()).await;
    Ok(ExitCode::SUCCESS)
}

/// A destination argument, parsed and normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestArg {
    /// Normalised host name or IP literal text.
    pub host: String,
    /// Port.
    pub port: u16,
}

/// Parses `host[:port]`, `ip[:port]`, `[v6]:port` or a bare IPv6 address.
/// Host names are normalised (IDN to A-labels); a malformed name is kept as
/// written so that `decide` reports `malformed_host`.
///
/// # Errors
/// A message when the port is not 1-65535.
pub fn parse_dest(text: &str, default_port: u16) -> Result<DestArg, String> {
    let text = text.trim();
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("'{text}': missing ']' after an IPv6 address"))?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err(format!("'{text}': expected ':port' after ']'")),
        }
    } else if text.parse::<std::net::Ipv6Addr>().is_ok() {
        (text, None)
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("'{text}': '{p}' is not a port (1-65535)"))?,
    };
    let host = match Target::parse(host) {
        Target::Ip(ip) => ip.to_string(),
        Target::Name(n) => host::normalize(n).unwrap_or_else(|_| n.to_string()),
    };
    Ok(DestArg { host, port })
}

fn describe(policy: &Policy, dest: &Dest<'_>, d: &Decision) -> String {
    let mut line = format!("{dest} {}", d.verdict.as_str());
    if let Some(id) = d.rule {
        let r = policy.rule(id);
        line.push_str(&format!(" rule={}", r.name));
        if let Some(s) = &r.scenario {
            line.push_str(&format!(" scenario={s}"));
        }
    } else {
        line.push_str(" rule=-");
    }
    line.push_str(&format!(
        " reason={} ({})",
        d.reason.as_str(),
        policy.explain(d)
    ));
    line
}

fn explain(policy: &Policy, dests: &[String], proto: Protocol) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let mut denied = false;
    let mut bad = false;
    for text in dests {
        match parse_dest(text, 443) {
            Ok(arg) => {
                let dest = Dest {
                    target: Target::parse(&arg.host),
                    port: arg.port,
                    proto,
                };
                let d = policy.decide(&dest);
                denied |= d.verdict != Verdict::Allow;
                writeln!(out, "{}", describe(policy, &dest, &d))?;
            }
            Err(e) => {
                bad = true;
                writeln!(out, "{text} error ({e})")?;
            }
        }
    }
    Ok(ExitCode::from(if bad {
        2
    } else if denied {
        1
    } else {
        0
    }))
}

fn check(loaded: &Loaded) -> Result<ExitCode> {
    let p = &loaded.policy;
    let mut out = std::io::stdout().lock();
    for w in &loaded.warnings {
        writeln!(out, "{w}")?;
    }
    let waiting: Vec<&str> = p
        .rules()
        .iter()
        .filter(|r| r.state == RuleState::WaitingForServiceTags)
        .map(|r| r.name.as_str())
        .collect();
    if !waiting.is_empty() {
        writeln!(
            out,
            "note: {} rule(s) wait for a service tags file ([policy] service_tags or --service-tags; download 'Azure IP Ranges and Service Tags'): {}",
            waiting.len(),
            waiting.join(", ")
        )?;
    }
    let mut failed = 0;
    for e in &loaded.config.expects {
        let arg = match parse_dest(e.dest.get_ref(), 443) {
            Ok(a) => a,
            Err(msg) => {
                let loc = loaded.source.locate(&e.dest.span());
                writeln!(out, "{loc}: error: expect: {msg}")?;
                failed += 1;
                continue;
            }
        };
        let dest = Dest {
            target: Target::parse(&arg.host),
            port: arg.port,
            proto: e.proto,
        };
        let d = p.decide(&dest);
        let got_allow = d.verdict == Verdict::Allow;
        let want_allow = e.verdict == ExpectVerdict::Allow;
        if got_allow != want_allow {
            failed += 1;
            let loc = loaded.source.locate(&e.dest.span());
            let want = if want_allow { "allow" } else { "deny" };
            writeln!(
                out,
                "{loc}: expect failed: wanted {want}, got {}",
                describe(p, &dest, &d)
            )?;
        }
    }
    let active = p
        .rules()
        .iter()
        .filter(|r| r.state == RuleState::Active)
        .count();
    let n = loaded.config.expects.len();
    if failed > 0 {
        writeln!(out, "{failed} of {n} expectation(s) failed")?;
        return Ok(ExitCode::from(1));
    }
    writeln!(
        out,
        "ok: {} ({active} active rules, {} warning(s), {n} expectation(s) passed)",
        loaded.source.name,
        loaded.warnings.len()
    )?;
    Ok(ExitCode::SUCCESS)
}

fn render_nftables(loaded: &Loaded) -> Result<ExitCode> {
    let text = crate::render::nftables(loaded).map_err(anyhow::Error::msg)?;
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

fn profile_list(policy: &Policy) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    for s in policy.scenarios() {
        let n = policy
            .rules()
            .iter()
            .filter(|r| r.scenario.as_deref() == Some(&s.name))
            .count();
        let on = if s.enabled { "on " } else { "off" };
        writeln!(out, "{on} {:<17} {n:>2} rules  {}", s.name, s.description)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn profile_show(policy: &Policy, scenario: Option<&str>) -> Result<ExitCode> {
    if let Some(name) = scenario
        && !policy.scenarios().iter().any(|s| s.name == name)
    {
        let known: Vec<&str> = policy.scenarios().iter().map(|s| s.name.as_str()).collect();
        bail!("unknown scenario '{name}' (known: {})", known.join(", "));
    }
    let mut out = std::io::stdout().lock();
    for s in policy
        .scenarios()
        .iter()
        .filter(|s| scenario.is_none_or(|n| n == s.name))
    {
        let on = if s.enabled { "enabled" } else { "disabled" };
        writeln!(out, "## {} ({on})\n{}\n", s.name, s.description)?;
        for r in policy
            .rules()
            .iter()
            .filter(|r| r.scenario.as_deref() == Some(&s.name))
        {
            let what: Vec<String> = r
                .hosts
                .iter()
                .cloned()
                .chain(r.service_tags.iter().map(|t| format!("tag:{t}")))
                .chain(
                    r.cidrs
                        .iter()
                        .filter(|_| r.service_tags.is_empty())
                        .map(ToString::to_string),
                )
                .collect();
            let ports = crate::policy::port_ranges(&r.ports);
            let state = match &r.state {
                RuleState::Active => String::new(),
                RuleState::ScenarioDisabled => String::new(),
                RuleState::MissingVars(v) => format!("  [needs --var {}]", v.join(", --var ")),
                RuleState::WaitingForServiceTags => "  [waits for service tags file]".into(),
                RuleState::NotEgress => {
                    format!("  [{:?}: not enforced by the proxy]", r.direction).to_lowercase()
                }
            };
            writeln!(
                out,
                "- {} {}/{}  {}{state}\n    {}",
                r.name,
                r.protocol.as_str(),
                ports.join(","),
                what.join(" "),
                r.description
            )?;
        }
        writeln!(out)?;
    }
    Ok(ExitCode::SUCCESS)
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
