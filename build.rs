//! Names the git commit in the version (`mailnode --version`,
//! `mailnode_build_info`, `ctl status`) when the build has one: a build
//! from a checkout says which code it is; one from a tarball says the
//! version alone.

use std::process::Command;

fn main() {
    let version = env!("CARGO_PKG_VERSION");
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_hexdigit()));
    match commit {
        Some(commit) => println!("cargo:rustc-env=MAILNODE_VERSION={version} (git {commit})"),
        None => println!("cargo:rustc-env=MAILNODE_VERSION={version}"),
    }
    // A new commit is a new version string.
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
