//! Configs that are written for the user or split over files, end to end as
//! a process: `[policy] include`, `import aml-dependencies`, `init`.

#[path = "support/cli.rs"]
#[allow(dead_code)]
mod cli;

use std::path::Path;

use cli::{portcullis, text};

fn data(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn write(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
}

fn s(path: &Path) -> String {
    path.to_string_lossy().to_string()
}

const MAIN: &str = "[policy]\nprofile = \"none\"\ninclude = [\"rules.d/*.toml\"]\n";

/// Rules and expectations of every matching file are merged after the
/// config's own, in name order; other files in the folder are not read.
#[test]
fn included_rules_and_expects_take_part() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("portcullis.toml");
    write(&cfg, MAIN);
    write(
        &dir.path().join("rules.d/10-pypi.toml"),
        "[[rule]]\nname = \"pypi\"\nhosts = [\"pypi.org\"]\n\n[[expect]]\ndest = \"pypi.org:443\"\nverdict = \"allow\"\n",
    );
    write(
        &dir.path().join("rules.d/20-github.toml"),
        "[[rule]]\nname = \"github\"\nhosts = [\"github.com\"]\nports = [22]\n",
    );
    write(&dir.path().join("rules.d/notes.txt"), "not toml at all [");
    write(
        &dir.path().join("rules.d/.hidden.toml"),
        "not toml at all [",
    );
    let c = s(&cfg);
    let out = portcullis(&["-c", &c, "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("1 expectation(s) passed"),
        "{}",
        text(&out)
    );
    let out = portcullis(&[
        "-c",
        &c,
        "explain",
        "pypi.org",
        "github.com:22",
        "example.com",
    ]);
    let t = text(&out);
    assert!(t.contains("pypi.org:443 allow rule=pypi "), "{t}");
    assert!(t.contains("github.com:22 allow rule=github "), "{t}");
    assert!(
        t.contains("example.com:443 deny rule=- reason=no_rule"),
        "{t}"
    );

    // A failing expectation is reported where it was written.
    write(
        &dir.path().join("rules.d/30-expect.toml"),
        "# a test\n[[expect]]\ndest = \"example.com:443\"\nverdict = \"allow\"\n",
    );
    let out = portcullis(&["-c", &c, "check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let at = format!(
        "{}:3:8: expect failed: wanted allow",
        s(&dir.path().join("rules.d/30-expect.toml"))
    );
    assert!(text(&out).contains(&at), "{}", text(&out));
}

/// `*.toml` beside the config skips the config itself, and a file two
/// patterns name is read once.
#[test]
fn the_including_file_and_repeats_are_read_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("portcullis.toml");
    write(
        &cfg,
        "[policy]\nprofile = \"none\"\ninclude = [\"*.toml\", \"pypi.toml\"]\n",
    );
    write(
        &dir.path().join("pypi.toml"),
        "[[rule]]\nname = \"pypi\"\nhosts = [\"pypi.org\"]\n",
    );
    let out = portcullis(&["-c", &s(&cfg), "explain", "pypi.org"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("allow rule=pypi "), "{}", text(&out));
}

/// An error in an included file names that file, line and column, both a
/// rule error and a parse error; an included file cannot include.
#[test]
fn errors_in_an_included_file_are_located_there() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("portcullis.toml");
    write(&cfg, MAIN);
    let bad = dir.path().join("rules.d/bad.toml");
    write(
        &bad,
        "[[rule]]\nname = \"x\"\nhosts = [\"x.example\"]\nports = [70000]\n",
    );
    let out = portcullis(&["-c", &s(&cfg), "check"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let want = format!(
        "{}:4:10: error: rules[0].ports[0]: 70000 is not a port",
        s(&bad)
    );
    assert!(text(&out).contains(&want), "{}", text(&out));

    write(
        &bad,
        "[[rule]]\nname = \"x\"\nhosts = [\"x.example\"]\n\n[policy]\ninclude = [\"*.toml\"]\n",
    );
    let out = portcullis(&["-c", &s(&cfg), "check"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let want = format!("{}:5:2: unknown field `policy`", s(&bad));
    assert!(text(&out).contains(&want), "{}", text(&out));
}

/// A `*` pattern that matches nothing is a warning (an empty drop-in folder
/// is fine); a plain path that is missing, a missing folder or a `*` in a
/// folder is an error at the pattern.
#[test]
fn patterns_that_match_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("portcullis.toml");
    std::fs::create_dir(dir.path().join("rules.d")).unwrap();
    write(&cfg, MAIN);
    let out = portcullis(&["-c", &s(&cfg), "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let want = format!(
        "{}:3:12: warning: policy.include[0]: 'rules.d/*.toml' matches no file",
        s(&cfg)
    );
    assert!(text(&out).contains(&want), "{}", text(&out));

    let cases = [
        (
            "\"rules.d/one.toml\"",
            "policy.include[0]: 'rules.d/one.toml': no such file",
        ),
        ("\"nope.d/*.toml\"", "policy.include[0]: cannot read folder"),
        (
            "\"*/x.toml\"",
            "policy.include[0]: '*/x.toml': a '*' may stand only in the file name",
        ),
    ];
    for (pattern, message) in cases {
        write(
            &cfg,
            &format!("[policy]\nprofile = \"none\"\ninclude = [{pattern}]\n"),
        );
        let out = portcullis(&["-c", &s(&cfg), "check"]);
        assert_eq!(out.status.code(), Some(2), "{pattern}: {}", text(&out));
        // Compile errors say "error:"; the pattern's own, like a parse error, do not.
        let t = text(&out).replace("error: policy.include", "policy.include");
        let want = format!("{}:3:12: {message}", s(&cfg));
        assert!(t.contains(&want), "{pattern}: {t}");
    }
}

/// Two files that name the same rule: an error at the later file (in name
/// order) that names the earlier one.
#[test]
fn a_rule_name_used_in_two_files_names_both() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("portcullis.toml");
    write(&cfg, MAIN);
    let rule = "[[rule]]\nname = \"pypi\"\nhosts = [\"pypi.org\"]\n";
    let (a, b) = (
        dir.path().join("rules.d/a.toml"),
        dir.path().join("rules.d/b.toml"),
    );
    write(&b, rule);
    write(&a, &format!("# first\n{rule}"));
    let out = portcullis(&["-c", &s(&cfg), "check"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let want = format!(
        "{}:2:8: error: rules[0].name: rule name 'pypi' is already used by another rule ({}:3:8)",
        s(&b),
        s(&a)
    );
    assert!(text(&out).contains(&want), "{}", text(&out));
}

/// `host:port` pairs an outbound-dependencies file lists (a wildcard as one
/// name under it).
fn listed(json_path: &str) -> Vec<String> {
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json_path).unwrap()).unwrap();
    let mut out = Vec::new();
    for item in doc["value"].as_array().unwrap() {
        let body = item.get("properties").unwrap_or(item);
        for e in body["endpoints"].as_array().unwrap() {
            let name = e["domainName"].as_str().unwrap().replace("*.", "x.");
            for d in e["endpointDetails"].as_array().unwrap() {
                out.push(format!("{name}:{}", d["port"].as_u64().unwrap()));
            }
        }
    }
    out
}

/// On each real example of the API's answer, the generated rules compile
/// when a config includes them, and every listed endpoint:port is allowed by
/// one of them.
#[test]
fn imported_dependencies_allow_every_listed_endpoint() {
    for file in [
        "aml-outbound-dependencies-example.json",
        "aml-outbound-dependencies-example-2021-07-01.json",
        "aml-outbound-dependencies-docs-excerpt.json",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("portcullis.toml");
        write(&cfg, MAIN);
        let rules = dir.path().join("rules.d/aml-dependencies.toml");
        let out = portcullis(&[
            "import",
            "aml-dependencies",
            &data(file),
            "--out",
            &s(&rules),
        ]);
        assert_eq!(out.status.code(), Some(0), "{file}: {}", text(&out));
        let generated = std::fs::read_to_string(&rules).unwrap();
        assert!(generated.contains(&format!("(from {file})")), "{generated}");
        let out = portcullis(&["-c", &s(&cfg), "check"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{file}: {}\n{generated}",
            text(&out)
        );
        let dests = listed(&data(file));
        assert!(dests.len() >= 2, "{file}: {dests:?}");
        let mut args = vec!["-c", cfg.to_str().unwrap(), "explain"];
        args.extend(dests.iter().map(String::as_str));
        let out = portcullis(&args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{file}: {}\n{generated}",
            text(&out)
        );
        let t = text(&out);
        for dest in &dests {
            let line = t
                .lines()
                .find(|l| l.starts_with(&format!("{dest} ")))
                .unwrap();
            assert!(line.contains(" allow rule=aml-dep-"), "{file}: {line}");
        }
        // Stdout is the same text.
        let out = portcullis(&["import", "aml-dependencies", &data(file)]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), generated, "{file}");
    }
    let out = portcullis(&[
        "import",
        "aml-dependencies",
        &data("clienthello-index.json"),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("not an outbound-dependencies list"),
        "{}",
        text(&out)
    );
}

fn init_args<'a>(region: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "init",
        "--region",
        region,
        "--storage",
        "mlstore01",
        "--acr",
        "mlregistry01",
        "--vnet",
        "10.0.0.0/16",
        "--compute-subnet",
        "10.0.2.0/24",
    ];
    v.extend_from_slice(extra);
    v
}

/// What `init` writes passes `check`, serves the compute subnet, and allows
/// what its flags imply; an existing file is replaced only with `--force`.
#[test]
fn init_writes_a_config_that_checks_and_explains() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("etc/portcullis.toml");
    let c = s(&cfg);
    let tags = data("servicetags-public-subset.json");
    let deps = data("aml-outbound-dependencies-example-2021-07-01.json");
    let extra = [
        "--service-tags",
        &tags,
        "--dependencies",
        &deps,
        "--out",
        &c,
    ];
    let out = portcullis(&init_args("westus2", &extra));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let written = std::fs::read_to_string(&cfg).unwrap();
    assert!(written.contains("allow = [\"10.0.2.0/24\"]"), "{written}");
    assert!(
        written.contains("include = [\"rules.d/*.toml\"]"),
        "{written}"
    );
    assert!(
        dir.path()
            .join("etc/rules.d/aml-dependencies.toml")
            .is_file()
    );
    let out = portcullis(&["-c", &c, "check"]);
    assert_eq!(out.status.code(), Some(0), "{}\n{written}", text(&out));
    assert!(
        text(&out).contains("4 expectation(s) passed"),
        "{}",
        text(&out)
    );
    assert!(
        !text(&out).contains("wait for a service tags file"),
        "{}",
        text(&out)
    );
    let allowed = [
        "mlstore01.blob.core.windows.net:443",
        "mlstore01.file.core.windows.net:445",
        "x.westus2.batch.azure.com:443",
        "pypi.org:443",
        "core.windows.net:18881",
    ];
    let mut args = vec!["-c", c.as_str(), "explain"];
    args.extend(allowed);
    let out = portcullis(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = portcullis(&["-c", &c, "explain", "--proto", "udp", "4.171.27.65:5831"]);
    let t = text(&out);
    assert!(
        t.contains("allow rule=tag-azure-machine-learning-udp"),
        "{t}"
    );
    let out = portcullis(&[
        "-c",
        &c,
        "explain",
        "x.westeurope.batch.azure.com",
        "example.com",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cfg), 0o640);

    // No overwrite without --force; the file is untouched.
    std::fs::write(&cfg, "# mine\n").unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = portcullis(&init_args("westus2", &["--out", &c]));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("exists: pass --force"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), "# mine\n");
    let out = portcullis(&init_args("westus2", &["--out", &c, "--force"]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(mode(&cfg), 0o600, "a replaced file keeps its mode");
    let out = portcullis(&["-c", &c, "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// On stdout the dependencies are inlined, and the text passes `check` as
/// saved; flag values the config cannot use are refused, nothing printed.
#[test]
fn init_on_stdout_inlines_dependencies_and_refuses_bad_values() {
    let deps = data("aml-outbound-dependencies-example-2021-07-01.json");
    let out = portcullis(&init_args("westeurope", &["--dependencies", &deps]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let written = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        written.contains("name = \"aml-dep-azure-storage-account\""),
        "{written}"
    );
    assert!(
        !written.lines().any(|l| l.starts_with("include")),
        "{written}"
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("portcullis.toml");
    std::fs::write(&cfg, &written).unwrap();
    let out = portcullis(&["-c", &s(&cfg), "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = portcullis(&["-c", &s(&cfg), "explain", "core.windows.net:18881"]);
    let t = text(&out);
    assert!(
        t.contains(" allow rule=aml-dep-azure-storage-account "),
        "{t}"
    );

    let out = portcullis(&init_args("west us", &[]));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(out.stdout.is_empty());
    assert!(
        text(&out).contains("vars.region: 'west us' is not a usable value"),
        "{}",
        text(&out)
    );
    let mut bad = init_args("westus2", &[]);
    bad[10] = "10.0.2.0/33";
    let out = portcullis(&bad);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("--compute-subnet '10.0.2.0/33' is not a CIDR"),
        "{}",
        text(&out)
    );
}

/// The config the Debian package installs is `init`'s output for the
/// example values the README and the deploy guide use, so the three agree.
#[test]
fn the_package_config_is_what_init_writes() {
    let args = [
        "init",
        "--region",
        "westeurope",
        "--storage",
        "mystorageaccount",
        "--acr",
        "myregistry",
        "--workspace-id",
        "00000000-0000-0000-0000-000000000000",
        "--vnet",
        "10.0.0.0/16",
        "--compute-subnet",
        "10.0.2.0/24",
    ];
    let out = portcullis(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let root = env!("CARGO_MANIFEST_DIR");
    let shipped = std::fs::read_to_string(format!("{root}/config/package.toml")).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout) == shipped,
        "config/package.toml differs from init's output: regenerate it with\n  portcullis {} > config/package.toml",
        args.join(" ")
    );
    for doc in ["README.md", "deploy/README.md"] {
        let text = std::fs::read_to_string(format!("{root}/{doc}")).unwrap();
        for flag in [
            "--region westeurope",
            "--vnet 10.0.0.0/16 --compute-subnet 10.0.2.0/24",
        ] {
            assert!(text.contains(flag), "{doc} does not use `{flag}`");
        }
    }
}

/// Every `portcullis init` command in README.md and deploy/README.md runs
/// as written (its `--out` moved to a temporary folder) and writes a config
/// that passes `check`.
#[test]
fn init_commands_in_the_docs_run() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut ran = 0;
    for doc in ["README.md", "deploy/README.md"] {
        let body = std::fs::read_to_string(format!("{root}/{doc}")).unwrap();
        let joined = body.replace("\\\n", " ");
        for line in joined.lines().filter(|l| l.contains("portcullis init ")) {
            let Some(start) = line.find("portcullis init ") else {
                continue;
            };
            if line[..start].contains('`') {
                continue; // prose, not a command
            }
            let words: Vec<&str> = line[start + "portcullis ".len()..]
                .split_whitespace()
                .take_while(|w| !w.starts_with('#'))
                .collect();
            let dir = tempfile::tempdir().unwrap();
            let out_file = dir.path().join("portcullis.toml");
            let out_path = s(&out_file);
            let mut args: Vec<&str> = Vec::new();
            let mut iter = words.iter();
            while let Some(w) = iter.next() {
                args.push(w);
                if *w == "--out" {
                    iter.next();
                    args.push(&out_path);
                }
            }
            assert!(args.contains(&"--out"), "{doc}: {line}");
            let out = portcullis(&args);
            assert_eq!(out.status.code(), Some(0), "{doc}: {line}\n{}", text(&out));
            let out = portcullis(&["-c", &out_path, "check"]);
            assert_eq!(out.status.code(), Some(0), "{doc}: {line}\n{}", text(&out));
            ran += 1;
        }
    }
    assert!(ran >= 3, "found {ran} init commands in the docs");
}

/// Files already in `rules.d/` are part of what `init --out` writes: when
/// the whole does not pass `check`, init says so and fails.
#[test]
fn init_checks_the_config_with_the_files_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("portcullis.toml");
    write(
        &dir.path().join("rules.d/zz-mine.toml"),
        "[[rule]]\nname = \"aml-dep-api\"\nhosts = [\"mine.example\"]\n",
    );
    let deps = data("aml-outbound-dependencies-example-2021-07-01.json");
    let out = portcullis(&init_args(
        "westus2",
        &["--dependencies", &deps, "--out", &s(&cfg)],
    ));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("does not pass `check`"), "{t}");
    assert!(t.contains("rule name 'aml-dep-api' is already used"), "{t}");
}
