//! The config loader: any text gives a config or errors, never a panic;
//! every error with a line points at one that exists.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mailnode::config::parse_files_only as parse;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let lines = text.split('\n').count();
    if let Err(errors) = parse(text, Path::new("mailnode.toml")) {
        assert!(!errors.is_empty());
        for error in &errors {
            if let Some(line) = error.line {
                assert!((1..=lines).contains(&line), "{}: {}", line, error.message);
            }
        }
    }
});
