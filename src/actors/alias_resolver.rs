//! The AliasResolver (≈ Postfix's aliases database): answers "who is this
//! recipient?" for every session from the table in force, and swaps in a
//! new table on reload. A file that fails to load leaves the old table.

use std::path::PathBuf;
use std::sync::Arc;

use actix::prelude::*;

use crate::actors::Shared;
use crate::aliases::{self, AliasTable, ReloadError, Resolution, Target};
use crate::protocol::command::Address;
use crate::protocol::reply;
use crate::protocol::session::{DeliveryTarget, RcptDecision};

/// Look a recipient up.
#[derive(Message)]
#[rtype(result = "RcptDecision")]
pub struct Resolve(pub Address);

/// Re-read the aliases file. Answers the number of aliases now in force, or
/// every problem as `FILE:LINE: message` lines.
#[derive(Message)]
#[rtype(result = "Result<usize, ReloadError>")]
pub struct Reload;

pub struct AliasResolver {
    path: PathBuf,
    /// Shared with the factory, so a restarted resolver keeps the table in
    /// force (a reload may have replaced the one loaded at start).
    table: Shared<Arc<AliasTable>>,
    /// The embedder's handlers, which `@NAME` targets may name.
    handler_names: Vec<String>,
    /// The node's own name: the domain of `<postmaster>` without one.
    hostname: String,
    /// A relay is configured, so address aliases can be forwarded.
    can_forward: bool,
}

impl AliasResolver {
    pub fn new(
        path: PathBuf,
        table: Shared<Arc<AliasTable>>,
        handler_names: Vec<String>,
        hostname: String,
        can_forward: bool,
    ) -> Self {
        AliasResolver {
            path,
            table,
            handler_names,
            hostname,
            can_forward,
        }
    }
}

impl Actor for AliasResolver {
    type Context = Context<Self>;
}

impl Handler<Resolve> for AliasResolver {
    type Result = MessageResult<Resolve>;

    fn handle(&mut self, msg: Resolve, _: &mut Self::Context) -> Self::Result {
        MessageResult(decide(
            &self.table.get(),
            &msg.0,
            &self.hostname,
            self.can_forward,
        ))
    }
}

impl Handler<Reload> for AliasResolver {
    type Result = Result<usize, ReloadError>;

    fn handle(&mut self, _: Reload, _: &mut Self::Context) -> Self::Result {
        match aliases::load_with_handlers(&self.path, &self.handler_names) {
            Ok(loaded) => {
                for warning in &loaded.warnings {
                    tracing::warn!("{warning}");
                }
                let count = loaded.table.len();
                self.table.set(Arc::new(loaded.table));
                tracing::info!(aliases = count, "aliases reloaded");
                Ok(count)
            }
            Err(e) => {
                tracing::error!("aliases not reloaded, old table stays in force: {e}");
                Err(e.into())
            }
        }
    }
}

/// The pure decision: which deliveries a recipient makes, or which reply
/// refuses it. Address aliases (`user@domain` targets) go through the
/// relay; with none they are refused like any other unsupported kind.
pub fn decide(
    table: &AliasTable,
    address: &Address,
    hostname: &str,
    can_forward: bool,
) -> RcptDecision {
    let domain = address.domain.as_deref().unwrap_or(hostname).to_lowercase();
    match table.resolve(&address.local) {
        Resolution::Unknown => RcptDecision::Refuse(reply::UNKNOWN_RECIPIENT),
        Resolution::Unsupported { .. } => RcptDecision::Refuse(reply::UNSUPPORTED_RECIPIENT),
        Resolution::Targets {
            extension, targets, ..
        } => {
            let extension = extension.unwrap_or_default();
            let mut deliveries = Vec::with_capacity(targets.len());
            for expanded in targets {
                if let Target::Forward { address: to } = &expanded.target {
                    if !can_forward {
                        tracing::warn!(
                            alias = %expanded.via_alias,
                            forward = %to,
                            "recipient refused: the alias forwards to another address and no [relay] host is configured"
                        );
                        return RcptDecision::Refuse(reply::FORWARD_WITHOUT_RELAY);
                    }
                }
                let local = expanded.via_alias;
                let recipient = if extension.is_empty() {
                    format!("{local}@{domain}")
                } else {
                    format!("{local}+{extension}@{domain}")
                };
                deliveries.push(DeliveryTarget {
                    recipient,
                    local,
                    extension: extension.clone(),
                    domain: domain.clone(),
                    target: expanded.target,
                });
            }
            RcptDecision::Accept(deliveries)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn table(text: &str) -> AliasTable {
        aliases::parse(text.as_bytes(), Path::new("aliases"))
            .unwrap()
            .table
    }

    fn addr(local: &str, domain: &str) -> Address {
        Address {
            local: local.into(),
            domain: Some(domain.into()),
        }
    }

    #[test]
    fn expansion_names_each_delivery_by_the_alias_that_holds_it() {
        let t = table("support: |rt\nteam: \"|notify\", support\n");
        let RcptDecision::Accept(d) = decide(&t, &addr("Team+Urgent", "Example.ORG"), "mx", false)
        else {
            panic!("refused");
        };
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].recipient, "team+Urgent@example.org");
        assert_eq!(d[0].local, "team");
        assert_eq!(d[0].extension, "Urgent");
        assert_eq!(d[1].recipient, "support+Urgent@example.org");
        assert_eq!(
            d[1].target,
            Target::Pipe {
                command: "rt".into()
            }
        );
    }

    #[test]
    fn unknown_unsupported_and_forward_are_refused_with_550() {
        let t = table("file: /var/mail/x\nops: oncall@partner.example\n");
        for local in ["nobody-here", "file", "ops"] {
            match decide(&t, &addr(local, "example.org"), "mx", false) {
                RcptDecision::Refuse(r) => {
                    assert_eq!(
                        (r.code(), r.enhanced_code()),
                        (550, Some("5.1.1")),
                        "{local}"
                    )
                }
                other => panic!("{local}: {other:?}"),
            }
        }
        // The forward's refusal says what is missing.
        match decide(&t, &addr("ops", "example.org"), "mx", false) {
            RcptDecision::Refuse(r) => assert_eq!(r, reply::FORWARD_WITHOUT_RELAY),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn forwards_are_accepted_when_a_relay_is_configured() {
        let t = table("ops: oncall@partner.example\n");
        let RcptDecision::Accept(d) = decide(&t, &addr("ops", "example.org"), "mx", true) else {
            panic!("refused");
        };
        assert_eq!(
            d[0].target,
            Target::Forward {
                address: "oncall@partner.example".into()
            }
        );
    }

    #[test]
    fn domainless_postmaster_gets_the_node_hostname() {
        let t = table("postmaster: |cat\n");
        let a = Address {
            local: "Postmaster".into(),
            domain: None,
        };
        let RcptDecision::Accept(d) = decide(&t, &a, "mx.example", false) else {
            panic!("refused");
        };
        assert_eq!(d[0].recipient, "postmaster@mx.example");
    }
}
