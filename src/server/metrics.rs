//! Prometheus metrics: requests by outcome, latency and time-to-first-token histograms, tokens.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// All server metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub ttft: HistogramVec,
    pub tokens: IntCounterVec,
    pub queue_depth: IntGauge,
}

const BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "ttarag_requests_total",
                "Chat requests by RAG mode and HTTP status",
            ),
            &["mode", "status"],
        )
        .expect("metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "ttarag_request_duration_seconds",
                "End-to-end request latency",
            )
            .buckets(BUCKETS.to_vec()),
            &["mode"],
        )
        .expect("metric");
        let ttft = HistogramVec::new(
            HistogramOpts::new(
                "ttarag_time_to_first_token_seconds",
                "Time to the first answer text",
            )
            .buckets(BUCKETS.to_vec()),
            &["mode"],
        )
        .expect("metric");
        let tokens = IntCounterVec::new(
            Opts::new(
                "ttarag_tokens_total",
                "Tokens processed, by kind (prompt, completion)",
            ),
            &["kind"],
        )
        .expect("metric");
        let queue_depth =
            IntGauge::new("ttarag_queue_depth", "Requests waiting for a worker").expect("metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(ttft.clone()),
            Box::new(tokens.clone()),
            Box::new(queue_depth.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        Self {
            registry,
            requests,
            latency,
            ttft,
            tokens,
            queue_depth,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
