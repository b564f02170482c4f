//! Service tags kept fresh: a reload with a broken tags file keeps the old
//! data (and says why), `/metrics` says which file is in force, how old it
//! is and how its last refresh went, and `deploy/refresh-service-tags.sh`
//! replaces the file and reloads only when the new one passes `check`.
//!
//! The script runs for real (bash) against a fake `az` and a fake
//! `systemctl` first on PATH, which print what a test tells them and log
//! their arguments: nothing reaches Azure or the machine's systemd. The
//! tags data is the real subset in tests/data, as the weekly download and
//! rewritten the way `az network list-service-tags` prints it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use portcullis::gateway::Gateway;
use portcullis::load::LoadInput;
use portcullis::policy::{Dest, Policy, Target, Verdict};
use portcullis::reload::Reloader;
use portcullis::servicetags::ServiceTags;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const SUBSET: &str = include_str!("data/servicetags-public-subset.json");

/// The subset as `az network list-service-tags` prints it: change numbers
/// as strings, the extra fields the CLI adds, and `change` as the file's
/// change number.
fn az_shaped(change: u64) -> String {
    let mut doc: serde_json::Value = serde_json::from_str(SUBSET).unwrap();
    doc["changeNumber"] = serde_json::json!(change.to_string());
    doc["id"] = serde_json::json!(
        "/subscriptions/00000000-0000-0000-0000-000000000000/providers/Microsoft.Network/serviceTags/Public"
    );
    doc["name"] = serde_json::json!("Public");
    doc["type"] = serde_json::json!("Microsoft.Network/serviceTags");
    doc["nextLink"] = serde_json::Value::Null;
    for v in doc["values"].as_array_mut().unwrap() {
        v["serviceTagChangeNumber"] = serde_json::json!("1");
        let p = &mut v["properties"];
        p["changeNumber"] = serde_json::json!("7");
        p["state"] = serde_json::json!("GA");
        p["networkFeatures"] = serde_json::json!(["API", "NSG"]);
    }
    serde_json::to_string_pretty(&doc).unwrap()
}

/// The subset with `edit` applied to its parsed JSON.
fn edited(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut doc: serde_json::Value = serde_json::from_str(SUBSET).unwrap();
    edit(&mut doc);
    serde_json::to_string_pretty(&doc).unwrap()
}

/// An address of the subset's AzureMachineLearning tag.
fn aml_address() -> String {
    let tags = ServiceTags::parse("subset.json", SUBSET).unwrap();
    let net = tags
        .get("AzureMachineLearning")
        .unwrap()
        .iter()
        .find(|n| matches!(n, ipnet::IpNet::V4(_)))
        .unwrap();
    net.hosts().next().unwrap_or(net.addr()).to_string()
}

/// A config whose one rule needs the AzureMachineLearning tag, with an
/// `[[expect]]` on one of its addresses: a tags file without that tag
/// fails `check`.
fn config(dir: &Path, tags: &Path) -> PathBuf {
    let path = dir.join("portcullis.toml");
    let text = format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\n\n[clients]\nallow = [\"127.0.0.0/8\"]\n\n\
         [policy]\nprofile = \"none\"\nservice_tags = {tags:?}\n\n\
         [[rule]]\nname = \"aml\"\nservice_tags = [\"AzureMachineLearning\"]\nports = [443]\n\n\
         [[expect]]\ndest = \"{ip}:443\"\nverdict = \"allow\"\n",
        tags = tags.display().to_string(),
        ip = aml_address(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn set_mtime(path: &Path, days_ago: u64) -> SystemTime {
    let t = SystemTime::now() - Duration::from_secs(days_ago * 86_400);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
    t
}

fn allows_aml(p: &Policy) -> bool {
    let ip = aml_address();
    let dest = Dest {
        target: Target::parse(&ip),
        port: 443,
        proto: portcullis::config::Protocol::Tcp,
    };
    p.decide(&dest).verdict == Verdict::Allow
}

/// The value of the one series of `name` (no labels) in `text`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn a_broken_tags_file_on_reload_keeps_the_old_data_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let tags = dir.path().join("service-tags.json");
    std::fs::write(&tags, SUBSET).unwrap();
    let written = set_mtime(&tags, 3);
    let input = LoadInput {
        path: Some(config(dir.path(), &tags)),
        ..LoadInput::default()
    };
    let loaded = input.load(1).unwrap();
    let reloader = Reloader {
        input,
        listen: (None, None, None),
    };
    let gw = Arc::new(Gateway::new(
        loaded.policy,
        loaded.config.limits,
        Vec::new(),
    ));
    assert!(allows_aml(&gw.policy.load()));
    let text = gw.metrics.render();
    assert_eq!(
        sample(&text, "portcullis_service_tags_change_number"),
        Some(376.0)
    );
    let unix = written.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    let exported = sample(&text, "portcullis_service_tags_timestamp_seconds").unwrap();
    assert!((exported - unix.as_secs_f64()).abs() < 1.0, "{exported}");
    let info = format!(
        "portcullis_service_tags_info{{cloud=\"Public\",path=\"{}\"}} 1",
        tags.display()
    );
    assert!(text.contains(&info), "{text}");
    // No refresh timer yet: no refresh series (an alert on them stays quiet).
    assert!(
        !text.contains("portcullis_service_tags_last_refresh"),
        "{text}"
    );

    let duplicate = edited(|d| {
        let values = d["values"].as_array_mut().unwrap();
        let mut copy = values[0].clone();
        let name = copy["name"].as_str().unwrap().to_ascii_lowercase();
        copy["name"] = serde_json::json!(name);
        values.push(copy);
    });
    let bad_prefix = edited(|d| {
        d["values"][0]["properties"]["addressPrefixes"][0] = serde_json::json!("20.0.0.0/33");
    });
    let cases = [
        (SUBSET[..SUBSET.len() / 3].to_string(), "EOF while parsing"),
        (
            edited(|d| d["values"] = serde_json::json!({})),
            "expected a sequence",
        ),
        (
            edited(|d| d["changeNumber"] = serde_json::json!(["376"])),
            "changeNumber [\"376\"] is not a number",
        ),
        (duplicate, "appears twice"),
        (bad_prefix, "'20.0.0.0/33' is not a CIDR"),
        (
            "{\"values\": []}".to_string(),
            "no service tags in the file",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        std::fs::write(&tags, text).unwrap();
        let err = reloader.reload(&gw).await.unwrap_err().to_string();
        assert!(
            err.contains(&tags.display().to_string()) && err.contains(want),
            "case {i}: {err}"
        );
        let p = gw.policy.load();
        assert_eq!(p.generation(), 1, "case {i}: the old policy stays");
        assert_eq!(p.service_tags_change(), Some(376));
        assert!(allows_aml(&p), "case {i}: the old tags still allow");
    }
    let text = gw.metrics.render();
    assert_eq!(
        sample(&text, "portcullis_config_last_reload_successful"),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "portcullis_service_tags_change_number"),
        Some(376.0)
    );

    // The refresh timer's status file is exported at the next scrape.
    let status = dir.path().join("service-tags.json.status");
    std::fs::write(
        &status,
        "result=failure\nfinished=1700000000\nmessage=az failed\n",
    )
    .unwrap();
    let text = gw.metrics.render();
    assert_eq!(
        sample(&text, "portcullis_service_tags_last_refresh_successful"),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "portcullis_service_tags_last_refresh_timestamp_seconds"
        ),
        Some(1.7e9)
    );

    // A good file in the az shape, with a newer change number, is taken.
    std::fs::write(&tags, az_shaped(377)).unwrap();
    reloader.reload(&gw).await.unwrap();
    let p = gw.policy.load();
    assert_eq!((p.generation(), p.service_tags_change()), (2, Some(377)));
    assert!(allows_aml(&p));
    let text = gw.metrics.render();
    assert_eq!(
        sample(&text, "portcullis_service_tags_change_number"),
        Some(377.0)
    );
    let fresh = sample(&text, "portcullis_service_tags_timestamp_seconds").unwrap();
    assert!(fresh > exported + 86_400.0, "{fresh} vs {exported}");
}

// ---------------------------------------------------------------------------
// deploy/refresh-service-tags.sh against a fake az and systemctl

/// A scratch host: `bin/` (fake az, fake systemctl), `state/` (the tags
/// file, old data with change number 300, 20 days old) and a config.
struct Host {
    dir: tempfile::TempDir,
    tags: PathBuf,
    config: PathBuf,
}

/// `az`: logs its arguments; `login` exits $FAKE_AZ_LOGIN (0); `network
/// list-service-tags` prints $FAKE_AZ_OUT, or fails with a message when
/// $FAKE_AZ_FAIL is set.
const FAKE_AZ: &str = r#"#!/bin/sh
echo "az $*" >>"$FAKE_LOG"
case "$1" in
    login) exit "${FAKE_AZ_LOGIN:-0}" ;;
    network)
        if [ -n "${FAKE_AZ_FAIL:-}" ]; then
            echo "ERROR: (AuthorizationFailed) $FAKE_AZ_FAIL" >&2
            exit 1
        fi
        cat "$FAKE_AZ_OUT" ;;
    *) exit 2 ;;
esac
"#;

/// `systemctl`: logs its arguments, exits $FAKE_SYSTEMCTL (0).
const FAKE_SYSTEMCTL: &str = r#"#!/bin/sh
echo "systemctl $*" >>"$FAKE_LOG"
if [ "${FAKE_SYSTEMCTL:-0}" != 0 ]; then
    echo "Job for portcullis.service failed" >&2
fi
exit "${FAKE_SYSTEMCTL:-0}"
"#;

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        for (name, body) in [("az", FAKE_AZ), ("systemctl", FAKE_SYSTEMCTL)] {
            let path = bin.join(name);
            std::fs::write(&path, body).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let tags = state.join("service-tags.json");
        std::fs::write(
            &tags,
            edited(|d| d["changeNumber"] = serde_json::json!(300)),
        )
        .unwrap();
        set_mtime(&tags, 20);
        let config = config(dir.path(), &tags);
        Host { dir, tags, config }
    }

    /// Runs the script with `az` printing `az_out` and the extra `env`.
    fn refresh(&self, az_out: &str, env: &[(&str, &str)]) -> Output {
        let out_file = self.dir.path().join("az-out.json");
        std::fs::write(&out_file, az_out).unwrap();
        let path = format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("timeout");
        cmd.args(["120", "bash"])
            .arg(Path::new(ROOT).join("deploy/refresh-service-tags.sh"))
            .env("PATH", path)
            .env("FAKE_LOG", self.dir.path().join("calls.log"))
            .env("FAKE_AZ_OUT", &out_file)
            .env("PORTCULLIS", BIN)
            .env("PORTCULLIS_CONFIG", &self.config)
            .env("PORTCULLIS_SERVICE_TAGS", &self.tags)
            .env("PORTCULLIS_REGION", "westeurope")
            .env_remove("PORTCULLIS_RELOAD")
            .env_remove("PORTCULLIS_AZ_LOGIN_ARGS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let _ = std::fs::remove_file(self.dir.path().join("calls.log"));
        cmd.output().unwrap()
    }

    /// The fake commands' calls, one line each.
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    fn status(&self) -> String {
        std::fs::read_to_string(self.tags.with_extension("json.status")).unwrap_or_default()
    }

    /// Names in the state folder: no temporary file is left behind.
    fn state_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.tags.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The refresh failed: exit 1, the old file untouched, no reload, the
/// failure recorded with `why`.
fn assert_refused(host: &Host, out: &Output, old: &[u8], old_mtime: SystemTime, why: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", text(out));
    assert_eq!(std::fs::read(&host.tags).unwrap(), old, "old file replaced");
    let mtime = std::fs::metadata(&host.tags).unwrap().modified().unwrap();
    assert_eq!(mtime, old_mtime, "old file touched");
    let calls = host.calls();
    assert!(
        !calls.iter().any(|c| c.starts_with("systemctl")),
        "reloaded after a failure: {calls:?}"
    );
    let status = host.status();
    assert!(
        status.contains("result=failure\n") && status.contains(why),
        "status {status:?}, want {why:?}\n{}",
        text(out)
    );
    assert_eq!(
        host.state_files(),
        ["service-tags.json", "service-tags.json.status"]
    );
}

#[test]
fn refresh_replaces_the_file_and_reloads_only_when_the_new_one_checks() {
    let host = Host::new();
    let old = std::fs::read(&host.tags).unwrap();
    let old_mtime = std::fs::metadata(&host.tags).unwrap().modified().unwrap();

    // az fails (no role on the subscription, say).
    let out = host.refresh("", &[("FAKE_AZ_FAIL", "no access")]);
    assert_refused(
        &host,
        &out,
        &old,
        old_mtime,
        "az network list-service-tags --location westeurope failed: ERROR: (AuthorizationFailed) no access",
    );
    let out = host.refresh(&az_shaped(376), &[("FAKE_AZ_LOGIN", "1")]);
    assert_refused(&host, &out, &old, old_mtime, "az login --identity failed");

    // az answers, but with a file the gateway cannot use.
    let truncated = az_shaped(376);
    let truncated = &truncated[..truncated.len() / 2];
    let out = host.refresh(truncated, &[]);
    assert_refused(
        &host,
        &out,
        &old,
        old_mtime,
        "the new file fails 'portcullis check': ",
    );
    assert!(
        host.status().contains("EOF while parsing"),
        "{}",
        host.status()
    );
    // Valid JSON, but without the tag the config needs: check refuses it.
    let without_aml = edited(|d| {
        d["values"]
            .as_array_mut()
            .unwrap()
            .retain(|v| v["name"] != "AzureMachineLearning");
    });
    let out = host.refresh(&without_aml, &[]);
    assert_refused(&host, &out, &old, old_mtime, "fails 'portcullis check'");
    // No region: nothing is asked of az.
    let out = host.refresh(&az_shaped(376), &[("PORTCULLIS_REGION", "")]);
    assert_refused(&host, &out, &old, old_mtime, "PORTCULLIS_REGION is not set");
    assert!(host.calls().is_empty(), "{:?}", host.calls());

    // Success: the az-shaped file replaces the old one, readable by the
    // gateway's user, then the gateway is reloaded.
    let new = az_shaped(376);
    let out = host.refresh(&new, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&host.tags).unwrap(), new);
    let meta = std::fs::metadata(&host.tags).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    assert!(meta.modified().unwrap() > old_mtime);
    assert_eq!(
        host.calls(),
        [
            "az login --identity --output none",
            "az network list-service-tags --location westeurope --output json",
            "systemctl try-reload-or-restart portcullis.service",
        ]
    );
    let status = host.status();
    assert!(
        status.contains("result=success\n")
            && status.contains("change number 376, cloud Public, 85 tags")
            && !status.contains("note:"),
        "{status}"
    );
    assert_eq!(
        host.state_files(),
        ["service-tags.json", "service-tags.json.status"]
    );

    // `check` on the gateway's config now reports the refresh and the file.
    let check = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&host.config)
        .output()
        .unwrap();
    let report = text(&check);
    assert!(check.status.success(), "{report}");
    assert!(
        report.contains("(change number 376, cloud Public, 85 tags, 0 day(s) old)")
            && report.contains("service tags refresh: the last run succeeded 0 hour(s) ago"),
        "{report}"
    );

    // The reload fails: the new file is in place, the failure recorded.
    let out = host.refresh(&az_shaped(377), &[("FAKE_SYSTEMCTL", "1")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let status = host.status();
    assert!(
        status.contains("result=failure\n")
            && status.contains("but the gateway reload failed: Job for portcullis.service failed"),
        "{status}"
    );
    let check = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&host.config)
        .output()
        .unwrap();
    assert!(
        text(&check).contains("warning: service tags refresh: the last run FAILED"),
        "{}",
        text(&check)
    );
}

#[test]
fn a_user_assigned_identity_and_another_reload_command_are_settings() {
    let host = Host::new();
    let hook = host.dir.path().join("bin/reload-hook");
    std::fs::write(&hook, "#!/bin/sh\necho \"hook $*\" >>\"$FAKE_LOG\"\n").unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A config that does not name the refreshed file: the run says so.
    let named = std::fs::read_to_string(&host.config).unwrap();
    let unnamed: String = named
        .lines()
        .filter(|l| !l.starts_with("service_tags = \""))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(named, unnamed);
    std::fs::write(&host.config, unnamed).unwrap();
    let reload = format!("{} now", hook.display());
    let out = host.refresh(
        &az_shaped(376),
        &[
            ("PORTCULLIS_AZ_LOGIN_ARGS", "--client-id 1111"),
            ("PORTCULLIS_RELOAD", &reload),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        host.calls(),
        [
            "az login --identity --client-id 1111 --output none",
            "az network list-service-tags --location westeurope --output json",
            "hook now",
        ]
    );
    let status = host.status();
    assert!(
        status.contains("result=success\n")
            && status.contains("does not name")
            && status.contains("so the gateway does not use it"),
        "{status}"
    );
}

#[test]
fn the_startup_log_names_the_tags_file_and_a_failed_refresh() {
    let dir = tempfile::tempdir().unwrap();
    let tags = dir.path().join("service-tags.json");
    std::fs::write(&tags, az_shaped(376)).unwrap();
    set_mtime(&tags, 40);
    std::fs::write(
        tags.with_extension("json.status"),
        "result=failure\nfinished=1700000000\nmessage=az login --identity failed\n",
    )
    .unwrap();
    let config = config(dir.path(), &tags);
    let mut child = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // stdout ends with "ready", or closes if the gateway fails to start.
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let ready = std::io::BufRead::lines(stdout)
        .map_while(Result::ok)
        .any(|l| l == "ready");
    // SIGTERM: a graceful stop flushes the log writer (SIGKILL would not).
    Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(ready, "{log}");
    let loaded = log
        .lines()
        .find(|l| l.contains("\"service tags loaded\""))
        .unwrap_or_else(|| panic!("{log}"));
    for field in [
        format!("\"path\":\"{}\"", tags.display()),
        "\"change_number\":376".to_string(),
        "\"cloud\":\"Public\"".to_string(),
        "\"tags\":85".to_string(),
        "\"age_days\":40".to_string(),
    ] {
        assert!(loaded.contains(&field), "{field} not in {loaded}");
    }
    assert!(
        log.contains("the service tags file is 40 days old"),
        "{log}"
    );
    assert!(
        log.contains("the last service tags refresh failed")
            && log.contains("\"reason\":\"az login --identity failed\""),
        "{log}"
    );
}
