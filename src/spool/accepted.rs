//! The envelope a message gets when its data is complete: who sent it,
//! where each recipient's mail goes, and which of those deliveries are
//! refused at once. Pure: the session actor only calls it.

use std::time::SystemTime;

use crate::delivery::status::EnhancedCode;
use crate::protocol::command::ReversePath;
use crate::protocol::session::{ClientInfo, MessageDraft};
use crate::spool::{Delivery, DeliveryState, Envelope};

impl Envelope {
    /// The envelope of `draft`, accepted `now` from `client`.
    ///
    /// The same recipient given twice, or reached twice through aliases,
    /// runs its program once (as Postfix does): a recipient that reaches
    /// it after another has a delivery superseded from the start, kept so
    /// that a retry expands its aliases again too (`queue::reexpand`). A recipient the message
    /// already carries a `Delivered-To:` for is a mail loop: that delivery
    /// fails at once (5.4.6), to be returned, never run.
    pub(crate) fn accepted(draft: MessageDraft, client: &ClientInfo, now: SystemTime) -> Envelope {
        let (sender, return_path) = match &draft.sender {
            ReversePath::Null => (String::new(), String::new()),
            ReversePath::Address(a) => (a.to_plain(), a.to_smtp()),
        };
        let mut deliveries: Vec<Delivery> = Vec::new();
        for (r, t) in draft
            .recipients
            .iter()
            .flat_map(|r| r.targets.iter().map(move |t| (r, t)))
        {
            let same = |d: &Delivery| d.recipient == t.recipient && d.target == t.target;
            let first = deliveries.iter().find(|d| same(d));
            if first.is_some_and(|d| d.original_recipient == r.original) {
                // The same RCPT given twice.
                continue;
            }
            let mut d = Delivery::new(
                r.original.clone(),
                t.recipient.clone(),
                t.local.clone(),
                t.extension.clone(),
                t.domain.clone(),
                t.target.clone(),
            );
            if let Some(first) = first {
                // Runs once, for the first recipient; kept so that a retry
                // decides this recipient's aliases again too.
                d.state = DeliveryState::Superseded;
                d.last_error = format!("delivered once, for {}", first.original_recipient);
            } else if draft.delivered_to.contains(&t.recipient.to_lowercase()) {
                d.state = DeliveryState::Failed;
                d.last_error = format!("mail forwarding loop for {}", t.recipient);
                d.record(now, EnhancedCode::LOOP, &d.last_error.clone());
            }
            deliveries.push(d);
        }
        Envelope {
            id: draft.id,
            sender,
            return_path,
            arrival: now,
            client_address: client.address.to_string(),
            client_helo: draft.helo,
            channel: client.channel.clone(),
            size: draft.size,
            smtputf8: draft.params.smtputf8,
            body_8bit: draft.params.body_8bit,
            held: false,
            next_attempt: now,
            deliveries,
            // The spool records it at commit.
            body_check: None,
            tls_version: draft
                .tls
                .as_ref()
                .map(|t| t.version.clone())
                .unwrap_or_default(),
            tls_cipher: draft.tls.map(|t| t.cipher).unwrap_or_default(),
            // The session adds the verdict once it has it.
            auth: super::AuthRecord::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aliases::Target;
    use crate::protocol::command::{Address, MailParams};
    use crate::protocol::session::{AcceptedRecipient, DeliveryTarget};

    fn target(recipient: &str, command: &str) -> DeliveryTarget {
        let (local, domain) = recipient.split_once('@').unwrap();
        DeliveryTarget {
            recipient: recipient.into(),
            local: local.into(),
            extension: String::new(),
            domain: domain.into(),
            target: Target::Pipe {
                command: command.into(),
            },
        }
    }

    fn draft(recipients: Vec<AcceptedRecipient>, delivered_to: &[&str]) -> MessageDraft {
        MessageDraft {
            id: "ID".into(),
            sender: ReversePath::Address(Address {
                local: "a b".into(),
                domain: Some("example.org".into()),
            }),
            params: MailParams::default(),
            helo: "client.example".into(),
            recipients,
            size: 42,
            tls: None,
            delivered_to: delivered_to.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn client() -> ClientInfo {
        ClientInfo {
            address: "192.0.2.7".parse().unwrap(),
            channel: "internet".into(),
        }
    }

    #[test]
    fn the_same_recipient_and_program_reached_twice_runs_once() {
        let now = SystemTime::now();
        let twice = AcceptedRecipient {
            original: "support@x.test".into(),
            targets: vec![target("support@x.test", "rt")],
        };
        let through_an_alias = AcceptedRecipient {
            original: "help@x.test".into(),
            targets: vec![
                target("support@x.test", "rt"),
                target("support@x.test", "archive"),
            ],
        };
        let env = Envelope::accepted(
            draft(vec![twice.clone(), twice, through_an_alias], &[]),
            &client(),
            now,
        );
        let runs: Vec<_> = env
            .deliveries
            .iter()
            .map(|d| (d.original_recipient.as_str(), d.target.clone(), d.state))
            .collect();
        let pipe = |command: &str| Target::Pipe {
            command: command.into(),
        };
        // help's way to rt is kept, set aside, so that a retry decides
        // help's aliases again too.
        assert_eq!(
            runs,
            vec![
                ("support@x.test", pipe("rt"), DeliveryState::Pending),
                ("help@x.test", pipe("rt"), DeliveryState::Superseded),
                ("help@x.test", pipe("archive"), DeliveryState::Pending),
            ]
        );
        assert_eq!(
            env.deliveries[1].last_error,
            "delivered once, for support@x.test"
        );
        assert!(env.pending().count() == 2);
        assert_eq!(env.sender, "a b@example.org");
        assert_eq!(env.return_path, "\"a b\"@example.org");
        assert_eq!(
            (env.client_address.as_str(), env.channel.as_str()),
            ("192.0.2.7", "internet")
        );
        assert_eq!((env.arrival, env.next_attempt, env.size), (now, now, 42));
    }

    #[test]
    fn a_recipient_the_message_was_already_delivered_to_is_a_loop() {
        let now = SystemTime::now();
        let env = Envelope::accepted(
            draft(
                vec![AcceptedRecipient {
                    original: "Support@X.test".into(),
                    targets: vec![target("Support@X.test", "rt"), target("other@x.test", "rt")],
                }],
                &["support@x.test"],
            ),
            &client(),
            now,
        );
        let looped = &env.deliveries[0];
        assert_eq!(looped.state, DeliveryState::Failed);
        assert_eq!(looped.status, "5.4.6");
        assert!(looped.last_error.contains("loop for Support@X.test"));
        assert_eq!(env.deliveries[1].state, DeliveryState::Pending);
    }

    #[test]
    fn a_null_sender_has_no_return_path() {
        let mut d = draft(Vec::new(), &[]);
        d.sender = ReversePath::Null;
        let env = Envelope::accepted(d, &client(), SystemTime::now());
        assert_eq!((env.sender.as_str(), env.return_path.as_str()), ("", ""));
    }
}
