//! Tests for `render::nftables`: the ruleset for a profile-free config,
//! with and without its service tags file, compared byte for byte with
//! snapshots in `tests/data/render/` (`UPDATE_SNAPSHOTS=1` rewrites them).

use std::path::{Path, PathBuf};

use super::*;
use crate::reload::{Loaded, load};

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
