//! Policy compile and decide tests: rule semantics, guarded addresses, errors.

use std::net::IpAddr;

use super::*;
use crate::config::{Config, Protocol, Source};

fn compile_text(text: &str) -> Result<(Policy, Vec<Diagnostic>), Vec<Diagnostic>> {
    let source = Source {
        name: "t.toml".into(),
        text: text.into(),
    };
    let config = Config::parse(&source).expect("test config parses");
    Policy::compile(&config, &source, &CompileInput::default())
}

fn policy(text: &str) -> Policy {
    match compile_text(text) {
        Ok((p, _)) => p,
        Err(e) => panic!("compile failed: {e:?}"),
    }
}

fn errors(text: &str) -> Vec<String> {
    match compile_text(text) {
        Ok(_) => panic!("expected errors"),
        Err(diags) => diags
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .map(ToString::to_string)
            .collect(),
    }
}

fn decide(p: &Policy, host: &str, port: u16) -> (Verdict, Option<String>, Reason) {
    decide_proto(p, host, port, Protocol::Tcp)
}

fn decide_proto(
    p: &Policy,
    host: &str,
    port: u16,
    proto: Protocol,
) -> (Verdict, Option<String>, Reason) {
    let d = p.decide(&Dest {
        target: Target::parse(host),
        port,
        proto,
    });
    (d.verdict, d.rule.map(|r| p.rule(r).name.clone()), d.reason)
}

macro_rules! t {
    ($p:expr, $($host:expr, $port:expr => $verdict:ident $rule:expr, $reason:ident;)+) => {
        $(
            assert_eq!(
                decide(&$p, $host, $port),
                (Verdict::$verdict, $rule.map(String::from), Reason::$reason),
                "{}:{}", $host, $port
            );
        )+
    };
}

const NONE: Option<&str> = None;

const BASE: &str = r#"
[policy]
profile = "none"

[[rule]]
name = "wild"
hosts = ["*.a.com"]

[[rule]]
name = "exact"
hosts = ["x.a.com"]
ports = [443, "8000-8010"]

[[rule]]
name = "block"
hosts = ["*.bad.a.com"]
action = "deny"

[[rule]]
name = "plain"
hosts = ["b.com"]
ports = [80]

[[rule]]
name = "udp-only"
hosts = ["u.com"]
protocol = "udp"
"#;

#[test]
fn wildcard_never_matches_apex() {
    let p = policy(BASE);
    t!(p,
        "a.com", 443 => Deny NONE, NoRule;
        "y.a.com", 443 => Allow Some("wild"), RuleMatched;
        "deep.y.a.com", 443 => Allow Some("wild"), RuleMatched;
    );
}

#[test]
fn more_specific_host_rule_wins() {
    let p = policy(BASE);
    t!(p,
        "x.a.com", 443 => Allow Some("exact"), RuleMatched;
        "x.a.com", 8005 => Allow Some("exact"), RuleMatched;
        "y.a.com", 8005 => Deny Some("wild"), PortNotAllowed;
    );
}

#[test]
fn deny_wins_over_every_allow() {
    let p = policy(BASE);
    t!(p,
        "evil.bad.a.com", 443 => Deny Some("block"), DenyRule;
        "bad.a.com", 443 => Allow Some("wild"), RuleMatched;
    );
}

#[test]
fn rule_order_breaks_ties() {
    let p = policy(
        r#"
        [policy]
        profile = "none"
        [[rule]]
        name = "first"
        hosts = ["t.com"]
        [[rule]]
        name = "second"
        hosts = ["t.com"]
        "#,
    );
    t!(p, "t.com", 443 => Allow Some("first"), RuleMatched;);
}

#[test]
fn ports_and_protocols() {
    let p = policy(BASE);
    t!(p,
        "b.com", 80 => Allow Some("plain"), RuleMatched;
        "b.com", 443 => Deny Some("plain"), PortNotAllowed;
        "u.com", 443 => Deny Some("udp-only"), ProtocolNotAllowed;
    );
    // UDP names no host: a host rule on UDP cannot be enforced, and the
    // ruleset forwards UDP by address rules only.
    assert_eq!(
        decide_proto(&p, "u.com", 443, Protocol::Udp),
        (Verdict::Deny, Some("udp-only".into()), Reason::NeedsDns)
    );
}

#[test]
fn case_trailing_dot_and_malformed() {
    let p = policy(BASE);
    t!(p,
        "Y.A.COM", 443 => Allow Some("wild"), RuleMatched;
        "y.a.com.", 443 => Allow Some("wild"), RuleMatched;
        "y..a.com", 443 => Deny NONE, MalformedHost;
        "y a.com", 443 => Deny NONE, MalformedHost;
        "", 443 => Deny NONE, MalformedHost;
        "bücher.a.com", 443 => Deny NONE, MalformedHost;
    );
}

const NETS: &str = r#"
[policy]
profile = "none"

[[rule]]
name = "public"
cidrs = ["20.0.0.0/8", "2603:1000::/24"]

[[rule]]
name = "everything"
cidrs = ["0.0.0.0/0"]
ports = [22]

[[rule]]
name = "private-endpoint"
cidrs = ["10.1.0.0/16"]

[[rule]]
name = "no-smtp"
cidrs = ["20.1.0.0/16"]
ports = [25]
action = "deny"

[[rule]]
name = "smtp"
cidrs = ["20.0.0.0/8"]
ports = [25]

[[rule]]
name = "named"
hosts = ["ok.com"]
"#;

#[test]
fn ip_literals_follow_address_rules_only() {
    let p = policy(NETS);
    t!(p,
        "20.1.2.3", 443 => Allow Some("public"), RuleMatched;
        "[2603:1000::5]", 443 => Allow Some("public"), RuleMatched;
        "21.0.0.1", 443 => Deny Some("everything"), PortNotAllowed;
        "21.0.0.1", 22 => Allow Some("everything"), RuleMatched;
        "20.1.0.9", 25 => Deny Some("no-smtp"), DenyRule;
        "20.2.0.9", 25 => Allow Some("smtp"), RuleMatched;
    );
}

#[test]
fn guarded_addresses_need_an_explicit_rule() {
    let p = policy(NETS);
    t!(p,
        "10.1.0.4", 443 => Allow Some("private-endpoint"), RuleMatched;
        "10.2.0.4", 443 => Deny NONE, GuardedAddress;
        "10.2.0.4", 22 => Deny Some("everything"), GuardedAddress;
        "127.0.0.1", 22 => Deny Some("everything"), GuardedAddress;
        "::ffff:127.0.0.1", 22 => Deny Some("everything"), GuardedAddress;
        "169.254.169.254", 80 => Deny NONE, PlatformAddress;
        "168.63.129.16", 80 => Deny NONE, PlatformAddress;
        "::ffff:169.254.169.254", 80 => Deny NONE, PlatformAddress;
    );
}

#[test]
fn resolved_addresses_are_checked() {
    let p = policy(NETS);
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(
        p.check_resolved(ip("93.184.216.34"), 443, Protocol::Tcp),
        Ok(())
    );
    assert_eq!(
        p.check_resolved(ip("127.0.0.1"), 443, Protocol::Tcp),
        Err(Reason::GuardedAddress)
    );
    assert_eq!(
        p.check_resolved(ip("10.9.9.9"), 443, Protocol::Tcp),
        Err(Reason::GuardedAddress)
    );
    assert_eq!(p.check_resolved(ip("10.1.9.9"), 443, Protocol::Tcp), Ok(()));
    assert_eq!(
        p.check_resolved(ip("169.254.169.254"), 443, Protocol::Tcp),
        Err(Reason::PlatformAddress)
    );
    assert_eq!(
        p.check_resolved(ip("20.1.0.1"), 25, Protocol::Tcp),
        Err(Reason::DenyRule)
    );
    assert_eq!(
        p.check_resolved(ip("fd00::1"), 443, Protocol::Tcp),
        Err(Reason::GuardedAddress)
    );
}

#[test]
fn audit_mode_lets_denials_through_as_audit_deny() {
    let p = policy(&BASE.replace("profile = \"none\"", "profile = \"none\"\nmode = \"audit\""));
    assert_eq!(decide(&p, "nope.com", 443).0, Verdict::AuditDeny);
    assert_eq!(decide(&p, "y.a.com", 443).0, Verdict::Allow);
}

#[test]
fn errors_are_located_and_all_reported() {
    let errs = errors(
        r#"[policy]
profile = "none"

[[rule]]
name = "bad"
hosts = ["ok.com", "*foo.com", "a.*.com"]
ports = [0, "9-3", 70000]

[[rule]]
name = "nets"
cidrs = ["10.0.0.0/33"]
"#,
    );
    assert_eq!(
        errs,
        vec![
            "t.toml:7:10: error: rules[0].ports[0]: 0 is not a port (1-65535)",
            "t.toml:7:13: error: rules[0].ports[1]: '9-3' is not a port or range: write 443 or \"8704-8710\" (1-65535, low-high)",
            "t.toml:7:20: error: rules[0].ports[2]: 70000 is not a port (1-65535)",
            "t.toml:6:20: error: rules[0].hosts[1]: '*foo.com' is not a valid pattern: a wildcard must be a whole leading label, as in '*.foo.com'",
            "t.toml:6:32: error: rules[0].hosts[2]: 'a.*.com' is not a valid pattern: a wildcard must be a whole leading label, as in '*.a.*.com'",
            "t.toml:11:10: error: rules[1].cidrs[0]: '10.0.0.0/33' is not a valid CIDR or IP address",
        ]
    );
}

#[test]
fn unfilled_placeholder_is_an_error_naming_the_rule() {
    let errs = errors(
        r#"[policy]
profile = "none"
[[rule]]
name = "storage"
hosts = ["<storage>.blob.core.windows.net"]
"#,
    );
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with(
            "t.toml:4:8: error: rules[0]: rule 'storage' uses placeholder <storage> with no value"
        ),
        "{}",
        errs[0]
    );
}

#[test]
fn placeholder_in_disabled_scenario_is_fine() {
    let p = policy(
        r#"[policy]
profile = "none"
scenarios = []
[[rule]]
name = "storage"
scenario = "extra"
hosts = ["<storage>.blob.core.windows.net"]
"#,
    );
    assert_eq!(p.rules()[0].state, RuleState::ScenarioDisabled);
}

#[test]
fn vars_fill_placeholders() {
    let p = policy(
        r#"[vars]
storage = "mystore"
[policy]
profile = "none"
[[rule]]
name = "storage"
hosts = ["<storage>.blob.core.windows.net"]
"#,
    );
    t!(p,
        "mystore.blob.core.windows.net", 443 => Allow Some("storage"), RuleMatched;
        "other.blob.core.windows.net", 443 => Deny NONE, NoRule;
    );
}

#[test]
fn other_structural_errors() {
    let errs = errors(
        r#"[policy]
profile = "nope"
scenarios = ["basic", "nonesuch"]
[clients]
allow = ["10.0.0.0/8", "banana"]
[[rule]]
name = "empty"
[[rule]]
name = "mixed"
hosts = ["a.com"]
cidrs = ["1.2.3.4"]
[[rule]]
name = "empty"
hosts = ["b.com"]
"#,
    );
    let joined = errs.join("\n");
    for want in [
        "t.toml:2:11: error: policy.profile: unknown profile 'nope' (known: azureml, none)",
        "t.toml:3:23: error: policy.scenarios[1]: unknown scenario 'nonesuch'",
        "t.toml:5:24: error: clients.allow[1]: 'banana' is not a valid CIDR or IP address",
        "rule 'empty' names no hosts, cidrs or service_tags",
        "rule 'mixed' mixes hosts with cidrs/service_tags",
    ] {
        assert!(joined.contains(want), "missing {want:?} in\n{joined}");
    }
}

#[test]
fn duplicate_rule_names_are_errors() {
    let errs = errors(
        r#"[policy]
profile = "none"
[[rule]]
name = "x"
hosts = ["a.com"]
[[rule]]
name = "x"
hosts = ["b.com"]
"#,
    );
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].contains("rule name 'x' is already used by another rule (t.toml:4:8)"),
        "{}",
        errs[0]
    );
}

#[test]
fn lints_exfiltration_shadowing_and_duplicates() {
    let (_, warnings) = compile_text(
        r#"[policy]
profile = "none"
[[rule]]
name = "storage"
hosts = ["*.blob.core.windows.net"]
[[rule]]
name = "broad"
hosts = ["*.example.com"]
[[rule]]
name = "narrow"
hosts = ["api.example.com"]
[[rule]]
name = "again"
hosts = ["*.example.com"]
"#,
    )
    .unwrap();
    let text: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    let joined = text.join("\n");
    assert!(
        joined.contains("rule 'storage' allows '*.blob.core.windows.net'"),
        "{joined}"
    );
    assert!(
        joined.contains("rule 'narrow' host 'api.example.com' is shadowed by rule 'broad'"),
        "{joined}"
    );
    assert!(
        joined.contains("rule 'again' host '*.example.com' duplicates rule 'broad'"),
        "{joined}"
    );
}

#[test]
fn denial_explains_disabled_scenario() {
    let p = policy(
        r#"[policy]
profile = "none"
scenarios = []
[[rule]]
name = "pypi"
scenario = "python-packages"
hosts = ["pypi.org"]
"#,
    );
    let d = p.decide(&Dest {
        target: Target::Name("pypi.org"),
        port: 443,
        proto: Protocol::Tcp,
    });
    assert_eq!(d.reason, Reason::ScenarioDisabled);
    assert_eq!(
        p.explain(&d),
        "no rule allows this host (scenario python-packages is disabled)"
    );
}

#[test]
fn client_allow_list() {
    let p = policy("[clients]\nallow = [\"10.0.0.0/24\"]\n[policy]\nprofile = \"none\"\n");
    assert!(p.client_allowed("10.0.0.7".parse().unwrap()).is_some());
    assert!(
        p.client_allowed("::ffff:10.0.0.7".parse().unwrap())
            .is_some()
    );
    assert!(p.client_allowed("10.0.1.7".parse().unwrap()).is_none());
}

#[test]
fn static_resolve_is_normalised() {
    let p = policy("[policy]\nprofile = \"none\"\n[resolve]\n\"PyPI.org.\" = [\"127.0.0.1\"]\n");
    assert_eq!(
        p.static_addresses("pypi.org"),
        Some(&["127.0.0.1".parse().unwrap()][..])
    );
}

/// Keys that overlap on names and ports: the most specific key's allow,
/// ports across keys, a deny on one exact name, UDP beside TCP, and a key
/// with 40 port entries folded into it.
#[test]
fn overlapping_keys_decide_by_specificity_and_port() {
    let overlapping = r#"
        [policy]
        profile = "none"
        [[rule]]
        name = "wide"
        hosts = ["*.com"]
        ports = ["1000-2000"]
        [[rule]]
        name = "narrow"
        hosts = ["*.a.com", "x.a.com"]
        ports = [443, 8443]
        [[rule]]
        name = "udp"
        hosts = ["x.a.com"]
        ports = [53]
        protocol = "udp"
        [[rule]]
        name = "no"
        action = "deny"
        hosts = ["bad.a.com"]
        ports = [443]
    "#;
    let p = policy(overlapping);
    t!(p,
        "x.a.com", 443 => Allow Some("narrow"), RuleMatched;
        "x.a.com", 1500 => Allow Some("wide"), RuleMatched;
        "y.a.com", 1500 => Allow Some("wide"), RuleMatched;
        "bad.a.com", 443 => Deny Some("no"), DenyRule;
        "bad.a.com", 1500 => Allow Some("wide"), RuleMatched;
        "x.a.com", 22 => Deny Some("wide"), PortNotAllowed;
    );
    assert_eq!(
        decide_proto(&p, "x.a.com", 53, Protocol::Udp),
        (Verdict::Deny, Some("udp".into()), Reason::NeedsDns)
    );
    let ports: Vec<String> = (1..=40).map(|i| (i * 100).to_string()).collect();
    let many = format!(
        "{overlapping}\n[[rule]]\nname = \"many\"\nhosts = [\"*.a.com\"]\nports = [{}]\n",
        ports.join(", ")
    );
    let p = policy(&many);
    t!(p,
        "x.a.com", 3900 => Allow Some("many"), RuleMatched;
        "x.a.com", 3901 => Deny Some("wide"), PortNotAllowed;
    );
}

/// Keys on several ports, from one rule or two.
#[test]
fn multi_port_keys() {
    let p = policy(
        r#"
        [policy]
        profile = "none"
        [[rule]]
        name = "ci"
        hosts = ["*.three.com"]
        ports = [443, 8787, 18881]
        [[rule]]
        name = "https"
        hosts = ["share.com"]
        ports = [443]
        [[rule]]
        name = "smb"
        hosts = ["share.com"]
        ports = [445]
    "#,
    );
    t!(p,
        "x.three.com", 8787 => Allow Some("ci"), RuleMatched;
        "x.three.com", 8788 => Deny Some("ci"), PortNotAllowed;
        "share.com", 443 => Allow Some("https"), RuleMatched;
        "share.com", 445 => Allow Some("smb"), RuleMatched;
        "share.com", 444 => Deny Some("https"), PortNotAllowed;
    );
}

#[test]
fn unchecked_tunnels_are_linted_and_sni_any_needs_addresses() {
    let warnings = |rules: &str| {
        let text = format!("[policy]\nprofile = \"none\"\n{rules}");
        let source = Source {
            name: "t.toml".into(),
            text,
        };
        let config = Config::parse(&source).expect("parses");
        Policy::compile(&config, &source, &CompileInput::default()).map(|(_, w)| {
            w.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        })
    };
    let any = warnings("[[rule]]\nname = \"fd\"\ncidrs = [\"203.0.113.0/24\"]\nsni = \"any\"\n")
        .expect("valid");
    assert!(any.contains("rule 'fd' accepts any TLS name"), "{any}");
    let opaque =
        warnings("[[rule]]\nname = \"o\"\nhosts = [\"a.test\"]\nports = [443]\nopaque = true\n")
            .expect("valid");
    assert!(
        opaque.contains("rule 'o' lets its tunnels on port 443 carry anything"),
        "{opaque}"
    );
    let ssh =
        warnings("[[rule]]\nname = \"ssh\"\nhosts = [\"a.test\"]\nports = [22]\nopaque = true\n")
            .expect("valid");
    assert!(!ssh.contains("carry anything"), "{ssh}");
    assert!(
        ssh.contains("rule 'ssh' names hosts with opaque = true")
            && ssh.contains("transparent connection on port 22 carries no name")
            && ssh.contains("disable_rules = [\"ssh\"]"),
        "{ssh}"
    );
    let err = warnings("[[rule]]\nname = \"h\"\nhosts = [\"a.test\"]\nsni = \"any\"\n")
        .expect_err("sni = any on a host rule is an error");
    let text: Vec<String> = err.iter().map(ToString::to_string).collect();
    assert!(
        text.join("\n")
            .contains("sni = \"any\" is for address rules"),
        "{text:?}"
    );
}

#[test]
fn disable_rules_switches_rules_off_by_name_and_refuses_unknown_names() {
    let compile = |policy: &str| {
        let text = format!(
            "[vars]\nregion = \"westus2\"\nstorage = \"mlstore\"\nacr = \"reg\"\nworkspace_id = \"w\"\nvnet = \"10.0.0.0/16\"\n\
             [policy]\n{policy}\n[[rule]]\nname = \"mine\"\nhosts = [\"mine.example\"]\n"
        );
        let source = Source {
            name: "t.toml".into(),
            text,
        };
        let config = Config::parse(&source).expect("parses");
        Policy::compile(&config, &source, &CompileInput::default())
    };
    let dest = |host: &'static str| Dest {
        target: Target::parse(host),
        port: 443,
        proto: Protocol::Tcp,
    };
    let (p, _) = compile("").expect("valid");
    assert_eq!(p.decide(&dest("pypi.org")).verdict, Verdict::Allow);
    let (p, warnings) = compile("disable_rules = [\"pypi\", \"mine\"]").expect("valid");
    for host in ["pypi.org", "mine.example"] {
        let d = p.decide(&dest(host));
        assert_eq!(d.verdict, Verdict::Deny, "{host}");
        assert!(
            p.explain(&d)
                .contains("switched off by [policy] disable_rules"),
            "{host}: {}",
            p.explain(&d)
        );
    }
    // Other rules are untouched, and the lint that names a rule points here.
    assert_eq!(
        p.decide(&dest("files.pythonhosted.org")).verdict,
        Verdict::Allow
    );
    let warned: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert!(
        warned.iter().any(|w| w.contains("disable_rules = [")),
        "{warned:?}"
    );
    let err = compile("disable_rules = [\"pypy\"]").expect_err("unknown name");
    let text: Vec<String> = err.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|e| e.contains("t.toml:") && e.contains("no rule is named 'pypy'")),
        "{text:?}"
    );
}

#[test]
fn private_ranges_let_names_reach_guarded_space_but_never_an_address_by_itself() {
    let text = |ranges: &str| {
        format!(
            "[policy]\nprofile = \"none\"\nprivate_ranges = [{ranges}]\n\
             [[rule]]\nname = \"pe\"\nhosts = [\"store.privatelink.test\"]\n"
        )
    };
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let tcp = Protocol::Tcp;
    let p = policy(&text(""));
    assert_eq!(
        p.check_resolved(ip("10.0.5.4"), 443, tcp),
        Err(Reason::GuardedAddress)
    );
    let p = policy(&text("\"10.0.5.0/24\""));
    assert_eq!(p.check_resolved(ip("10.0.5.4"), 443, tcp), Ok(()));
    assert_eq!(
        p.check_resolved(ip("10.0.6.4"), 443, tcp),
        Err(Reason::GuardedAddress)
    );
    assert_eq!(
        p.check_resolved(ip("169.254.169.254"), 80, tcp),
        Err(Reason::PlatformAddress)
    );
    // An address asked for directly still needs an address rule.
    let (verdict, _, reason) = decide(&p, "10.0.5.4", 443);
    assert_eq!((verdict, reason), (Verdict::Deny, Reason::GuardedAddress));
    // Only guarded space may be named: a public range is an error.
    let errs = errors(&text("\"20.0.0.0/8\""));
    assert!(
        errs.iter()
            .any(|e| e.contains("private_ranges[0]") && e.contains("not inside")),
        "{errs:?}"
    );
    let errs = errors(&text("\"0.0.0.0/0\""));
    assert!(errs.iter().any(|e| e.contains("not inside")), "{errs:?}");
}

/// Compiles `text` without a config file's strictness: placeholders without
/// a value disable their rule (as for the embedded default); `tags`, if
/// given, is the service tags file.
fn lenient(text: &str, tags: Option<&crate::servicetags::ServiceTags>) -> (Policy, Vec<String>) {
    let source = Source {
        name: "t.toml".into(),
        text: text.into(),
    };
    let config = Config::parse(&source).expect("test config parses");
    let input = CompileInput {
        service_tags: tags,
        lenient_placeholders: true,
        ..CompileInput::default()
    };
    match Policy::compile(&config, &source, &input) {
        Ok((p, w)) => (p, w.iter().map(ToString::to_string).collect()),
        Err(e) => panic!("compile failed: {e:?}"),
    }
}

const WAITING: &str = r#"
[policy]
profile = "none"
[[rule]]
name = "batch"
hosts = ["*.<region>.batch.azure.com"]
[[rule]]
name = "acr"
hosts = ["<acr>.azurecr.io", "<acr>.<region>.data.azurecr.io", "fixed.azurecr.io"]
[[rule]]
name = "pe"
cidrs = ["<vnet>"]
[[rule]]
name = "aml"
service_tags = ["AzureMachineLearning"]
ports = [443, 8787]
[[rule]]
name = "open"
hosts = ["open.test"]
"#;

#[test]
fn rules_waiting_for_a_value_explain_denials_with_what_is_missing() {
    let (p, _) = lenient(WAITING, None);
    t!(p,
        "pool.westus2.batch.azure.com", 443 => Deny Some("batch"), NeedsVar;
        "a.b.WestUS2.batch.azure.com.", 443 => Deny Some("batch"), NeedsVar;
        "westus2.batch.azure.com", 443 => Deny NONE, NoRule;
        "pool.westus2.batch.azure.com", 80 => Deny NONE, NoRule;
        "myacr.azurecr.io", 443 => Deny Some("acr"), NeedsVar;
        "myacr.westus2.data.azurecr.io", 443 => Deny Some("acr"), NeedsVar;
        // a filled name of a waiting rule: its key is there, inactive
        "fixed.azurecr.io", 443 => Deny Some("acr"), NeedsVar;
        "x.myacr.azurecr.io", 443 => Deny NONE, NoRule;
        "10.0.0.5", 443 => Deny Some("pe"), NeedsVar;
        "20.1.2.3", 8787 => Deny Some("aml"), NeedsServiceTags;
        "20.1.2.3", 22 => Deny NONE, NoRule;
        "open.test", 443 => Allow Some("open"), RuleMatched;
    );
    // Private space is only ever named by a cidrs rule, never by a tag.
    t!(p, "10.0.0.5", 8787 => Deny NONE, GuardedAddress;);
    let text = p.explain(&p.decide(&Dest {
        target: Target::parse("pool.westus2.batch.azure.com"),
        port: 443,
        proto: Protocol::Tcp,
    }));
    assert!(text.contains("<region> has no value"), "{text}");
    let text = p.explain(&p.decide(&Dest {
        target: Target::parse("20.1.2.3"),
        port: 8787,
        proto: Protocol::Tcp,
    }));
    assert!(
        text.contains("service tag AzureMachineLearning") && text.contains("--service-tags"),
        "{text}"
    );
    // Once the values are given, the same destinations are decided by the rules.
    let filled = WAITING.replace(
        "[policy]",
        "[vars]\nregion = \"westus2\"\nacr = \"myacr\"\nvnet = \"10.0.0.0/16\"\n[policy]",
    );
    let tags = crate::servicetags::ServiceTags::parse(
        "t.json",
        r#"{"changeNumber": 1, "cloud": "Public", "values": [{"name": "AzureMachineLearning", "id": "AzureMachineLearning", "properties": {"changeNumber": 1, "addressPrefixes": ["20.1.2.0/24"]}}]}"#,
    )
    .expect("tags parse");
    let (p, warnings) = lenient(&filled, Some(&tags));
    assert!(
        warnings
            .iter()
            .all(|w| !w.contains("cannot be enforced yet")),
        "{warnings:?}"
    );
    t!(p,
        "pool.westus2.batch.azure.com", 443 => Allow Some("batch"), RuleMatched;
        "pool.eastus.batch.azure.com", 443 => Deny NONE, NoRule;
        "myacr.azurecr.io", 443 => Allow Some("acr"), RuleMatched;
        "10.0.0.5", 443 => Allow Some("pe"), RuleMatched;
        "20.1.2.3", 8787 => Allow Some("aml"), RuleMatched;
        "20.1.3.3", 8787 => Deny NONE, NoRule;
    );
}

#[test]
fn one_warning_lists_every_waiting_rule_with_the_command_that_fixes_it() {
    let (_, warnings) = lenient(WAITING, None);
    let summary: Vec<&String> = warnings
        .iter()
        .filter(|w| w.contains("cannot be enforced yet"))
        .collect();
    assert_eq!(summary.len(), 1, "{warnings:?}");
    let w = summary[0];
    for part in [
        "<region> has no value (batch, acr)",
        "<acr> has no value (acr)",
        "<vnet> has no value (pe)",
        "1 rule(s) wait for a service tags file (aml)",
        "portcullis init --acr REGISTRY --region westus2 --vnet 10.0.0.0/16 --service-tags FILE",
    ] {
        assert!(w.contains(part), "missing {part:?} in {w}");
    }
    assert!(
        !warnings
            .iter()
            .any(|w| w.contains("rule 'batch' is disabled")),
        "{warnings:?}"
    );
    // A config file: missing values are errors; a missing tags file is the one warning.
    let (_, w) = Policy::compile(
        &Config::parse(&Source {
            name: "t.toml".into(),
            text: "[policy]\nprofile = \"none\"\n[[rule]]\nname = \"aml\"\nservice_tags = [\"AzureMachineLearning\"]\n".into(),
        })
        .expect("parses"),
        &Source {
            name: "t.toml".into(),
            text: String::new(),
        },
        &CompileInput::default(),
    )
    .expect("valid");
    let w: Vec<String> = w.iter().map(ToString::to_string).collect();
    assert!(
        w.len() == 1 && w[0].contains("[policy] service_tags") && w[0].contains("(aml)"),
        "{w:?}"
    );
}

#[test]
fn names_on_udp_are_not_enforceable_and_linted() {
    let text = r#"
[policy]
profile = "none"
[[rule]]
name = "tundra"
hosts = ["westus2.tundra.azureml.ms"]
ports = [5831]
protocol = "udp"
[[rule]]
name = "batch"
hosts = ["*.batch.azure.com"]
protocol = "any"
"#;
    let (p, warnings) = compile_text(text).expect("valid");
    assert_eq!(
        decide_proto(&p, "westus2.tundra.azureml.ms", 5831, Protocol::Udp),
        (Verdict::Deny, Some("tundra".into()), Reason::NeedsDns)
    );
    assert_eq!(
        decide_proto(&p, "x.batch.azure.com", 443, Protocol::Udp),
        (Verdict::Deny, Some("batch".into()), Reason::NeedsDns)
    );
    t!(p, "x.batch.azure.com", 443 => Allow Some("batch"), RuleMatched;);
    let warnings: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    for (rule, proto) in [("tundra", "udp"), ("batch", "any")] {
        assert!(
            warnings.iter().any(|w| w.contains(&format!(
                "rule '{rule}' names hosts on {proto}, but UDP carries no name"
            )) && w.contains(&format!("disable_rules = [\"{rule}\"]"))
                && w.contains("by address sets only")),
            "{rule}: {warnings:?}"
        );
    }
}

#[test]
fn multi_tenant_wildcards_and_tags_are_linted_with_the_setting_that_fixes_them() {
    let tags = crate::servicetags::ServiceTags::parse(
        "t.json",
        r#"{"changeNumber": 1, "cloud": "Public", "values": [{"name": "AzureFrontDoor.Frontend", "id": "AzureFrontDoor.Frontend", "properties": {"changeNumber": 1, "addressPrefixes": ["13.107.0.0/16"]}}]}"#,
    )
    .expect("tags parse");
    let text = r#"
[policy]
profile = "none"
[[rule]]
name = "kv"
hosts = ["*.vault.azure.net", "mine.vault.azure.net"]
[[rule]]
name = "kusto"
hosts = ["*.kusto.windows.net"]
[[rule]]
name = "fd"
service_tags = ["AzureFrontDoor.Frontend"]
"#;
    let (_, warnings) = lenient(text, Some(&tags));
    let has = |rule: &str, what: &str| {
        warnings.iter().any(|w| {
            w.contains(&format!("rule '{rule}' allows '{what}'"))
                && w.contains(&format!("disable_rules = [\"{rule}\"]"))
        })
    };
    assert!(has("kv", "*.vault.azure.net"), "{warnings:?}");
    assert!(has("kusto", "*.kusto.windows.net"), "{warnings:?}");
    assert!(
        warnings.iter().any(|w| w
            .contains("rule 'fd' allows service tag 'AzureFrontDoor.Frontend'")
            && w.contains("every Azure Front Door customer")
            && w.contains("disable_rules = [\"fd\"]")),
        "{warnings:?}"
    );
    // A named account is what the warning asks for: no warning.
    assert!(
        !warnings
            .iter()
            .any(|w| w.contains("'mine.vault.azure.net'")),
        "{warnings:?}"
    );
}

#[test]
fn names_on_udp_are_allowed_through_the_dns_listener_except_quic() {
    let text = r#"
[listen]
dns = "127.0.0.1:5353"
[policy]
profile = "none"
[[rule]]
name = "tundra"
hosts = ["westus2.tundra.azureml.ms"]
ports = [5831]
protocol = "udp"
[[rule]]
name = "batch"
hosts = ["*.batch.azure.com"]
ports = [443, 8000]
protocol = "any"
[[rule]]
name = "no-8000"
hosts = ["bad.batch.azure.com"]
ports = [8000]
protocol = "udp"
action = "deny"
[[rule]]
name = "wide"
hosts = ["wide.example"]
ports = ["1000-1999"]
protocol = "udp"
"#;
    let (p, warnings) = compile_text(text).expect("valid");
    assert_eq!(
        decide_proto(&p, "westus2.tundra.azureml.ms", 5831, Protocol::Udp),
        (Verdict::Allow, Some("tundra".into()), Reason::RuleMatched)
    );
    // UDP 443 is QUIC, which the ruleset drops whatever the listener learns.
    let quic = decide_proto(&p, "x.batch.azure.com", 443, Protocol::Udp);
    assert_eq!(
        quic,
        (Verdict::Deny, Some("batch".into()), Reason::NeedsDns)
    );
    let d = p.decide(&Dest {
        target: Target::parse("x.batch.azure.com"),
        port: 443,
        proto: Protocol::Udp,
    });
    assert!(
        p.explain(&d).contains("UDP 443 (QUIC)"),
        "{}",
        p.explain(&d)
    );
    // The ports the gateway writes into the sets are those `decide` allows.
    assert_eq!(p.udp_ports("westus2.tundra.azureml.ms"), [5831]);
    assert_eq!(p.udp_ports("x.batch.azure.com"), [8000]);
    assert!(p.udp_ports("bad.batch.azure.com").is_empty());
    assert!(p.udp_ports("other.example").is_empty());
    assert_eq!(
        p.udp_ports("wide.example").len(),
        crate::policy::MAX_UDP_PORTS
    );
    // Only the rule wider than the sets can hold is linted.
    let warnings: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert!(
        !warnings.iter().any(|w| w.contains("UDP carries no name")),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("rule 'wide' names hosts on 1000 UDP ports")),
        "{warnings:?}"
    );
    // Without the listener the same rules cannot be enforced.
    let (p, _) = compile_text(&text.replace("dns = \"127.0.0.1:5353\"", "")).expect("valid");
    assert_eq!(
        decide_proto(&p, "westus2.tundra.azureml.ms", 5831, Protocol::Udp).2,
        Reason::NeedsDns
    );
    assert!(p.udp_ports("westus2.tundra.azureml.ms").is_empty());
}
