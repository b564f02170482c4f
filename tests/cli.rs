//! The CLI end to end, as a process: `check`, `explain`, `profile` exit codes and output.

#[path = "support/cli.rs"]
mod cli;

use cli::{config, portcullis, text};

#[test]
fn shipped_configs_check_clean() {
    for file in [
        "config/azureml.toml",
        "config/minimal.toml",
        "config/package.toml",
    ] {
        let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
        let out = portcullis(&["check", "-c", &path]);
        assert_eq!(out.status.code(), Some(0), "{file}: {}", text(&out));
        assert!(
            text(&out).contains("expectation(s) passed"),
            "{}",
            text(&out)
        );
    }
}

/// `check` says what `[admin] require_ruleset` makes `/readyz` require,
/// and warns (with the line) when no transparent listener loads a ruleset.
#[test]
fn check_says_what_require_ruleset_requires() {
    let body = |listen: &str| {
        format!(
            "[listen]\n{listen}\n[admin]\nrequire_ruleset = true\n[policy]\nprofile = \"none\"\n"
        )
    };
    let f = config(&body("transparent = \"127.0.0.1:3129\""));
    let out = portcullis(&["check", "-c", &f.path().to_string_lossy()]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("readiness: /readyz answers 503 unless /run/portcullis/ruleset-counters.json lists chain inet portcullis forward and is at most 60 s old"),
        "{said}"
    );
    assert!(said.contains("(0 active rules, 0 warning(s)"), "{said}");
    let f = config(&body("proxy = \"127.0.0.1:3128\""));
    let out = portcullis(&["check", "-c", &f.path().to_string_lossy()]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains(
            ":4:19: warning: [admin] require_ruleset is true but [listen] transparent is not set"
        ),
        "{said}"
    );
    // Off (the default): nothing to say.
    let f = config("[policy]\nprofile = \"none\"\n[admin]\nrequire_ruleset = false\n");
    let out = portcullis(&["check", "-c", &f.path().to_string_lossy()]);
    assert!(!text(&out).contains("readiness"), "{}", text(&out));
}

/// A name allowed on a port other than 80 and 443: explain says its tunnels
/// must start with TLS or HTTP, as the gateway enforces, unless `opaque`.
#[test]
fn explain_says_what_a_tunnel_may_carry_off_the_web_ports() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ssh.toml");
    let rules = |extra: &str| {
        format!(
            "[policy]\nprofile = \"none\"\n[[rule]]\nname = \"gh\"\nhosts = [\"github.com\"]\nports = [22, 443]\n{extra}"
        )
    };
    std::fs::write(&file, rules("")).unwrap();
    let path = file.to_string_lossy().to_string();
    let out = portcullis(&["-c", &path, "explain", "github.com:22", "github.com:443"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].ends_with("must start with TLS or HTTP naming it (opaque = true on the rule for SSH and other protocols)"), "{stdout}");
    assert!(lines[1].ends_with("(allowed by rule 'gh')"), "{stdout}");
    // opaque: anything may pass, but only the explicit proxy sees the name.
    std::fs::write(&file, rules("opaque = true\n")).unwrap();
    let out = portcullis(&["-c", &path, "explain", "github.com:22"]);
    assert!(
        text(&out).trim_end().ends_with(
            "(allowed by rule 'gh'); through the explicit proxy only: without a DNS listener ([listen] dns) a transparent connection on this port carries no name and is decided by address rules"
        ),
        "{}",
        text(&out)
    );
    // check says the same, with the setting that switches the rule off.
    let out = portcullis(&["-c", &path, "check"]);
    assert!(
        text(&out).contains("transparent connection on port 22, 443 carries no name")
            && text(&out).contains("disable_rules = [\"gh\"]"),
        "{}",
        text(&out)
    ); // With a DNS listener, the name is enforced for transparent connections
    // too, once a client resolved it through the gateway: explain says so,
    // and check has nothing to warn about.
    let with_dns = format!(
        "[listen]\ndns = \"127.0.0.1:5353\"\n{}",
        rules("opaque = true\n")
    );
    std::fs::write(&file, with_dns).unwrap();
    let out = portcullis(&["-c", &path, "explain", "github.com:22"]);
    assert!(
        text(&out).trim_end().ends_with(
            "(allowed by rule 'gh'); transparent connections on this port carry no name: they are decided as this name once the client resolved it through the DNS listener ([listen] dns), by address rules otherwise"
        ),
        "{}",
        text(&out)
    );
    let out = portcullis(&["-c", &path, "check"]);
    assert!(
        !text(&out).contains("carries no name") && out.status.success(),
        "{}",
        text(&out)
    );
}

/// The ```toml blocks of a markdown file, with their first line number.
fn toml_blocks(doc: &str) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(format!("{}/{doc}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{doc}: {e}"));
    let mut out = Vec::new();
    let mut block: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        match (&mut block, line.trim_start()) {
            (None, "```toml") => block = Some((i + 2, String::new())),
            (Some(_), "```") => out.push(block.take().expect("open block")),
            (Some((_, body)), _) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(block.is_none(), "{doc}: a ```toml block is not closed");
    out
}

/// Every TOML block in README.md and deploy/README.md and every
/// `config/*.toml` passes `check` as it stands: a block a user copies into
/// an empty file is a whole config, with no `--var` and nothing beside it.
#[test]
fn configs_in_the_docs_check_clean() {
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let mut checked: Vec<(String, std::path::PathBuf)> = Vec::new();
    for doc in ["README.md", "deploy/README.md"] {
        for (line, block) in toml_blocks(doc) {
            // Each block alone in a folder of its own.
            let folder = dir.path().join(format!("block-{}", checked.len()));
            std::fs::create_dir_all(&folder).unwrap();
            let path = folder.join("portcullis.toml");
            std::fs::write(&path, &block).unwrap();
            checked.push((format!("{doc}:{line}"), path));
        }
    }
    let blocks = checked.len();
    let mut shipped: Vec<_> = std::fs::read_dir(format!("{root}/config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    shipped.sort();
    for path in shipped {
        checked.push((path.display().to_string(), path));
    }
    for (name, path) in &checked {
        let out = portcullis(&["check", "-c", &path.display().to_string()]);
        let body = std::fs::read_to_string(path).unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}:\n{body}\n{}",
            text(&out)
        );
    }
    assert!(blocks >= 1, "no TOML block found in the docs");
    assert!(checked.len() - blocks >= 3, "config/*.toml: {checked:?}");
}

/// The config that `deploy/cloud-init.yaml` writes on a new VM passes `check`.
#[test]
fn the_cloud_init_config_checks_clean() {
    let path = format!("{}/deploy/cloud-init.yaml", env!("CARGO_MANIFEST_DIR"));
    let yaml = std::fs::read_to_string(&path).unwrap();
    let start = yaml
        .find("content: |\n")
        .expect("a write_files content block")
        + 11;
    let config: String = yaml[start..]
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("      "))
        .map(|l| format!("{}\n", l.get(6..).unwrap_or("")))
        .collect();
    assert!(config.contains("[listen]"), "{config}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("portcullis.toml");
    std::fs::write(&file, &config).unwrap();
    let out = portcullis(&["check", "-c", &file.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{config}\n{}", text(&out));
}

#[test]
fn explain_exit_codes_and_lines() {
    let out = portcullis(&["explain", "pypi.org:443", "files.pythonhosted.org"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        vec![
            "pypi.org:443 allow rule=pypi scenario=python-packages reason=rule_matched (allowed by rule 'pypi')",
            "files.pythonhosted.org:443 allow rule=pythonhosted scenario=python-packages reason=rule_matched (allowed by rule 'pythonhosted')",
        ]
    );

    let out = portcullis(&[
        "explain",
        "pypi.org:443",
        "evilazureml.ms",
        "169.254.169.254:80",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("evilazureml.ms:443 deny rule=- reason=no_rule"),
        "{stdout}"
    );
    assert!(
        stdout.contains("169.254.169.254:80 deny rule=- reason=platform_address"),
        "{stdout}"
    );
    assert!(stdout.contains("NO_PROXY"), "{stdout}");

    let out = portcullis(&["explain", "pypi.org:70000"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("'70000' is not a port"),
        "{}",
        text(&out)
    );
}

/// UDP names no host: a host rule on UDP is never enforced (`needs_dns`),
/// the address rule is; rules waiting for a value say which (`needs_var`,
/// `needs_service_tags`) and still deny, as the gateway does.
#[test]
fn explain_udp_and_vars() {
    let line = |args: &[&str]| {
        let out = portcullis(args);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    };
    let l = line(&[
        "--var",
        "region=westus2",
        "explain",
        "--proto",
        "udp",
        "westus2.tundra.azureml.ms:5831",
    ]);
    assert!(
        l.starts_with("westus2.tundra.azureml.ms:5831/udp deny rule=compute-instance-tundra scenario=basic reason=needs_dns (")
            && l.contains("UDP carries no name"),
        "{l}"
    );
    let l = line(&[
        "--var",
        "region=westus2",
        "explain",
        "--proto",
        "udp",
        "pool.westus2.batch.azure.com:443",
    ]);
    assert!(
        l.contains("deny rule=compute-instance-batch scenario=basic reason=needs_dns"),
        "{l}"
    );
    let l = line(&["explain", "x.westus2.batch.azure.com:443"]);
    assert!(
        l.starts_with("x.westus2.batch.azure.com:443 deny rule=compute-instance-batch scenario=basic reason=needs_var (")
            && l.contains("<region> has no value"),
        "{l}"
    );
    let l = line(&["explain", "myacr.azurecr.io"]);
    assert!(
        l.contains("rule=container-registry scenario=basic reason=needs_var"),
        "{l}"
    );
    let l = line(&["explain", "--proto", "udp", "20.37.64.10:5831"]);
    assert!(
        l.contains("rule=tag-azure-machine-learning-udp scenario=basic reason=needs_service_tags")
            && l.contains("service tag AzureMachineLearning"),
        "{l}"
    );
    // With the tags file, the address rule decides UDP 5831 by address.
    let tags = format!(
        "{}/tests/data/servicetags-public-subset.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let tags_text = std::fs::read_to_string(&tags).unwrap();
    let parsed = portcullis::servicetags::ServiceTags::parse("t", &tags_text).unwrap();
    let net = parsed.get("AzureMachineLearning").unwrap()[0];
    let ip = net.hosts().next().unwrap_or(net.addr()).to_string();
    let dest = if ip.contains(':') {
        format!("[{ip}]:5831")
    } else {
        format!("{ip}:5831")
    };
    let out = portcullis(&[
        "--service-tags",
        &tags,
        "--var",
        "region=eastus",
        "explain",
        "--proto",
        "udp",
        &dest,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// With a DNS listener a host rule on UDP is enforced through the sets the
/// gateway fills: `explain` allows it and says how, `check` is silent about
/// it; UDP 443 (QUIC) stays `needs_dns`. Without the listener the same
/// config denies (`needs_dns`) and `check` warns.
#[test]
fn explain_and_check_udp_names_with_and_without_a_dns_listener() {
    let body = r#"[listen]
transparent = "0.0.0.0:3129"
dns = "0.0.0.0:5353"

[clients]
allow = ["10.0.2.0/24"]

[policy]
profile = "none"

[[rule]]
name = "tundra"
hosts = ["westus2.tundra.azureml.ms"]
ports = [5831]
protocol = "udp"

[[rule]]
name = "batch"
hosts = ["*.westus2.batch.azure.com"]
ports = [443]
protocol = "any"
"#;
    let with = config(body);
    let path = with.path().to_str().unwrap();
    let out = portcullis(&[
        "-c",
        path,
        "explain",
        "--proto",
        "udp",
        "westus2.tundra.azureml.ms:5831",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let l = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        l.starts_with("westus2.tundra.azureml.ms:5831/udp allow rule=tundra reason=rule_matched")
            && l.contains("allowed once resolved through the DNS listener"),
        "{l}"
    );
    let out = portcullis(&[
        "-c",
        path,
        "explain",
        "--proto",
        "udp",
        "pool.westus2.batch.azure.com:443",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let l = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        l.contains("deny rule=batch reason=needs_dns") && l.contains("UDP 443 (QUIC)"),
        "{l}"
    );
    let out = portcullis(&["-c", path, "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        !text(&out).contains("UDP carries no name"),
        "{}",
        text(&out)
    );
    let out = portcullis(&["-c", path, "render", "nftables"]);
    let ruleset = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        ruleset.contains("ip daddr . udp dport @dns_udp_v4 counter accept")
            && ruleset.contains("udp dport 53 counter redirect to :5353"),
        "{ruleset}"
    );

    let without = config(&body.replace("dns = \"0.0.0.0:5353\"\n", ""));
    let path = without.path().to_str().unwrap();
    let out = portcullis(&[
        "-c",
        path,
        "explain",
        "--proto",
        "udp",
        "westus2.tundra.azureml.ms:5831",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let l = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        l.contains("deny rule=tundra reason=needs_dns") && l.contains("no DNS listener"),
        "{l}"
    );
    let out = portcullis(&["-c", path, "check"]);
    assert!(
        text(&out).contains("rule 'tundra' names hosts on udp, but UDP carries no name"),
        "{}",
        text(&out)
    );
    let out = portcullis(&["-c", path, "render", "nftables"]);
    let ruleset = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !ruleset.contains("dns_udp") && !ruleset.contains("dport 53"),
        "{ruleset}"
    );
}

#[test]
fn check_reports_every_error_with_location() {
    let f = config(
        "[policy]\nprofile = \"none\"\n[[rule]]\nname = \"a\"\nhosts = [\"*foo.com\"]\n[[rule]]\nname = \"b\"\nhosts = [\"ok.com\"]\nports = [0]\n",
    );
    let path = f.path().to_str().unwrap();
    let out = portcullis(&["check", "-c", path]);
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "{path}:5:10: error: rules[0].hosts[0]: '*foo.com' is not a valid pattern: a wildcard must be a whole leading label, as in '*.foo.com'"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "{path}:9:10: error: rules[1].ports[0]: 0 is not a port"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("invalid: 2 error(s)"), "{stdout}");
}

#[test]
fn check_reports_syntax_and_unknown_keys() {
    let f = config("[policy]\nprofile = \"none\"\n[[rule]]\nname = \"a\"\nhost = [\"a.com\"]\n");
    let out = portcullis(&["check", "-c", f.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains(":5:1: unknown field `host`"),
        "{}",
        text(&out)
    );

    let f = config("[policy\n");
    let out = portcullis(&["check", "-c", f.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains(":1:"), "{}", text(&out));

    let out = portcullis(&["check", "-c", "/nonexistent/portcullis.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("cannot read /nonexistent/portcullis.toml"),
        "{}",
        text(&out)
    );
}

#[test]
fn check_runs_expectations() {
    let f = config(
        r#"[policy]
profile = "none"
[[rule]]
name = "pypi"
hosts = ["pypi.org"]
[[expect]]
dest = "pypi.org:443"
verdict = "allow"
[[expect]]
dest = "example.com"
verdict = "allow"
[[expect]]
dest = "pypi.org:80"
verdict = "deny"
"#,
    );
    let out = portcullis(&["check", "-c", f.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            ":10:8: expect failed: wanted allow, got example.com:443 deny rule=- reason=no_rule"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("1 of 3 expectation(s) failed"), "{stdout}");
}

#[test]
fn check_says_which_rules_wait_for_service_tags() {
    let out = portcullis(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("wait for a service tags file"), "{stdout}");
    assert!(stdout.contains("tag-azure-machine-learning"), "{stdout}");
    // Unset placeholders are listed with their rules, once, with the fix.
    let summary: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("cannot be enforced yet"))
        .collect();
    assert_eq!(summary.len(), 1, "{stdout}");
    assert!(
        summary[0].contains("<region> has no value (")
            && summary[0].contains("compute-instance-batch")
            && summary[0].contains("portcullis init ")
            && summary[0].contains("--region westus2"),
        "{stdout}"
    );
    assert!(!stdout.contains("is disabled: placeholder"), "{stdout}");

    let tags = format!(
        "{}/tests/data/servicetags-public-subset.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = portcullis(&["--service-tags", &tags, "--var", "region=eastus", "check"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("wait for a service tags file"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out)
            .contains("servicetags-public-subset.json (change number 376, cloud Public, 85 tags, "),
        "check says which tags file it loaded: {}",
        text(&out)
    );
    // A month-old copy is flagged: the ranges change weekly.
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("tags.json");
    std::fs::copy(&tags, &old).unwrap();
    let month_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(40 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(month_ago)
        .unwrap();
    let old = old.to_string_lossy().to_string();
    let out = portcullis(&["--service-tags", &old, "--var", "region=eastus", "check"]);
    assert!(
        text(&out).contains("warning: the service tags file is 40 days old"),
        "{}",
        text(&out)
    );
    // An address allowed by a service tag: explain says what its tunnels may carry.
    let out = portcullis(&[
        "--service-tags",
        &tags,
        "--var",
        "region=eastus",
        "explain",
        "20.42.0.1:443",
        "4.171.27.64:443",
    ]);
    assert!(text(&out).contains("20.42.0.1:443"), "{}", text(&out));
    assert!(
        text(&out).contains("rule=tag-azure-machine-learning")
            && text(&out).contains("a tunnel to it carries only TLS names a host rule allows"),
        "{}",
        text(&out)
    );
}

#[test]
fn profile_list_and_show() {
    let out = portcullis(&["profile", "list"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for s in [
        "basic",
        "python-packages",
        "rstudio",
        "storage-firewall",
        "hbi-workspace",
        "kubernetes",
        "vscode",
        "monitoring",
    ] {
        assert!(stdout.contains(s), "{s} missing from {stdout}");
    }
    assert!(
        stdout.lines().any(|l| l.starts_with("on  python-packages")),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("off rstudio")),
        "{stdout}"
    );

    let out = portcullis(&["profile", "show", "python-packages"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("pypi.org"), "{stdout}");
    assert!(
        stdout.contains("Used to list dependencies from the default index"),
        "{stdout}"
    );

    let out = portcullis(&["profile", "show", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("unknown scenario 'nope'"),
        "{}",
        text(&out)
    );
}

const GROUPS: &str = r#"
[clients]
allow = ["10.0.0.0/16"]
training = ["10.0.2.0/24"]
inference = { cidrs = ["10.0.3.0/24"], mode = "audit" }

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

/// `explain --client` decides for that address; without it, a verdict that
/// differs between client groups is printed once per group, never as one
/// line that holds for some clients only.
#[test]
fn explain_decides_for_a_client_and_splits_by_group_without_one() {
    let file = config(GROUPS);
    let path = file.path().to_string_lossy().to_string();
    let run = |args: &[&str]| {
        let mut all = vec!["-c", path.as_str(), "explain"];
        all.extend_from_slice(args);
        let out = portcullis(&all);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, out) = run(&["--client", "10.0.2.7", "pypi.org"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("pypi.org:443 allow rule=pypi"), "{out}");
    assert!(out.contains("client=10.0.2.7 groups=training"), "{out}");
    let (code, out) = run(&["--client", "10.0.3.7", "pypi.org"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("audit_deny rule=pypi reason=no_rule"), "{out}");
    assert!(out.contains("is for client group(s) training"), "{out}");
    assert!(out.contains("groups=inference"), "{out}");
    let (code, out) = run(&["--client", "10.9.9.9", "registry.test"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not in [clients] allow"), "{out}");
    // Without --client: one line per set of groups, each saying whom.
    let (code, out) = run(&["pypi.org"]);
    assert_eq!(code, Some(1), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with("pypi.org:443 deny ")
            && lines[0].ends_with("for clients in no group (e.g. 10.0.0.0)"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("pypi.org:443 allow ")
            && lines[1].ends_with("for clients in group training (e.g. 10.0.2.0)"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("pypi.org:443 audit_deny ")
            && lines[2].ends_with("for clients in group inference (e.g. 10.0.3.0)"),
        "{out}"
    );
    // The same for everyone: one line, as without groups.
    let (code, out) = run(&["registry.test"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(!out.contains("for clients"), "{out}");
}

/// `[[expect]]` with `client` checks that client; without it the verdict
/// must hold for every group.
#[test]
fn expectations_hold_per_client_or_for_every_group() {
    let ok = format!(
        "{GROUPS}\n[[expect]]\ndest = \"pypi.org\"\nclient = \"10.0.2.7\"\nverdict = \"allow\"\n\n[[expect]]\ndest = \"registry.test\"\nverdict = \"allow\"\n"
    );
    let file = config(&ok);
    let out = portcullis(&["check", "-c", &file.path().to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let bad = format!("{GROUPS}\n[[expect]]\ndest = \"pypi.org\"\nverdict = \"allow\"\n");
    let file = config(&bad);
    let out = portcullis(&["check", "-c", &file.path().to_string_lossy()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("expect failed: wanted allow for clients in no group (e.g. 10.0.0.0), got pypi.org:443 deny"),
        "{}",
        text(&out)
    );
    let unknown = GROUPS.replace("clients = [\"training\"]", "clients = [\"trainig\"]");
    let file = config(&unknown);
    let out = portcullis(&["check", "-c", &file.path().to_string_lossy()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains(":13:"), "{}", text(&out));
    assert!(
        text(&out).contains("did you mean 'training'?"),
        "{}",
        text(&out)
    );
}

/// An address the policy denies is still reached by name once a client
/// resolved it through the DNS listener: `explain` says so with a listener,
/// and not without one, nor for addresses no name may reach.
#[test]
fn explain_of_an_address_says_a_dns_listener_may_decide_it_by_name() {
    let rules = "[policy]\nprofile = \"none\"\n[[rule]]\nname = \"files\"\nhosts = [\"files.example\"]\nports = [445]\nopaque = true\n";
    let note = "decided as that name (reason dns_address)";
    for (listen, public) in [("[listen]\ndns = \"0.0.0.0:5353\"\n", true), ("", false)] {
        let cfg = config(&format!("{listen}{rules}"));
        let path = cfg.path().to_str().unwrap();
        let out = portcullis(&["-c", path, "explain", "20.1.2.3:445", "169.254.169.254:80"]);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 2, "{}", text(&out));
        assert!(
            lines[0].contains(" deny ") && lines[0].contains(note) == public,
            "{stdout}"
        );
        assert!(!lines[1].contains(note), "a platform address: {stdout}");
    }
}
