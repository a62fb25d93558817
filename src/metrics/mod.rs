//! Prometheus metrics: one registry per process, handed to the server and
//! to every tier through the composition's build context.
//!
//! Names follow Prometheus conventions: `strata_` prefix, counters end in
//! `_total`, byte counters in `_bytes_total`, durations are `_seconds`
//! histograms. [`docs/operations.md`](../../docs/operations.md) lists them.
//!
//! Metric handles are cheap clones of shared atomics, so components keep
//! their own (a [`TierMetrics`] per tier) and never touch the registry on a
//! hot path.

mod http;

pub use http::serve_metrics;

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// Labels of per-tier metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    /// The tier's name in the composition.
    pub tier: String,
}

/// Labels of per-tier, per-operation metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierOpLabels {
    /// The tier's name in the composition.
    pub tier: String,
    /// `stat`, `outboard`, `read`, `read_chunk` or `write`.
    pub op: &'static str,
}

/// Labels of per-RPC metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// `Stat`, `Read` or `Put`.
    pub method: &'static str,
    /// The gRPC status code's name (`Ok`, `NotFound`, ...).
    pub code: String,
}

/// Labels of per-method metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    /// `Stat`, `Read` or `Put`.
    pub method: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets: 100 µs to about 100 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 4.0, 11))
}

struct Families {
    registry: Registry,
    tier_hits: Family<TierLabel, Counter>,
    tier_misses: Family<TierLabel, Counter>,
    tier_errors: Family<TierLabel, Counter>,
    tier_verification_failures: Family<TierLabel, Counter>,
    tier_read_bytes: Family<TierLabel, Counter>,
    tier_written_bytes: Family<TierLabel, Counter>,
    tier_fills: Family<TierLabel, Counter>,
    tier_fills_dropped: Family<TierLabel, Counter>,
    tier_evictions: Family<TierLabel, Counter>,
    tier_occupancy: Family<TierLabel, Gauge>,
    tier_breaker_open: Family<TierLabel, Gauge>,
    tier_breaker_trips: Family<TierLabel, Counter>,
    tier_retries: Family<TierLabel, Counter>,
    tier_duration: HistogramFamily<TierOpLabels>,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: HistogramFamily<MethodLabel>,
    rpc_in_flight: Gauge,
    singleflight_joins: Counter,
}

/// The process's metrics. Clones share the registry.
#[derive(Clone)]
pub struct Metrics(Arc<Families>);

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// A fresh registry with every strata metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("strata");
        let f = Families {
            tier_hits: Family::default(),
            tier_misses: Family::default(),
            tier_errors: Family::default(),
            tier_verification_failures: Family::default(),
            tier_read_bytes: Family::default(),
            tier_written_bytes: Family::default(),
            tier_fills: Family::default(),
            tier_fills_dropped: Family::default(),
            tier_evictions: Family::default(),
            tier_occupancy: Family::default(),
            tier_breaker_open: Family::default(),
            tier_breaker_trips: Family::default(),
            tier_retries: Family::default(),
            tier_duration: Family::new_with_constructor(latency_histogram),
            rpc_requests: Family::default(),
            rpc_duration: Family::new_with_constructor(latency_histogram),
            rpc_in_flight: Gauge::default(),
            singleflight_joins: Counter::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "tier_hits",
            "Lookups a tier answered with the blob",
            f.tier_hits.clone(),
        );
        r.register(
            "tier_misses",
            "Lookups a tier answered with absent",
            f.tier_misses.clone(),
        );
        r.register(
            "tier_errors",
            "Tier calls and streams that failed (down, timeout, I/O, bad data)",
            f.tier_errors.clone(),
        );
        r.register(
            "tier_verification_failures",
            "Data from a tier that failed verification against its digest",
            f.tier_verification_failures.clone(),
        );
        r.register_with_unit(
            "tier_read",
            "Bytes read from a tier",
            Unit::Bytes,
            f.tier_read_bytes.clone(),
        );
        r.register_with_unit(
            "tier_written",
            "Bytes written into a tier",
            Unit::Bytes,
            f.tier_written_bytes.clone(),
        );
        r.register(
            "tier_fills",
            "Blobs written into a tier by a fill",
            f.tier_fills.clone(),
        );
        r.register(
            "tier_fills_dropped",
            "Async fills into a tier dropped because the queue was full",
            f.tier_fills_dropped.clone(),
        );
        r.register(
            "tier_evictions",
            "Entries a cache tier evicted to stay within its size",
            f.tier_evictions.clone(),
        );
        r.register_with_unit(
            "tier_occupancy",
            "Bytes a cache tier holds",
            Unit::Bytes,
            f.tier_occupancy.clone(),
        );
        r.register(
            "tier_breaker_open",
            "1 while a tier's circuit breaker is open (the tier is skipped)",
            f.tier_breaker_open.clone(),
        );
        r.register(
            "tier_breaker_trips",
            "Times a tier's circuit breaker opened",
            f.tier_breaker_trips.clone(),
        );
        r.register(
            "tier_retries",
            "Calls to a peer repeated after its connection failed",
            f.tier_retries.clone(),
        );
        r.register_with_unit(
            "tier_request_duration",
            "Duration of tier calls (for reads and writes: until the stream is open)",
            Unit::Seconds,
            f.tier_duration.clone(),
        );
        r.register(
            "rpc_requests",
            "gRPC requests served, by method and status code",
            f.rpc_requests.clone(),
        );
        r.register_with_unit(
            "rpc_duration",
            "Duration of gRPC requests, to the last byte of the answer",
            Unit::Seconds,
            f.rpc_duration.clone(),
        );
        r.register(
            "rpc_in_flight",
            "gRPC requests being served",
            f.rpc_in_flight.clone(),
        );
        r.register(
            "singleflight_joins",
            "Reads that joined a fetch of the same blob already in flight",
            f.singleflight_joins.clone(),
        );
        Metrics(Arc::new(Families { registry, ..f }))
    }

    /// The handles for the tier called `name`.
    pub fn tier(&self, name: &str) -> TierMetrics {
        let label = TierLabel {
            tier: name.to_owned(),
        };
        let f = &self.0;
        let op = |op: &'static str| {
            f.tier_duration
                .get_or_create(&TierOpLabels {
                    tier: name.to_owned(),
                    op,
                })
                .clone()
        };
        TierMetrics {
            hits: f.tier_hits.get_or_create(&label).clone(),
            misses: f.tier_misses.get_or_create(&label).clone(),
            errors: f.tier_errors.get_or_create(&label).clone(),
            verification_failures: f.tier_verification_failures.get_or_create(&label).clone(),
            read_bytes: f.tier_read_bytes.get_or_create(&label).clone(),
            written_bytes: f.tier_written_bytes.get_or_create(&label).clone(),
            fills: f.tier_fills.get_or_create(&label).clone(),
            fills_dropped: f.tier_fills_dropped.get_or_create(&label).clone(),
            evictions: f.tier_evictions.get_or_create(&label).clone(),
            occupancy_bytes: f.tier_occupancy.get_or_create(&label).clone(),
            breaker_open: f.tier_breaker_open.get_or_create(&label).clone(),
            breaker_trips: f.tier_breaker_trips.get_or_create(&label).clone(),
            retries: f.tier_retries.get_or_create(&label).clone(),
            stat_seconds: op("stat"),
            outboard_seconds: op("outboard"),
            read_seconds: op("read"),
            read_chunk_seconds: op("read_chunk"),
            write_seconds: op("write"),
        }
    }

    /// Counts a finished RPC.
    pub fn rpc_done(&self, method: &'static str, code: tonic::Code, seconds: f64) {
        self.0
            .rpc_requests
            .get_or_create(&RpcLabels {
                method,
                code: format!("{code:?}"),
            })
            .inc();
        self.0
            .rpc_duration
            .get_or_create(&MethodLabel { method })
            .observe(seconds);
    }

    /// The gauge of RPCs in flight.
    pub fn rpc_in_flight(&self) -> &Gauge {
        &self.0.rpc_in_flight
    }

    /// The counter of single-flight joins.
    pub fn singleflight_joins(&self) -> &Counter {
        &self.0.singleflight_joins
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.0.registry);
        out
    }
}

/// One tier's metric handles.
#[derive(Clone, Debug)]
pub struct TierMetrics {
    /// Lookups answered with the blob.
    pub hits: Counter,
    /// Lookups answered "absent".
    pub misses: Counter,
    /// Calls and streams that failed.
    pub errors: Counter,
    /// Data that failed verification.
    pub verification_failures: Counter,
    /// Bytes read from the tier.
    pub read_bytes: Counter,
    /// Bytes written into the tier.
    pub written_bytes: Counter,
    /// Blobs written into the tier by a fill.
    pub fills: Counter,
    /// Async fills dropped because the queue was full.
    pub fills_dropped: Counter,
    /// Entries evicted.
    pub evictions: Counter,
    /// Bytes held.
    pub occupancy_bytes: Gauge,
    /// 1 while the circuit breaker is open.
    pub breaker_open: Gauge,
    /// Times the circuit breaker opened.
    pub breaker_trips: Counter,
    /// Calls repeated after a connection failure.
    pub retries: Counter,
    /// Durations of Stats.
    pub stat_seconds: Histogram,
    /// Durations of outboard lookups.
    pub outboard_seconds: Histogram,
    /// Durations of opening a read.
    pub read_seconds: Histogram,
    /// Durations of chunk reads.
    pub read_chunk_seconds: Histogram,
    /// Durations of opening a write.
    pub write_seconds: Histogram,
}

impl TierMetrics {
    /// Handles registered nowhere, for tiers built outside a composition.
    pub fn detached(name: &str) -> Self {
        Metrics::new().tier(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let m = Metrics::new();
        let t = m.tier("disk");
        t.hits.inc();
        t.read_bytes.inc_by(42);
        t.stat_seconds.observe(0.001);
        m.rpc_done("Stat", tonic::Code::NotFound, 0.002);
        m.singleflight_joins().inc();
        let text = m.encode();
        for line in [
            "strata_tier_hits_total{tier=\"disk\"} 1",
            "strata_tier_read_bytes_total{tier=\"disk\"} 42",
            "strata_tier_request_duration_seconds_count{tier=\"disk\",op=\"stat\"} 1",
            "strata_rpc_requests_total{method=\"Stat\",code=\"NotFound\"} 1",
            "strata_rpc_duration_seconds_count{method=\"Stat\"} 1",
            "strata_singleflight_joins_total 1",
            "strata_tier_occupancy_bytes{tier=\"disk\"} 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
