//! Prometheus metrics: one registry shared by every component (agent,
//! waypoint, DNS proxy, kernel counters), encoded at scrape time by `admin`.
//!
//! Label sets are resolved once per connection ([`Metrics::connection`]):
//! the returned [`ConnectionRecorder`] holds the counters themselves, so
//! counting bytes on the data path is one atomic add, never a map lookup.

use std::sync::{Arc, LazyLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Istio's default request-duration buckets (milliseconds).
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Who reports the metric, as in Istio's `reporter` label.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The client side (the node agent for outbound connections).
    #[default]
    Source,
    /// The server side (the waypoint).
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Labels of the `istio_tcp_*` metrics (names from reference.md). Empty
/// strings are exported as `unknown`, as Istio does. The values are shared
/// ([`super::intern`]): a connection's recorder holds them without copies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnectionLabels {
    pub reporter: Reporter,
    pub source_workload: Arc<str>,
    pub source_workload_namespace: Arc<str>,
    pub source_principal: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_workload_namespace: Arc<str>,
    pub destination_principal: Arc<str>,
    /// `tcp` for connections, `http`/`http2` for requests.
    pub request_protocol: Arc<str>,
    /// Envoy-style response flags, `-` when none.
    pub response_flags: String,
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() {
        "unknown"
    } else {
        s
    }
}

impl EncodeLabelSet for ConnectionLabels {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), std::fmt::Error> {
        let flags = if self.response_flags.is_empty() {
            "-"
        } else {
            &self.response_flags
        };
        [
            ("reporter", self.reporter.as_str()),
            ("source_workload", or_unknown(&self.source_workload)),
            (
                "source_workload_namespace",
                or_unknown(&self.source_workload_namespace),
            ),
            ("source_principal", or_unknown(&self.source_principal)),
            ("destination_service", or_unknown(&self.destination_service)),
            (
                "destination_workload",
                or_unknown(&self.destination_workload),
            ),
            (
                "destination_workload_namespace",
                or_unknown(&self.destination_workload_namespace),
            ),
            (
                "destination_principal",
                or_unknown(&self.destination_principal),
            ),
            ("request_protocol", or_unknown(&self.request_protocol)),
            ("response_flags", flags),
        ]
        .encode(encoder)
    }
}

/// Labels of `istio_requests_total` and `istio_request_duration_milliseconds`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    pub connection: ConnectionLabels,
    pub response_code: u16,
}

impl EncodeLabelSet for RequestLabels {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), std::fmt::Error> {
        self.connection.encode(encoder)?;
        let code = self.response_code.to_string();
        [("response_code", code.as_str())].encode(encoder)
    }
}

/// Labels of `shunt_authz_shadow_decisions_total`: one dry-run decision, by
/// shadow engine (`istio_dry_run_allow` / `istio_dry_run_deny`, Istio's
/// shadow rule stat prefixes), result and deciding policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ShadowLabels {
    pub engine: &'static str,
    /// `allowed` or `denied`.
    pub result: &'static str,
    /// `namespace/name`, empty when no single policy decided.
    pub policy: String,
}

impl EncodeLabelSet for ShadowLabels {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), std::fmt::Error> {
        [
            ("shadow_engine", self.engine),
            ("shadow_result", self.result),
            ("policy", or_unknown(&self.policy)),
        ]
        .encode(encoder)
    }
}

/// Labels of the listener counters: which server, and why.
#[derive(Clone, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
    reason: &'static str,
}

/// `shunt_accept_errors_total`. Process-wide (like the listeners' accept
/// loops, which hold no registry) and registered by every [`Metrics`].
static ACCEPT_ERRORS: LazyLock<Family<ListenerLabels, Counter>> = LazyLock::new(Family::default);
/// `shunt_refused_connections_total`: connections closed at accept because
/// a budget (per source, handshakes, DNS TCP connections) was spent.
static REFUSED: LazyLock<Family<ListenerLabels, Counter>> = LazyLock::new(Family::default);

/// Counts one failed `accept` on `listener` (`reason`: `emfile`, ...).
pub fn count_accept_error(listener: &'static str, reason: &'static str) {
    ACCEPT_ERRORS
        .get_or_create(&ListenerLabels { listener, reason })
        .inc();
}

/// Counts one connection closed at accept because a budget was spent.
pub fn count_refused_connection(listener: &'static str, reason: &'static str) {
    REFUSED
        .get_or_create(&ListenerLabels { listener, reason })
        .inc();
}

/// Counters of the DNS proxy. Cloning shares the counters.
#[derive(Clone, Debug, Default)]
pub struct DnsMetrics {
    /// Every query received (UDP and TCP).
    pub requests: Counter,
    /// Every query sent to an upstream resolver (each attempt).
    pub upstream_requests: Counter,
    /// Upstream attempts that timed out, failed or answered garbage.
    pub upstream_failures: Counter,
    /// Queries dropped unanswered because a forwarding budget was spent.
    pub dropped: Family<DnsDropLabels, Counter>,
    /// Queries answered REFUSED: the source is neither an enrolled workload
    /// nor the node.
    pub refused: Counter,
}

/// Labels of `shunt_dns_dropped_total`: the budget that was spent and the
/// client. Only served clients (enrolled workloads, the node) are ever
/// dropped, so the client label is bounded by the model.
#[derive(Clone, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct DnsDropLabels {
    pub reason: &'static str,
    pub client: String,
}

/// A counter read at scrape time, e.g. a kernel per-CPU map summed by the lead.
type CounterFn = Arc<dyn Fn() -> u64 + Send + Sync>;

struct CallbackCounter {
    name: String,
    help: String,
    read: CounterFn,
}

impl std::fmt::Debug for CallbackCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackCounter")
            .field("name", &self.name)
            .finish()
    }
}

/// A gauge read at scrape time (e.g. the config source's health).
struct CallbackGauge {
    name: String,
    help: String,
    read: Arc<dyn Fn() -> i64 + Send + Sync>,
}

impl std::fmt::Debug for CallbackGauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackGauge")
            .field("name", &self.name)
            .finish()
    }
}

impl Collector for CallbackGauge {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new((self.read)());
        let metric =
            encoder.encode_descriptor(&self.name, &self.help, None, gauge.metric_type())?;
        gauge.encode(metric)
    }
}

impl Collector for CallbackCounter {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new((self.read)());
        let metric =
            encoder.encode_descriptor(&self.name, &self.help, None, counter.metric_type())?;
        counter.encode(metric)
    }
}

/// Builds the registry; components register extra metrics before `build`.
pub struct MetricsBuilder {
    registry: Registry,
    tcp: TcpFamilies,
    requests: RequestFamilies,
    dns: DnsMetrics,
    shadow: Family<ShadowLabels, Counter>,
    forwarded_rejected: Counter,
}

impl MetricsBuilder {
    /// The registry, for a component that owns metrics of its own.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Registers a counter whose value is read by `read` at each scrape
    /// (kernel counters: steered/dropped/refused summed over CPUs). `name`
    /// is given without `_total`, which the encoder appends.
    pub fn register_counter_fn(
        &mut self,
        name: impl Into<String>,
        help: impl Into<String>,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.registry.register_collector(Box::new(CallbackCounter {
            name: name.into(),
            help: help.into(),
            read: Arc::new(read),
        }));
    }

    /// Registers a gauge whose value is read by `read` at each scrape.
    pub fn register_gauge_fn(
        &mut self,
        name: impl Into<String>,
        help: impl Into<String>,
        read: impl Fn() -> i64 + Send + Sync + 'static,
    ) {
        self.registry.register_collector(Box::new(CallbackGauge {
            name: name.into(),
            help: help.into(),
            read: Arc::new(read),
        }));
    }

    pub fn build(self) -> Arc<Metrics> {
        Arc::new(Metrics {
            registry: self.registry,
            tcp: self.tcp,
            requests: self.requests,
            dns: self.dns,
            shadow: self.shadow,
            forwarded_rejected: self.forwarded_rejected,
        })
    }
}

#[derive(Clone)]
struct TcpFamilies {
    opened: Family<ConnectionLabels, Counter>,
    closed: Family<ConnectionLabels, Counter>,
    sent: Family<ConnectionLabels, Counter>,
    received: Family<ConnectionLabels, Counter>,
    failed: Family<ConnectionLabels, Counter>,
}

#[derive(Clone)]
struct RequestFamilies {
    total: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
}

/// The process-wide metrics. Built once, shared as `Arc<Metrics>`.
pub struct Metrics {
    registry: Registry,
    tcp: TcpFamilies,
    requests: RequestFamilies,
    dns: DnsMetrics,
    shadow: Family<ShadowLabels, Counter>,
    forwarded_rejected: Counter,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A builder with the `istio_*` metrics already registered.
    #[allow(clippy::new_ret_no_self)]
    pub fn builder() -> MetricsBuilder {
        let mut registry = Registry::default();
        let tcp = TcpFamilies {
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            failed: Family::default(),
        };
        registry.register(
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            tcp.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            tcp.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            tcp.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            tcp.received.clone(),
        );
        registry.register(
            "istio_tcp_connections_failed",
            "The total number of TCP connections that failed",
            tcp.failed.clone(),
        );
        let requests = RequestFamilies {
            total: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
        };
        registry.register(
            "istio_requests",
            "The total number of requests",
            requests.total.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Duration of requests in milliseconds",
            requests.duration.clone(),
        );
        let dns = DnsMetrics::default();
        registry.register(
            "istio_dns_requests",
            "Total number of DNS requests",
            dns.requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_requests",
            "Total number of DNS requests forwarded to upstream resolvers",
            dns.upstream_requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_failures",
            "Total number of failed upstream DNS requests",
            dns.upstream_failures.clone(),
        );
        registry.register(
            "shunt_dns_dropped",
            "DNS queries dropped unanswered because a forwarding budget (per client, total) was spent",
            dns.dropped.clone(),
        );
        registry.register(
            "shunt_dns_refused",
            "DNS queries answered REFUSED: the source is neither an enrolled workload nor the node",
            dns.refused.clone(),
        );
        let shadow = Family::default();
        registry.register(
            "shunt_authz_shadow_decisions",
            "Decisions of dry-run (istio.io/dry-run) AuthorizationPolicies, never enforced",
            shadow.clone(),
        );
        registry.register(
            "shunt_accept_errors",
            "Failed accepts per listener and errno (the server keeps serving)",
            ACCEPT_ERRORS.clone(),
        );
        registry.register(
            "shunt_refused_connections",
            "Connections closed at accept, and tunnels answered 503 (listener=\"hbone_tunnel\"), because a budget was spent",
            REFUSED.clone(),
        );
        let forwarded_rejected = Counter::default();
        registry.register(
            "shunt_forwarded_rejected",
            "HBONE tunnels whose Forwarded for= address is not a workload of the client certificate's identity (the peer address was used)",
            forwarded_rejected.clone(),
        );
        MetricsBuilder {
            registry,
            tcp,
            requests,
            dns,
            shadow,
            forwarded_rejected,
        }
    }

    /// The DNS proxy's counters.
    pub fn dns(&self) -> DnsMetrics {
        self.dns.clone()
    }

    /// Opens a connection's recorder: counts `opened` now and resolves the
    /// label set once for the byte counters.
    pub fn connection(&self, labels: ConnectionLabels) -> ConnectionRecorder {
        self.tcp.opened.get_or_create(&labels).inc();
        ConnectionRecorder {
            sent: self.tcp.sent.get_or_create(&labels).clone(),
            received: self.tcp.received.get_or_create(&labels).clone(),
            closed: self.tcp.closed.clone(),
            failed: self.tcp.failed.clone(),
            labels,
        }
    }

    /// Records one HTTP request (waypoint, per request).
    pub fn record_request(&self, labels: &RequestLabels, duration_ms: f64) {
        self.requests.total.get_or_create(labels).inc();
        self.requests
            .duration
            .get_or_create(labels)
            .observe(duration_ms);
    }

    /// Counts one dry-run decision (waypoint, per request or connection).
    pub fn record_shadow(&self, labels: &ShadowLabels) {
        self.shadow.get_or_create(labels).inc();
    }

    /// Counts one refused `Forwarded: for=` claim (waypoint, per tunnel).
    pub fn record_forwarded_rejected(&self) {
        self.forwarded_rejected.inc();
    }

    /// Prometheus/OpenMetrics text of every registered metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Per-connection handle: byte counters with their labels already resolved.
pub struct ConnectionRecorder {
    sent: Counter,
    received: Counter,
    closed: Family<ConnectionLabels, Counter>,
    failed: Family<ConnectionLabels, Counter>,
    labels: ConnectionLabels,
}

impl ConnectionRecorder {
    #[inline]
    pub fn sent(&self, bytes: u64) {
        self.sent.inc_by(bytes);
    }

    #[inline]
    pub fn received(&self, bytes: u64) {
        self.received.inc_by(bytes);
    }

    /// At close: counts `closed`, and `failed` when the connection failed.
    /// `response_flags` (e.g. `UF` for an upstream connect failure) replaces
    /// the label's flags for these two counters.
    pub fn close(mut self, failed: bool, response_flags: Option<&str>) {
        if let Some(flags) = response_flags {
            self.labels.response_flags = flags.to_string();
        }
        self.closed.get_or_create(&self.labels).inc();
        if failed {
            self.failed.get_or_create(&self.labels).inc();
        }
    }

    pub fn labels(&self) -> &ConnectionLabels {
        &self.labels
    }
}
