//! The tree matches `docs/ARCHITECTURE.md`: every source file is in its code
//! map, and each module imports only what the import table allows.

use std::collections::BTreeSet;
use std::path::Path;

fn doc() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ARCHITECTURE.md"))
        .expect("docs/ARCHITECTURE.md")
}

/// Every `.rs` file under `src/`, relative to the crate, tests left out.
fn sources() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).expect("read src") {
            let p = e.expect("entry").path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if p.is_dir() {
                if name != "tests" {
                    walk(&p, out);
                }
            } else if name.ends_with(".rs") && !name.ends_with("tests.rs") {
                let root = Path::new(env!("CARGO_MANIFEST_DIR"));
                out.push(
                    p.strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .replace('\\', "/"),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
    out.sort();
    out
}

#[test]
fn every_source_file_is_in_the_code_map() {
    let doc = doc();
    let missing: Vec<String> = sources()
        .into_iter()
        .filter(|f| !doc.contains(&format!("`{f}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "not in docs/ARCHITECTURE.md: {missing:?}"
    );
}

/// `crate::X` modules a file imports.
fn imports(file: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
    let mut out = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.insert(name);
    }
    out
}

#[test]
fn modules_import_only_what_the_table_allows() {
    let doc = doc();
    let table = &doc[doc.find("| module | may import").expect("import table")..];
    let mut rules: Vec<(Vec<String>, Option<BTreeSet<String>>)> = Vec::new();
    for line in table
        .lines()
        .skip(2)
        .take_while(|l| l.trim_start().starts_with('|'))
    {
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        let names = |cell: &str| -> Vec<String> {
            cell.split(',')
                .map(|n| n.trim().trim_matches('`').to_string())
                .collect()
        };
        let allowed = match cells[1] {
            "nothing" => Some(BTreeSet::new()),
            "anything" => None,
            c if c.starts_with("everything above except") => {
                let except = names(c.trim_start_matches("everything above except"));
                let above: BTreeSet<String> = rules.iter().flat_map(|(m, _)| m.clone()).collect();
                Some(above.into_iter().filter(|m| !except.contains(m)).collect())
            }
            c => Some(names(c).into_iter().collect()),
        };
        rules.push((names(cells[0]), allowed));
    }
    assert!(rules.len() >= 10, "import table not found: {rules:?}");
    let mut broken = Vec::new();
    for file in sources() {
        let module = file
            .trim_start_matches("src/")
            .split(['/', '.'])
            .next()
            .unwrap()
            .to_string();
        let Some((_, allowed)) = rules.iter().find(|(m, _)| m.contains(&module)) else {
            if !["main", "lib"].contains(&module.as_str()) {
                broken.push(format!("{file}: module {module} not in the import table"));
            }
            continue;
        };
        let Some(allowed) = allowed else { continue };
        for used in imports(&file) {
            // Any module's unit tests may use the shared test random source.
            if used != module && used != "testing" && !allowed.contains(&used) {
                broken.push(format!("{file} imports crate::{used}"));
            }
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}
