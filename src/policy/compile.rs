//! Compile: config (plus profile, `--var`s and service tags) in, [`Policy`]
//! out, or every error found.
//!
//! In: a parsed [`Config`] and its [`Source`] text, and a [`CompileInput`].
//! Out: the immutable [`Policy`] with its warnings, or every error (each
//! with file:line:col and config path) instead of stopping at the first.
//! This is the only place that builds host and CIDR tables. Each step is a
//! function below, in the order `compile` runs them: profile, vars,
//! scenarios, clients, rules, static resolution, then (only without errors)
//! lints and tables.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use toml::Spanned;

use super::clients::{self, ClientMap};
use super::decision::Reason;
use super::diagnostic::{Diagnostic, Diags};
use super::grants::{self, Grant};
use super::host::{self, HostKey, HostTable};
use super::net::{self, NetTable};
use super::pending::{Pattern, Pending};
use super::profile::{self, Profile};
use super::rule::{Rule, RuleState, ScenarioState};
use super::{Inner, Policy, lint};
use crate::config::{Action, Config, Direction, PortSpec, RuleConfig, SniMode, Source};
use crate::servicetags::ServiceTags;

/// Everything `compile` needs besides the config itself.
#[derive(Default)]
pub struct CompileInput<'a> {
    /// `--var key=value` overrides, applied over `[vars]`.
    pub var_overrides: &'a [(String, String)],
    /// The loaded service tags file, if `[policy] service_tags` names one.
    pub service_tags: Option<&'a ServiceTags>,
    /// Placeholders without a value disable their rule with a warning instead
    /// of failing (used for the embedded default, when there is no config file).
    pub lenient_placeholders: bool,
    /// Reload generation to stamp the policy with.
    pub generation: u64,
}

/// Source index (in [`Diags`]) of the config file.
const CFG: usize = 0;
/// Source index of the built-in profile.
const PROFILE: usize = 1;
/// Source index of the first included file (`config.included[0]`).
const INCLUDED: usize = 2;

/// The config's own rules, then each included file's: source index, config
/// path (`rules[3]`, the index within its file) and rule.
fn config_rules(config: &Config) -> impl Iterator<Item = (usize, String, &RuleConfig)> {
    let own = (config.rules.iter().enumerate()).map(|(i, r)| (CFG, format!("rules[{i}]"), r));
    let included = config.included.iter().enumerate().flat_map(|(k, inc)| {
        (inc.rules.iter().enumerate()).map(move |(i, r)| (INCLUDED + k, format!("rules[{i}]"), r))
    });
    own.chain(included)
}

/// An `[policy] include` pattern that named no file: a plain path is an
/// error (a typo, or a file not yet written); a pattern with `*` a warning
/// (a drop-in folder may be empty, and fewer rules only deny more).
fn unmatched_includes(config: &Config, d: &mut Diags<'_>) {
    for (i, pattern) in config.policy.include.iter().enumerate() {
        if config.included.iter().any(|inc| inc.patterns.contains(&i)) {
            continue;
        }
        let path = format!("policy.include[{i}]");
        let text = pattern.get_ref();
        if text.contains('*') {
            let message = format!("'{text}' matches no file (relative to this file's folder)");
            d.warn(CFG, Some(&pattern.span()), path, message);
        } else {
            let message = format!("'{text}': no such file (relative to this file's folder)");
            d.error(CFG, Some(&pattern.span()), path, message);
        }
    }
}

/// SHA-256 of the config text and, in order, of each included file's path and text.
fn config_sha256(config: &Config, source: &Source) -> String {
    if config.included.is_empty() {
        return sha256_hex(source.text.as_bytes());
    }
    let mut all = source.text.clone();
    for inc in &config.included {
        all.push_str(&format!("\0{}\0{}", inc.source.name, inc.source.text));
    }
    sha256_hex(all.as_bytes())
}

impl Policy {
    /// Compiles a config (and its profile) into a policy.
    ///
    /// # Errors
    /// Every error found, each with its location and config path; warnings
    /// found along the way are included.
    pub fn compile(
        config: &Config,
        source: &Source,
        input: &CompileInput<'_>,
    ) -> Result<(Policy, Vec<Diagnostic>), Vec<Diagnostic>> {
        let profile = profile::by_name(config.policy.profile.get_ref());
        let empty = Source {
            name: String::new(),
            text: String::new(),
        };
        let mut sources = vec![source, profile.map_or(&empty, |p| &p.source)];
        sources.extend(config.included.iter().map(|i| &i.source));
        let mut d = Diags::new(sources);
        check_profile(config, profile, &mut d);
        unmatched_includes(config, &mut d);
        let vars = vars(config, input, &mut d);
        let scenarios = scenarios(config, profile, &mut d);
        let clients = clients::compile(config, CFG, &mut d);
        let compiled = rules(config, profile, &vars, &scenarios, &clients, input, &mut d);
        let resolve = static_resolve(config, &mut d);
        let dns_servers = dns_servers(config, &mut d);
        let private_ranges = private_ranges(config, &mut d);
        if d.has_errors() {
            return Err(d.list);
        }
        waiting_summary(&compiled.rules, input.lenient_placeholders, &mut d);
        lint::lint(
            &compiled.rules,
            &compiled.keyed,
            config.listen.dns.is_some(),
            &mut d,
        );

        let mut grants = Vec::new();
        let host_keys = grants::fold_host_grants(compiled.keyed, &mut grants);
        let nets = net_table(compiled.netted, &mut grants);
        let inner = Inner {
            rules: compiled.rules,
            grants,
            hosts: HostTable::build(&host_keys),
            nets,
            pending: compiled.pending,
            mode: config.policy.mode,
            upstream: config.policy.upstream,
            require_matching_sni: config.policy.require_matching_sni,
            default_client: clients.with_mask(clients::SERVED),
            clients,
            resolve,
            dns: config.dns.clone(),
            dns_servers,
            private_ranges,
            dns_listener: config.listen.dns.is_some(),
            scenarios,
            vars,
            service_tags: input.service_tags.map(ServiceTags::file),
            generation: input.generation,
            config_sha256: config_sha256(config, source),
        };
        Ok((
            Policy {
                inner: Arc::new(inner),
            },
            d.list,
        ))
    }
}

/// `[policy] profile` names a built-in profile or `none`.
fn check_profile(config: &Config, profile: Option<&Profile>, d: &mut Diags<'_>) {
    let name = config.policy.profile.get_ref();
    if profile.is_none() && name != "none" {
        d.error(
            CFG,
            Some(&config.policy.profile.span()),
            "policy.profile".into(),
            format!("unknown profile '{name}' (known: azureml, none)"),
        );
    }
}

/// Placeholder values: `[vars]`, then `--var` over them; each must be usable
/// inside a host name or CIDR.
fn vars(config: &Config, input: &CompileInput<'_>, d: &mut Diags<'_>) -> BTreeMap<String, String> {
    let mut vars: BTreeMap<String, String> = config
        .vars
        .iter()
        .map(|(k, v)| (k.clone(), v.get_ref().clone()))
        .collect();
    for (k, v) in input.var_overrides {
        vars.insert(k.clone(), v.clone());
    }
    for (k, v) in &vars {
        let ok = !v.is_empty()
            && v.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b':')
            });
        if !ok {
            let span = config.vars.get(k).map(|s| s.span());
            d.error(
                CFG,
                span.as_ref(),
                format!("vars.{k}"),
                format!(
                    "'{v}' is not a usable value: letters, digits, '-', '_', '.', '/' and ':' only"
                ),
            );
        }
    }
    vars
}

/// The profile's scenarios (on by default as it says) and those config rules
/// name (off); `[policy] scenarios`, when given, is the exact set that is on.
fn scenarios(config: &Config, profile: Option<&Profile>, d: &mut Diags<'_>) -> Vec<ScenarioState> {
    let mut scenarios: Vec<ScenarioState> = profile
        .map(|p| {
            p.scenarios
                .iter()
                .map(|s| ScenarioState {
                    name: s.name.clone(),
                    description: s.description.clone(),
                    notes: s.notes.clone(),
                    enabled: s.default,
                })
                .collect()
        })
        .unwrap_or_default();
    for (_, _, rule) in config_rules(config) {
        if let Some(s) = &rule.scenario
            && !scenarios.iter().any(|k| &k.name == s)
        {
            scenarios.push(ScenarioState {
                name: s.clone(),
                description: String::new(),
                notes: Vec::new(),
                enabled: false,
            });
        }
    }
    let Some(wanted) = &config.policy.scenarios else {
        return scenarios;
    };
    for s in scenarios.iter_mut() {
        s.enabled = false;
    }
    for (i, w) in wanted.iter().enumerate() {
        match scenarios.iter_mut().find(|s| &s.name == w.get_ref()) {
            Some(s) => s.enabled = true,
            None => {
                let known: Vec<_> = scenarios.iter().map(|s| s.name.as_str()).collect();
                d.error(
                    CFG,
                    Some(&w.span()),
                    format!("policy.scenarios[{i}]"),
                    format!(
                        "unknown scenario '{}' (known: {})",
                        w.get_ref(),
                        known.join(", ")
                    ),
                );
            }
        }
    }
    scenarios
}

/// The compiled rules, and the grants they give host keys and CIDRs (in
/// rule order, then port order).
#[derive(Default)]
struct Compiled {
    rules: Vec<Rule>,
    keyed: Vec<(HostKey, Grant)>,
    netted: Vec<(IpNet, Grant)>,
    pending: Pending,
}

impl Compiled {
    /// Adds a rule, with one grant per port range on each of its keys and
    /// nets, and on what it waits for; `clients` is its group mask.
    fn add(&mut self, rule: Rule, keys: &[HostKey], nets: &[IpNet], waits: &Waits, clients: u64) {
        let rule_id = u32::try_from(self.rules.len()).expect("fewer than 2^32 rules");
        let why = match rule.state {
            RuleState::MissingVars(_) => Reason::NeedsVar,
            RuleState::WaitingForServiceTags => Reason::NeedsServiceTags,
            _ => Reason::ScenarioDisabled,
        };
        let waiting = matches!(why, Reason::NeedsVar | Reason::NeedsServiceTags)
            && rule.action == Action::Allow;
        for &(lo, hi) in &rule.ports {
            let grant = Grant {
                rule: rule_id,
                lo,
                hi,
                proto: rule.protocol,
                deny: rule.action == Action::Deny,
                active: rule.state == RuleState::Active,
                why,
                unlocks_guarded: false,
                more_specific: false,
                clients,
            };
            for key in keys {
                self.keyed.push((key.clone(), grant));
            }
            if waiting {
                for p in &waits.patterns {
                    self.pending.add_host(p.clone(), grant);
                }
                if let Some(guarded) = waits.addresses {
                    self.pending.add_addr(grant, why, guarded);
                }
            }
            for net in nets {
                let unlocks_guarded = net::unlocks_guarded(net);
                self.netted.push((
                    *net,
                    Grant {
                        unlocks_guarded,
                        ..grant
                    },
                ));
            }
        }
        self.rules.push(rule);
    }
}

/// Every rule: the profile's, then the config's. Rule names must be unique.
fn rules(
    config: &Config,
    profile: Option<&Profile>,
    vars: &BTreeMap<String, String>,
    scenarios: &[ScenarioState],
    groups: &ClientMap,
    input: &CompileInput<'_>,
    d: &mut Diags<'_>,
) -> Compiled {
    let enabled = |s: &Option<String>| {
        s.as_ref()
            .is_none_or(|name| scenarios.iter().any(|k| &k.name == name && k.enabled))
    };
    let profile_rules = profile.map(|p| p.rules.as_slice()).unwrap_or_default();
    let all = (profile_rules.iter().enumerate())
        .map(|(i, r)| (PROFILE, format!("profile.rules[{i}]"), r))
        .chain(config_rules(config));
    let mut out = Compiled::default();
    let mut names: HashMap<String, usize> = HashMap::new();
    let disabled: HashSet<&str> = (config.policy.disable_rules.iter())
        .map(|n| n.get_ref().as_str())
        .collect();
    for (src, path, rc) in all {
        let mask = clients::rule_mask(rc.clients.as_ref(), groups, &path, (src, &mut *d));
        let rule = RuleCx::new(rc, src, &path, vars, d).compile(input, enabled(&rc.scenario));
        let Some((mut rule, keys, nets, waits)) = rule else {
            continue;
        };
        // A switched-off rule still compiles its keys, so that `explain`
        // can say which setting turned it off.
        if disabled.contains(rule.name.as_str()) {
            rule.state = RuleState::Disabled;
        }
        if let Some(prev) = names.insert(rule.name.clone(), out.rules.len()) {
            d.error(
                src,
                Some(&rc.name.span()),
                format!("{path}.name"),
                format!(
                    "rule name '{}' is already used by another rule ({})",
                    rule.name, out.rules[prev].origin
                ),
            );
        }
        out.add(rule, &keys, &nets, &waits, mask);
    }
    unknown_disabled(config, &names, d);
    out
}

/// The flag of `portcullis init` that sets a placeholder, and an example
/// value, if it has one.
fn init_flag(var: &str) -> Option<&'static str> {
    Some(match var {
        "region" => "--region westus2",
        "storage" => "--storage ACCOUNT",
        "acr" => "--acr REGISTRY",
        "workspace_id" => "--workspace-id ID",
        "vnet" => "--vnet 10.0.0.0/16",
        _ => return None,
    })
}

/// One warning for every rule of an enabled scenario that cannot be
/// enforced yet (a placeholder without a value, or no service tags file),
/// with the command that fixes it: the gateway denies what they would allow,
/// and `explain` says `needs_var` / `needs_service_tags` for it.
fn waiting_summary(rules: &[Rule], lenient: bool, d: &mut Diags<'_>) {
    let mut by_var: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut tags: Vec<&str> = Vec::new();
    for r in rules {
        match &r.state {
            RuleState::MissingVars(vars) => {
                for v in vars {
                    by_var.entry(v).or_default().push(&r.name);
                }
            }
            RuleState::WaitingForServiceTags => tags.push(&r.name),
            _ => {}
        }
    }
    if by_var.is_empty() && tags.is_empty() {
        return;
    }
    let mut parts: Vec<String> = by_var
        .iter()
        .map(|(v, names)| format!("<{v}> has no value ({})", names.join(", ")))
        .collect();
    if !tags.is_empty() {
        parts.push(format!(
            "{} rule(s) wait for a service tags file ({})",
            tags.len(),
            tags.join(", ")
        ));
    }
    let mut fix: Vec<String> = by_var
        .keys()
        .map(|v| match init_flag(v) {
            Some(flag) => flag.to_string(),
            None => format!("--var {v}=VALUE"),
        })
        .collect();
    if !tags.is_empty() {
        fix.push("--service-tags FILE".into());
    }
    let how = if lenient {
        format!(
            "`portcullis init {}` writes a config that sets them (or pass --var NAME=VALUE and --service-tags FILE)",
            fix.join(" ")
        )
    } else {
        "set [policy] service_tags = \"FILE\" or pass --service-tags FILE (FILE from `az network list-service-tags --location REGION`, or the weekly 'Azure IP Ranges and Service Tags' download)".into()
    };
    let message = format!(
        "rules of enabled scenarios cannot be enforced yet, so the gateway denies what they would allow (`explain` says needs_var / needs_service_tags): {}. Fix: {how}",
        parts.join("; ")
    );
    d.warn(CFG, None, String::new(), message);
}

/// Lowercase hex SHA-256 of `bytes`.
fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest
        .as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// `[policy] disable_rules` names no rule: an error, with the closest names.
fn unknown_disabled(config: &Config, names: &HashMap<String, usize>, d: &mut Diags<'_>) {
    for (i, name) in config.policy.disable_rules.iter().enumerate() {
        if names.contains_key(name.get_ref()) {
            continue;
        }
        let want = name.get_ref().to_ascii_lowercase();
        let mut close: Vec<&String> = names
            .keys()
            .filter(|n| {
                n.contains(want.as_str()) || want.contains(n.as_str()) || shares_words(n, &want)
            })
            .collect();
        close.sort();
        close.truncate(3);
        let hint = if close.is_empty() {
            "`portcullis profile show` lists the profile's rules".to_string()
        } else {
            let close: Vec<String> = close.iter().map(|n| format!("'{n}'")).collect();
            format!("did you mean {}?", close.join(", "))
        };
        d.error(
            CFG,
            Some(&name.span()),
            format!("policy.disable_rules[{i}]"),
            format!("no rule is named '{}': {hint}", name.get_ref()),
        );
    }
}

/// Two rule names share a word of three letters or more (`storage` in
/// `microsoft-storage` and `storage-blob`).
fn shares_words(a: &str, b: &str) -> bool {
    let words = |s: &str| -> Vec<String> {
        s.split(['-', '_', '.'])
            .filter(|w| w.len() >= 3)
            .map(str::to_string)
            .collect()
    };
    let wb = words(b);
    words(a).iter().any(|w| wb.contains(w))
}

/// A compiled rule, with the host keys and nets it gives grants to, and
/// what it would allow once it stops waiting.
type CompiledRule = (Rule, Vec<HostKey>, Vec<IpNet>, Waits);

/// What a rule that waits for a value would allow: its host patterns with
/// the unfilled placeholders, and whether it is an address rule (`Some`;
/// `true` when a `cidrs` entry is unfilled, which may name private space).
#[derive(Default)]
struct Waits {
    patterns: Vec<Pattern>,
    addresses: Option<bool>,
}

/// One rule being compiled: its config, where it was written, and the
/// placeholders it uses that have no value.
struct RuleCx<'a, 'd, 's> {
    rc: &'a RuleConfig,
    src: usize,
    path: &'a str,
    vars: &'a BTreeMap<String, String>,
    d: &'d mut Diags<'s>,
    missing: Vec<String>,
    /// Host patterns whose placeholders have no value, partially filled.
    unfilled: Vec<Pattern>,
    /// A `cidrs` entry has an unfilled placeholder.
    unfilled_cidr: bool,
}

impl<'a, 'd, 's> RuleCx<'a, 'd, 's> {
    fn new(
        rc: &'a RuleConfig,
        src: usize,
        path: &'a str,
        vars: &'a BTreeMap<String, String>,
        d: &'d mut Diags<'s>,
    ) -> Self {
        RuleCx {
            rc,
            src,
            path,
            vars,
            d,
            missing: Vec::new(),
            unfilled: Vec::new(),
            unfilled_cidr: false,
        }
    }

    /// The rule, or `None` if it has errors (reported). `scenario_on`: its
    /// scenario, if any, is enabled.
    fn compile(mut self, input: &CompileInput<'_>, scenario_on: bool) -> Option<CompiledRule> {
        let errors_before = self.d.list.len();
        let rc = self.rc;
        let name = self.name();
        let ports = self.ports();
        let (hosts, keys) = self.hosts();
        let mut cidrs = self.cidrs();
        let to = self.to();
        let must_exist = scenario_on && rc.direction == Direction::Egress;
        let (service_tags, waiting) = self.service_tags(input.service_tags, must_exist, &mut cidrs);
        let state = self.state(&name, scenario_on, waiting, input.lenient_placeholders);
        if rc.sni == SniMode::Any && rc.cidrs.is_empty() && rc.service_tags.is_empty() {
            let path = format!("{}.sni", self.path);
            let message = "sni = \"any\" is for address rules (cidrs or service_tags): a host rule's tunnels carry its own names".to_string();
            self.error(rc.name.span(), path, message);
        }
        if self.d.errors_since(errors_before) {
            return None;
        }
        // Rules that cannot match anything yet still compile their host keys, so
        // that a denial can say which scenario or placeholder would allow it.
        let keys = match state {
            RuleState::NotEgress => Vec::new(),
            _ => keys,
        };
        let nets = match state {
            RuleState::NotEgress => Vec::new(),
            _ => cidrs.clone(),
        };
        let has_addr = !rc.cidrs.is_empty() || !rc.service_tags.is_empty();
        let waits = Waits {
            patterns: std::mem::take(&mut self.unfilled),
            addresses: has_addr.then_some(self.unfilled_cidr),
        };
        let rule = Rule {
            name,
            description: rc.description.clone().unwrap_or_default(),
            scenario: rc.scenario.clone(),
            action: rc.action,
            protocol: rc.protocol,
            direction: rc.direction,
            ports,
            hosts,
            cidrs,
            service_tags,
            to,
            origin: self.d.locate(self.src, &rc.name.span()),
            state,
            from_profile: self.src == PROFILE,
            any_sni: rc.sni == SniMode::Any,
            opaque: rc.opaque,
            clients: (rc.clients.as_ref())
                .map(|c| c.get_ref().iter().map(|n| n.get_ref().clone()).collect())
                .unwrap_or_default(),
        };
        Some((rule, keys, nets, waits))
    }

    fn error(&mut self, span: std::ops::Range<usize>, path: String, message: String) {
        self.d.error(self.src, Some(&span), path, message);
    }

    /// The name, trimmed; a rule names hosts or addresses, not both.
    fn name(&mut self) -> String {
        let rc = self.rc;
        let name = rc.name.get_ref().trim().to_string();
        let span = rc.name.span();
        if name.is_empty() {
            let path = format!("{}.name", self.path);
            self.error(span.clone(), path, "a rule needs a name".into());
        }
        let has_addr = !rc.cidrs.is_empty() || !rc.service_tags.is_empty();
        if rc.hosts.is_empty() && !has_addr {
            let message = format!("rule '{name}' names no hosts, cidrs or service_tags");
            self.error(span.clone(), self.path.to_string(), message);
        }
        if !rc.hosts.is_empty() && has_addr {
            let message = format!(
                "rule '{name}' mixes hosts with cidrs/service_tags: write one rule for names and one for addresses"
            );
            self.error(span, self.path.to_string(), message);
        }
        name
    }

    /// Port ranges (443 when none are given).
    fn ports(&mut self) -> Vec<(u16, u16)> {
        match parse_ports(&self.rc.ports) {
            Ok(p) => p,
            Err(errors) => {
                for (i, e) in errors {
                    let path = format!("{}.ports[{i}]", self.path);
                    self.error(self.rc.ports[i].span(), path, e);
                }
                Vec::new()
            }
        }
    }

    /// Host patterns as shown (filled, or as written when a placeholder is
    /// missing) and the keys of those that are filled.
    fn hosts(&mut self) -> (Vec<String>, Vec<HostKey>) {
        let (mut hosts, mut keys) = (Vec::new(), Vec::new());
        for (i, h) in self.rc.hosts.iter().enumerate() {
            match fill(h.get_ref(), self.vars) {
                Ok(text) => match HostKey::parse(text.trim()) {
                    Ok(key) => {
                        hosts.push(key.to_string());
                        keys.push(key);
                    }
                    Err(e) => self.error(h.span(), format!("{}.hosts[{i}]", self.path), e),
                },
                Err((partial, m)) => {
                    hosts.push(h.get_ref().clone());
                    self.unfilled.push(Pattern::parse(&partial));
                    self.missing.extend(m);
                }
            }
        }
        (hosts, keys)
    }

    /// The `cidrs` whose placeholders are filled.
    fn cidrs(&mut self) -> Vec<IpNet> {
        let mut cidrs = Vec::new();
        for (i, c) in self.rc.cidrs.iter().enumerate() {
            match fill(c.get_ref(), self.vars) {
                Ok(text) => match net::parse_cidr(&text) {
                    Ok(n) => cidrs.push(n),
                    Err(e) => self.error(c.span(), format!("{}.cidrs[{i}]", self.path), e),
                },
                Err((_, m)) => {
                    self.unfilled_cidr = true;
                    self.missing.extend(m);
                }
            }
        }
        cidrs
    }

    /// `to`: where an inbound rule's traffic may go. An inbound rule must
    /// say (the ruleset would otherwise accept it to every address); other
    /// rules must not.
    fn to(&mut self) -> Vec<IpNet> {
        let rc = self.rc;
        let inbound = rc.direction == Direction::Inbound;
        if inbound && rc.to.is_empty() {
            let message = format!(
                "inbound rule '{}' needs `to`: the address ranges its traffic may reach, e.g. to = [\"<vnet>\"]",
                rc.name.get_ref()
            );
            self.error(rc.name.span(), self.path.to_string(), message);
        }
        if !inbound && !rc.to.is_empty() {
            let message = "`to` is for inbound rules (direction = \"inbound\")".to_string();
            self.error(rc.to[0].span(), format!("{}.to", self.path), message);
        }
        let mut to = Vec::new();
        for (i, c) in rc.to.iter().enumerate() {
            match fill(c.get_ref(), self.vars) {
                Ok(text) => match net::parse_cidr(&text) {
                    Ok(n) => to.push(n),
                    Err(e) => self.error(c.span(), format!("{}.to[{i}]", self.path), e),
                },
                Err((_, m)) => self.missing.extend(m),
            }
        }
        to
    }

    /// Service tag names as shown, their ranges added to `cidrs`, and whether
    /// the rule waits for a service tags file. `must_exist`: a tag missing
    /// from the file is an error (the rule is in use).
    fn service_tags(
        &mut self,
        file: Option<&ServiceTags>,
        must_exist: bool,
        cidrs: &mut Vec<IpNet>,
    ) -> (Vec<String>, bool) {
        let (mut tags, mut waiting) = (Vec::new(), false);
        for (i, t) in self.rc.service_tags.iter().enumerate() {
            let tag = match fill(t.get_ref(), self.vars) {
                Ok(tag) => tag,
                Err((_, m)) => {
                    tags.push(t.get_ref().clone());
                    self.missing.extend(m);
                    continue;
                }
            };
            match file.map(|st| (st, st.get(&tag))) {
                Some((_, Some(nets))) => cidrs.extend_from_slice(nets),
                Some((st, None)) if must_exist => {
                    let similar = st.similar(&tag);
                    let hint = if similar.is_empty() {
                        String::new()
                    } else {
                        format!(" (similar: {})", similar.join(", "))
                    };
                    let path = format!("{}.service_tags[{i}]", self.path);
                    let message =
                        format!("service tag '{tag}' is not in the service tags file{hint}");
                    self.error(t.span(), path, message);
                }
                Some((_, None)) => {}
                None => waiting = true,
            }
            tags.push(tag);
        }
        (tags, waiting)
    }

    /// Whether the rule takes part in decisions. Missing placeholders are an
    /// error, or with `lenient` a warning that disables the rule.
    fn state(&mut self, name: &str, scenario_on: bool, waiting: bool, lenient: bool) -> RuleState {
        let rc = self.rc;
        let egress = rc.direction == Direction::Egress;
        if !scenario_on {
            return if egress {
                RuleState::ScenarioDisabled
            } else {
                RuleState::NotEgress
            };
        }
        let mut missing = std::mem::take(&mut self.missing);
        missing.sort();
        missing.dedup();
        let Some(first) = missing.first() else {
            return match (egress, waiting) {
                (false, _) => RuleState::NotEgress,
                (true, true) => RuleState::WaitingForServiceTags,
                (true, false) => RuleState::Active,
            };
        };
        // Without a config (lenient) one summary warning lists every rule
        // that waits (`waiting_summary`); an inbound rule is not rendered.
        if !lenient {
            let list = missing
                .iter()
                .map(|m| format!("<{m}>"))
                .collect::<Vec<_>>()
                .join(", ");
            let span = Some(rc.name.span());
            let message = format!(
                "rule '{name}' uses placeholder {list} with no value: set it in [vars] or with --var {first}=..., or disable scenario '{}'",
                rc.scenario.as_deref().unwrap_or("-")
            );
            self.d
                .error(self.src, span.as_ref(), self.path.to_string(), message);
        }
        if egress {
            RuleState::MissingVars(missing)
        } else {
            RuleState::NotEgress
        }
    }
}

/// Replaces `<name>` placeholders. On failure, the text with the missing
/// ones kept as written, and their names.
fn fill(text: &str, vars: &BTreeMap<String, String>) -> Result<String, (String, Vec<String>)> {
    let mut out = String::with_capacity(text.len());
    let mut missing = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('<') {
        let Some(close) = rest[open..].find('>') else {
            break;
        };
        let name = &rest[open + 1..open + close];
        out.push_str(&rest[..open]);
        match vars.get(name) {
            Some(value) => out.push_str(value),
            None => {
                out.push_str(&rest[open..=open + close]);
                missing.push(name.to_string());
            }
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    if missing.is_empty() {
        Ok(out)
    } else {
        Err((out, missing))
    }
}

/// Port errors: index into `ports` and message.
type PortErrors = Vec<(usize, String)>;

/// Port numbers and `"lo-hi"` ranges, inclusive; none given means 443.
fn parse_ports(specs: &[Spanned<PortSpec>]) -> Result<Vec<(u16, u16)>, PortErrors> {
    if specs.is_empty() {
        return Ok(vec![(443, 443)]);
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        match parse_port_spec(spec.get_ref()) {
            Ok(r) => out.push(r),
            Err(e) => errors.push((i, e)),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn parse_port_spec(spec: &PortSpec) -> Result<(u16, u16), String> {
    let port = |n: i64| u16::try_from(n).ok().filter(|&p| p != 0);
    match spec {
        PortSpec::Number(n) => port(*n)
            .map(|p| (p, p))
            .ok_or_else(|| format!("{n} is not a port (1-65535)")),
        PortSpec::Range(text) => {
            let range = text.split_once('-').and_then(|(lo, hi)| {
                let lo = port(lo.trim().parse().ok()?)?;
                let hi = port(hi.trim().parse().ok()?)?;
                (lo <= hi).then_some((lo, hi))
            });
            match (range, text.trim().parse::<i64>().ok().and_then(port)) {
                (Some(r), _) => Ok(r),
                (None, Some(p)) => Ok((p, p)),
                (None, None) => Err(format!(
                    "'{text}' is not a port or range: write 443 or \"8704-8710\" (1-65535, low-high)"
                )),
            }
        }
    }
}

/// `[policy] private_ranges`: CIDRs, each inside one guarded range (a
/// public or platform range there would be meaningless or a hole).
fn private_ranges(config: &Config, d: &mut Diags<'_>) -> Vec<IpNet> {
    let mut out = Vec::new();
    for (i, c) in config.policy.private_ranges.iter().enumerate() {
        let path = format!("policy.private_ranges[{i}]");
        match net::parse_cidr(c.get_ref()) {
            Ok(n) if net::unlocks_guarded(&n) => out.push(n),
            Ok(n) => d.error(
                CFG,
                Some(&c.span()),
                path,
                format!(
                    "'{n}' is not inside one private or other guarded range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 127.0.0.0/8, fc00::/7, ...): private_ranges only lets names reach guarded space"
                ),
            ),
            Err(e) => d.error(CFG, Some(&c.span()), path, e),
        }
    }
    out
}

/// `[resolve]`: static addresses, keyed by the normalised name.
fn static_resolve(config: &Config, d: &mut Diags<'_>) -> HashMap<String, Vec<IpAddr>> {
    let mut resolve = HashMap::new();
    for (name, addrs) in &config.resolve {
        let norm = match host::normalize(name) {
            Ok(n) => n,
            Err(e) => {
                d.error(
                    CFG,
                    None,
                    format!("resolve.\"{name}\""),
                    format!("'{name}' is not a valid host: {e}"),
                );
                continue;
            }
        };
        let mut ips = Vec::new();
        for (i, a) in addrs.iter().enumerate() {
            match a.get_ref().parse::<IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => d.error(
                    CFG,
                    Some(&a.span()),
                    format!("resolve.\"{name}\"[{i}]"),
                    format!("'{}' is not an IP address", a.get_ref()),
                ),
            }
        }
        resolve.insert(norm, ips);
    }
    resolve
}

/// `[dns] servers`: `ip` or `ip:port` (port 53 by default).
fn dns_servers(config: &Config, d: &mut Diags<'_>) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for (i, s) in config.dns.servers.iter().enumerate() {
        let text = s.get_ref().trim();
        let addr = (text.parse::<SocketAddr>().ok()).or_else(|| {
            text.parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, 53))
        });
        match addr {
            Some(a) => out.push(a),
            None => d.error(
                CFG,
                Some(&s.span()),
                format!("dns.servers[{i}]"),
                format!("'{text}' is not an IP address or IP:port"),
            ),
        }
    }
    let ttl = &config.dns;
    if ttl.min_ttl_s > ttl.max_ttl_s {
        d.error(
            CFG,
            None,
            "dns.min_ttl_s".into(),
            format!(
                "min_ttl_s ({}) is above max_ttl_s ({})",
                ttl.min_ttl_s, ttl.max_ttl_s
            ),
        );
    }
    out
}

/// The CIDR table: each net's grant appended to `grants`, the table holding
/// its index.
fn net_table(netted: Vec<(IpNet, Grant)>, grants: &mut Vec<Grant>) -> NetTable {
    let mut entries = Vec::with_capacity(netted.len());
    for (net, grant) in netted {
        let index = u32::try_from(grants.len()).expect("fewer than 2^32 grants");
        entries.push((net, index));
        grants.push(grant);
    }
    NetTable::build(&entries)
}
