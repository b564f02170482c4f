//! Tests for `render::nftables`: the ruleset for a profile-free config,
//! with and without its service tags file, compared byte for byte with
//! snapshots in `tests/data/render/` (`UPDATE_SNAPSHOTS=1` rewrites them).

use std::path::{Path, PathBuf};

use super::*;
use crate::load::{Loaded, load};

/// `path` relative to the crate root.
fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn load_config(config: &str, service_tags: Option<&str>) -> Loaded {
    let tags = service_tags.map(repo);
    match load(Some(&repo(config)), &[], tags.as_deref(), 1) {
        Ok(loaded) => loaded,
        Err(e) => panic!("{config} does not load: {e}"),
    }
}

/// The ruleset with the two run-dependent parts of its header (version and
/// config path) replaced by placeholders.
fn render_normalised(loaded: &Loaded) -> String {
    let text = nftables(loaded).expect("the snapshot config has a transparent listener");
    let header = format!(
        "# portcullis {} gateway ruleset, rendered from {} by",
        env!("CARGO_PKG_VERSION"),
        loaded.source.name
    );
    assert!(text.contains(&header), "header line changed:\n{text}");
    text.replacen(
        &header,
        "# portcullis <version> gateway ruleset, rendered from <config> by",
        1,
    )
}

fn assert_snapshot(name: &str, actual: &str) {
    let path = repo(name);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, actual).expect("write snapshot");
        return;
    }
    let expected = std::fs::read_to_string(&path).expect("read snapshot");
    if expected == actual {
        return;
    }
    let line = expected
        .lines()
        .zip(actual.lines())
        .position(|(e, a)| e != a)
        .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
    panic!(
        "{} differs from the rendered ruleset at line {} (UPDATE_SNAPSHOTS=1 rewrites it)\n\
         expected: {:?}\n  actual: {:?}\n--- actual ---\n{actual}",
        path.display(),
        line + 1,
        expected.lines().nth(line),
        actual.lines().nth(line),
    );
}

#[test]
fn nftables_snapshot_with_service_tags() {
    let loaded = load_config(
        "tests/data/render/nftables.toml",
        Some("tests/data/servicetags-public-subset.json"),
    );
    assert_snapshot(
        "tests/data/render/nftables.nft",
        &render_normalised(&loaded),
    );
}

#[test]
fn nftables_snapshot_without_service_tags() {
    let loaded = load_config("tests/data/render/nftables.toml", None);
    let text = render_normalised(&loaded);
    assert!(text.contains("# WARNING: no service tags file"));
    assert_snapshot("tests/data/render/nftables-no-tags.nft", &text);
}

#[test]
fn nftables_needs_a_transparent_listener() {
    let loaded = load_config("config/minimal.toml", None);
    let err = nftables(&loaded).expect_err("minimal.toml has no transparent listener");
    assert!(err.contains("[listen] transparent is not set"), "{err}");
}

#[test]
fn one_line_cuts_before_a_character_across_byte_97() {
    // 96 ASCII bytes, then characters of 2, 3 and 4 bytes starting at byte
    // 96, so byte 97 is inside each one: the cut keeps the 96 bytes.
    let ascii = "a".repeat(96);
    for wide in ["é", "€", "𝄞"] {
        let text = format!("{ascii}{wide} and then some more words");
        assert_eq!(one_line(&text), format!("{ascii}..."), "{wide}");
    }
    // Byte 97 is a boundary: the cut is unchanged from the ASCII case.
    let text = format!("{}é and more words", "a".repeat(97));
    assert_eq!(one_line(&text), format!("{}...", "a".repeat(97)));
}

#[test]
fn nftables_renders_a_multibyte_name_and_description() {
    let loaded = load_config("tests/data/render/multibyte.toml", None);
    let text = nftables(&loaded).expect("has a transparent listener");
    let name = format!("x{}", "ü".repeat(48));
    // The set comment: the rule name, then the description cut before `é`.
    assert!(
        text.contains(&format!("# rule {name}: {}...\n", "a".repeat(96))),
        "{text}"
    );
    // The rule comment `rule x ü…` is cut before the `ü` across byte 97.
    assert!(
        text.contains(&format!("comment \"rule x{}...\"\n", "ü".repeat(45))),
        "{text}"
    );
}

use crate::testing::Rng;

/// Random text for `one_line`.
trait Text {
    /// A character of 1, 2, 3 or 4 UTF-8 bytes, or one `one_line` drops.
    fn char(&mut self) -> char;
    /// Up to `max_chars` such characters.
    fn string(&mut self, max_chars: usize) -> String;
}

impl Text for Rng {
    fn char(&mut self) -> char {
        let range = match self.below(6) {
            0 => return ['"', '\n', ' ', '\t'][self.below(4)],
            1 => 0x20..0x7f,
            2 => 0x80..0x800,
            3 => 0x800..0x1_0000,
            _ => 0x1_0000..0x11_0000,
        };
        loop {
            let code = range.start + self.below((range.end - range.start) as usize) as u32;
            // Surrogates are not chars: draw again.
            if let Some(c) = char::from_u32(code) {
                return c;
            }
        }
    }

    fn string(&mut self, max_chars: usize) -> String {
        let len = self.below(max_chars + 1);
        (0..len).map(|_| self.char()).collect()
    }
}

/// What `one_line` promises, for any text: no `"` or newline, at most 100
/// bytes, unchanged when short, otherwise a prefix of at least 94 bytes
/// (97 less a partial 4-byte character) and `...`.
fn check_one_line(text: &str) -> Result<(), String> {
    let kept: String = text.chars().filter(|c| *c != '"' && *c != '\n').collect();
    let out = std::panic::catch_unwind(|| one_line(text)).map_err(|_| "panicked".to_string())?;
    if out.contains(['"', '\n']) || out.len() > 100 {
        return Err(format!("bad comment {out:?}"));
    }
    if kept.len() <= 100 {
        return if out == kept {
            Ok(())
        } else {
            Err(format!("short text changed to {out:?}"))
        };
    }
    match out.strip_suffix("...") {
        Some(head) if kept.starts_with(head) && head.len() >= 94 => Ok(()),
        _ => Err(format!("bad cut {out:?}")),
    }
}

#[test]
fn one_line_never_panics_on_random_unicode() {
    // RENDER_SEED=<n> replays one failing case.
    let (first, cases) = match std::env::var("RENDER_SEED") {
        Ok(seed) => (seed.parse().expect("RENDER_SEED is a u64"), 1),
        Err(_) => (0x5eed_0000_u64, 3000),
    };
    for seed in first..first + cases {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let description = rng.string(160);
        let name = rng.string(60);
        // The three shapes `nftables` passes: a description, and a name in
        // the UDP and the inbound rule comments.
        for text in [
            description,
            format!("rule {name}"),
            format!("inbound rule {name}"),
        ] {
            if let Err(why) = check_one_line(&text) {
                panic!("one_line({text:?}): {why} (reproduce with RENDER_SEED={seed})");
            }
        }
    }
}

/// The profile's `public-ip` scenario: inbound 44224 from the
/// AzureMachineLearning ranges of the region and its pair, accepted to the
/// VNet only, never to every address.
#[test]
fn public_ip_inbound_is_accepted_to_the_vnet_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("public-ip.toml");
    let text = format!(
        "[vars]\nregion = \"eastus\"\npaired_region = \"centralus\"\nstorage = \"s\"\nacr = \"r\"\nvnet = \"10.7.0.0/16\"\n\
         [listen]\ntransparent = \"0.0.0.0:3129\"\n[policy]\nscenarios = [\"basic\", \"public-ip\"]\nservice_tags = {:?}\n",
        repo("tests/data/servicetags-public-subset.json")
            .display()
            .to_string()
    );
    std::fs::write(&path, text).expect("write");
    let loaded = load(Some(&path), &[], None, 1).unwrap_or_else(|e| panic!("{e}"));
    let ruleset = nftables(&loaded).expect("renders");
    let lines: Vec<&str> = ruleset
        .lines()
        .filter(|l| l.contains("dport 44224"))
        .collect();
    assert!(!lines.is_empty(), "{ruleset}");
    for l in &lines {
        assert!(
            l.contains("ip daddr 10.7.0.0/16 tcp dport 44224 counter accept"),
            "{l}"
        );
    }
    // Protocol-ANY host rules on 443 (`*.<region>.batch.azure.com`) get no
    // UDP accept: UDP 443 is dropped, as `explain` says (needs_dns).
    assert!(ruleset.contains("udp dport 443 counter drop comment \"quic\""));
    assert!(
        !ruleset
            .lines()
            .any(|l| l.contains("udp dport 443") && l.contains("accept"))
    );
    // Both regions' ranges are in the set the rule reads.
    let tags =
        crate::servicetags::ServiceTags::load(&repo("tests/data/servicetags-public-subset.json"))
            .expect("tags");
    for tag in [
        "AzureMachineLearning.EastUS",
        "AzureMachineLearning.CentralUS",
    ] {
        let net = tags.get(tag).expect("tag in test data")[0];
        assert!(ruleset.contains(&net.trunc().to_string()), "{tag} {net}");
    }
    // Without the scenario: nothing inbound.
    let basic = std::fs::read_to_string(&path)
        .expect("read")
        .replace(", \"public-ip\"", "");
    std::fs::write(&path, basic).expect("write");
    let loaded = load(Some(&path), &[], None, 1).unwrap_or_else(|e| panic!("{e}"));
    assert!(!nftables(&loaded).expect("renders").contains("44224"));
}

#[test]
fn nftables_snapshot_with_a_dns_listener() {
    let loaded = load_config("tests/data/render/nftables-dns.toml", None);
    let text = render_normalised(&loaded);
    // Port 53 goes to the listener before anything else in prerouting
    // (the gateway's own address included); the learned sets come after
    // the address rules in forward, so a deny rule's drop wins.
    let pre = text.find("chain prerouting").expect("prerouting");
    let redirect = text
        .find("udp dport 53 counter redirect to :5353")
        .expect("redirect");
    let local = text.find("fib daddr type local return").expect("local");
    assert!(pre < redirect && redirect < local, "{text}");
    let deny = text
        .find("comment \"rule no-udp-there\"")
        .expect("deny rule");
    let learned = text
        .find("ip daddr . udp dport @dns_udp_v4")
        .expect("learned");
    assert!(deny < learned, "{text}");
    assert_snapshot("tests/data/render/nftables-dns.nft", &text);
    // A listener on loopback cannot take redirected DNS: a clear error.
    let looped = std::env::temp_dir().join(format!("pcl-render-dns-{}.toml", std::process::id()));
    let text = std::fs::read_to_string(repo("tests/data/render/nftables-dns.toml")).expect("read");
    std::fs::write(&looped, text.replace("0.0.0.0:5353", "127.0.0.1:5353")).expect("write");
    let err = nftables(&load(Some(&looped), &[], None, 1).expect("loads")).expect_err("loopback");
    let _ = std::fs::remove_file(&looped);
    assert!(
        err.contains("[listen] dns = \"127.0.0.1:5353\" is a loopback address"),
        "{err}"
    );
    // Without the listener: neither the redirect nor the sets.
    let plain = render_normalised(&load_config("tests/data/render/nftables.toml", None));
    assert!(!plain.contains("dport 53 counter redirect") && !plain.contains("dns_udp"));
}
