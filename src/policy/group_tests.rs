//! Client groups: `[clients]` groups, rules with `clients`, per-group audit.

use super::*;
use crate::config::{Config, Protocol, Source};

fn compile(text: &str) -> Result<Policy, Vec<Diagnostic>> {
    let source = Source {
        name: "t.toml".into(),
        text: text.into(),
    };
    let config = Config::parse(&source).unwrap_or_else(|e| panic!("parse: {e}"));
    Policy::compile(&config, &source, &CompileInput::default()).map(|(p, _)| p)
}

fn policy(text: &str) -> Policy {
    compile(text).unwrap_or_else(|e| panic!("{e:#?}"))
}

/// Error messages (with locations) of a config that must not compile.
fn errors(text: &str) -> String {
    match compile(text) {
        Ok(_) => panic!("compiled:\n{text}"),
        Err(list) => (list.iter())
            .filter(|d| d.severity == Severity::Error)
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

fn tcp(host: &str, port: u16) -> Dest<'_> {
    Dest {
        target: Target::parse(host),
        port,
        proto: Protocol::Tcp,
    }
}

/// (verdict, rule name, reason) for `host:443` from the client at `ip`.
fn decided(p: &Policy, ip: &str, host: &str) -> (Verdict, String, Reason) {
    let client = p.client(ip.parse().unwrap());
    assert!(client.served(), "{ip} is served");
    let d = p.decide_for(&tcp(host, 443), client);
    let rule = d.rule.map_or("-".into(), |r| p.rule(r).name.clone());
    (d.verdict, rule, d.reason)
}

const TWO_GROUPS: &str = r#"
[clients]
allow = ["10.0.0.0/16"]
training = ["10.0.2.0/24"]
inference = ["10.0.3.0/24"]

[policy]
profile = "none"

[[rule]]
name = "pypi"
hosts = ["pypi.org"]
clients = ["training"]

[[rule]]
name = "registry"
hosts = ["registry.test"]
"#;

#[test]
fn a_rule_for_one_group_never_allows_another() {
    let p = policy(TWO_GROUPS);
    let allow = |rule: &str| (Verdict::Allow, rule.to_string(), Reason::RuleMatched);
    assert_eq!(decided(&p, "10.0.2.7", "pypi.org"), allow("pypi"));
    // Another group, no group, and `decide` (a client in no group): denied,
    // naming the rule that is for someone else.
    let other = (Verdict::Deny, "pypi".to_string(), Reason::NoRule);
    assert_eq!(decided(&p, "10.0.3.7", "pypi.org"), other);
    assert_eq!(decided(&p, "10.0.9.1", "pypi.org"), other);
    assert_eq!(p.decide(&tcp("pypi.org", 443)).verdict, Verdict::Deny);
    let d = p.decide_for(&tcp("pypi.org", 443), p.client("10.0.3.7".parse().unwrap()));
    assert!(
        p.explain(&d).contains("for client group(s) training"),
        "{}",
        p.explain(&d)
    );
    // A rule without `clients` is for every served client.
    for ip in ["10.0.2.7", "10.0.3.7", "10.0.9.1"] {
        assert_eq!(decided(&p, ip, "registry.test"), allow("registry"), "{ip}");
    }
    // IPv4-mapped client addresses are the IPv4 client.
    let mapped = p.client("::ffff:10.0.2.7".parse().unwrap());
    assert_eq!(p.client_group(mapped), "training");
    assert!(!p.client("10.1.0.1".parse().unwrap()).served());
}

#[test]
fn overlapping_groups_get_the_union_and_their_deny_rules() {
    let p = policy(
        r#"
[clients]
allow = ["10.0.0.0/16"]
training = ["10.0.2.0/24"]
gpu = ["10.0.2.128/25", "10.0.4.0/24"]

[policy]
profile = "none"

[[rule]]
name = "pypi"
hosts = ["pypi.org"]
clients = ["training"]

[[rule]]
name = "cuda"
hosts = ["developer.download.nvidia.com"]
clients = ["gpu"]

[[rule]]
name = "everyone"
hosts = ["*.example.com"]

[[rule]]
name = "no-uploads-from-gpu"
hosts = ["upload.example.com"]
action = "deny"
clients = ["gpu"]
"#,
    );
    let both = p.client("10.0.2.200".parse().unwrap());
    assert_eq!(p.client_groups(both), ["training", "gpu"]);
    assert_eq!(
        p.client_group(both),
        "training",
        "first group in file order"
    );
    for host in ["pypi.org", "developer.download.nvidia.com"] {
        assert_eq!(decided(&p, "10.0.2.200", host).0, Verdict::Allow, "{host}");
    }
    assert_eq!(decided(&p, "10.0.2.5", "pypi.org").0, Verdict::Allow);
    let nvidia = decided(&p, "10.0.2.5", "developer.download.nvidia.com");
    assert_eq!(nvidia.0, Verdict::Deny);
    // The deny rule binds only gpu clients.
    let deny = (
        Verdict::Deny,
        "no-uploads-from-gpu".into(),
        Reason::DenyRule,
    );
    assert_eq!(decided(&p, "10.0.2.200", "upload.example.com"), deny);
    assert_eq!(decided(&p, "10.0.4.1", "upload.example.com"), deny);
    assert_eq!(
        decided(&p, "10.0.2.5", "upload.example.com").0,
        Verdict::Allow
    );
    // One class per distinct set of groups, clients in no group first.
    let classes: Vec<(Vec<&str>, String)> = (p.client_classes().iter())
        .map(|c| (p.client_groups(c.client), c.example.to_string()))
        .collect();
    assert_eq!(
        classes,
        [
            (vec![], "10.0.0.0".to_string()),
            (vec!["training"], "10.0.2.0".into()),
            (vec!["gpu"], "10.0.4.0".into()),
            (vec!["training", "gpu"], "10.0.2.128".into()),
        ]
    );
}

#[test]
fn unknown_group_names_are_errors_at_their_line_with_a_suggestion() {
    let text = TWO_GROUPS.replace("clients = [\"training\"]", "clients = [\"trainig\"]");
    let e = errors(&text);
    assert!(e.contains("t.toml:13:"), "{e}");
    assert!(e.contains("unknown client group 'trainig'"), "{e}");
    assert!(e.contains("did you mean 'training'?"), "{e}");
    let e = errors(&TWO_GROUPS.replace("[\"training\"]\n\n[[rule]]", "[\"allow\"]\n\n[[rule]]"));
    assert!(
        e.contains("'allow' is [clients]' list of served clients"),
        "{e}"
    );
    let e = errors(&TWO_GROUPS.replace("clients = [\"training\"]", "clients = []"));
    assert!(e.contains("names no client group"), "{e}");
    let none = "[policy]\nprofile = \"none\"\n[[rule]]\nname = \"r\"\nhosts = [\"a.test\"]\nclients = [\"ops\"]\n";
    let e = errors(none);
    assert!(e.contains("[clients] names no groups"), "{e}");
    let e = errors(&TWO_GROUPS.replace("inference =", "\"in ference\" ="));
    assert!(e.contains("not a usable client group name"), "{e}");
}

#[test]
fn a_group_outside_clients_allow_is_an_error() {
    let outside = TWO_GROUPS.replace("10.0.3.0/24", "10.9.0.0/24");
    let e = errors(&outside);
    assert!(e.contains("t.toml:5:"), "{e}");
    assert!(
        e.contains("10.9.0.0/24 is not inside [clients] allow (10.0.0.0/16)"),
        "{e}"
    );
    // Partly outside is outside; covered by two allow ranges is inside.
    let partly = TWO_GROUPS.replace("10.0.3.0/24", "10.0.0.0/15");
    assert!(errors(&partly).contains("10.0.0.0/15 is not inside"));
    let split = TWO_GROUPS.replace(
        "[\"10.0.0.0/16\"]",
        "[\"10.0.3.0/25\", \"10.0.3.128/25\", \"10.0.2.0/24\"]",
    );
    policy(&split);
    // Without `allow`, only loopback is served.
    let default_allow = TWO_GROUPS.replace("allow = [\"10.0.0.0/16\"]\n", "");
    assert!(errors(&default_allow).contains("(127.0.0.0/8, ::1/128)"));
}

#[test]
fn more_than_63_groups_are_an_error() {
    let mut text = String::from("[clients]\nallow = [\"10.0.0.0/8\"]\n");
    for i in 0..64 {
        text.push_str(&format!("g{i} = [\"10.{i}.0.0/16\"]\n"));
    }
    text.push_str("[policy]\nprofile = \"none\"\n");
    assert!(errors(&text).contains("more than 63 client groups"));
    let fits: String = text
        .lines()
        .filter(|l| !l.starts_with("g63"))
        .collect::<Vec<_>>()
        .join("\n");
    let p = policy(&fits);
    assert_eq!(
        p.client_group(p.client("10.62.0.1".parse().unwrap())),
        "g62"
    );
}

const AUDIT: &str = r#"
[clients]
allow = ["10.0.0.0/16"]
new-team = { cidrs = ["10.0.5.0/24"], mode = "audit" }
training = ["10.0.2.0/24"]
mixed = { cidrs = ["10.0.5.128/25"], mode = "enforce" }

[policy]
profile = "none"
MODE

[[rule]]
name = "pypi"
hosts = ["pypi.org"]
"#;

#[test]
fn an_audit_group_audits_and_an_enforcing_group_wins() {
    let p = policy(&AUDIT.replace("MODE", ""));
    let verdict = |ip: &str| decided(&p, ip, "denied.test").0;
    assert_eq!(verdict("10.0.5.7"), Verdict::AuditDeny);
    assert_eq!(verdict("10.0.2.7"), Verdict::Deny);
    // In an audit group and an enforcing one: enforced (fail closed).
    assert_eq!(verdict("10.0.5.200"), Verdict::Deny);
    assert_eq!(
        verdict("10.0.9.9"),
        Verdict::Deny,
        "no group: [policy] mode"
    );
    assert_eq!(decided(&p, "10.0.5.7", "pypi.org").0, Verdict::Allow);
    // `[policy] mode = "audit"`: groups without a mode inherit it, an
    // enforcing group still enforces.
    let p = policy(&AUDIT.replace("MODE", "mode = \"audit\""));
    let verdict = |ip: &str| decided(&p, ip, "denied.test").0;
    assert_eq!(verdict("10.0.9.9"), Verdict::AuditDeny);
    assert_eq!(verdict("10.0.2.7"), Verdict::AuditDeny);
    assert_eq!(verdict("10.0.5.200"), Verdict::Deny);
}

#[test]
fn a_pooled_connection_passes_the_address_check_of_every_client() {
    let p = policy(
        r#"
[clients]
allow = ["10.0.0.0/16"]
training = ["10.0.2.0/24"]

[policy]
profile = "none"

[[rule]]
name = "endpoint"
cidrs = ["10.0.50.0/24"]
ports = [80]
clients = ["training"]
"#,
    );
    let ip: IpAddr = "10.0.50.4".parse().unwrap();
    let training = p.client("10.0.2.1".parse().unwrap());
    let other = p.client("10.0.9.1".parse().unwrap());
    assert_eq!(
        p.check_resolved_for(ip, 80, Protocol::Tcp, Some(training)),
        Ok(())
    );
    let refused = Err(Reason::GuardedAddress);
    assert_eq!(
        p.check_resolved_for(ip, 80, Protocol::Tcp, Some(other)),
        refused
    );
    assert_eq!(p.check_resolved_for(ip, 80, Protocol::Tcp, None), refused);
}

#[test]
fn a_rule_is_shadowed_only_by_one_for_at_least_its_clients() {
    let warnings = |text: &str| -> Vec<String> {
        let source = Source {
            name: "t.toml".into(),
            text: text.into(),
        };
        let config = Config::parse(&source).unwrap();
        let (_, diags) = Policy::compile(&config, &source, &CompileInput::default()).unwrap();
        diags.iter().map(ToString::to_string).collect()
    };
    let mirror = "\n[[rule]]\nname = \"mirror\"\nhosts = [\"pypi.org\"]\nCLIENTS\n";
    // The mirror rule comes first: a duplicate is reported on the later rule.
    let with = |clients: &str| {
        let first = mirror.replace("CLIENTS", clients);
        TWO_GROUPS.replace(
            "profile = \"none\"\n",
            &format!("profile = \"none\"\n{first}"),
        )
    };
    let w = warnings(&with("clients = [\"inference\"]"));
    assert!(!w.iter().any(|w| w.contains("mirror")), "{w:?}");
    let w = warnings(&with(""));
    assert!(
        w.iter()
            .any(|w| w.contains("rule 'pypi' host 'pypi.org' duplicates rule 'mirror'")),
        "{w:?}"
    );
}
