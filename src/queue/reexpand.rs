//! Aliases are expanded again when a message is retried (as Postfix's
//! local(8) expands them at delivery): an operator who fixes a broken
//! alias and reloads fixes the mail already queued for it. Pure: the
//! table is given.
//!
//! For each original recipient with a delivery still pending, the table
//! in force decides again:
//! - the alias is gone (or now names only what mailnode cannot deliver
//!   to): its pending deliveries fail with 5.1.1 and are returned;
//! - otherwise a pending delivery to a target the alias still names stays
//!   as it is (its attempts and `DELIVERY_ID` kept); one to a target it no
//!   longer names is superseded, never attempted again; a target it names
//!   now that the message has no delivery to yet is added. A target that
//!   already succeeded, or failed for good, is never added again.
//!
//! Deliveries are only ever added at the end, never removed: a delivery's
//! index is its `DELIVERY_ID`, which must not change between retries.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use crate::actors::alias_resolver::decide;
use crate::actors::Shared;
use crate::aliases::{AliasTable, Target};
use crate::delivery::status::EnhancedCode;
use crate::protocol::command::Address;
use crate::protocol::session::RcptDecision;
use crate::spool::{Delivery, DeliveryState, Envelope};

/// The aliases in force, as the AliasResolver has them (a reload swaps
/// the table for both), and what deciding a recipient needs besides.
#[derive(Clone)]
pub(crate) struct Aliases {
    pub table: Shared<Arc<AliasTable>>,
    /// The domain of a domain-less `<postmaster>`.
    pub hostname: String,
    /// A relay is configured: address aliases can be forwarded.
    pub can_forward: bool,
}

/// What re-expanding one recipient did, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// Its alias no longer exists (or has nothing mailnode delivers to):
    /// `failed` pending deliveries fail with 5.1.1.
    Vanished { recipient: String, failed: usize },
    /// Its alias now names other targets.
    Retargeted {
        recipient: String,
        superseded: usize,
        added: usize,
    },
}

/// Expands the pending recipients of `envelope` again with `aliases`;
/// what changed, one entry per recipient whose deliveries changed.
pub(crate) fn reexpand(envelope: &mut Envelope, aliases: &Aliases, now: SystemTime) -> Vec<Change> {
    let table = aliases.table.get();
    let mut pending_recipients: Vec<String> = Vec::new();
    for (_, d) in envelope.pending() {
        if !pending_recipients.contains(&d.original_recipient) {
            pending_recipients.push(d.original_recipient.clone());
        }
    }
    let mut changes = Vec::new();
    for original in pending_recipients {
        let decision = decide(
            &table,
            &address_of(&original),
            &aliases.hostname,
            aliases.can_forward,
        );
        let change = match decision {
            RcptDecision::Accept(targets) => {
                let now_named: HashSet<(&str, &Target)> = targets
                    .iter()
                    .map(|t| (t.recipient.as_str(), &t.target))
                    .collect();
                let mut superseded = 0;
                for d in envelope.deliveries.iter_mut().filter(|d| {
                    d.original_recipient == original && d.state == DeliveryState::Pending
                }) {
                    if !now_named.contains(&(d.recipient.as_str(), &d.target)) {
                        d.state = DeliveryState::Superseded;
                        d.last_error = "the recipient's alias no longer names this target".into();
                        superseded += 1;
                    }
                }
                let mut added = 0;
                for t in &targets {
                    let known = envelope
                        .deliveries
                        .iter()
                        .any(|d| d.recipient == t.recipient && d.target == t.target);
                    if !known {
                        envelope.deliveries.push(Delivery::new(
                            original.clone(),
                            t.recipient.clone(),
                            t.local.clone(),
                            t.extension.clone(),
                            t.domain.clone(),
                            t.target.clone(),
                        ));
                        added += 1;
                    }
                }
                (superseded + added > 0).then_some(Change::Retargeted {
                    recipient: original,
                    superseded,
                    added,
                })
            }
            RcptDecision::Refuse(reply) => {
                let text = reply.text();
                let reason = text.split_once(' ').map_or(text, |(_, reason)| reason);
                let why = format!("the aliases in force no longer take it: {reason}");
                let mut failed = 0;
                for d in envelope.deliveries.iter_mut().filter(|d| {
                    d.original_recipient == original && d.state == DeliveryState::Pending
                }) {
                    d.state = DeliveryState::Failed;
                    d.last_error = why.clone();
                    d.record(now, EnhancedCode::UNKNOWN_RECIPIENT, &why);
                    failed += 1;
                }
                Some(Change::Vanished {
                    recipient: original,
                    failed,
                })
            }
        };
        changes.extend(change);
    }
    changes
}

/// The address a recipient was accepted as (`Address::to_plain`): the
/// domain follows the last `@`; `<postmaster>` may have none.
fn address_of(plain: &str) -> Address {
    match plain.rsplit_once('@') {
        Some((local, domain)) => Address {
            local: local.to_string(),
            domain: Some(domain.to_string()),
        },
        None => Address {
            local: plain.to_string(),
            domain: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aliases;
    use std::path::Path;

    fn aliases_of(text: &str) -> Aliases {
        let table = aliases::parse(text.as_bytes(), Path::new("aliases"))
            .unwrap()
            .table;
        Aliases {
            table: Shared::new(Arc::new(table)),
            hostname: "mx.test".into(),
            can_forward: false,
        }
    }

    fn pipe(command: &str) -> Target {
        Target::Pipe {
            command: command.into(),
        }
    }

    /// The envelope the table `text` gives `rcpts` at intake.
    fn accepted(text: &str, rcpts: &[&str]) -> Envelope {
        let aliases = aliases_of(text);
        let mut deliveries = Vec::new();
        for rcpt in rcpts {
            let RcptDecision::Accept(targets) =
                decide(&aliases.table.get(), &address_of(rcpt), "mx.test", false)
            else {
                panic!("{rcpt} refused");
            };
            for t in targets {
                deliveries.push(Delivery::new(
                    rcpt.to_string(),
                    t.recipient,
                    t.local,
                    t.extension,
                    t.domain,
                    t.target,
                ));
            }
        }
        Envelope::for_test("Q", "a@example.org", SystemTime::UNIX_EPOCH, deliveries)
    }

    fn states(envelope: &Envelope) -> Vec<(String, Target, DeliveryState)> {
        envelope
            .deliveries
            .iter()
            .map(|d| (d.recipient.clone(), d.target.clone(), d.state))
            .collect()
    }

    #[test]
    fn a_fixed_target_replaces_the_broken_one_and_what_succeeded_stays_done() {
        let mut envelope = accepted(
            "rt: |rt-ok\nbroken: |/old/path\nhelpdesk: rt, broken\n",
            &["Helpdesk+Urgent@Example.org"],
        );
        envelope.deliveries[0].state = DeliveryState::Delivered;
        envelope.deliveries[1].attempts = 3;
        let changes = reexpand(
            &mut envelope,
            &aliases_of("rt: |rt-ok\nfixed: |/new/path\nhelpdesk: rt, fixed\n"),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(
            changes,
            vec![Change::Retargeted {
                recipient: "Helpdesk+Urgent@Example.org".into(),
                superseded: 1,
                added: 1,
            }]
        );
        // Indexes (DELIVERY_IDs) are kept; the new delivery comes last.
        assert_eq!(
            states(&envelope),
            vec![
                (
                    "rt+Urgent@example.org".into(),
                    pipe("rt-ok"),
                    DeliveryState::Delivered
                ),
                (
                    "broken+Urgent@example.org".into(),
                    pipe("/old/path"),
                    DeliveryState::Superseded
                ),
                (
                    "fixed+Urgent@example.org".into(),
                    pipe("/new/path"),
                    DeliveryState::Pending
                ),
            ]
        );
        let added = &envelope.deliveries[2];
        assert_eq!(added.original_recipient, "Helpdesk+Urgent@Example.org");
        assert_eq!(
            (added.local.as_str(), added.extension.as_str()),
            ("fixed", "Urgent")
        );
        assert_eq!(added.attempts, 0);
    }

    #[test]
    fn an_unchanged_alias_changes_nothing_and_keeps_the_attempts() {
        let text = "helpdesk: |rt\n";
        let mut envelope = accepted(text, &["helpdesk@example.org"]);
        envelope.deliveries[0].attempts = 2;
        let before = envelope.clone();
        assert!(reexpand(&mut envelope, &aliases_of(text), SystemTime::UNIX_EPOCH).is_empty());
        assert_eq!(envelope, before);
    }

    #[test]
    fn a_vanished_or_undeliverable_alias_fails_its_pending_deliveries_with_5_1_1() {
        let mut envelope = accepted(
            "gone: \"|a\", \"|b\"\nfile: |c\nstays: |d\n",
            &["gone@example.org", "file@example.org", "stays@example.org"],
        );
        envelope.deliveries[1].state = DeliveryState::Delivered;
        let changes = reexpand(
            &mut envelope,
            &aliases_of("file: /var/mail/file\nstays: |d\n"),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(changes.len(), 2, "{changes:?}");
        let failed: Vec<(usize, &str)> = envelope
            .deliveries
            .iter()
            .enumerate()
            .filter(|(_, d)| d.state == DeliveryState::Failed)
            .map(|(i, d)| (i, d.status.as_str()))
            .collect();
        // gone's second target had already succeeded: it stays delivered.
        assert_eq!(failed, vec![(0, "5.1.1"), (2, "5.1.1")]);
        assert!(envelope.deliveries[0].last_error.contains("no longer"));
        assert_eq!(envelope.deliveries[3].state, DeliveryState::Pending);
    }

    #[test]
    fn a_target_done_before_is_never_added_again() {
        // helpdesk named rt, then only other, and now rt again: rt had
        // succeeded (and `failed` failed for good): neither runs again.
        let mut envelope = accepted(
            "helpdesk: \"|rt\", \"|failed\", \"|other\"\n",
            &["helpdesk@example.org"],
        );
        envelope.deliveries[0].state = DeliveryState::Delivered;
        envelope.deliveries[1].state = DeliveryState::Bounced;
        let changes = reexpand(
            &mut envelope,
            &aliases_of("helpdesk: \"|rt\", \"|failed\", \"|new\"\n"),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(
            changes,
            vec![Change::Retargeted {
                recipient: "helpdesk@example.org".into(),
                superseded: 1,
                added: 1,
            }]
        );
        let pending: Vec<&Target> = envelope.pending().map(|(_, d)| &d.target).collect();
        assert_eq!(pending, vec![&pipe("new")]);
    }

    #[test]
    fn postmaster_without_a_domain_is_decided_again_with_the_hostname() {
        let mut envelope = accepted("postmaster: |old\n", &["postmaster"]);
        reexpand(
            &mut envelope,
            &aliases_of("postmaster: |new\n"),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(envelope.deliveries[1].recipient, "postmaster@mx.test");
        assert_eq!(envelope.deliveries[1].target, pipe("new"));
    }
}
