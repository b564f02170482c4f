//! Config: the TOML model of a portcullis config file, and nothing else.
//!
//! In: the text of a config file (or of the embedded profile). Out: a typed,
//! defaulted [`Config`] whose user-written strings keep their byte spans, so
//! that `policy::compile` can report `file:line:col` for every semantic error.
//! This module does no I/O beyond reading the file it is given and the files
//! its `[policy] include` names (each parsed as rules and expectations, located
//! in its own text), and never interprets rules: that is `policy::compile`'s job.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// A config text and the name it is reported under (a path, or `profile:azureml`).
#[derive(Debug, Clone)]
pub struct Source {
    /// File name used in messages.
    pub name: String,
    /// The whole text.
    pub text: String,
}

impl Source {
    /// Line and column (1-based) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        LineIndex::new(&self.text).line_col(offset)
    }

    /// `name:line:col` for a span.
    pub fn locate(&self, span: &Range<usize>) -> Location {
        LineIndex::new(&self.text).locate(&self.name, span)
    }
}

/// Where each line of a text starts, for many location lookups in one text
/// (compile locates every rule: a scan per lookup would be quadratic).
#[derive(Debug, Clone)]
pub struct LineIndex {
    starts: Vec<usize>,
    len: usize,
}

impl LineIndex {
    /// Indexes a text.
    pub fn new(text: &str) -> LineIndex {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineIndex {
            starts,
            len: text.len(),
        }
    }

    /// Line and column (1-based) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.len);
        let line = self.starts.partition_point(|&s| s <= offset);
        (line, offset - self.starts[line - 1] + 1)
    }

    /// `file:line:col` for a span.
    pub fn locate(&self, file: &str, span: &Range<usize>) -> Location {
        let (line, col) = self.line_col(span.start);
        Location {
            file: file.to_string(),
            line,
            col,
        }
    }
}

/// Where something was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// File name as given to [`Source`].
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

/// A config file that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML is malformed or does not fit the model (unknown key, wrong type).
    #[error("{location}: {message}")]
    Parse {
        /// Where the parser stopped.
        location: Location,
        /// The parser's message, without its own position.
        message: String,
    },
    /// An `[policy] include` pattern that cannot be used (bad form, unreadable folder).
    #[error("{location}: policy.include[{index}]: {message}")]
    Include {
        /// Where the pattern was written.
        location: Location,
        /// Index in `[policy] include`.
        index: usize,
        /// What is wrong.
        message: String,
    },
}

/// The whole config file. Every table is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Placeholder values: `<region>` in a rule is replaced by `vars.region`. Default: none.
    #[serde(default)]
    pub vars: BTreeMap<String, Spanned<String>>,
    /// Listener addresses.
    #[serde(default)]
    pub listen: Listen,
    /// What `/readyz` requires besides bound listeners.
    #[serde(default)]
    pub admin: Admin,
    /// Which clients are served.
    #[serde(default)]
    pub clients: Clients,
    /// Profile, scenarios, mode.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Rules of this file, in order (`[[rule]]`).
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
    /// Static name → addresses, consulted before DNS (split horizon, tests). Default: empty.
    #[serde(default)]
    pub resolve: BTreeMap<String, Vec<Spanned<String>>>,
    /// Sizes and timeouts.
    #[serde(default)]
    pub limits: Limits,
    /// The DNS listener's answers and the addresses it learns.
    #[serde(default)]
    pub dns: DnsConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Policy tests run by `portcullis check` (`[[expect]]`).
    #[serde(default, rename = "expect")]
    pub expects: Vec<Expect>,
    /// The files `[policy] include` named, in the order read (filled by [`Config::load`]).
    #[serde(skip)]
    pub included: Vec<Included>,
}

/// A file named by `[policy] include`: its rules and expectations, which
/// come after the including file's, located in its own text.
#[derive(Debug)]
pub struct Included {
    /// Its path (as reported) and text.
    pub source: Source,
    /// Indexes of the `[policy] include` patterns that named it.
    pub patterns: Vec<usize>,
    /// Its `[[rule]]` blocks.
    pub rules: Vec<RuleConfig>,
    /// Its `[[expect]]` blocks.
    pub expects: Vec<Expect>,
}

/// What an included file may hold: rules and expectations only, so an
/// included file cannot include further files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fragment {
    #[serde(default, rename = "rule")]
    rules: Vec<RuleConfig>,
    #[serde(default, rename = "expect")]
    expects: Vec<Expect>,
}

impl Included {
    /// Parses the text of an included file.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] located in `source`; anything but `[[rule]]`
    /// and `[[expect]]` is an unknown field.
    pub fn parse(source: Source, pattern: usize) -> Result<Included, ConfigError> {
        let fragment: Fragment =
            toml::from_str(&source.text).map_err(|err| parse_error(&source, &err))?;
        Ok(Included {
            source,
            patterns: vec![pattern],
            rules: fragment.rules,
            expects: fragment.expects,
        })
    }
}

/// `[listen]`: where each listener binds. Changing these needs a restart.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Explicit proxy (CONNECT and absolute-URI HTTP). Default `127.0.0.1:3128`.
    #[serde(default = "default_proxy_addr")]
    pub proxy: Option<SocketAddr>,
    /// Transparent listener fed by nftables REDIRECT. Default: off.
    #[serde(default)]
    pub transparent: Option<SocketAddr>,
    /// `/metrics`, `/healthz`, `/readyz`. Default `127.0.0.1:9090`.
    #[serde(default = "default_admin_addr")]
    pub admin: Option<SocketAddr>,
    /// DNS for clients (UDP and TCP): answers only names some rule allows,
    /// and remembers the addresses it answered. Default: off.
    #[serde(default)]
    pub dns: Option<SocketAddr>,
}

/// `[admin]`: what the admin endpoint's `/readyz` requires.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// `/readyz` answers 503 unless the transparent ruleset is loaded, as
    /// the root-only counters timer last saw it: its file names the
    /// portcullis forward chain and is fresh. For gateways behind a load
    /// balancer in transparent mode, where a gateway without its ruleset
    /// cannot route. Needs `[listen] transparent`. Default false.
    #[serde(default)]
    pub require_ruleset: Option<Spanned<bool>>,
}

impl Admin {
    /// Whether `/readyz` requires the ruleset (`require_ruleset`, default false).
    pub fn require_ruleset(&self) -> bool {
        self.require_ruleset.as_ref().is_some_and(|s| *s.get_ref())
    }
}

fn default_proxy_addr() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 3128)))
}

fn default_admin_addr() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9090)))
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            proxy: default_proxy_addr(),
            transparent: None,
            admin: default_admin_addr(),
            dns: None,
        }
    }
}

/// What the DNS listener answers for a name no rule allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefuseWith {
    /// `REFUSED` (the default): the client knows it was policy.
    #[default]
    Refused,
    /// `NXDOMAIN`: the name seems not to exist.
    Nxdomain,
}

/// `[dns]`: where the gateway resolves, and how the DNS listener answers
/// and remembers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Resolvers the gateway asks (`"10.0.0.4"` or `"10.0.0.4:53"`), for
    /// its own connections and for the DNS listener. Default: `/etc/resolv.conf`.
    pub servers: Vec<Spanned<String>>,
    /// The answer for a name no rule allows. Default `refused`.
    pub refuse: RefuseWith,
    /// Learned addresses are kept at least this long (seconds). Default 30.
    pub min_ttl_s: u32,
    /// ... and at most this long, before the grace period. Default 86400.
    pub max_ttl_s: u32,
    /// Kept this long past their TTL (Azure Firewall keeps 15 minutes). Default 900.
    pub grace_s: u32,
    /// Learned addresses kept; past it the oldest go first. Default 100000.
    pub max_learned: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            servers: Vec::new(),
            refuse: RefuseWith::Refused,
            min_ttl_s: 30,
            max_ttl_s: 86_400,
            grace_s: 900,
            max_learned: 100_000,
        }
    }
}

/// `[clients]`: who may use the gateway, and named groups of them.
///
/// Every key but `allow` names a client group: a list of CIDRs
/// (`training = ["10.0.2.0/24"]`) or a table with `cidrs` and `mode`
/// (`inference = { cidrs = ["10.0.3.0/24"], mode = "audit" }`). A rule with
/// `clients = ["training"]` applies only to clients in that group.
#[derive(Debug)]
pub struct Clients {
    /// Client CIDRs served; everyone else gets 403. Default: loopback only.
    /// An empty list refuses to start: portcullis is never an open proxy.
    pub allow: Vec<Spanned<String>>,
    /// Named client groups, in file order. Default: none.
    pub groups: Vec<ClientGroup>,
}

/// One named client group of `[clients]`.
#[derive(Debug, Clone)]
pub struct ClientGroup {
    /// The group's name (its key in `[clients]`).
    pub name: Spanned<String>,
    /// Its CIDRs; each must lie inside `[clients] allow`.
    pub cidrs: Vec<Spanned<String>>,
    /// `enforce` or `audit` for its clients. Default: `[policy] mode`.
    pub mode: Option<Mode>,
}

/// A group's value: a list of CIDRs, or a table with `cidrs` and `mode`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupTable {
    /// The group's CIDRs.
    cidrs: Vec<Spanned<String>>,
    /// `enforce` or `audit`. Default: `[policy] mode`.
    #[serde(default)]
    mode: Option<Mode>,
}

impl<'de> Deserialize<'de> for Clients {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ClientsVisitor)
    }
}

struct ClientsVisitor;

impl<'de> serde::de::Visitor<'de> for ClientsVisitor {
    type Value = Clients;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a table: `allow = [CIDRs]` and named client groups")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Clients, A::Error> {
        let mut allow = None;
        let mut groups: Vec<ClientGroup> = Vec::new();
        while let Some(key) = map.next_key::<Spanned<String>>()? {
            if key.get_ref() == "allow" {
                allow = Some(map.next_value()?);
                continue;
            }
            let (cidrs, mode) = match map.next_value::<GroupValue>()? {
                GroupValue::List(cidrs) => (cidrs, None),
                GroupValue::Table(t) => (t.cidrs, t.mode),
            };
            groups.push(ClientGroup {
                name: key,
                cidrs,
                mode,
            });
        }
        // Tables may arrive in key order: file order is what group bits,
        // labels and "first group" follow.
        groups.sort_by_key(|g| (g.name.span().start, g.cidrs.first().map(|c| c.span().start)));
        Ok(Clients {
            allow: allow.unwrap_or_else(default_clients),
            groups,
        })
    }
}

/// A group written as a list or as a table (read without buffering, so
/// that spans survive).
enum GroupValue {
    List(Vec<Spanned<String>>),
    Table(GroupTable),
}

impl<'de> Deserialize<'de> for GroupValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = GroupValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a client group: a list of CIDRs, or a table with `cidrs` and `mode`")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<GroupValue, A::Error> {
                let list =
                    Deserialize::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
                Ok(GroupValue::List(list))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<GroupValue, A::Error> {
                let table =
                    Deserialize::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(GroupValue::Table(table))
            }
        }
        d.deserialize_any(V)
    }
}

fn default_clients() -> Vec<Spanned<String>> {
    ["127.0.0.0/8", "::1/128"]
        .into_iter()
        .map(|s| Spanned::new(0..0, s.to_string()))
        .collect()
}

impl Default for Clients {
    fn default() -> Self {
        Clients {
            allow: default_clients(),
            groups: Vec::new(),
        }
    }
}

/// `enforce` denies; `audit` lets would-be denials through and counts them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny what no rule allows (default).
    #[default]
    Enforce,
    /// Allow everything, log and count `audit_deny` for what would be denied.
    Audit,
}

/// Which address a transparent connection is dialled at.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamMode {
    /// Dial a fresh resolution of the allowed name (default; a forged SNI cannot reach another address).
    #[default]
    Resolve,
    /// Dial the original destination, but only if it is among the name's addresses.
    Verify,
    /// Dial the original destination as is (spoofable: only for split-horizon DNS you trust).
    Original,
}

/// `[policy]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// `enforce` (default) or `audit`.
    #[serde(default)]
    pub mode: Mode,
    /// Built-in profile whose rules come before this file's: `azureml` (default) or `none`.
    #[serde(default = "default_profile")]
    pub profile: Spanned<String>,
    /// Profile scenarios to enable. Default: the profile's defaults
    /// (`basic`, `python-packages`, `monitoring` for `azureml`).
    #[serde(default)]
    pub scenarios: Option<Vec<Spanned<String>>>,
    /// Transparent mode: `resolve` (default), `verify` or `original`.
    #[serde(default)]
    pub upstream: UpstreamMode,
    /// Azure Service Tags JSON file (`ServiceTags_Public_*.json`), relative to this file. Default: none,
    /// and service-tag rules wait for it.
    #[serde(default)]
    pub service_tags: Option<Spanned<String>>,
    /// Cut a CONNECT tunnel whose TLS SNI names another host than the CONNECT authority. Default true.
    #[serde(default = "yes")]
    pub require_matching_sni: bool,
    /// Rules switched off by name (the profile's or this file's), e.g. to
    /// replace `microsoft-storage`'s `*.blob.core.windows.net` with the
    /// accounts you own. Unknown names are errors. Default: none.
    #[serde(default)]
    pub disable_rules: Vec<Spanned<String>>,
    /// Files of `[[rule]]` (and `[[expect]]`) blocks merged after this file's,
    /// relative to this file: `rules.d/*.toml`. A `*` may stand only in the
    /// file-name part; matches are read in sorted order; a pattern with a `*`
    /// that matches nothing is a warning, a plain path that is missing an
    /// error. Included files cannot include. Default: none.
    #[serde(default)]
    pub include: Vec<Spanned<String>>,
    /// Guarded private ranges that allowed names may resolve to (Azure
    /// private endpoints in the VNet, test labs): an address there is
    /// reached when a name rule, a name the DNS listener answered or an
    /// address rule allows it, never by itself. Each must lie inside one
    /// guarded range. Default: none.
    #[serde(default)]
    pub private_ranges: Vec<Spanned<String>>,
}

fn default_profile() -> Spanned<String> {
    Spanned::new(0..0, "azureml".to_string())
}

fn yes() -> bool {
    true
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            mode: Mode::default(),
            profile: default_profile(),
            scenarios: None,
            upstream: UpstreamMode::default(),
            service_tags: None,
            require_matching_sni: true,
            disable_rules: Vec::new(),
            include: Vec::new(),
            private_ranges: Vec::new(),
        }
    }
}

/// Allow or deny.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let matching traffic through (default).
    #[default]
    Allow,
    /// Refuse matching traffic; wins over every allow.
    Deny,
}

/// Transport protocol of a rule or destination.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (default).
    #[default]
    Tcp,
    /// UDP (address rules only: names are never seen for UDP).
    Udp,
    /// Both.
    Any,
}

impl Protocol {
    /// Label form.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Any => "any",
        }
    }
}

/// Which way a rule's traffic flows. Only `egress` rules take part in decisions;
/// the others document what the profile's source requires (nftables, NSGs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// From the protected network out (default).
    #[default]
    Egress,
    /// Into the protected network (rendered as a forward accept by `render nftables`).
    Inbound,
    /// Between hosts inside the protected network (documentation only).
    Internal,
}

/// A port or an inclusive range `"8704-8710"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PortSpec {
    /// A single port.
    Number(i64),
    /// A range written as a string.
    Range(String),
}

/// One `[[rule]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique name, shown in logs and `explain`.
    pub name: Spanned<String>,
    /// Why the rule exists (the profile keeps the source document's wording). Default: empty.
    #[serde(default)]
    pub description: Option<String>,
    /// Scenario the rule belongs to; it is active only when that scenario is enabled. Default: always active.
    #[serde(default)]
    pub scenario: Option<String>,
    /// Host names: `example.com` or `*.example.com` (one or more labels, never the apex).
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    /// Address ranges, IPv4 or IPv6 (`10.0.0.0/8`, `2001:db8::/32`, or one address).
    #[serde(default)]
    pub cidrs: Vec<Spanned<String>>,
    /// Azure service tags (`AzureMachineLearning`, `Storage.WestUS2`), case-insensitive.
    #[serde(default)]
    pub service_tags: Vec<Spanned<String>>,
    /// Ports and ranges. Default: 443.
    #[serde(default)]
    pub ports: Vec<Spanned<PortSpec>>,
    /// Client groups (`[clients]` names) the rule applies to. Default: every
    /// client `[clients] allow` serves.
    #[serde(default)]
    pub clients: Option<Spanned<Vec<Spanned<String>>>>,
    /// `tcp` (default), `udp` or `any`.
    #[serde(default)]
    pub protocol: Protocol,
    /// `allow` (default) or `deny`.
    #[serde(default)]
    pub action: Action,
    /// `egress` (default), `inbound` or `internal`.
    #[serde(default)]
    pub direction: Direction,
    /// Inbound rules: the address ranges the traffic may reach (e.g.
    /// `["<vnet>"]`); the rule's `cidrs`/`service_tags` are its sources.
    /// Required for inbound rules, so the ruleset never opens a port to
    /// every address. Default: none.
    #[serde(default)]
    pub to: Vec<Spanned<String>>,
    /// Address rules: which TLS names a CONNECT to one of the rule's
    /// addresses may carry. `match` (default): only names some host rule
    /// allows on that port; `any`: every name (linted: every tenant behind
    /// the addresses is reachable).
    #[serde(default)]
    pub sni: SniMode,
    /// Tunnels this rule allows may carry a protocol that names no host
    /// (SSH on 22, …), unchecked. Default false: a tunnel must start with a
    /// TLS ClientHello or an HTTP request whose name agrees, or it is cut.
    #[serde(default)]
    pub opaque: bool,
}

/// Which TLS names an address rule's tunnels may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SniMode {
    /// Only names a host rule allows on the port.
    #[default]
    Match,
    /// Any name.
    Any,
}

/// `[limits]`: every read of client input is bounded in size and time.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request head accepted from a client. Default 65536.
    pub max_head_bytes: usize,
    /// Time allowed for a client to send its request head. Default 10000.
    pub head_timeout_ms: u64,
    /// A tunnel with no bytes either way for this long is closed. Default 300000 (5 min).
    pub idle_timeout_ms: u64,
    /// Time allowed for one upstream connection attempt sequence. Default 5000.
    pub connect_timeout_ms: u64,
    /// Concurrent client connections per listener; more get 503 (explicit) or are closed.
    /// Default 50000: the 50,000 idle tunnels docs/perf/cost.md sizes a gateway for
    /// (6 KiB of RSS each; the unit's LimitNOFILE=131072 leaves 64,496).
    pub max_connections: usize,
    /// Concurrent connections from one client address. Default 1024.
    pub max_connections_per_client: usize,
    /// Transparent mode: time to wait for the first client bytes. Default 2000.
    pub sniff_timeout_ms: u64,
    /// Transparent mode and SNI checks: bytes buffered to find SNI or Host. Default 16384.
    pub sniff_max_bytes: usize,
    /// On shutdown, open tunnels may run this long before being cut. Default 30000.
    pub grace_period_ms: u64,
    /// On shutdown, `/readyz` answers 503 this long before the listeners
    /// close, so a load balancer's health probe takes the gateway out of
    /// rotation while it still accepts (longer than probe interval times
    /// unhealthy threshold). Default 0 (close at once).
    pub drain_delay_ms: u64,
    /// Distinct denied hosts tracked as metric series; the rest fold into `__other__`. Default 500.
    pub max_denied_hosts: usize,
    /// DNS answers kept in the cache. Default 10000.
    pub dns_cache_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: 64 * 1024,
            head_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            connect_timeout_ms: 5_000,
            max_connections: 50_000,
            max_connections_per_client: 1024,
            sniff_timeout_ms: 2_000,
            sniff_max_bytes: 16 * 1024,
            grace_period_ms: 30_000,
            drain_delay_ms: 0,
            max_denied_hosts: 500,
            dns_cache_entries: 10_000,
        }
    }
}

/// Log line format.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (default).
    #[default]
    Json,
    /// Human-readable text.
    Text,
}

/// `[log]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `json` (default) or `text`.
    #[serde(default)]
    pub format: LogFormat,
    /// tracing filter, e.g. `info` (default) or `portcullis=debug`. `RUST_LOG` overrides it.
    #[serde(default = "default_level")]
    pub level: String,
}

fn default_level() -> String {
    "info".to_string()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: default_level(),
        }
    }
}

/// Expected verdict of an `[[expect]]` policy test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpectVerdict {
    /// The destination must be allowed.
    Allow,
    /// The destination must be denied.
    Deny,
}

/// `[[expect]]`: a policy test that `portcullis check` runs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// `host[:port]` or `ip[:port]` (port defaults to 443).
    pub dest: Spanned<String>,
    /// `tcp` (default) or `udp`.
    #[serde(default)]
    pub proto: Protocol,
    /// `allow` or `deny`.
    pub verdict: ExpectVerdict,
    /// The client address the verdict is for. Default: every client the
    /// gateway serves (each client group, and clients in none, must get it).
    #[serde(default)]
    pub client: Option<Spanned<String>>,
}

impl Config {
    /// Parses a config text.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] with the location of the first syntax or schema error.
    pub fn parse(source: &Source) -> Result<Config, ConfigError> {
        toml::from_str(&source.text).map_err(|err| parse_error(source, &err))
    }

    /// The `[[expect]]` tests of this file (whose text is `own`) and of each
    /// included file, each with the text its spans point into.
    pub fn expects_by_file<'a>(
        &'a self,
        own: &'a Source,
    ) -> impl Iterator<Item = (&'a Source, &'a [Expect])> {
        let included = (self.included.iter()).map(|inc| (&inc.source, inc.expects.as_slice()));
        std::iter::once((own, self.expects.as_slice())).chain(included)
    }

    /// Reads and parses a config file and the files its `[policy] include` names.
    ///
    /// # Errors
    /// [`ConfigError::Read`], [`ConfigError::Parse`] (located in the file
    /// where it was found) or [`ConfigError::Include`].
    pub fn load(path: &Path) -> Result<(Config, Source), ConfigError> {
        let source = read_source(path)?;
        let mut config = Config::parse(&source)?;
        config.included = include::read(&config.policy.include, path, &source)?;
        Ok((config, source))
    }
}

/// A file's text, named by its path.
fn read_source(path: &Path) -> Result<Source, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Source {
        name: path.display().to_string(),
        text,
    })
}

/// `[policy] include`: patterns to files, read and parsed.
mod include {
    use std::path::{Path, PathBuf};

    use toml::Spanned;

    use super::{ConfigError, Included, Source, read_source};

    /// Every file the patterns name, each once, pattern by pattern, sorted
    /// by name within a pattern. The including file itself is skipped (so
    /// `*.toml` beside it works).
    pub(super) fn read(
        patterns: &[Spanned<String>],
        config_path: &Path,
        config_source: &Source,
    ) -> Result<Vec<Included>, ConfigError> {
        let base = config_path.parent().unwrap_or(Path::new(""));
        let own = std::fs::canonicalize(config_path).ok();
        // Canonical paths read so far, each with its place in `out` (none: the config).
        let mut seen: Vec<(PathBuf, Option<usize>)> = own.map(|p| (p, None)).into_iter().collect();
        let mut out: Vec<Included> = Vec::new();
        for (index, pattern) in patterns.iter().enumerate() {
            let error = |message: String| ConfigError::Include {
                location: config_source.locate(&pattern.span()),
                index,
                message,
            };
            for path in expand(pattern.get_ref(), base).map_err(error)? {
                let canonical = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
                match seen.iter().find(|(p, _)| *p == canonical) {
                    Some((_, Some(k))) => out[*k].patterns.push(index),
                    Some((_, None)) => {}
                    None => {
                        seen.push((canonical, Some(out.len())));
                        out.push(Included::parse(read_source(&path)?, index)?);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The files one pattern names, sorted. A plain path is returned as is
    /// when it exists (compile reports one that does not); a `*` may stand
    /// only in the file-name part.
    fn expand(pattern: &str, base: &Path) -> Result<Vec<PathBuf>, String> {
        let pattern = pattern.trim();
        if pattern.is_empty() {
            return Err("an empty pattern names no file".into());
        }
        let full = base.join(pattern);
        let name = full
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .ok_or_else(|| format!("'{pattern}' names no file (it ends in a folder)"))?;
        let dir = full.parent().unwrap_or(Path::new("")).to_path_buf();
        if dir.to_string_lossy().contains('*') {
            return Err(format!(
                "'{pattern}': a '*' may stand only in the file name (rules.d/*.toml), not in a folder"
            ));
        }
        if !name.contains('*') {
            return Ok(if full.is_file() {
                vec![full]
            } else {
                Vec::new()
            });
        }
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| format!("cannot read folder {}: {e}", dir.display()))?;
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().is_file())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| (!n.starts_with('.') || name.starts_with('.')) && matches(&name, n))
            .collect();
        names.sort();
        Ok(names.into_iter().map(|n| dir.join(n)).collect())
    }

    /// Whether `name` fits `pattern`, where `*` stands for any run of
    /// characters (none included) and everything else for itself.
    pub(super) fn matches(pattern: &str, name: &str) -> bool {
        let mut parts = pattern.split('*');
        let first = parts.next().unwrap_or("");
        let Some(mut rest) = name.strip_prefix(first) else {
            return false;
        };
        let parts: Vec<&str> = parts.collect();
        let Some((last, middle)) = parts.split_last() else {
            return rest.is_empty();
        };
        for part in middle {
            match rest.find(part) {
                Some(i) => rest = &rest[i + part.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

/// Turns a toml error into a located one (toml's own message carries a snippet we don't want).
pub(crate) fn parse_error(source: &Source, err: &toml::de::Error) -> ConfigError {
    let span = err.span().unwrap_or(0..0);
    ConfigError::Parse {
        location: source.locate(&span),
        message: err.message().trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(text: &str) -> Source {
        Source {
            name: "test.toml".into(),
            text: text.into(),
        }
    }

    #[test]
    fn empty_config_has_safe_defaults() {
        let c = Config::parse(&src("")).unwrap();
        assert_eq!(c.listen.proxy, Some("127.0.0.1:3128".parse().unwrap()));
        assert_eq!(c.clients.allow.len(), 2);
        assert_eq!(c.policy.mode, Mode::Enforce);
        assert_eq!(c.policy.profile.get_ref(), "azureml");
        assert_eq!(c.limits.max_head_bytes, 65536);
    }

    #[test]
    fn unknown_key_is_located() {
        let err = Config::parse(&src("[policy]\nmode = \"enforce\"\nmood = 1\n")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("test.toml:3:1: unknown field `mood`"),
            "{text}"
        );
    }

    #[test]
    fn bad_enum_value_is_located() {
        let err = Config::parse(&src("[policy]\nmode = \"strict\"\n")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("test.toml:2:8: unknown variant `strict`"),
            "{text}"
        );
    }

    #[test]
    fn include_patterns_match_file_names() {
        use super::include::matches;
        assert!(matches("*.toml", "a.toml"));
        assert!(matches("*.toml", ".toml"));
        assert!(!matches("*.toml", "a.toml.bak"));
        assert!(matches("aml-*.toml", "aml-deps.toml"));
        assert!(!matches("aml-*.toml", "deps.toml"));
        assert!(matches("a*b*c", "abc"));
        assert!(matches("a*b*c", "a-b-b-c"));
        assert!(!matches("a*b*c", "a-c"));
        assert!(matches("*", "x"));
        assert!(matches("plain.toml", "plain.toml"));
        assert!(!matches("plain.toml", "plain.tom"));
        assert!(!matches("ab*ba", "aba"));
    }

    #[test]
    fn line_col_counts_from_one() {
        let s = src("ab\ncd\n");
        assert_eq!(s.line_col(0), (1, 1));
        assert_eq!(s.line_col(2), (1, 3));
        assert_eq!(s.line_col(3), (2, 1));
        assert_eq!(s.line_col(4), (2, 2));
        assert_eq!(s.line_col(6), (3, 1));
        assert_eq!(s.line_col(600), (3, 1));
        assert_eq!(src("").line_col(0), (1, 1));
    }
}
