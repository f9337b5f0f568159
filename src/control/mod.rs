//! The control protocol, shared by the server (ControlServer actor) and
//! `mailnode ctl`: one JSON object per line each way.
//! `{"cmd":"queue.list"}` -> `{"ok":true,"data":...}` or
//! `{"ok":false,"error":"..."}`.

pub(crate) mod queue;

use serde::{Deserialize, Serialize};

/// A request, tagged by `cmd` as the contract spells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", deny_unknown_fields)]
pub enum Request {
    #[serde(rename = "status")]
    Status,
    /// Every queued message in id order; or a page of them: those after
    /// `after`, at most `limit` (the reply then says whether `more` follow).
    #[serde(rename = "queue.list")]
    QueueList {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
    },
    #[serde(rename = "queue.show")]
    QueueShow { id: String },
    #[serde(rename = "queue.flush")]
    QueueFlush {
        #[serde(default)]
        id: Option<String>,
    },
    #[serde(rename = "queue.delete")]
    QueueDelete { id: String },
    #[serde(rename = "queue.hold")]
    QueueHold { id: String },
    #[serde(rename = "queue.release")]
    QueueRelease { id: String },
    #[serde(rename = "queue.bounce")]
    QueueBounce { id: String },
    #[serde(rename = "aliases.reload")]
    AliasesReload,
    #[serde(rename = "aliases.lookup")]
    AliasesLookup { address: String },
    /// Re-read `[tls]` cert and key; the old ones stay on failure.
    #[serde(rename = "tls.reload")]
    TlsReload,
    #[serde(rename = "intake.pause")]
    IntakePause,
    #[serde(rename = "intake.resume")]
    IntakeResume,
}

/// A reply line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A page of `queue.list`: whether more messages follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub more: Option<bool>,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Response {
            ok: true,
            data: Some(data),
            error: None,
            more: None,
        }
    }

    pub fn error(text: impl Into<String>) -> Self {
        Response {
            ok: false,
            data: None,
            error: Some(text.into()),
            more: None,
        }
    }
}

/// One queued message as `queue.list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub id: String,
    /// `active`, `deferred` or `held`.
    pub state: String,
    pub sender: String,
    pub size: u64,
    pub age_seconds: u64,
    /// Seconds until the next attempt (deferred messages).
    pub next_attempt_seconds: Option<u64>,
    pub last_error: String,
    pub recipients: Vec<RecipientEntry>,
}

/// One recipient (delivery) of a queued message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecipientEntry {
    pub address: String,
    pub original: String,
    /// The target as the aliases file writes it: `|command`, a URL,
    /// `@handler` or an address.
    #[serde(default)]
    pub target: String,
    /// `pending`, `delivered`, `failed` or `bounced`.
    pub state: String,
    pub attempts: u32,
    pub last_error: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<AttemptEntry>,
}

/// One attempt, in `queue.show`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptEntry {
    /// RFC 3339.
    pub at: String,
    pub status: String,
    pub diagnostic: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_use_the_contract_spelling() {
        let r: Request = serde_json::from_str(r#"{"cmd":"queue.list"}"#).unwrap();
        assert_eq!(
            r,
            Request::QueueList {
                limit: None,
                after: None
            }
        );
        let r: Request =
            serde_json::from_str(r#"{"cmd":"queue.list","limit":50,"after":"X"}"#).unwrap();
        assert_eq!(
            r,
            Request::QueueList {
                limit: Some(50),
                after: Some("X".into())
            }
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"queue.flush"}"#).unwrap();
        assert_eq!(r, Request::QueueFlush { id: None });
        let r: Request = serde_json::from_str(r#"{"cmd":"queue.show","id":"X"}"#).unwrap();
        assert_eq!(r, Request::QueueShow { id: "X".into() });
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"queue.explode"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Request::IntakePause).unwrap(),
            r#"{"cmd":"intake.pause"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::error("no")).unwrap(),
            r#"{"ok":false,"error":"no"}"#
        );
    }
}
