//! The Debian package for real, as root: `scripts/package` builds it, lintian
//! finds no error, `dpkg -i` installs it on this machine with a config that
//! passes `check` and units systemd accepts, and `dpkg --purge` removes it.

mod support;

use std::path::Path;
use std::process::Command;

use support::{have, is_root, output_text, require};

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(out.status.success(), "{cmd:?}: {}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_package_builds_passes_lintian_installs_and_purges() {
    let tools = ["dpkg-deb", "dpkg-shlibdeps", "objcopy", "lintian"]
        .iter()
        .all(|t| have(t, &["--version"]));
    if !require(
        is_root() && tools,
        "needs root, dpkg-dev, binutils and lintian",
    ) {
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let out = tempfile::tempdir().unwrap();
    let deb = ok(Command::new(format!("{root}/scripts/package"))
        .args(["--binary", env!("CARGO_BIN_EXE_portcullis"), "--out"])
        .arg(out.path()));
    let deb = deb.trim().to_string();
    assert!(deb.ends_with(".deb"), "{deb}");
    // Errors fail; warnings (no man page, systemctl in prerm) are printed.
    ok(Command::new("lintian").args(["--fail-on", "error", &deb]));
    let contents = ok(Command::new("dpkg-deb").args(["-c", &deb]));
    for path in [
        "./usr/bin/portcullis",
        "./lib/systemd/system/portcullis.service",
        "./lib/systemd/system/portcullis-nftables.service",
        "./usr/lib/portcullis/apply-nftables.sh",
        "./usr/lib/portcullis/refresh-service-tags.sh",
        "./lib/systemd/system/portcullis-service-tags.service",
        "./lib/systemd/system/portcullis-service-tags.timer",
        "./etc/default/portcullis",
        "./usr/lib/sysusers.d/portcullis.conf",
        "./etc/portcullis/portcullis.toml",
    ] {
        assert!(
            contents.contains(path),
            "{path} not in the package:\n{contents}"
        );
    }
    let conffiles = ok(Command::new("dpkg-deb").args(["-I", &deb, "conffiles"]));
    assert_eq!(
        conffiles.trim(),
        "/etc/default/portcullis\n/etc/portcullis/portcullis.toml"
    );

    let _ = Command::new("dpkg")
        .args(["--purge", "portcullis"])
        .output();
    ok(Command::new("dpkg").args(["-i", &deb]));
    assert!(Path::new("/usr/bin/portcullis").exists());
    let check = ["check", "-c", "/etc/portcullis/portcullis.toml"];
    ok(Command::new("/usr/bin/portcullis").args(check));
    ok(Command::new("getent").args(["passwd", "portcullis"]));
    let mode = ["-c", "%a %U:%G", "/etc/portcullis/portcullis.toml"];
    assert_eq!(
        ok(Command::new("stat").args(mode)).trim(),
        "640 root:portcullis"
    );
    let unit = std::fs::read_to_string("/lib/systemd/system/portcullis.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/portcullis run"), "{unit}");
    assert!(!unit.contains("/usr/local/"), "{unit}");
    let refresh = std::fs::read_to_string("/usr/lib/portcullis/refresh-service-tags.sh").unwrap();
    assert!(
        refresh.contains("PORTCULLIS:-/usr/bin/portcullis}") && !refresh.contains("/usr/local/"),
        "{refresh}"
    );
    let tags_unit =
        std::fs::read_to_string("/lib/systemd/system/portcullis-service-tags.service").unwrap();
    assert!(
        tags_unit.contains("ExecStart=/usr/lib/portcullis/refresh-service-tags.sh"),
        "{tags_unit}"
    );
    if have("systemd-analyze", &["--version"]) {
        for unit in [
            "portcullis.service",
            "portcullis-nftables.service",
            "portcullis-ruleset-counters.service",
            "portcullis-ruleset-counters.timer",
            "portcullis-service-tags.service",
            "portcullis-service-tags.timer",
        ] {
            let out = Command::new("systemd-analyze")
                .arg("verify")
                .arg(format!("/lib/systemd/system/{unit}"))
                .output()
                .unwrap();
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "systemd-analyze verify {unit}: {}",
                output_text(&out)
            );
        }
    }
    ok(Command::new("dpkg").args(["--purge", "portcullis"]));
    assert!(!Path::new("/usr/bin/portcullis").exists());
    assert!(!Path::new("/etc/portcullis/portcullis.toml").exists());
    assert!(!Path::new("/etc/default/portcullis").exists());
}
