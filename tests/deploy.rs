//! The deploy/ files do what their comments say: the ruleset unit turns IP
//! forwarding on only with the portcullis table loaded and off (before the
//! table goes) on stop or failure; a restart of nftables.service (PartOf)
//! brings forwarding back only with the table; the units pass
//! `systemd-analyze verify`; the sysctl file sets no forwarding.
//!
//! The netns test runs the unit's own Exec lines (paths mapped to this
//! checkout, the built binary as PORTCULLIS) inside a network namespace it
//! creates and removes, under `setpriv` with the unit's capability bounding
//! set, so the namespace's /proc/sys/net and ruleset are the only ones it
//! touches. It needs root, `ip`, `nft` and `setpriv`; without them it prints
//! SKIP, and under `CI=true` a skip fails.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
/// Where deploy/README.md installs the script and the config.
const INSTALLED_SCRIPT: &str = "/usr/local/lib/portcullis/apply-nftables.sh";
const INSTALLED_REFRESH: &str = "/usr/local/lib/portcullis/refresh-service-tags.sh";
/// Every unit in deploy/systemd.
const UNITS: [&str; 6] = [
    "portcullis.service",
    "portcullis-nftables.service",
    "portcullis-ruleset-counters.service",
    "portcullis-ruleset-counters.timer",
    "portcullis-service-tags.service",
    "portcullis-service-tags.timer",
];
const INSTALLED_BIN: &str = "/usr/local/bin/portcullis";
const INSTALLED_CONFIG: &str = "/etc/portcullis/portcullis.toml";

fn deploy(rel: &str) -> PathBuf {
    Path::new(ROOT).join("deploy").join(rel)
}

/// Prints a SKIP line and returns false, or panics under `CI=true`, where
/// every test must run.
fn require(ok: bool, test: &str, why: &str) -> bool {
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test}: cannot run in CI: {why}");
        }
        // Straight to the process's stderr: the harness captures eprintln!
        // of passing tests, and a skip must be seen.
        let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
    }
    ok
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn tool_works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

fn text(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------
// Unit files

/// The settings of a unit file: key → values in file order (a key may repeat).
struct Unit {
    name: &'static str,
    keys: BTreeMap<String, Vec<String>>,
}

impl Unit {
    fn load(name: &'static str) -> Unit {
        let path = deploy(&format!("systemd/{name}"));
        let body = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in body.lines().map(str::trim) {
            if line.starts_with('#') || line.starts_with('[') {
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                keys.entry(k.trim().to_string())
                    .or_default()
                    .push(v.trim().to_string());
            }
        }
        Unit { name, keys }
    }

    /// Every value of `key` (empty when absent).
    fn all(&self, key: &str) -> &[String] {
        self.keys.get(key).map_or(&[], Vec::as_slice)
    }

    /// The single value of `key`; panics when absent or repeated.
    fn one(&self, key: &str) -> &str {
        match self.all(key) {
            [v] => v,
            other => panic!("{}: want one {key}=, found {other:?}", self.name),
        }
    }

    /// Whitespace-separated words of every `key=` line.
    fn words(&self, key: &str) -> Vec<&str> {
        self.all(key)
            .iter()
            .flat_map(|v| v.split_whitespace())
            .collect()
    }
}

/// The main unit's `LimitNOFILE` holds the default `[limits]
/// max_connections`: two descriptors per connection (client and upstream)
/// plus the reserve of 32 + limit/64 the gateway keeps (README, limits);
/// and the default is the 50,000 idle tunnels docs/perf/cost.md sizes for.
#[test]
fn unit_open_file_limit_fits_the_default_max_connections() {
    let unit = Unit::load("portcullis.service");
    let limit: u64 = unit
        .one("LimitNOFILE")
        .parse()
        .expect("LimitNOFILE is a number");
    let max = portcullis::config::Limits::default().max_connections as u64;
    let budget = (limit - (32 + limit / 64)) / 2;
    assert!(
        budget >= max,
        "LimitNOFILE={limit} admits {budget} connections, below max_connections {max}"
    );
    assert!(max >= 50_000, "default max_connections {max}");
}

#[test]
fn unit_files_declare_the_ordering_and_privileges() {
    let nft = Unit::load("portcullis-nftables.service");
    assert!(nft.words("PartOf").contains(&"nftables.service"));
    assert!(nft.words("After").contains(&"nftables.service"));
    let propagated = nft.words("ReloadPropagatedFrom");
    assert!(propagated.contains(&"portcullis.service"), "{propagated:?}");
    assert_eq!(nft.one("CapabilityBoundingSet"), "CAP_NET_ADMIN");
    assert_eq!(nft.one("NoNewPrivileges"), "yes");
    assert!(
        nft.one("ExecStopPost").ends_with("--stop"),
        "stop and failure must turn forwarding off"
    );
    // /proc/sys must stay writable for the forwarding keys.
    assert!(nft.all("ProtectKernelTunables").is_empty());

    let main = Unit::load("portcullis.service");
    // One capability, for `nft` adding elements to the DNS listener's UDP
    // sets; nothing else (no CAP_NET_RAW, no CAP_SYS_ADMIN, ...).
    assert_eq!(main.one("AmbientCapabilities"), "CAP_NET_ADMIN");
    assert_eq!(main.one("CapabilityBoundingSet"), "CAP_NET_ADMIN");
    assert_eq!(main.one("NoNewPrivileges"), "yes");
    assert!(
        main.words("RestrictAddressFamilies")
            .contains(&"AF_NETLINK"),
        "nft talks netlink"
    );
    assert_eq!(main.one("Restart"), "always");
    assert!(main.one("StartLimitIntervalSec").parse::<u32>().is_ok());
    assert!(main.one("StartLimitBurst").parse::<u32>().is_ok());
    let pre = main.one("ExecStartPre");
    assert!(
        pre.starts_with(&format!("{INSTALLED_BIN} check -c ")),
        "ExecStartPre={pre}"
    );

    // The service tags refresh: weekly, spread, caught up after downtime;
    // root without capabilities, settings from /etc/default/portcullis.
    let timer = Unit::load("portcullis-service-tags.timer");
    assert_eq!(timer.one("OnCalendar"), "weekly");
    assert_eq!(timer.one("Persistent"), "true");
    assert!(timer.one("RandomizedDelaySec").ends_with('h'));
    let refresh = Unit::load("portcullis-service-tags.service");
    assert_eq!(refresh.one("ExecStart"), INSTALLED_REFRESH);
    assert_eq!(refresh.one("EnvironmentFile"), "-/etc/default/portcullis");
    assert_eq!(refresh.one("CapabilityBoundingSet"), "");
    assert_eq!(refresh.one("NoNewPrivileges"), "yes");
    assert_eq!(refresh.one("ProtectSystem"), "strict");
    assert_eq!(refresh.one("StateDirectory"), "portcullis");
    assert_eq!(refresh.one("StateDirectoryMode"), "0755");
    // The default file it refreshes is in that state folder.
    let script = std::fs::read_to_string(deploy("refresh-service-tags.sh")).unwrap();
    assert!(script.contains("PORTCULLIS_SERVICE_TAGS:-/var/lib/portcullis/service-tags.json}"));

    // Nothing in the sysctl file turns forwarding on (a comment may name it).
    let sysctl = std::fs::read_to_string(deploy("sysctl.d/90-portcullis.conf")).unwrap();
    let set: Vec<&str> = sysctl
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && (l.contains("forwarding") || l.contains("ip_forward")))
        .collect();
    assert!(set.is_empty(), "sysctl file sets forwarding: {set:?}");
    // Every key it sets exists (a typo would be skipped at boot with only a
    // warning). net.netfilter keys exist once nf_conntrack is loaded.
    let conntrack = Path::new("/proc/sys/net/netfilter/nf_conntrack_max").exists();
    for line in sysctl.lines().map(str::trim) {
        let Some((key, _)) = line.split_once('=').filter(|_| !line.starts_with('#')) else {
            continue;
        };
        let key = key.trim();
        if key.starts_with("net.netfilter.") && !conntrack {
            continue;
        }
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        assert!(
            path.exists(),
            "sysctl file sets {key}: no {}",
            path.display()
        );
    }
}

/// A root directory for `systemd-analyze verify --root`: the units, the
/// binary and the script at their install paths, and the system's own unit
/// directory (for sysinit.target, network-pre.target, nftables.service).
fn verify_root(dir: &Path) {
    let put = |from: &Path, to: &str| {
        let dest = dir.join(to.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(from, &dest)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), dest.display()));
    };
    put(Path::new(BIN), INSTALLED_BIN);
    put(&deploy("apply-nftables.sh"), INSTALLED_SCRIPT);
    put(&deploy("refresh-service-tags.sh"), INSTALLED_REFRESH);
    put(Path::new("/bin/kill"), "/bin/kill");
    for unit in UNITS {
        put(
            &deploy(&format!("systemd/{unit}")),
            &format!("/etc/systemd/system/{unit}"),
        );
    }
    let system = Path::new("/lib/systemd/system");
    let dest = dir.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&dest).unwrap();
    for entry in std::fs::read_dir(system).unwrap().flatten() {
        let path = entry.path();
        if path.is_file() {
            std::fs::copy(&path, dest.join(entry.file_name())).unwrap();
        }
    }
}

#[test]
fn units_pass_systemd_analyze_verify() {
    const TEST: &str = "units_pass_systemd_analyze_verify";
    let have = tool_works("systemd-analyze", &["--version"])
        && Path::new("/lib/systemd/system/sysinit.target").exists();
    if !require(
        have,
        TEST,
        "systemd-analyze (Debian package systemd) not found",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    verify_root(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", dir.path().display()))
        .args(UNITS)
        .output()
        .unwrap();
    // verify exits 0 on unknown keys and only warns: any output is a failure.
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        text(&out)
    );

    // Exposure scores, as deploy/README.md records them (offline: no
    // running systemd needed).
    for unit in [
        "portcullis-nftables.service",
        "portcullis.service",
        "portcullis-ruleset-counters.service",
        "portcullis-service-tags.service",
    ] {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(deploy(&format!("systemd/{unit}")))
            .output()
            .unwrap();
        let all = String::from_utf8_lossy(&out.stdout);
        let Some(line) = all.lines().find(|l| l.contains("Overall exposure level")) else {
            panic!("systemd-analyze security {unit}: {}", text(&out));
        };
        eprintln!("{}", line.trim());
        let score: f64 = line
            .split(':')
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no score in {line:?}"));
        assert!(
            score <= 3.0,
            "{unit} exposure {score} (deploy/README.md says under 3)"
        );
    }
}

// ---------------------------------------------------------------------------
// The ruleset unit in a network namespace

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Netns {
        // Unique per test: the tests of this file run in parallel.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("pc-deploy-{}-{n}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip netns add {name}: {}", text(&out));
        Netns { name }
    }

    /// `ip netns exec NAME program args...`.
    fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// `net.ipv4.ip_forward` and `net.ipv6.conf.all.forwarding` (None when
    /// the kernel has no IPv6) inside the namespace.
    fn forwarding(&self) -> (u8, Option<u8>) {
        let read = |key: &str| {
            let out = self.exec("cat").arg(key).output().unwrap();
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
                .flatten()
        };
        let v4 = read("/proc/sys/net/ipv4/ip_forward").expect("read ip_forward");
        (v4, read("/proc/sys/net/ipv6/conf/all/forwarding"))
    }

    fn table_loaded(&self) -> bool {
        self.exec("nft")
            .args(["list", "table", "inet", "portcullis"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// Forwarding (both families) is `on` and the table is there exactly
    /// when `table` says.
    #[track_caller]
    fn assert_state(&self, on: bool, table: bool, when: &str) {
        let want = u8::from(on);
        let (v4, v6) = self.forwarding();
        assert_eq!(v4, want, "ip_forward {when}");
        if let Some(v6) = v6 {
            assert_eq!(v6, want, "ipv6 forwarding {when}");
        }
        assert_eq!(self.table_loaded(), table, "table inet portcullis {when}");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs the ruleset unit's Exec lines the way systemd would, in a
/// namespace, with the unit's capability bounding set.
struct RulesetUnit<'a> {
    ns: &'a Netns,
    unit: Unit,
    dir: &'a Path,
    /// `+net_admin`-style list for setpriv, from CapabilityBoundingSet=.
    caps: String,
}

impl RulesetUnit<'_> {
    /// One Exec line with install paths mapped to this checkout and `config`.
    fn run_line(&self, line: &str, config: &Path) -> Output {
        // Prefixes such as "-" (ignore failure) would change the meaning;
        // the unit uses none.
        assert!(
            !line.starts_with(['-', '@', ':', '+', '!']),
            "unexpected Exec prefix in {line:?}"
        );
        let script = deploy("apply-nftables.sh");
        let argv: Vec<String> = line
            .split_whitespace()
            .map(|w| match w {
                INSTALLED_SCRIPT => script.display().to_string(),
                INSTALLED_CONFIG => config.display().to_string(),
                other => other.to_string(),
            })
            .collect();
        self.ns
            .exec("setpriv")
            .arg(format!("--bounding-set=-all,{}", self.caps))
            .args(["--inh-caps=-all", "--no-new-privs", "env"])
            .arg(format!("PORTCULLIS={BIN}"))
            .arg(format!(
                "RULESET={}",
                self.dir.join("run/ruleset.nft").display()
            ))
            .arg(format!(
                "COUNTERS={}",
                self.dir.join("run/ruleset-counters.json").display()
            ))
            .arg(format!("NFT={}", self.dir.join("nft-logged").display()))
            .args(&argv)
            .output()
            .unwrap()
    }

    /// Runs the `key=` lines in order; stops at the first failure.
    fn run_key(&self, key: &str, config: &Path, log: &mut Vec<String>) -> bool {
        for line in self.unit.all(key) {
            let out = self.run_line(line, config);
            log.push(format!("{key}={line}: {}", text(&out)));
            if !out.status.success() {
                return false;
            }
        }
        true
    }

    /// `systemctl start`: ExecStartPre, ExecStart; on failure ExecStopPost.
    fn start(&self, config: &Path) -> Result<Vec<String>, Vec<String>> {
        let mut log = Vec::new();
        if self.run_key("ExecStartPre", config, &mut log)
            && self.run_key("ExecStart", config, &mut log)
        {
            return Ok(log);
        }
        self.run_key("ExecStopPost", config, &mut log);
        Err(log)
    }

    /// `systemctl stop`: ExecStop, then ExecStopPost.
    fn stop(&self, config: &Path) -> Vec<String> {
        let mut log = Vec::new();
        let stopped = self.run_key("ExecStop", config, &mut log);
        let post = self.run_key("ExecStopPost", config, &mut log);
        assert!(stopped && post, "stop failed:\n{}", log.join("\n"));
        log
    }

    /// `systemctl reload`: ExecReload; a failure leaves the unit active.
    fn reload(&self, config: &Path) -> Result<Vec<String>, Vec<String>> {
        let mut log = Vec::new();
        if self.run_key("ExecReload", config, &mut log) {
            Ok(log)
        } else {
            Err(log)
        }
    }

    /// The nft calls so far, each with the ip_forward value seen when it ran.
    fn nft_calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("nft.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// A config with a transparent listener, which `render nftables` needs.
const GOOD_CONFIG: &str = r#"
[listen]
proxy = "0.0.0.0:3128"
transparent = "0.0.0.0:3129"

[clients]
allow = ["10.0.1.0/24"]

[policy]
profile = "none"

[[rule]]
name = "pypi"
hosts = ["pypi.org"]
ports = [443]
"#;

/// Fails to parse: `render` and `check` refuse it.
const BROKEN_CONFIG: &str = "[listen]\ntransparent = \"not an address\"\n";

/// setpriv's form of CapabilityBoundingSet=CAP_A CAP_B: "+a,+b".
fn setpriv_caps(unit: &Unit) -> String {
    unit.words("CapabilityBoundingSet")
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Writes the configs and an `nft` wrapper that logs each call with the
/// forwarding value at that moment (the order check).
fn scratch(dir: &Path) -> (PathBuf, PathBuf) {
    let good = dir.join("good.toml");
    let broken = dir.join("broken.toml");
    std::fs::write(&good, GOOD_CONFIG).unwrap();
    std::fs::write(&broken, BROKEN_CONFIG).unwrap();
    let wrapper = dir.join("nft-logged");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"ip_forward=$(cat /proc/sys/net/ipv4/ip_forward) nft $*\" >>{}\nexec nft \"$@\"\n",
            dir.join("nft.log").display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .args(["0755"])
        .arg(&wrapper)
        .status()
        .unwrap();
    (good, broken)
}

#[test]
fn ruleset_unit_turns_forwarding_on_only_with_the_table() {
    const TEST: &str = "ruleset_unit_turns_forwarding_on_only_with_the_table";
    if !require(is_root(), TEST, "needs root (network namespaces, nft)")
        || !require(tool_works("ip", &["-V"]), TEST, "ip (iproute2) not found")
        || !require(
            tool_works("nft", &["--version"]),
            TEST,
            "nft (nftables) not found",
        )
        || !require(
            tool_works("setpriv", &["--version"]),
            TEST,
            "setpriv (util-linux) not found",
        )
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (good, broken) = scratch(dir.path());
    let ns = Netns::create();
    let unit = Unit::load("portcullis-nftables.service");
    let caps = setpriv_caps(&unit);
    let u = RulesetUnit {
        ns: &ns,
        unit,
        dir: dir.path(),
        caps,
    };
    ns.assert_state(false, false, "in a new namespace");

    // Start: forwarding on, with the table.
    let log = u
        .start(&good)
        .unwrap_or_else(|l| panic!("start:\n{}", l.join("\n")));
    ns.assert_state(true, true, &format!("after start:\n{}", log.join("\n")));
    assert!(dir.path().join("run/ruleset.nft").exists());
    // The counters file says so at once (a gateway with `[admin]
    // require_ruleset` need not wait for the timer) ...
    let counters = dir.path().join("run/ruleset-counters.json");
    let json = std::fs::read_to_string(&counters).expect("counters written after the load");
    assert!(json.contains("\"portcullis\""), "{json}");

    // Stop: forwarding off first, then the table removed.
    u.stop(&good);
    ns.assert_state(false, false, "after stop");
    // ... and its removal says the ruleset is gone.
    assert!(!counters.exists(), "counters file left after stop");
    let calls = u.nft_calls();
    let delete = calls
        .iter()
        .rfind(|c| c.contains("nft delete table inet portcullis"))
        .unwrap_or_else(|| panic!("stop deleted no table: {calls:?}"));
    assert!(delete.starts_with("ip_forward=0 "), "{calls:?}");
    // The ruleset was loaded while forwarding was still off.
    let load = calls
        .iter()
        .find(|c| c.contains(" -f ") && !c.contains(" -c "))
        .unwrap_or_else(|| panic!("no nft -f: {calls:?}"));
    assert!(load.starts_with("ip_forward=0 "), "{calls:?}");

    // A broken config: start fails, nothing forwards, no table.
    let log = u.start(&broken).expect_err("start with a broken config");
    eprintln!("start with a broken config fails:\n{}", log.join("\n"));
    ns.assert_state(false, false, "after a failed start");

    // A failed reload keeps the loaded ruleset and forwarding.
    u.start(&good)
        .unwrap_or_else(|l| panic!("start:\n{}", l.join("\n")));
    u.reload(&broken).expect_err("reload with a broken config");
    ns.assert_state(true, true, "after a failed reload");
    u.reload(&good)
        .unwrap_or_else(|l| panic!("reload:\n{}", l.join("\n")));
    ns.assert_state(true, true, "after a reload");

    // What `nft flush ruleset` alone does (nftables.service without
    // PartOf=): the table is gone and forwarding is still on.
    let flush = |when: &str| {
        let out = ns.exec("nft").args(["flush", "ruleset"]).output().unwrap();
        assert!(
            out.status.success(),
            "nft flush ruleset {when}: {}",
            text(&out)
        );
    };
    flush("alone");
    ns.assert_state(
        true,
        false,
        "after a bare flush (the hazard PartOf= closes)",
    );
    u.start(&good)
        .unwrap_or_else(|l| panic!("start:\n{}", l.join("\n")));

    // `systemctl restart nftables` with PartOf=: this unit stops first
    // (After= reverses on stop), nftables flushes and reloads, this unit
    // starts after it.
    u.stop(&good);
    ns.assert_state(false, false, "after the PartOf stop");
    flush("as nftables.service restarts");
    ns.assert_state(false, false, "while nftables.service restarts");
    u.start(&good)
        .unwrap_or_else(|l| panic!("start:\n{}", l.join("\n")));
    ns.assert_state(true, true, "after nftables.service restart");

    // Stop is idempotent: a second stop with no table succeeds.
    u.stop(&good);
    u.stop(&good);
    ns.assert_state(false, false, "after two stops");
}

#[test]
fn main_unit_check_fails_fast_on_a_broken_config() {
    let dir = tempfile::tempdir().unwrap();
    let (good, broken) = scratch(dir.path());
    let main = Unit::load("portcullis.service");
    let pre = main.one("ExecStartPre");
    let run = |config: &Path| {
        let argv: Vec<String> = pre
            .split_whitespace()
            .map(|w| match w {
                INSTALLED_BIN => BIN.to_string(),
                INSTALLED_CONFIG => config.display().to_string(),
                other => other.to_string(),
            })
            .collect();
        Command::new(&argv[0]).args(&argv[1..]).output().unwrap()
    };
    let ok = run(&good);
    assert!(ok.status.success(), "{}", text(&ok));
    let bad = run(&broken);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert!(
        msg.contains("broken.toml:2:"),
        "check names the file and line: {msg}"
    );
    eprintln!("ExecStartPre on a broken config: {}", msg.trim());
}

#[test]
fn ruleset_counters_reach_the_gateways_metrics() {
    const TEST: &str = "ruleset_counters_reach_the_gateways_metrics";
    if !require(is_root(), TEST, "needs root (network namespaces, nft)")
        || !require(
            tool_works("nft", &["--version"]),
            TEST,
            "nft (nftables) not found",
        )
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (good, _) = scratch(dir.path());
    let ns = Netns::create();
    let script = deploy("apply-nftables.sh");
    let run = |args: &[&str]| {
        let out = ns
            .exec("env")
            .arg(format!("PORTCULLIS={BIN}"))
            .arg(format!(
                "RULESET={}",
                dir.path().join("run/ruleset.nft").display()
            ))
            .arg(format!(
                "COUNTERS={}",
                dir.path().join("run/ruleset-counters.json").display()
            ))
            .arg("bash")
            .arg(&script)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "apply-nftables.sh {args:?}: {}",
            text(&out)
        );
    };
    run(&["--config", &good.to_string_lossy()]);
    let counters = dir.path().join("run/ruleset-counters.json");
    run(&["--counters", &counters.to_string_lossy()]);
    let json = std::fs::read_to_string(&counters).unwrap();
    let parsed = portcullis::ruleset::parse(&json).unwrap();
    assert!(
        parsed
            .iter()
            .any(|c| c.name == "quic" && c.action == "drop"),
        "{parsed:?}"
    );
    assert!(
        parsed
            .iter()
            .any(|c| c.name == "dropped" && c.action == "drop"),
        "{parsed:?}"
    );

    // The gateway exports them on /metrics.
    let config = dir.path().join("metrics.toml");
    std::fs::write(
        &config,
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[admin]\nrequire_ruleset = true\n[clients]\nallow = [\"127.0.0.0/8\"]\n[policy]\nprofile = \"none\"\n",
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&config)
        .env("PORTCULLIS_RULESET_COUNTERS", &counters)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut admin = None;
    for line in std::io::BufRead::lines(stdout).map_while(Result::ok) {
        if let Some(a) = line.strip_prefix("listening admin ") {
            admin = Some(a.to_string());
        }
        if line == "ready" {
            break;
        }
    }
    let admin = admin.expect("admin address");
    let out = Command::new("curl")
        .args(["-sS", "--noproxy", "*", &format!("http://{admin}/metrics")])
        .output()
        .unwrap();
    // The file the unit wrote is what `[admin] require_ruleset` asks for.
    let ready = Command::new("curl")
        .args(["-sS", "--noproxy", "*", "-w", "%{http_code}"])
        .arg(format!("http://{admin}/readyz"))
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(
        metrics.contains("portcullis_ruleset_packets_total{action=\"drop\",counter=\"quic\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_ruleset_counters_timestamp_seconds "),
        "{metrics}"
    );
    let ready = String::from_utf8_lossy(&ready.stdout);
    assert_eq!(ready, "ready\n200", "/readyz with a fresh counters file");

    // A bare flush removes the filter: the next counters run turns
    // forwarding off instead of leaving it on unfiltered.
    ns.exec("sh")
        .args(["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        .status()
        .unwrap();
    ns.exec("nft").args(["flush", "ruleset"]).status().unwrap();
    let out = ns
        .exec("env")
        .arg(format!("PORTCULLIS={BIN}"))
        .arg("bash")
        .arg(&script)
        .args(["--counters", &counters.to_string_lossy()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(ns.forwarding().0, 0, "forwarding left on without a table");
    assert!(
        !counters.exists(),
        "the counters file of a gone table is removed (/readyz turns 503)"
    );
}
