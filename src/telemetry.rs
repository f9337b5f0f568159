//! Telemetry: every metric of the contract by name, registered with its help
//! text and all its label values (so a dashboard has a series from the first
//! scrape), and the Prometheus text rendering the metrics service serves.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const SMTP_CONNECTIONS_TOTAL: &str = "mailnode_smtp_connections_total";
pub const SMTP_SESSIONS_ACTIVE: &str = "mailnode_smtp_sessions_active";
pub const SMTP_SESSIONS_CLOSED_TOTAL: &str = "mailnode_smtp_sessions_closed_total";
pub const SMTP_MESSAGES_TOTAL: &str = "mailnode_smtp_messages_total";
pub const SMTP_RECIPIENTS_TOTAL: &str = "mailnode_smtp_recipients_total";
pub const QUEUE_MESSAGES: &str = "mailnode_queue_messages";
pub const DELIVERIES_TOTAL: &str = "mailnode_deliveries_total";
pub const DELIVERY_DURATION_SECONDS: &str = "mailnode_delivery_duration_seconds";
pub const DELIVERIES_BY_TARGET_TOTAL: &str = "mailnode_deliveries_by_target_total";
pub const HTTP_RESPONSES_TOTAL: &str = "mailnode_http_responses_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "mailnode_http_request_duration_seconds";
pub const RATELIMIT_REJECTIONS_TOTAL: &str = "mailnode_ratelimit_rejections_total";
pub const ACTOR_RESTARTS_TOTAL: &str = "mailnode_actor_restarts_total";
pub const BUILD_INFO: &str = "mailnode_build_info";
pub const QUEUE_OLDEST_AGE_SECONDS: &str = "mailnode_queue_oldest_age_seconds";
pub const QUEUE_MAX_AGE_SECONDS: &str = "mailnode_queue_max_age_seconds";
pub const INTAKE_PAUSED: &str = "mailnode_intake_paused";
pub const PROXY_HEADERS_TOTAL: &str = "mailnode_proxy_headers_total";
pub const INTAKE_BACKPRESSURE_TOTAL: &str = "mailnode_intake_backpressure_total";
pub const TLS_HANDSHAKES_TOTAL: &str = "mailnode_tls_handshakes_total";
pub const AUTH_RESULTS_TOTAL: &str = "mailnode_auth_results_total";
pub const TLS_CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS: &str =
    "mailnode_tls_certificate_expiry_timestamp_seconds";

/// Label values, as the contract lists them.
pub const TARGET_KINDS: [&str; 4] = ["program", "http", "handler", "forward"];
pub const HTTP_RESPONSE_CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "failed"];
pub const CONNECTION_OUTCOMES: [&str; 4] = ["accepted", "denied", "rate_limited", "over_capacity"];
pub const CLOSE_REASONS: [&str; 6] = [
    "quit",
    "connect_limit",
    "timeout",
    "error",
    "shutdown",
    "peer",
];
pub const MESSAGE_OUTCOMES: [&str; 3] = ["accepted", "rejected", "tempfailed"];
pub const RECIPIENT_OUTCOMES: [&str; 2] = ["accepted", "rejected"];
pub const QUEUE_STATES: [&str; 3] = ["active", "deferred", "held"];
pub const DELIVERY_OUTCOMES: [&str; 3] = ["delivered", "deferred", "bounced"];
pub const RATE_LIMITS: [&str; 2] = ["connection", "message"];
pub const PROXY_HEADER_RESULTS: [&str; 3] = ["ok", "invalid", "missing"];
pub const BACKPRESSURE_OUTCOMES: [&str; 2] = ["waited", "refused"];
pub const TLS_HANDSHAKE_RESULTS: [&str; 2] = ["ok", "failed"];
pub const AUTH_METHODS: [&str; 3] = ["spf", "dkim", "dmarc"];
pub const AUTH_RESULTS: [&str; 7] = [
    "pass",
    "fail",
    "softfail",
    "neutral",
    "none",
    "temperror",
    "permerror",
];
pub const ACTORS: [&str; 6] = [
    "acceptor",
    "alias_resolver",
    "queue_runner",
    "delivery_worker",
    "metrics_server",
    "control_server",
];

/// From a millisecond to ten minutes (the default program timeout).
const DURATION_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
/// CPU, memory and descriptors of this process (process_* metrics).
static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();

/// Installs the process-wide recorder once (every node in the process
/// shares it) and registers every metric of the contract.
pub fn install() {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(DELIVERY_DURATION_SECONDS.to_string()),
                &DURATION_BUCKETS,
            )
            .ok()?
            .set_buckets_for_metric(
                Matcher::Full(HTTP_REQUEST_DURATION_SECONDS.to_string()),
                &DURATION_BUCKETS,
            )
            .ok()?;
        let handle = match builder.install_recorder() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("metrics recorder not installed: {e}");
                return None;
            }
        };
        register();
        PROCESS
            .get_or_init(metrics_process::Collector::default)
            .describe();
        Some(handle)
    });
}

fn register() {
    describe_counter!(
        SMTP_CONNECTIONS_TOTAL,
        "SMTP connections by how they were received."
    );
    describe_gauge!(SMTP_SESSIONS_ACTIVE, "SMTP sessions open now.");
    describe_counter!(
        SMTP_SESSIONS_CLOSED_TOTAL,
        "SMTP sessions ended, by reason."
    );
    describe_counter!(
        SMTP_MESSAGES_TOTAL,
        "Messages at the end of DATA, by outcome."
    );
    describe_counter!(SMTP_RECIPIENTS_TOTAL, "RCPT commands, by outcome.");
    describe_gauge!(QUEUE_MESSAGES, "Messages in the queue, by state.");
    describe_counter!(DELIVERIES_TOTAL, "Delivery attempts, by outcome.");
    describe_counter!(
        DELIVERIES_BY_TARGET_TOTAL,
        "Delivery attempts, by the target's kind and outcome."
    );
    describe_counter!(
        HTTP_RESPONSES_TOTAL,
        "POSTs to HTTP targets, by the response's status class (failed: no response)."
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        "Seconds a POST to an HTTP target took, to the start of the response."
    );
    describe_histogram!(
        DELIVERY_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "How long one delivery attempt took."
    );
    describe_counter!(
        RATELIMIT_REJECTIONS_TOTAL,
        "Clients refused by a rate limit."
    );
    describe_counter!(ACTOR_RESTARTS_TOTAL, "Actors the supervisor restarted.");
    describe_gauge!(BUILD_INFO, "Always 1; the version is a label.");
    describe_gauge!(
        QUEUE_OLDEST_AGE_SECONDS,
        metrics::Unit::Seconds,
        "Age of the oldest message not yet done (held messages excluded)."
    );
    describe_gauge!(
        QUEUE_MAX_AGE_SECONDS,
        metrics::Unit::Seconds,
        "[queue] max_age: messages older than this are returned to their sender."
    );
    describe_gauge!(INTAKE_PAUSED, "1 while intake is paused by the operator.");
    describe_counter!(
        INTAKE_BACKPRESSURE_TOTAL,
        "MAIL commands that waited for a spool behind its disk, by outcome."
    );
    describe_counter!(
        PROXY_HEADERS_TOTAL,
        "PROXY protocol headers from proxy_protocol_from peers, by result."
    );
    describe_counter!(
        TLS_HANDSHAKES_TOTAL,
        "TLS handshakes (STARTTLS and implicit TLS), by result."
    );
    describe_gauge!(
        TLS_CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS,
        metrics::Unit::Seconds,
        "When the certificate in force stops being valid (notAfter), as a Unix time."
    );
    gauge!(QUEUE_OLDEST_AGE_SECONDS).set(0.0);
    gauge!(INTAKE_PAUSED).set(0.0);
    for o in CONNECTION_OUTCOMES {
        counter!(SMTP_CONNECTIONS_TOTAL, "outcome" => o).increment(0);
    }
    for r in CLOSE_REASONS {
        counter!(SMTP_SESSIONS_CLOSED_TOTAL, "reason" => r).increment(0);
    }
    for o in MESSAGE_OUTCOMES {
        counter!(SMTP_MESSAGES_TOTAL, "outcome" => o).increment(0);
    }
    for o in RECIPIENT_OUTCOMES {
        counter!(SMTP_RECIPIENTS_TOTAL, "outcome" => o).increment(0);
    }
    for s in QUEUE_STATES {
        gauge!(QUEUE_MESSAGES, "state" => s).set(0.0);
    }
    for o in DELIVERY_OUTCOMES {
        counter!(DELIVERIES_TOTAL, "outcome" => o).increment(0);
    }
    for k in TARGET_KINDS {
        for o in DELIVERY_OUTCOMES {
            counter!(DELIVERIES_BY_TARGET_TOTAL, "kind" => k, "outcome" => o).increment(0);
        }
    }
    for c in HTTP_RESPONSE_CLASSES {
        counter!(HTTP_RESPONSES_TOTAL, "class" => c).increment(0);
    }
    for l in RATE_LIMITS {
        counter!(RATELIMIT_REJECTIONS_TOTAL, "limit" => l).increment(0);
    }
    for o in BACKPRESSURE_OUTCOMES {
        counter!(INTAKE_BACKPRESSURE_TOTAL, "outcome" => o).increment(0);
    }
    describe_counter!(
        AUTH_RESULTS_TOTAL,
        "Sender authentication verdicts on messages, by method and result."
    );
    for m in AUTH_METHODS {
        for r in AUTH_RESULTS {
            counter!(AUTH_RESULTS_TOTAL, "method" => m, "result" => r).increment(0);
        }
    }
    for r in TLS_HANDSHAKE_RESULTS {
        counter!(TLS_HANDSHAKES_TOTAL, "result" => r).increment(0);
    }
    for r in PROXY_HEADER_RESULTS {
        counter!(PROXY_HEADERS_TOTAL, "result" => r).increment(0);
    }
    for a in ACTORS {
        counter!(ACTOR_RESTARTS_TOTAL, "actor" => a).increment(0);
    }
    gauge!(SMTP_SESSIONS_ACTIVE).set(0.0);
    gauge!(BUILD_INFO, "version" => crate::VERSION).set(1.0);
}

/// The Prometheus text exposition of every metric; `None` when another
/// recorder owns the process.
pub fn render() -> Option<String> {
    let handle = HANDLE.get()?.as_ref()?;
    if let Some(process) = PROCESS.get() {
        process.collect();
    }
    handle.run_upkeep();
    Some(handle.render())
}

pub fn connection(outcome: &'static str) {
    counter!(SMTP_CONNECTIONS_TOTAL, "outcome" => outcome).increment(1);
}

pub fn session_opened() {
    gauge!(SMTP_SESSIONS_ACTIVE).increment(1.0);
}

pub fn session_closed(reason: &'static str) {
    gauge!(SMTP_SESSIONS_ACTIVE).decrement(1.0);
    counter!(SMTP_SESSIONS_CLOSED_TOTAL, "reason" => reason).increment(1);
}

/// The outcome of a message or recipient from its reply code.
pub fn message(code: u16) {
    let outcome = match code {
        200..=399 => "accepted",
        400..=499 => "tempfailed",
        _ => "rejected",
    };
    counter!(SMTP_MESSAGES_TOTAL, "outcome" => outcome).increment(1);
}

pub fn recipient(code: u16) {
    let outcome = if code < 400 { "accepted" } else { "rejected" };
    counter!(SMTP_RECIPIENTS_TOTAL, "outcome" => outcome).increment(1);
}

pub fn queue_oldest(age: Duration) {
    gauge!(QUEUE_OLDEST_AGE_SECONDS).set(age.as_secs_f64());
}

pub fn queue_max_age(max_age: Duration) {
    gauge!(QUEUE_MAX_AGE_SECONDS).set(max_age.as_secs_f64());
}

pub fn intake_paused(paused: bool) {
    gauge!(INTAKE_PAUSED).set(if paused { 1.0 } else { 0.0 });
}

pub fn queue_sizes(active: usize, deferred: usize, held: usize) {
    gauge!(QUEUE_MESSAGES, "state" => "active").set(active as f64);
    gauge!(QUEUE_MESSAGES, "state" => "deferred").set(deferred as f64);
    gauge!(QUEUE_MESSAGES, "state" => "held").set(held as f64);
}

pub fn delivery(outcome: &'static str, took: Duration) {
    counter!(DELIVERIES_TOTAL, "outcome" => outcome).increment(1);
    histogram!(DELIVERY_DURATION_SECONDS).record(took.as_secs_f64());
}

/// `kind`: program, http, handler or forward.
pub fn delivery_by_target(kind: &'static str, outcome: &'static str) {
    counter!(DELIVERIES_BY_TARGET_TOTAL, "kind" => kind, "outcome" => outcome).increment(1);
}

/// One POST to an HTTP target: `class` is 2xx to 5xx, or failed when no
/// response came (no connection, TLS, timeout).
pub fn http_response(class: &'static str, took: Duration) {
    counter!(HTTP_RESPONSES_TOTAL, "class" => class).increment(1);
    histogram!(HTTP_REQUEST_DURATION_SECONDS).record(took.as_secs_f64());
}

pub fn rate_limited(limit: &'static str) {
    counter!(RATELIMIT_REJECTIONS_TOTAL, "limit" => limit).increment(1);
}

pub fn intake_backpressure(outcome: &'static str) {
    counter!(INTAKE_BACKPRESSURE_TOTAL, "outcome" => outcome).increment(1);
}

pub fn proxy_header(result: &'static str) {
    counter!(PROXY_HEADERS_TOTAL, "result" => result).increment(1);
}

pub fn actor_restarted(actor: &'static str) {
    counter!(ACTOR_RESTARTS_TOTAL, "actor" => actor).increment(1);
}

pub fn tls_handshake(result: &'static str) {
    counter!(TLS_HANDSHAKES_TOTAL, "result" => result).increment(1);
}

/// The certificate in force; absent until TLS is configured.
pub fn tls_certificate_expiry(not_after: std::time::SystemTime) {
    let seconds = not_after
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    gauge!(TLS_CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS).set(seconds);
}

pub fn auth_result(method: &'static str, result: &'static str) {
    counter!(AUTH_RESULTS_TOTAL, "method" => method, "result" => result).increment(1);
}
