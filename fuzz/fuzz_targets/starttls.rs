//! The session machine around STARTTLS, driven as the connection's I/O task
//! drives it. The input is a few "writes" of command lines (split at 0x01),
//! its first byte choosing whether `[tls]` is configured and required.
//! Beyond "no panic": STARTTLS is accepted only in clear with TLS
//! configured, and nothing the client wrote after it in the same write is
//! ever fed (the driver drops it); after the handshake no MAIL is taken
//! before a new EHLO/HELO; EHLO offers STARTTLS exactly when it can be
//! used; with `require`, no MAIL is taken in clear; a message records the
//! TLS the session had.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use mailnode::aliases::Target;
use mailnode::protocol::session::{
    Action, ClientInfo, DeliveryTarget, Event, RcptDecision, SessionConfig, SessionMachine,
    TlsInfo,
};

fn tls13() -> TlsInfo {
    TlsInfo {
        version: "TLSv1.3".into(),
        cipher: "TLS_AES_128_GCM_SHA256".into(),
    }
}

fn target() -> DeliveryTarget {
    DeliveryTarget {
        recipient: "r@example.org".into(),
        local: "r".into(),
        extension: String::new(),
        domain: "example.org".into(),
        target: Target::Pipe {
            command: "cat".into(),
        },
    }
}

/// What the driver knows of the session.
struct Driver {
    machine: SessionMachine,
    starttls: bool,
    required: bool,
    tls: bool,
    /// STARTTLS happened and no greeting since.
    needs_helo: bool,
    /// The handshake is due: the rest of the write is dropped.
    handshake_due: bool,
}

impl Driver {
    /// Feeds an event and answers whatever the machine asks for, as the
    /// session actor does, checking each step.
    fn feed(&mut self, event: Event, line: &[u8]) {
        let is_mail = line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"MAIL");
        let is_ehlo = line.len() >= 4
            && (line[..4].eq_ignore_ascii_case(b"EHLO") || line[..4].eq_ignore_ascii_case(b"HELO"));
        let mut pending = vec![event];
        while let Some(event) = pending.pop() {
            let actions = self.machine.handle(event);
            for (n, action) in actions.iter().enumerate() {
                match action {
                    Action::StartTls => {
                        assert!(self.starttls && !self.tls, "STARTTLS taken: {line:?}");
                        assert_eq!(n + 1, actions.len(), "StartTls is the last action");
                        assert!(
                            matches!(&actions[..n], [Action::Reply(r)] if r.code() == 220),
                            "{actions:?}"
                        );
                        self.handshake_due = true;
                    }
                    Action::CheckSender(_) => {
                        assert!(!self.needs_helo, "MAIL taken before EHLO after TLS: {line:?}");
                        assert!(!self.required || self.tls, "MAIL taken in clear: {line:?}");
                        assert!(is_mail);
                        pending.push(Event::SenderChecked(Ok(())));
                    }
                    Action::Resolve(_) => {
                        pending.push(Event::Resolved(RcptDecision::Accept(vec![target()])))
                    }
                    Action::OpenBody => pending.push(Event::BodyOpened {
                        result: Ok("Q1".into()),
                        now: SystemTime::UNIX_EPOCH,
                    }),
                    Action::EnterData => pending.push(Event::DataEnd {
                        size: 0,
                        too_big: false,
                    }),
                    Action::Commit(draft) => {
                        assert_eq!(draft.tls.is_some(), self.tls);
                        pending.push(Event::Committed(Ok(draft.id.clone())));
                    }
                    Action::Reply(r) if is_ehlo && r.code() == 250 => {
                        let offered = r.text().lines().any(|l| l == "STARTTLS");
                        if line[..4].eq_ignore_ascii_case(b"EHLO") {
                            assert_eq!(offered, self.starttls && !self.tls, "{r}");
                        }
                        self.needs_helo = false;
                    }
                    _ => {}
                }
            }
        }
    }
}

fuzz_target!(|bytes: &[u8]| {
    let Some((&choice, input)) = bytes.split_first() else {
        return;
    };
    let (starttls, required) = (choice & 1 == 1, choice & 3 == 3);
    let config = SessionConfig {
        hostname: "mx.example.org".into(),
        max_message_size: 1000,
        max_recipients: 5,
        local_domains: Vec::new(),
        starttls,
        tls_required: required,
        authserv_id: None,
    };
    let client = ClientInfo {
        address: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        channel: "local".into(),
    };
    let mut driver = Driver {
        machine: SessionMachine::new(Arc::new(config), client),
        starttls,
        required,
        tls: false,
        needs_helo: false,
        handshake_due: false,
    };
    driver.feed(Event::Connected, b"");
    for write in input.split(|&b| b == 1) {
        for line in write.split(|&b| b == b'\n') {
            if driver.machine.is_closed() {
                return;
            }
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            driver.feed(Event::Line(bytes::Bytes::copy_from_slice(line)), line);
            if driver.handshake_due {
                // The rest of this write was sent before the handshake.
                break;
            }
        }
        if driver.handshake_due {
            driver.handshake_due = false;
            driver.tls = true;
            driver.needs_helo = true;
            driver.feed(Event::TlsStarted(tls13()), b"");
        }
    }
});
