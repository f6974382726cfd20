//! Embeds the compare-rule preview (`target/preview/`, written by `cargo xtask
//! setup`: the wasm module of `filter/preview/` and wasm-bindgen's JS glue) into the
//! binary, so the dashboard works with no files beside it.
//!
//! When the preview was not built, empty files are embedded instead and the
//! shadow page says so: the control plane still compiles (and `cargo clippy`
//! never has to build the wasm).

use std::path::PathBuf;

/// What wasm-bindgen writes for the `understudy-preview` crate.
const FILES: [&str; 2] = ["understudy_preview_bg.wasm", "understudy_preview.js"];

fn main() {
    // `refinery::embed_migrations!` reads these at compile time; a new
    // migration must rebuild the crate.
    println!("cargo:rerun-if-changed=migrations");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let dir = manifest.join("../target/preview");
    // Watching a path that does not exist makes cargo run this script on
    // every build (and rebuild the crate); a directory is watched with
    // everything in it (cargo compares the newest mtime), so creating it
    // empty covers the files appearing later.
    let _ = std::fs::create_dir_all(&dir);
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut built = true;
    for name in FILES {
        let from = dir.join(name);
        let bytes = std::fs::read(&from).unwrap_or_default();
        if bytes.is_empty() {
            built = false;
        }
        if let Err(e) = std::fs::write(out.join(name), &bytes) {
            println!("cargo:warning=could not write {name} to OUT_DIR: {e}");
            built = false;
        }
    }
    if !built {
        println!(
            "cargo:warning=rule preview not built ({} is missing): run `cargo xtask setup`",
            dir.display()
        );
    }
    println!(
        "cargo:rustc-env=UNDERSTUDY_PREVIEW_BUILT={}",
        if built { "1" } else { "0" }
    );
}
