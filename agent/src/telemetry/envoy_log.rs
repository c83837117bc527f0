//! Per-request lines of the waypoint in Envoy's default access-log format,
//! which Istio uses:
//! `[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
//! %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%
//! %CONNECTION_TERMINATION_DETAILS% "%UPSTREAM_TRANSPORT_FAILURE_REASON%"
//! %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%
//! "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%"
//! "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER%
//! %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS%
//! %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%`
//! Absent values print as `-`, as Envoy does.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use super::{rfc3339_millis, LogAddr, LogFormat};

/// One HTTP request seen by the waypoint.
#[derive(Clone, Debug)]
pub struct RequestLog {
    pub start_time: SystemTime,
    pub method: String,
    /// `x-envoy-original-path` if the request had one, else `:path`.
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`...
    pub protocol: String,
    /// 0 when no response was sent (Envoy prints 0 too).
    pub response_code: u16,
    /// Envoy response flags (`UF`, `URX`, `RBAC`...), `None` → `-`.
    pub response_flags: Option<String>,
    /// `via_upstream`, or for a denial the deciding policy, see
    /// [`RequestLog::rbac_denied_details`].
    pub response_code_details: Option<String>,
    pub connection_termination_details: Option<String>,
    pub upstream_transport_failure_reason: Option<String>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    pub upstream_service_time: Option<Duration>,
    pub x_forwarded_for: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub authority: Option<String>,
    pub upstream_host: Option<SocketAddr>,
    /// e.g. `inbound-vip|80|http|httpbin.org`.
    pub upstream_cluster: Option<String>,
    pub upstream_local_address: Option<SocketAddr>,
    pub downstream_local_address: Option<SocketAddr>,
    pub downstream_remote_address: Option<SocketAddr>,
    pub requested_server_name: Option<String>,
    pub route_name: Option<String>,
    /// The dry-run policies' would-be decision (`shadow allowed: ...`),
    /// appended as `shadow="..."` only when one applied (Envoy puts it in
    /// the RBAC filter's dynamic metadata).
    pub shadow: Option<String>,
}

fn dash(v: Option<&str>) -> &str {
    match v {
        Some(s) if !s.is_empty() => s,
        _ => "-",
    }
}

/// Envoy replaces whitespace in `%RESPONSE_CODE_DETAILS%` and
/// `%CONNECTION_TERMINATION_DETAILS%` with `_` so the line stays splittable.
fn no_spaces(v: Option<&str>) -> String {
    dash(v)
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect()
}

fn addr(a: &Option<SocketAddr>) -> String {
    a.map(|a| LogAddr(a).to_string())
        .unwrap_or_else(|| "-".to_string())
}

impl RequestLog {
    /// An entry with every optional field absent.
    pub fn new(
        method: impl Into<String>,
        path: impl Into<String>,
        protocol: impl Into<String>,
    ) -> Self {
        RequestLog {
            start_time: SystemTime::now(),
            method: method.into(),
            path: path.into(),
            protocol: protocol.into(),
            response_code: 0,
            response_flags: None,
            response_code_details: None,
            connection_termination_details: None,
            upstream_transport_failure_reason: None,
            bytes_received: 0,
            bytes_sent: 0,
            duration: Duration::ZERO,
            upstream_service_time: None,
            x_forwarded_for: None,
            user_agent: None,
            request_id: None,
            authority: None,
            upstream_host: None,
            upstream_cluster: None,
            upstream_local_address: None,
            downstream_local_address: None,
            downstream_remote_address: None,
            requested_server_name: None,
            route_name: None,
            shadow: None,
        }
    }

    /// Envoy's RBAC details for a denial by a named policy, with Istio's
    /// policy naming: `rbac_access_denied_matched_policy[ns[NS]-policy[NAME]-rule[N]]`.
    /// `None` means no ALLOW policy matched: `rbac_access_denied_matched_policy[none]`.
    pub fn rbac_denied_details(policy: Option<(&str, &str, usize)>) -> String {
        match policy {
            Some((ns, name, rule)) => {
                format!("rbac_access_denied_matched_policy[ns[{ns}]-policy[{name}]-rule[{rule}]]")
            }
            None => "rbac_access_denied_matched_policy[none]".to_string(),
        }
    }

    /// The Envoy/Istio default text line, without a trailing newline.
    pub fn format_text(&self) -> String {
        let mut out = String::with_capacity(512);
        let ms = |d: Duration| d.as_millis();
        let _ = write!(
            out,
            "[{}] \"{} {} {}\" {} {} {} {} \"{}\" {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" \"{}\" {} {} {} {} {} {}",
            rfc3339_millis(self.start_time),
            self.method,
            self.path,
            self.protocol,
            self.response_code,
            dash(self.response_flags.as_deref()),
            no_spaces(self.response_code_details.as_deref()),
            no_spaces(self.connection_termination_details.as_deref()),
            dash(self.upstream_transport_failure_reason.as_deref()),
            self.bytes_received,
            self.bytes_sent,
            ms(self.duration),
            self.upstream_service_time.map(|d| ms(d).to_string()).unwrap_or_else(|| "-".into()),
            dash(self.x_forwarded_for.as_deref()),
            dash(self.user_agent.as_deref()),
            dash(self.request_id.as_deref()),
            dash(self.authority.as_deref()),
            addr(&self.upstream_host),
            dash(self.upstream_cluster.as_deref()),
            addr(&self.upstream_local_address),
            addr(&self.downstream_local_address),
            addr(&self.downstream_remote_address),
            dash(self.requested_server_name.as_deref()),
            dash(self.route_name.as_deref()),
        );
        if let Some(s) = &self.shadow {
            let _ = write!(out, " shadow={s:?}");
        }
        out
    }

    /// Istio's JSON access-log form (`--log-format json`); absent → null.
    pub fn format_json(&self) -> String {
        let o = |v: &Option<String>| v.clone().map(serde_json::Value::String).unwrap_or_default();
        let a = |v: &Option<SocketAddr>| {
            v.map(|a| serde_json::Value::String(LogAddr(a).to_string()))
                .unwrap_or_default()
        };
        // serde_json keeps insertion order only with `preserve_order`, so the
        // object is assembled field by field in Envoy's order.
        let fields: [(&str, serde_json::Value); 24] = [
            ("start_time", rfc3339_millis(self.start_time).into()),
            ("method", self.method.clone().into()),
            ("path", self.path.clone().into()),
            ("protocol", self.protocol.clone().into()),
            ("response_code", self.response_code.into()),
            ("response_flags", o(&self.response_flags)),
            ("response_code_details", o(&self.response_code_details)),
            (
                "connection_termination_details",
                o(&self.connection_termination_details),
            ),
            (
                "upstream_transport_failure_reason",
                o(&self.upstream_transport_failure_reason),
            ),
            ("bytes_received", self.bytes_received.into()),
            ("bytes_sent", self.bytes_sent.into()),
            ("duration", (self.duration.as_millis() as u64).into()),
            (
                "upstream_service_time",
                self.upstream_service_time
                    .map(|d| serde_json::Value::from(d.as_millis() as u64))
                    .unwrap_or_default(),
            ),
            ("x_forwarded_for", o(&self.x_forwarded_for)),
            ("user_agent", o(&self.user_agent)),
            ("request_id", o(&self.request_id)),
            ("authority", o(&self.authority)),
            ("upstream_host", a(&self.upstream_host)),
            ("upstream_cluster", o(&self.upstream_cluster)),
            ("upstream_local_address", a(&self.upstream_local_address)),
            (
                "downstream_local_address",
                a(&self.downstream_local_address),
            ),
            (
                "downstream_remote_address",
                a(&self.downstream_remote_address),
            ),
            ("requested_server_name", o(&self.requested_server_name)),
            ("route_name", o(&self.route_name)),
        ];
        let mut out = String::with_capacity(768);
        for (k, v) in fields {
            out.push(if out.is_empty() { '{' } else { ',' });
            let _ = write!(out, "{}:{}", serde_json::Value::from(k), v);
        }
        if let Some(s) = &self.shadow {
            let _ = write!(out, ",\"shadow\":{}", serde_json::Value::from(s.as_str()));
        }
        out.push('}');
        out
    }

    pub fn format(&self, format: LogFormat) -> String {
        match format {
            LogFormat::Text => self.format_text(),
            LogFormat::Json => self.format_json(),
        }
    }
}
