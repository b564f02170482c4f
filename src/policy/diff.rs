//! Policy diff: which rules two policies add, remove and change, for `portcullis diff` and the reload log.
//!
//! In: two compiled policies. Out: [`RuleChange`]s by rule name, each
//! changed rule with the fields that differ (`ports 443 → 443, 8443`,
//! `hosts +a.example -b.example`, `state active → scenario off`). Where a
//! rule was written and its description are not compared: they change no
//! decision. What a change does to traffic is asked of `decide`, by the
//! caller, on the destinations it cares about.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::{Policy, Rule, RuleState, rule::ports_text};

/// One rule that differs between two policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleChange {
    /// Only in the new policy.
    Added(String),
    /// Only in the old policy.
    Removed(String),
    /// In both, with these fields changed (`field old → new`, or `+x -y`).
    Changed(String, Vec<String>),
}

impl RuleChange {
    /// The rule's name.
    pub fn name(&self) -> &str {
        match self {
            RuleChange::Added(n) | RuleChange::Removed(n) | RuleChange::Changed(n, _) => n,
        }
    }
}

impl fmt::Display for RuleChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleChange::Added(n) => write!(f, "+ rule {n}"),
            RuleChange::Removed(n) => write!(f, "- rule {n}"),
            RuleChange::Changed(n, fields) => write!(f, "~ rule {n}: {}", fields.join("; ")),
        }
    }
}

/// The rules `new` adds, removes and changes against `old`, by name, in
/// name order.
pub fn rule_changes(old: &Policy, new: &Policy) -> Vec<RuleChange> {
    let by_name = |p: &Policy| -> BTreeMap<String, Rule> {
        p.rules()
            .iter()
            .map(|r| (r.name.clone(), r.clone()))
            .collect()
    };
    let (before, after) = (by_name(old), by_name(new));
    let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    names
        .into_iter()
        .filter_map(|name| match (before.get(name), after.get(name)) {
            (None, Some(_)) => Some(RuleChange::Added(name.clone())),
            (Some(_), None) => Some(RuleChange::Removed(name.clone())),
            (Some(a), Some(b)) => {
                let fields = changed_fields(a, b);
                (!fields.is_empty()).then(|| RuleChange::Changed(name.clone(), fields))
            }
            (None, None) => None,
        })
        .collect()
}

/// One line: `2 added (a, b), 1 removed (c), 1 changed (d)`, or `no rule changed`.
pub fn summary(changes: &[RuleChange]) -> String {
    let mut groups: [(&str, Vec<&str>); 3] =
        [("added", vec![]), ("removed", vec![]), ("changed", vec![])];
    for c in changes {
        let i = match c {
            RuleChange::Added(_) => 0,
            RuleChange::Removed(_) => 1,
            RuleChange::Changed(..) => 2,
        };
        groups[i].1.push(c.name());
    }
    let parts: Vec<String> = (groups.iter())
        .filter(|(_, names)| !names.is_empty())
        .map(|(what, names)| format!("{} {what} ({})", names.len(), names.join(", ")))
        .collect();
    if parts.is_empty() {
        "no rule changed".to_string()
    } else {
        parts.join(", ")
    }
}

/// The fields of a rule that differ, each as one short phrase.
fn changed_fields(a: &Rule, b: &Rule) -> Vec<String> {
    let mut out = Vec::new();
    let mut scalar = |field: &str, x: String, y: String| {
        if x != y {
            out.push(format!("{field} {x} → {y}"));
        }
    };
    scalar(
        "action",
        format!("{:?}", a.action),
        format!("{:?}", b.action),
    );
    scalar(
        "protocol",
        format!("{:?}", a.protocol),
        format!("{:?}", b.protocol),
    );
    scalar(
        "direction",
        format!("{:?}", a.direction),
        format!("{:?}", b.direction),
    );
    scalar("ports", ports_text(&a.ports), ports_text(&b.ports));
    scalar("state", state_text(&a.state), state_text(&b.state));
    scalar(
        "scenario",
        a.scenario.clone().unwrap_or_else(|| "-".into()),
        b.scenario.clone().unwrap_or_else(|| "-".into()),
    );
    scalar("sni", any_sni(a), any_sni(b));
    scalar("opaque", a.opaque.to_string(), b.opaque.to_string());
    let mut set = |field: &str, x: Vec<String>, y: Vec<String>| {
        let (x, y): (BTreeSet<String>, BTreeSet<String>) =
            (x.into_iter().collect(), y.into_iter().collect());
        let plus = y.difference(&x).map(|v| format!("+{v}"));
        let minus = x.difference(&y).map(|v| format!("-{v}"));
        let moved: Vec<String> = plus.chain(minus).collect();
        if !moved.is_empty() {
            out.push(format!("{field} {}", moved.join(" ")));
        }
    };
    set("hosts", a.hosts.clone(), b.hosts.clone());
    set(
        "service_tags",
        a.service_tags.clone(),
        b.service_tags.clone(),
    );
    let nets = |r: &Rule| r.cidrs.iter().map(ToString::to_string).collect();
    set("cidrs", nets(a), nets(b));
    out
}

fn any_sni(r: &Rule) -> String {
    if r.any_sni { "any" } else { "named" }.to_string()
}

/// A rule's state as `diff` prints it.
pub fn state_text(state: &RuleState) -> String {
    match state {
        RuleState::Active => "active".into(),
        RuleState::ScenarioDisabled => "scenario off".into(),
        RuleState::MissingVars(v) => format!("waiting for {}", v.join(", ")),
        RuleState::WaitingForServiceTags => "waiting for service tags".into(),
        RuleState::NotEgress => "not egress".into(),
        RuleState::Disabled => "disabled".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Source};
    use crate::policy::CompileInput;

    fn policy(rules: &str) -> Policy {
        let source = Source {
            name: "t.toml".into(),
            text: format!("[policy]\nprofile = \"none\"\n{rules}"),
        };
        let config = Config::parse(&source).unwrap();
        Policy::compile(&config, &source, &CompileInput::default())
            .unwrap()
            .0
    }

    #[test]
    fn added_removed_and_changed_rules_are_named_with_their_fields() {
        let old = policy(
            "[[rule]]\nname = \"pypi\"\nhosts = [\"pypi.org\"]\n\
             [[rule]]\nname = \"gone\"\nhosts = [\"old.example\"]\n\
             [[rule]]\nname = \"same\"\nhosts = [\"same.example\"]\ndescription = \"x\"\n",
        );
        let new = policy(
            "[[rule]]\nname = \"pypi\"\nhosts = [\"pypi.org\", \"files.pythonhosted.org\"]\nports = [443, 8443]\n\
             [[rule]]\nname = \"new\"\ncidrs = [\"20.1.2.0/24\"]\n\
             [[rule]]\nname = \"same\"\nhosts = [\"same.example\"]\ndescription = \"y\"\n",
        );
        let changes = rule_changes(&old, &new);
        let text: Vec<String> = changes.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "- rule gone",
                "+ rule new",
                "~ rule pypi: ports 443 → 443, 8443; hosts +files.pythonhosted.org",
            ]
        );
        assert_eq!(
            summary(&changes),
            "1 added (new), 1 removed (gone), 1 changed (pypi)"
        );
        assert_eq!(summary(&rule_changes(&new, &new)), "no rule changed");
    }
}
