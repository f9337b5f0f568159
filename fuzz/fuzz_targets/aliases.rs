//! The aliases file parser: any bytes load or give errors, never a panic,
//! and every error or warning points at a line that exists.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mailnode::aliases::{parse, LoadError};

fuzz_target!(|bytes: &[u8]| {
    let lines = bytes.split(|&b| b == b'\n').count();
    match parse(bytes, Path::new("aliases")) {
        Ok(loaded) => {
            assert!(loaded.table.len() <= lines);
            for warning in &loaded.warnings {
                assert!((1..=lines).contains(&warning.line), "{warning}");
            }
        }
        Err(LoadError::Invalid(errors)) => {
            assert!(!errors.is_empty());
            for error in &errors {
                assert!((1..=lines).contains(&error.line), "{error}");
            }
        }
        Err(other) => panic!("parse does no I/O, yet: {other}"),
    }
});
