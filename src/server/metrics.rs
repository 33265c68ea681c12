//! Prometheus metrics: requests by outcome, latency and time-to-first-token histograms, tokens,
//! the A/B arms' (`arm` label) requests, latency, adaptation loss change, fallbacks, feedback,
//! the retrieval gate's decisions and time, and the worker pool's health. A request whose
//! client went away counts under `status="cancelled"`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// All server metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub ttft: HistogramVec,
    pub tokens: IntCounterVec,
    pub queue_depth: IntGauge,
    pub arm_requests: IntCounterVec,
    pub arm_latency: HistogramVec,
    pub arm_loss_delta: HistogramVec,
    pub arm_fallbacks: IntCounterVec,
    pub feedback: IntCounterVec,
    pub gate_decisions: IntCounterVec,
    pub adapt_gate_decisions: IntCounterVec,
    pub gate_seconds: prometheus::Histogram,
    pub workers_alive: IntGauge,
    pub running: IntGauge,
    pub kv_cache_bytes: IntGauge,
    pub adapt_memory_bytes: IntGauge,
    pub in_flight: IntGauge,
    pub worker_panics: IntCounter,
    pub jobs_cancelled: IntCounter,
    pub decode_steps: IntCounter,
    pub step_graphs: IntCounter,
    pub rebound_steps: IntCounter,
    pub replayed_steps: IntCounter,
    /// Serialises [`Metrics::observe_engine`], so two scrapes do not both add the same delta.
    observing: std::sync::Mutex<()>,
}

const BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// `loss_after - loss_before` of an adaptation: negative = it learnt the passages. Useful
/// adaptations land around -2..0; positive values flag harm.
const LOSS_DELTA_BUCKETS: &[f64] = &[
    -2.0, -1.5, -1.0, -0.75, -0.5, -0.25, -0.1, -0.05, 0.0, 0.05, 0.1, 0.25, 0.5,
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
        let arm_requests = IntCounterVec::new(
            Opts::new(
                "ttarag_arm_requests_total",
                "A/B requests by arm and HTTP status",
            ),
            &["arm", "status"],
        )
        .expect("metric");
        let arm_latency = HistogramVec::new(
            HistogramOpts::new(
                "ttarag_arm_request_duration_seconds",
                "End-to-end latency of successful A/B requests",
            )
            .buckets(BUCKETS.to_vec()),
            &["arm"],
        )
        .expect("metric");
        let arm_loss_delta = HistogramVec::new(
            HistogramOpts::new(
                "ttarag_arm_adapt_loss_delta",
                "Adaptation loss_after - loss_before per A/B request",
            )
            .buckets(LOSS_DELTA_BUCKETS.to_vec()),
            &["arm"],
        )
        .expect("metric");
        let arm_fallbacks = IntCounterVec::new(
            Opts::new(
                "ttarag_arm_fallbacks_total",
                "A/B requests whose adaptation was skipped, cut short or discarded, by reason",
            ),
            &["arm", "reason"],
        )
        .expect("metric");
        let feedback = IntCounterVec::new(
            Opts::new(
                "ttarag_feedback_total",
                "Feedback on A/B responses by arm and signal (correct, incorrect, rating)",
            ),
            &["arm", "signal"],
        )
        .expect("metric");
        let gate_decisions = IntCounterVec::new(
            Opts::new(
                "ttarag_gate_decisions_total",
                "Retrieval gate decisions on mode-auto requests (retrieve, skip)",
            ),
            &["decision"],
        )
        .expect("metric");
        let adapt_gate_decisions = IntCounterVec::new(
            Opts::new(
                "ttarag_adapt_gate_decisions_total",
                "Adaptation gate decisions on mode-auto requests that would adapt (adapt, skip)",
            ),
            &["decision"],
        )
        .expect("metric");
        let workers_alive =
            IntGauge::new("ttarag_workers_alive", "Model worker threads running").expect("metric");
        let running = IntGauge::new(
            "ttarag_requests_running",
            "Requests the decode scheduler has admitted (prefilling or decoding)",
        )
        .expect("metric");
        let kv_cache_bytes = IntGauge::new(
            "ttarag_kv_cache_bytes",
            "KV-cache bytes the running requests reserve (bounded by server.kv_cache_mb)",
        )
        .expect("metric");
        let adapt_memory_bytes = IntGauge::new(
            "ttarag_adapt_memory_bytes",
            "Bytes adaptations in flight reserve: working sets while training, adapters while \
             answering (bounded by server.adapt_memory_mb)",
        )
        .expect("metric");
        let in_flight = IntGauge::new(
            "ttarag_in_flight_requests",
            "Chat requests received and not yet answered or abandoned",
        )
        .expect("metric");
        let worker_panics = IntCounter::new(
            "ttarag_worker_panics_total",
            "Requests whose job panicked (answered 500; the worker was replaced)",
        )
        .expect("metric");
        let jobs_cancelled = IntCounter::new(
            "ttarag_jobs_cancelled_total",
            "Jobs a worker stopped early because their client went away",
        )
        .expect("metric");
        let decode_steps = IntCounter::new(
            "ttarag_decode_steps_total",
            "Decode steps the scheduler ran (one token of every row of a batch)",
        )
        .expect("metric");
        let step_graphs = IntCounter::new(
            "ttarag_decode_step_graphs_total",
            "Step graphs the scheduler made, one per batch size class and again where the \
             held one could not take a batch (on a GPU each is a capture: a step run op by \
             op, then recorded)",
        )
        .expect("metric");
        let rebound_steps = IntCounter::new(
            "ttarag_decode_steps_rebound_total",
            "Decode steps that rebound the held step graph to other rows (one joined or left) \
             instead of making a new one",
        )
        .expect("metric");
        let replayed_steps = IntCounter::new(
            "ttarag_decode_steps_replayed_total",
            "Decode steps that replayed a captured CUDA graph",
        )
        .expect("metric");
        let gate_seconds = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "ttarag_gate_duration_seconds",
                "Time the retrieval gate takes per request",
            )
            .buckets(BUCKETS.to_vec()),
        )
        .expect("metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(ttft.clone()),
            Box::new(tokens.clone()),
            Box::new(queue_depth.clone()),
            Box::new(arm_requests.clone()),
            Box::new(arm_latency.clone()),
            Box::new(arm_loss_delta.clone()),
            Box::new(arm_fallbacks.clone()),
            Box::new(feedback.clone()),
            Box::new(gate_decisions.clone()),
            Box::new(adapt_gate_decisions.clone()),
            Box::new(gate_seconds.clone()),
            Box::new(workers_alive.clone()),
            Box::new(running.clone()),
            Box::new(kv_cache_bytes.clone()),
            Box::new(adapt_memory_bytes.clone()),
            Box::new(in_flight.clone()),
            Box::new(worker_panics.clone()),
            Box::new(jobs_cancelled.clone()),
            Box::new(decode_steps.clone()),
            Box::new(step_graphs.clone()),
            Box::new(rebound_steps.clone()),
            Box::new(replayed_steps.clone()),
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
            arm_requests,
            arm_latency,
            arm_loss_delta,
            arm_fallbacks,
            feedback,
            gate_decisions,
            adapt_gate_decisions,
            gate_seconds,
            workers_alive,
            running,
            kv_cache_bytes,
            adapt_memory_bytes,
            in_flight,
            worker_panics,
            jobs_cancelled,
            decode_steps,
            step_graphs,
            rebound_steps,
            replayed_steps,
            observing: std::sync::Mutex::new(()),
        }
    }

    /// Copies the engine's own counts in before a scrape (the engine knows nothing of
    /// Prometheus; a panicking job may have no client left to count it).
    pub fn observe_engine(&self, engine: &crate::engine::Engine, in_flight: usize) {
        let _one = self.observing.lock().unwrap_or_else(|e| e.into_inner());
        let h = engine.health();
        self.queue_depth.set(engine.queue_depth() as i64);
        self.workers_alive.set(h.workers_alive() as i64);
        self.running.set(h.running() as i64);
        self.kv_cache_bytes.set(h.kv_bytes() as i64);
        self.adapt_memory_bytes
            .set(engine.adapt_memory().used() as i64);
        self.in_flight.set(in_flight as i64);
        let d = h.decode_counts();
        for (counter, now) in [
            (&self.worker_panics, h.panics()),
            (&self.jobs_cancelled, h.cancelled()),
            (&self.decode_steps, d.steps),
            (&self.step_graphs, d.graphs),
            (&self.rebound_steps, d.rebound),
            (&self.replayed_steps, d.replayed),
        ] {
            counter.inc_by(now.saturating_sub(counter.get()));
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
