//! Aliases are expanded again when a message is retried (as Postfix's
//! local(8) expands them at delivery): an operator who fixes a broken
//! alias and reloads fixes the mail already queued for it. Pure: the
//! table is given.
//!
//! Every recipient (as given at `RCPT`) still waiting for something is
//! decided again by the table in force, all of them before anything
//! changes; then:
//! - a pending delivery some recipient's alias still names stays as it is
//!   (its attempts and `DELIVERY_ID` kept);
//! - one that none names any more is superseded, never attempted again,
//!   or, when its own recipient's alias is gone (or now refused as at
//!   `RCPT`: it names a file, or an address with no relay), fails with
//!   5.1.1 and is returned;
//! - a target named now that the message has neither pending nor done is
//!   attempted: a superseded delivery to it comes back, else a new one is
//!   added. A target that succeeded or failed for good never runs again,
//!   nor does a program that already took this recipient's mail under
//!   another alias's name.
//!
//! Deliveries are only ever added at the end, never removed: a delivery's
//! index is its `DELIVERY_ID`, which must not change between retries.
//! (Intake keeps a delivery for each recipient that reaches a target
//! another recipient reached first, superseded from the start, so that
//! every recipient is decided again here.)

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use crate::actors::alias_resolver::decide;
use crate::actors::Shared;
use crate::aliases::{AliasTable, Target};
use crate::delivery::status::EnhancedCode;
use crate::protocol::command::Address;
use crate::protocol::session::{DeliveryTarget, RcptDecision};
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
    /// Its alias now names other targets: `superseded` deliveries set
    /// aside, `added` new or set-aside ones to attempt.
    Retargeted {
        recipient: String,
        superseded: usize,
        added: usize,
    },
}

/// Expands again, with `aliases`, every recipient of `envelope` still
/// waiting for something; what changed, one entry per recipient (as given
/// at `RCPT`) whose deliveries changed.
pub(crate) fn reexpand(envelope: &mut Envelope, aliases: &Aliases, now: SystemTime) -> Vec<Change> {
    let table = aliases.table.get();
    // Waiting: a delivery pending, or one set aside (superseded) that the
    // aliases may name again.
    let mut originals: Vec<String> = Vec::new();
    for d in &envelope.deliveries {
        if matches!(d.state, DeliveryState::Pending | DeliveryState::Superseded)
            && !originals.contains(&d.original_recipient)
        {
            originals.push(d.original_recipient.clone());
        }
    }
    // All decided before anything changes: a delivery several recipients
    // reach (kept once at intake) stays while any of them names it.
    let decided: Vec<(String, Result<Vec<DeliveryTarget>, String>)> = originals
        .into_iter()
        .map(|original| {
            let decision = match decide(
                &table,
                &address_of(&original),
                &aliases.hostname,
                aliases.can_forward,
            ) {
                RcptDecision::Accept(targets) => Ok(targets),
                RcptDecision::Refuse(reply) => {
                    let text = reply.text();
                    Err(text
                        .split_once(' ')
                        .map_or(text, |(_, why)| why)
                        .to_string())
                }
            };
            (original, decision)
        })
        .collect();
    let named: HashSet<(&str, &Target)> = decided
        .iter()
        .filter_map(|(_, decision)| decision.as_ref().ok())
        .flatten()
        .map(|t| (t.recipient.as_str(), &t.target))
        .collect();
    let mut tally: Vec<Tally> = decided
        .iter()
        .map(|(original, _)| Tally {
            recipient: original.clone(),
            ..Tally::default()
        })
        .collect();
    let position = |original: &str| decided.iter().position(|(o, _)| o == original);

    // Pending deliveries no recipient's alias names any more.
    for d in &mut envelope.deliveries {
        if d.state != DeliveryState::Pending || named.contains(&(d.recipient.as_str(), &d.target)) {
            continue;
        }
        let Some(at) = position(&d.original_recipient) else {
            continue;
        };
        match &decided[at].1 {
            Ok(_) => {
                d.state = DeliveryState::Superseded;
                d.last_error = "the recipient's alias no longer names this target".into();
                tally[at].superseded += 1;
            }
            Err(why) => {
                d.state = DeliveryState::Failed;
                d.last_error = format!("the aliases in force no longer take it: {why}");
                let why = d.last_error.clone();
                d.record(now, EnhancedCode::UNKNOWN_RECIPIENT, &why);
                tally[at].failed += 1;
            }
        }
    }

    // Targets named now that the message has not delivered, nor has pending.
    for (at, (original, decision)) in decided.iter().enumerate() {
        let Ok(targets) = decision else {
            continue;
        };
        for t in targets {
            let same = |d: &Delivery| d.recipient == t.recipient && d.target == t.target;
            let taken = envelope
                .deliveries
                .iter()
                .any(|d| same(d) && d.state != DeliveryState::Superseded);
            // The alias holding the target was renamed: the program has
            // this recipient's mail already.
            let delivered_for_this_recipient = envelope.deliveries.iter().any(|d| {
                d.original_recipient == *original
                    && d.target == t.target
                    && d.state == DeliveryState::Delivered
            });
            if taken || delivered_for_this_recipient {
                continue;
            }
            // Named again: the delivery set aside comes back, under its
            // own DELIVERY_ID.
            if let Some(d) = envelope.deliveries.iter_mut().find(|d| same(d)) {
                d.state = DeliveryState::Pending;
                d.last_error.clear();
            } else {
                envelope.deliveries.push(Delivery::new(
                    original.clone(),
                    t.recipient.clone(),
                    t.local.clone(),
                    t.extension.clone(),
                    t.domain.clone(),
                    t.target.clone(),
                ));
            }
            tally[at].added += 1;
        }
    }
    tally.into_iter().filter_map(Tally::change).collect()
}

/// What happened to one recipient's deliveries.
#[derive(Default)]
struct Tally {
    recipient: String,
    superseded: usize,
    failed: usize,
    added: usize,
}

impl Tally {
    fn change(self) -> Option<Change> {
        if self.failed > 0 {
            Some(Change::Vanished {
                recipient: self.recipient,
                failed: self.failed,
            })
        } else if self.superseded + self.added > 0 {
            Some(Change::Retargeted {
                recipient: self.recipient,
                superseded: self.superseded,
                added: self.added,
            })
        } else {
            None
        }
    }
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

    #[test]
    fn a_target_named_again_comes_back_under_its_own_delivery_id() {
        let mut envelope = accepted("helpdesk: |a\n", &["helpdesk@example.org"]);
        envelope.deliveries[0].attempts = 1;
        let epoch = SystemTime::UNIX_EPOCH;
        reexpand(&mut envelope, &aliases_of("helpdesk: |b\n"), epoch);
        envelope.deliveries[1].attempts = 1;
        let changes = reexpand(&mut envelope, &aliases_of("helpdesk: |a\n"), epoch);
        assert_eq!(
            changes,
            vec![Change::Retargeted {
                recipient: "helpdesk@example.org".into(),
                superseded: 1,
                added: 1,
            }]
        );
        let targets: Vec<(Target, DeliveryState)> = envelope
            .deliveries
            .iter()
            .map(|d| (d.target.clone(), d.state))
            .collect();
        assert_eq!(
            targets,
            vec![
                (pipe("a"), DeliveryState::Pending),
                (pipe("b"), DeliveryState::Superseded),
            ],
            "a is not lost, and keeps its DELIVERY_ID"
        );
        assert_eq!(envelope.deliveries[0].attempts, 1);
    }

    /// As intake keeps it: `sales` and `support` both reach `rt`, which
    /// runs once, for `sales`.
    fn reached_by_two() -> Envelope {
        let mut envelope = accepted(
            "rt: |rt\nsales: rt\nsupport: rt\n",
            &["sales@example.org", "support@example.org"],
        );
        envelope.deliveries[0].attempts = 1;
        envelope.deliveries[1].state = DeliveryState::Superseded;
        envelope
    }

    #[test]
    fn a_target_two_recipients_reach_stays_while_either_still_names_it() {
        let epoch = SystemTime::UNIX_EPOCH;
        let mut envelope = reached_by_two();
        reexpand(
            &mut envelope,
            &aliases_of("rt: |rt\ncrm: |crm\nsales: crm\nsupport: rt\n"),
            epoch,
        );
        let states: Vec<(String, Target, DeliveryState)> = states(&envelope);
        assert_eq!(
            states,
            vec![
                ("rt@example.org".into(), pipe("rt"), DeliveryState::Pending),
                (
                    "rt@example.org".into(),
                    pipe("rt"),
                    DeliveryState::Superseded
                ),
                (
                    "crm@example.org".into(),
                    pipe("crm"),
                    DeliveryState::Pending
                ),
            ],
            "support still reaches rt"
        );

        let mut envelope = reached_by_two();
        let changes = reexpand(&mut envelope, &aliases_of("rt: |rt\nsupport: rt\n"), epoch);
        assert!(
            changes.is_empty(),
            "sales is gone, but rt still runs for support: {changes:?}"
        );
        assert_eq!(envelope.deliveries[0].state, DeliveryState::Pending);

        let mut envelope = reached_by_two();
        reexpand(&mut envelope, &aliases_of("rt: |rt\n"), epoch);
        assert_eq!(envelope.deliveries[0].state, DeliveryState::Failed);
        assert_eq!(envelope.deliveries[0].status, "5.1.1");
    }

    #[test]
    fn a_program_that_took_the_recipients_mail_is_not_run_again_under_another_alias_name() {
        let mut envelope = accepted(
            "rt: |rt\nother: |other\nhelpdesk: rt, other\n",
            &["helpdesk@example.org"],
        );
        envelope.deliveries[0].state = DeliveryState::Delivered;
        let changes = reexpand(
            &mut envelope,
            &aliases_of("support: |rt\nother: |other\nhelpdesk: support, other\n"),
            SystemTime::UNIX_EPOCH,
        );
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(envelope.deliveries.len(), 2);
    }
}
