//! A load balancer's PROXY header, as the acceptor reads it: beyond "no
//! panic", reading only the bytes `parse` asks for never reads past a
//! header (what follows is the client's SMTP) nor beyond the bounds, and a
//! header's verdict does not depend on the bytes after it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailnode::protocol::proxy::{parse, Header, LONGEST_V2, SHORTEST};

fuzz_target!(|bytes: &[u8]| {
    let verdict = parse(bytes);
    match &verdict {
        Header::Done { len, .. } => {
            assert!(*len >= SHORTEST && *len <= bytes.len() && *len <= LONGEST_V2);
            assert_eq!(parse(&bytes[..*len]), verdict, "the bytes after it changed it");
            for cut in SHORTEST..*len {
                match parse(&bytes[..cut]) {
                    Header::Need(more) => assert!(cut + more <= *len, "{cut}+{more} > {len}"),
                    other => panic!("{cut} of {len} bytes: {other:?}"),
                }
            }
        }
        Header::Need(more) => assert!(*more >= 1 && bytes.len() + more <= LONGEST_V2),
        Header::Invalid(_) => {}
    }
});
