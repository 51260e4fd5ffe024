//! Holds the code to the layer table in `src/lib.rs`: a module imports only
//! from its own layer and those above it in the table. Reads every source
//! file's `use crate::…` items and the `crate::…` paths in its code (not in
//! comments, not in its tests) and fails on one that goes up the table.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layers in table order (bottom first), read from `src/lib.rs`: rows
/// of the form ``//! | [`name`] | role |``.
fn layers(lib: &str) -> Vec<String> {
    lib.lines()
        .filter_map(|l| l.strip_prefix("//! | [`"))
        .filter_map(|l| l.split_once("`]"))
        .map(|(name, _)| name.to_owned())
        .collect()
}

/// The code of a source file: comments and `#[cfg(test)]` items dropped.
fn code(source: &str) -> String {
    let source = match source.find("#[cfg(test)]") {
        Some(at) => &source[..at],
        None => source,
    };
    source
        .lines()
        .map(|l| match l.find("//") {
            Some(at) => &l[..at],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every top-level module a piece of code names under `crate::`: in `use`
/// items (grouped ones too, `use crate::{a, b::c}`) and in paths.
fn imports(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `crate::X` with a lower-case X is a module; an upper-case one
            // is a type re-exported at the root (the engine's).
            if name.starts_with(|c: char| c.is_ascii_lowercase()) {
                out.insert(name);
            }
        }
        rest = after;
    }
    out
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("src is readable").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Each import of `files` (path, source) that goes up `layers`, as
/// `file: module -> imported`.
fn violations(layers: &[String], files: &[(String, String)]) -> Vec<String> {
    let rank = |name: &str| layers.iter().position(|l| l == name);
    let mut out = Vec::new();
    for (path, source) in files {
        let Some(module) = path.split('/').next().map(|m| m.trim_end_matches(".rs")) else {
            continue;
        };
        let Some(own) = rank(module) else {
            out.push(format!(
                "{path}: module {module:?} is not in the layer table of src/lib.rs"
            ));
            continue;
        };
        for imported in imports(&code(source)) {
            match rank(&imported) {
                Some(theirs) if theirs > own => out.push(format!(
                    "{path}: {module} imports crate::{imported}, a layer above it"
                )),
                Some(_) => {}
                None => out.push(format!("{path}: crate::{imported} is not in the layer table")),
            }
        }
    }
    out
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(root.join("lib.rs")).expect("src/lib.rs");
    let layers = layers(&lib);
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';').to_owned())
        .collect();
    assert_eq!(
        layers.iter().cloned().collect::<BTreeSet<_>>(),
        declared,
        "the layer table of src/lib.rs lists every module the crate declares, and only those"
    );
    let mut paths = Vec::new();
    sources(&root, &mut paths);
    let files: Vec<(String, String)> = paths
        .iter()
        .filter(|p| !p.ends_with("lib.rs") && !p.ends_with("main.rs") && !p.ends_with("tests.rs"))
        .map(|p| {
            let relative = p.strip_prefix(&root).unwrap().to_string_lossy().into_owned();
            (relative, std::fs::read_to_string(p).unwrap())
        })
        .collect();
    assert!(files.len() > 40, "read the sources: {} files", files.len());
    let found = violations(&layers, &files);
    assert!(
        found.is_empty(),
        "imports that go up the layer table:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_finds_an_import_up_the_table_in_any_form() {
    let layers: Vec<String> = ["engine", "pipeline", "service"].map(String::from).to_vec();
    let file = |path: &str, source: &str| (path.to_owned(), source.to_owned());
    let files = [
        file("engine/a.rs", "use crate::pipeline::Pipeline;\n"),
        file("engine/b.rs", "use crate::{engine::x, service::run};\n"),
        file("engine/c.rs", "fn f() { crate::service::run(); }\n"),
        file(
            "pipeline/d.rs",
            "use crate::engine::Record;\nuse crate::Deduplicator;\n",
        ),
        file(
            "pipeline/e.rs",
            "// see crate::service\n/// [`crate::service`]\nfn g() {}\n",
        ),
        file(
            "pipeline/f.rs",
            "fn h() {}\n#[cfg(test)]\nmod tests { use crate::service::run; }\n",
        ),
        file("cli.rs", "use crate::engine::x;\n"),
    ];
    let found = violations(&layers, &files);
    assert_eq!(
        found,
        [
            "engine/a.rs: engine imports crate::pipeline, a layer above it",
            "engine/b.rs: engine imports crate::service, a layer above it",
            "engine/c.rs: engine imports crate::service, a layer above it",
            "cli.rs: module \"cli\" is not in the layer table of src/lib.rs",
        ]
    );
}
