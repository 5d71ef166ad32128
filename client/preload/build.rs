//! Exports exactly the interposed symbols (version script, `local: *;`),
//! and checks that the script names the same calls as lib.rs's
//! `interpose!` table (an entry is a line indented four spaces that starts
//! with its name and an opening parenthesis).
use std::collections::BTreeSet;

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = dir.join("exports.map");
    let lib = dir.join("src/lib.rs");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed={}", lib.display());

    let map = std::fs::read_to_string(&script).expect("read exports.map");
    let global = map
        .split("global:")
        .nth(1)
        .and_then(|g| g.split("local:").next())
        .expect("exports.map has a global: section before local:");
    let exported: BTreeSet<&str> = global
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();

    let src = std::fs::read_to_string(&lib).expect("read src/lib.rs");
    let table = src
        .split("\ninterpose! {\n")
        .nth(1)
        .and_then(|t| t.split("\n}\n").next())
        .expect("src/lib.rs has the interpose! table");
    let interposed: BTreeSet<&str> = table
        .lines()
        .filter(|l| l.starts_with("    ") && !l.starts_with("     "))
        .filter_map(|l| l.trim_start().split_once('('))
        .map(|(name, _)| name)
        .filter(|name| name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .filter(|name| !name.is_empty())
        .collect();
    assert!(
        exported == interposed,
        "exports.map and lib.rs's interpose! table differ: only in exports.map {:?}, only in lib.rs {:?}",
        exported.difference(&interposed).collect::<Vec<_>>(),
        interposed.difference(&exported).collect::<Vec<_>>(),
    );

    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,--version-script={}",
        script.display()
    );
}
