//! One SMTP command line. Beyond "no panic": nothing the parser accepts
//! carries a control character (C0, DEL, the C1 controls of UTF-8 such as
//! NEL; TAB, legal in headers, aside) or a Unicode line separator into a
//! HELO name or an address, which end up in headers and program
//! environments; and an accepted address written back in its RFC 5321 form
//! parses to the same address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailnode::protocol::command::{parse, Address, Command, MailParams, ReversePath};

fn assert_clean(field: &str, what: &str, line: &[u8]) {
    assert!(
        !field
            .chars()
            .any(|c| (c.is_control() && c != '\t') || c == '\u{2028}' || c == '\u{2029}'),
        "{what} {field:?} parsed from {line:?} holds a control character"
    );
}

fn assert_address(address: &Address, line: &[u8]) {
    assert_clean(&address.local, "local part", line);
    if let Some(domain) = &address.domain {
        assert_clean(domain, "domain", line);
    }
    let again = format!("RCPT TO:<{}>", address.to_smtp());
    assert_eq!(
        parse(again.as_bytes()),
        Ok(Command::Rcpt {
            to: address.clone()
        }),
        "{address:?} from {line:?} does not survive to_smtp ({again:?})"
    );
}

fuzz_target!(|line: &[u8]| {
    match parse(line) {
        Ok(Command::Helo(name)) | Ok(Command::Ehlo(name)) => assert_clean(&name, "HELO name", line),
        Ok(Command::Mail {
            from: ReversePath::Address(address),
            params,
        }) => {
            assert_address(&address, line);
            let again = format!("MAIL FROM:<{}>", address.to_smtp());
            assert_eq!(
                parse(again.as_bytes()),
                Ok(Command::Mail {
                    from: ReversePath::Address(address),
                    params: MailParams::default(),
                }),
                "MAIL from {line:?} ({params:?})"
            );
        }
        Ok(Command::Rcpt { to }) => assert_address(&to, line),
        _ => {}
    }
});
