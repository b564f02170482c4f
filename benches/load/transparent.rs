//! The transparent cases: builds the namespaces, starts the server role,
//! portcullis behind its rendered ruleset and the client role, checks both
//! paths with verified traffic, then runs jobs in the client namespace and
//! reads their samples back. Also the two roles themselves (`--ns-role`).
//!
//! The client role dials only the tool's own namespaces; the roles end when
//! the tool closes their stdin, or after [`ROLE_LIMIT`].

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::cases::{Work, run_work};
use crate::clients::{IN_TOOL_NETNS, Via};
use crate::host::{is_root, tool_works};
use crate::io_err;
use crate::netns::{Netns, Ns, PORTCULLIS_NET, ROUTED_NET, Role, must};
use crate::proxies::{config_text, port_list};
use crate::report::{DIRECT, PORTCULLIS, short_error};
use crate::run::{RUN_LIMIT, bounded};
use crate::sample::{Sample, parse_sample, sample_line};
use crate::settings::{Settings, check_settings};
use crate::upstreams::{Upstreams, start_upstreams};
use crate::wire::Dir;

/// The transparent listener in the portcullis gateway (the ruleset redirects to it).
const TRANSPARENT_PORT: u16 = 3129;
/// Longest a namespace role (server or client process) lives.
const ROLE_LIMIT: Duration = Duration::from_secs(3600);
/// Most jobs the client role runs before it stops.
const ROLE_MAX_JOBS: usize = 100_000;
/// Longest a child in a namespace may take to print its ready line.
const READY_LIMIT: Duration = Duration::from_secs(20);

/// The portcullis gateway's config: clients from the client side, the
/// server by address (10/8 is guarded), the transparent listener on
/// [`TRANSPARENT_PORT`].
fn transparent_config(ports: &[u16], level: &str) -> String {
    let ports = port_list(ports, ", ");
    let p = PORTCULLIS_NET;
    let rules = format!(
        r#"[[rule]]
name = "load-test-server"
description = "10/8 is guarded: the load servers need an explicit address rule"
cidrs = ["10.{p}.2.2/32"]
ports = [{ports}]
"#
    );
    let listen = format!(
        "proxy = \"127.0.0.1:0\"\ntransparent = \"0.0.0.0:{TRANSPARENT_PORT}\"\nadmin = \"127.0.0.1:0\"\n"
    );
    let clients = format!("10.{p}.1.0/24");
    config_text("transparent cases", &listen, &clients, &rules, level)
}

/// One job for the client role: `WORK BULK ECHO HTTP BULK_MS BULK_BYTES
/// TXN_MS TXN_MAX VERIFY`, with WORK `bulk:d|u:STREAMS` or `tunnels:CLIENTS`.
fn job_line(work: Work, ups: Upstreams, s: &Settings) -> Result<String, String> {
    let w = match work {
        Work::Bulk { dir, streams } => {
            format!(
                "bulk:{}:{streams}",
                if dir == Dir::Down { 'd' } else { 'u' }
            )
        }
        Work::Tunnels { clients } => format!("tunnels:{clients}"),
        other => return Err(format!("{other:?} is not a transparent case")),
    };
    Ok(format!(
        "{w} {} {} {} {} {} {} {} {}",
        ups.bulk,
        ups.echo,
        ups.http,
        s.bulk_time.as_millis(),
        s.bulk_bytes,
        s.txn_time.as_millis(),
        s.txn_max,
        u8::from(s.verify)
    ))
}

fn parse_job(line: &str) -> Result<(Work, Upstreams, Settings), String> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let [
        w,
        bulk,
        echo,
        http,
        bulk_ms,
        bulk_bytes,
        txn_ms,
        txn_max,
        verify,
    ] = f[..]
    else {
        return Err(format!("bad job {line:?}"));
    };
    let bad = |what: &str| format!("bad {what} in job {line:?}");
    let num = |v: &str, what: &str| v.parse::<u64>().map_err(|_| bad(what));
    let addr = |v: &str| v.parse::<SocketAddr>().map_err(|_| bad("address"));
    let work = match w.split(':').collect::<Vec<_>>()[..] {
        ["bulk", d, n] => Work::Bulk {
            dir: match d {
                "d" => Dir::Down,
                "u" => Dir::Up,
                _ => return Err(bad("direction")),
            },
            streams: num(n, "streams")?.clamp(1, 64) as usize,
        },
        ["tunnels", n] => Work::Tunnels {
            clients: num(n, "clients")?.clamp(1, 256) as usize,
        },
        _ => return Err(bad("work")),
    };
    let ups = Upstreams {
        bulk: addr(bulk)?,
        echo: addr(echo)?,
        http: addr(http)?,
    };
    let s = Settings {
        reps: 1,
        bulk_time: Duration::from_millis(num(bulk_ms, "time")?.min(60_000)),
        bulk_bytes: num(bulk_bytes, "size")?.max(1),
        txn_time: Duration::from_millis(num(txn_ms, "time")?.min(60_000)),
        txn_max: num(txn_max, "count")?.clamp(1, 1_000_000) as usize,
        verify: verify == "1",
        ..Settings::quick()
    };
    Ok((work, ups, s))
}

/// The client role, from the parent's side.
pub struct NsClient {
    /// The `--ns-role client` process.
    pub role: Role,
    /// Set once a job went unanswered: later answers would not match.
    pub dead: Option<String>,
}

impl NsClient {
    /// Runs one job in the client namespace (blocking).
    pub fn run(&mut self, work: Work, ups: Upstreams, s: &Settings) -> Result<Sample, String> {
        use std::io::Write as _;
        if let Some(e) = &self.dead {
            return Err(e.clone());
        }
        let job = job_line(work, ups, s)?;
        if let Err(e) = writeln!(self.role.stdin, "{job}") {
            let e = format!("client namespace process gone: {e}");
            self.dead = Some(e.clone());
            return Err(e);
        }
        match self
            .role
            .wait_line(RUN_LIMIT + Duration::from_secs(10), |_| true)
        {
            Ok(line) => parse_sample(&line),
            Err(e) => {
                self.dead = Some(format!("client stopped answering: {e}"));
                Err(e)
            }
        }
    }
}

/// Everything the transparent cases run on.
pub struct Transparent {
    /// Runs the jobs in the client namespace.
    pub client: NsClient,
    /// The server role (its stdin keeps it up).
    pub _server: Role,
    /// portcullis in its gateway (its log is checked for access lines).
    pub portcullis: Role,
    /// The server role's bulk, echo and HTTP ports.
    pub ports: [u16; 3],
    /// Per column, why a path failed its verified check.
    pub broken: [Option<String>; 3],
    /// Last: dropping it ends every process and deletes the namespaces.
    pub _netns: Netns,
}

/// Logs a set-up failure in full and returns its table cell.
fn fail(e: String) -> String {
    eprintln!("load: transparent set-up: {e}");
    short_error(&e)
}

/// Starts this tool as `--ns-role ROLE` in a namespace and waits for its
/// ready line (`pred`); returns the role and that line.
fn start_role(
    netns: &mut Netns,
    exe: &Path,
    ns: Ns,
    role: &str,
    pred: impl FnMut(&str) -> bool,
) -> Result<(Role, String), String> {
    let r = netns
        .spawn(
            ns,
            exe,
            &["--ns-role".as_ref(), role.as_ref()],
            &format!("{role}.log"),
        )
        .map_err(fail)?;
    let ready = r
        .wait_line(READY_LIMIT, pred)
        .map_err(|e| fail(format!("{role}: {e}")))?;
    Ok((r, ready))
}

/// Starts the server role; returns it and its (bulk, echo, http) ports.
fn start_server(netns: &mut Netns, exe: &Path) -> Result<(Role, [u16; 3]), String> {
    let (server, ready) = start_role(netns, exe, Ns::Server, "server", |l| {
        l.starts_with("ready ")
    })?;
    let ports: Vec<u16> = ready
        .split_whitespace()
        .skip(1)
        .filter_map(|p| p.parse().ok())
        .collect();
    let [bulk, echo, http] = ports[..] else {
        return Err(fail(format!("server said {ready:?}")));
    };
    Ok((server, [bulk, echo, http]))
}

/// Writes the gateway's config, checks and applies the ruleset
/// `render nftables` prints for it, then starts portcullis there and waits
/// for `ready` with its transparent listener on [`TRANSPARENT_PORT`].
fn start_gateway(
    netns: &mut Netns,
    bin: &Path,
    ports: &[u16; 3],
    level: &str,
) -> Result<Role, String> {
    let config = netns.dir.path().join("portcullis.toml");
    fs::write(&config, transparent_config(ports, level))
        .map_err(|e| fail(format!("write config: {e}")))?;
    let ruleset = must(
        Command::new(bin)
            .args(["render", "nftables", "-c"])
            .arg(&config),
    )
    .map_err(fail)?;
    let nft = netns.dir.path().join("portcullis.nft");
    fs::write(&nft, ruleset).map_err(|e| fail(format!("write ruleset: {e}")))?;
    must(netns.exec(Ns::Gateway, "nft").arg("-c").arg("-f").arg(&nft)).map_err(fail)?;
    must(netns.exec(Ns::Gateway, "nft").arg("-f").arg(&nft)).map_err(fail)?;
    // Closed connections leave conntrack entries for 120 s by default:
    // keep the gateway's table small over tens of thousands of them.
    if let Err(e) = netns.sysctl(
        Ns::Gateway,
        "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
    ) {
        eprintln!("load: note: {e}");
    }
    let gw = netns
        .spawn(
            Ns::Gateway,
            bin,
            &["run".as_ref(), "-c".as_ref(), config.as_os_str()],
            "portcullis.log",
        )
        .map_err(fail)?;
    let mut listening = None;
    gw.wait_line(READY_LIMIT, |l| {
        if let Some(a) = l.strip_prefix("listening transparent ") {
            listening = a.trim().parse::<SocketAddr>().ok();
        }
        l == "ready"
    })
    .map_err(|e| fail(format!("portcullis: {e}")))?;
    if listening.map(|a| a.port()) != Some(TRANSPARENT_PORT) {
        return Err(fail(format!(
            "portcullis listens transparent on {listening:?}, not port {TRANSPARENT_PORT}"
        )));
    }
    Ok(gw)
}

/// Starts the client role and waits for its `ready`.
fn start_client(netns: &mut Netns, exe: &Path) -> Result<NsClient, String> {
    let (client, _) = start_role(netns, exe, Ns::Client, "client", |l| l == "ready")?;
    Ok(NsClient {
        role: client,
        dead: None,
    })
}

impl Transparent {
    /// Builds the namespaces, starts the server, portcullis (behind its
    /// rendered ruleset) and the client, and checks both paths with verified
    /// traffic. `Err` is a table cell: why nothing can be measured.
    pub fn setup(bin: &Path, level: &str) -> Result<Transparent, String> {
        if !is_root() {
            return Err("skipped (needs root)".into());
        }
        for (tool, arg) in [("ip", "-V"), ("nft", "--version"), ("sysctl", "--version")] {
            if !tool_works(tool, &[arg]) {
                return Err(format!("skipped ({tool} not found)"));
            }
        }
        let exe = std::env::current_exe().map_err(|e| fail(format!("current_exe: {e}")))?;
        let mut netns = Netns::create().map_err(fail)?;
        let (server, ports) = start_server(&mut netns, &exe)?;
        let portcullis = start_gateway(&mut netns, bin, &ports, level)?;
        let client = start_client(&mut netns, &exe)?;
        let mut t = Transparent {
            client,
            _server: server,
            portcullis,
            ports,
            broken: Default::default(),
            _netns: netns,
        };
        for col in [DIRECT, PORTCULLIS] {
            if let Err(e) = t.check(col) {
                eprintln!("load: transparent path check failed for column {col}: {e}");
                t.broken[col] = Some(short_error(&format!("broken: {e}")));
            }
        }
        Ok(t)
    }

    /// Gate: a path carries bytes intact before anything is measured, and
    /// the portcullis path's connections show in portcullis's access log
    /// (stderr to a file, through its log thread).
    fn check(&mut self, col: usize) -> Result<(), String> {
        let ups = self.upstreams(col);
        let check = check_settings();
        for w in [
            Work::Bulk {
                dir: Dir::Down,
                streams: 1,
            },
            Work::Bulk {
                dir: Dir::Up,
                streams: 1,
            },
            Work::Tunnels { clients: 4 },
        ] {
            self.client.run(w, ups, &check)?;
        }
        if col != PORTCULLIS {
            return Ok(());
        }
        let server = ups.echo.ip().to_string();
        // Lines reach the file a few milliseconds after the connection
        // closes (portcullis's log thread gathers them).
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let logged = fs::read_to_string(&self.portcullis.log).unwrap_or_default();
            if logged.contains(&server) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("no access line for {server} in portcullis's log"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The servers as the client sees them: through the routed gateway for
    /// the direct column, through the portcullis gateway otherwise.
    pub fn upstreams(&self, col: usize) -> Upstreams {
        let net = if col == DIRECT {
            ROUTED_NET
        } else {
            PORTCULLIS_NET
        };
        let at = |port| SocketAddr::from(([10, net, 2, 2], port));
        Upstreams {
            bulk: at(self.ports[0]),
            echo: at(self.ports[1]),
            http: at(self.ports[2]),
        }
    }
}

/// `--ns-role server`: the three servers on every address of the server
/// namespace, until the tool closes stdin (it ended) or [`ROLE_LIMIT`].
pub async fn role_server() -> Result<(), String> {
    let ups = start_upstreams(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        .await
        .map_err(io_err("upstreams"))?;
    let [b, e, h] = ups.ports();
    println!("ready {b} {e} {h}");
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(ROLE_LIMIT, async {
        while let Ok(n) = stdin.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Ok(())
}

/// `--ns-role client`: runs one job per stdin line, answers one line each,
/// until EOF, [`ROLE_MAX_JOBS`] or [`ROLE_LIMIT`].
pub async fn role_client() -> Result<(), String> {
    use std::io::Write as _;
    use tokio::io::AsyncBufReadExt;
    IN_TOOL_NETNS.store(true, Relaxed);
    println!("ready");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let deadline = Instant::now() + ROLE_LIMIT;
    for _ in 0..ROLE_MAX_JOBS {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = tokio::time::timeout(left, lines.next_line()).await else {
            return Err("client role: lifetime over".into());
        };
        let Some(line) = line.map_err(io_err("stdin"))? else {
            return Ok(());
        };
        let answer = match parse_job(&line) {
            Ok((work, ups, s)) => {
                match bounded(RUN_LIMIT, run_work(work, Via::Direct, ups, &s)).await {
                    Ok(sample) => sample_line(&sample),
                    Err(e) => format!("error {}", e.lines().next().unwrap_or_default()),
                }
            }
            Err(e) => format!("error {e}"),
        };
        if writeln!(io::stdout(), "{answer}").is_err() {
            return Ok(()); // the tool is gone
        }
    }
    Ok(())
}
