//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device};
use ttarag::model::Model;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn default_model_path() -> PathBuf {
    root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The real default model, loaded once per test binary. Missing model = failed test (CI runs
/// `make test`, whose setup step fetches it).
pub fn default_model() -> Arc<Model> {
    static M: OnceLock<Arc<Model>> = OnceLock::new();
    M.get_or_init(|| {
        let p = default_model_path();
        assert!(p.exists(), "{} missing: run `make setup`", p.display());
        let mut m = Model::load(&p, "smollm2-135m-instruct", &Device::Cpu, DType::F32).unwrap();
        // As the server runs it by default.
        if let Some(q) = ttarag::config::Config::default()
            .model
            .decode_quant()
            .unwrap()
        {
            m.decoder.quantize_for_decode(q).unwrap();
        }
        Arc::new(m)
    })
    .clone()
}

pub fn golden() -> serde_json::Value {
    let text = std::fs::read_to_string(root().join("tests/fixtures/smollm2_golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A server on an ephemeral loopback port over a tiny random model and a small collection.
pub struct TestServer {
    pub base: String,
    pub model: Arc<Model>,
    pub app: Arc<ttarag::server::App>,
    pub _dir: tempfile::TempDir,
}

impl TestServer {
    /// The folder of the server's collections.
    pub fn index_dir(&self) -> PathBuf {
        self._dir.path().join("index")
    }
}

pub const FACTS: &str = "{\"id\": \"f1\", \"text\": \"Earthquakes can damage buildings.\"}\n\
{\"id\": \"f2\", \"text\": \"Plants need sunlight to grow.\"}\n\
{\"id\": \"f3\", \"text\": \"Water boils at 100 degrees Celsius at sea level.\"}\n";

/// Starts the real router. `never_stop` removes the EOS ids so every answer runs to max_tokens
/// (useful to keep workers busy).
pub async fn start_tiny(workers: usize, queue: usize, never_stop: bool) -> TestServer {
    start_tiny_with(
        workers,
        queue,
        never_stop,
        ttarag::config::Config::default(),
    )
    .await
}

/// An engine over the real default model and the sample QASC collection (built in a temp dir).
pub fn qasc_engine(workers: usize) -> (ttarag::engine::Engine, tempfile::TempDir) {
    use ttarag::engine::{Engine, EngineConfig};
    use ttarag::retrieval::{ingest_path, Collections};

    let dir = tempfile::tempdir().unwrap();
    let cols = Arc::new(Collections::new(dir.path()));
    let c = cols.get_or_create("qasc").unwrap();
    ingest_path(
        &c,
        &root().join("index/samples/qasc/corpus.jsonl"),
        1000,
        None,
    )
    .unwrap();
    let cfg = ttarag::config::Config::default();
    let e = Engine::start(
        default_model(),
        cols,
        &EngineConfig {
            workers,
            queue_capacity: 8,
            prompt_template: cfg.retrieval.prompt_template.clone(),
            collection_templates: cfg.collection_templates(),
            gate: None,
            ..Default::default()
        },
    )
    .unwrap();
    (e, dir)
}

/// As [`start_tiny`], but over `cfg` (e.g. with `[ab]` arms); its retrieval collection, worker
/// and queue settings are replaced by the tiny server's.
pub async fn start_tiny_with(
    workers: usize,
    queue: usize,
    never_stop: bool,
    cfg: ttarag::config::Config,
) -> TestServer {
    start_tiny_slow(workers, queue, never_stop, cfg, None).await
}

/// As [`start_tiny_with`], pausing `text_delay` after each piece of answer text (fault
/// injection: jobs long enough to hang up on or to time out). Every test server's worker
/// panics on [`PANIC_MARKER`].
pub async fn start_tiny_slow(
    workers: usize,
    queue: usize,
    never_stop: bool,
    cfg: ttarag::config::Config,
    text_delay: Option<std::time::Duration>,
) -> TestServer {
    start_tiny_opts(workers, queue, never_stop, cfg, text_delay, false).await
}

/// As [`start_tiny_slow`]; with `quantize`, decode reads q8_0 weights as the real server's
/// do, whose products are row-independent on every CPU (so batched answers equal lone ones
/// there too, not only where the few-row f32 kernels run).
pub async fn start_tiny_opts(
    workers: usize,
    queue: usize,
    never_stop: bool,
    mut cfg: ttarag::config::Config,
    text_delay: Option<std::time::Duration>,
    quantize: bool,
) -> TestServer {
    let faults = ttarag::engine::Faults {
        panic_on: Some(PANIC_MARKER.into()),
        text_delay,
        panic_in_decode: None,
    };
    use ttarag::engine::{Engine, EngineConfig};
    use ttarag::retrieval::{ingest_path, Collections};

    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("facts.jsonl");
    std::fs::write(&corpus, FACTS).unwrap();
    let cols = Arc::new(Collections::new(dir.path().join("index")));
    ingest_path(&cols.get_or_create("facts").unwrap(), &corpus, 500, None).unwrap();
    let mut model = ttarag::model::tiny::tiny_model(3).unwrap();
    if never_stop {
        model.eos_ids.clear();
    }
    if quantize {
        model
            .decoder
            .quantize_for_decode(candle_core::quantized::GgmlDType::Q8_0)
            .unwrap();
    }
    model.id = "tiny".into();
    cfg.retrieval.collection = "facts".into();
    cfg.server.workers = workers;
    cfg.server.queue_capacity = queue;
    cfg.server.max_body_bytes = 64 * 1024;
    let model = Arc::new(model);
    // The shipped probe belongs to the real default model; tests that want a gate set their own.
    if cfg.gate.probe == ttarag::config::Config::default().gate.probe {
        cfg.gate.probe = None;
    }
    if cfg.gate.adapt_probe == ttarag::config::Config::default().gate.adapt_probe {
        cfg.gate.adapt_probe = None;
    }
    let load = |card: &PathBuf, decides| {
        use ttarag::gate::card::LoadedGate;
        let g = LoadedGate::load(card, &model, TINY_SHA, &Device::Cpu).unwrap();
        Arc::new(g.expect(decides).unwrap())
    };
    use ttarag::gate::card::Decides;
    let gate = cfg.gate.probe.as_ref().map(|c| load(c, Decides::Retrieval));
    let adapt_gate = cfg
        .gate
        .adapt_probe
        .as_ref()
        .map(|c| load(c, Decides::Adaptation));
    let engine = Engine::start(
        model.clone(),
        cols,
        &EngineConfig {
            workers,
            queue_capacity: queue,
            prompt_template: cfg.retrieval.prompt_template.clone(),
            collection_templates: cfg.collection_templates(),
            gate,
            adapt_gate,
            request_timeout: Some(std::time::Duration::from_millis(
                cfg.server.request_timeout_ms,
            )),
            max_prompt_tokens: cfg.server.max_prompt_tokens,
            domain: Some(Arc::new(ttarag::adapt::domain::DomainAdapters::new(
                cfg.domain.dir.clone(),
                ttarag::model::fingerprint::WeightsDigest::known(TINY_SHA),
                model.decoder.config().clone(),
                Device::Cpu,
                candle_core::DType::F32,
            ))),
            batch: ttarag::engine::BatchLimits::of(&cfg.server),
            faults,
        },
    )
    .unwrap();
    let app = ttarag::server::App::new(engine, cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = ttarag::server::router(app.clone());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    TestServer {
        base: format!("http://{addr}"),
        model,
        app,
        _dir: dir,
    }
}

/// Trains a domain adapter for the test servers' tiny model and their `facts` collection (as
/// [`FACTS`] builds it), saved under `dir`/facts with a card claiming `model_sha`. Strong
/// settings, so answers on it visibly differ from the base model's.
pub fn tiny_domain_adapter(
    dir: &std::path::Path,
    model_sha: &str,
) -> ttarag::adapt::domain::DomainCard {
    use ttarag::adapt::domain::*;
    use ttarag::retrieval::{ingest_path, Collections};
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("facts.jsonl");
    std::fs::write(&corpus, FACTS).unwrap();
    let cols = Collections::new(tmp.path().join("index"));
    let coll = cols.get_or_create("facts").unwrap();
    ingest_path(&coll, &corpus, 500, None).unwrap();
    let model = ttarag::model::tiny::tiny_model(3).unwrap();
    let examples: Vec<ttarag::adapt::Example> = coll
        .passages()
        .unwrap()
        .iter()
        .map(|p| ttarag::adapt::Example {
            ids: model.tokenizer.encode_text(&p.text).unwrap(),
            suffix_start: 1,
        })
        .collect();
    let mut s = ttarag::config::Config::default().domain.train;
    s.rank = 4;
    s.alpha = 8.0;
    s.lr = 5e-2;
    s.epochs = 8;
    s.batch = 3;
    let t = train_domain(&model.decoder, &examples, &s, None, &mut |_, _, _| true).unwrap();
    let card = DomainCard {
        format: CARD_FORMAT,
        collection: "facts".into(),
        model_id: "tiny".into(),
        model_sha256: model_sha.into(),
        fingerprint: coll.fingerprint().unwrap(),
        shape: Shape {
            rank: s.rank,
            alpha: s.alpha,
            targets: s.targets.clone(),
        },
        settings: serde_json::to_value(&s).unwrap(),
        data: TrainingData {
            questions: 0,
            questions_file: None,
            questions_excluded: 0,
            corpus_examples: examples.len(),
            examples_sha256: examples_sha256(&examples),
        },
        loss_curve: t.curve,
        steps: t.steps,
        train_seconds: 0.0,
        adapter_sha256: String::new(),
        adapter_bytes: 0,
    };
    save_adapter(&adapter_dir(dir, "facts"), &t.lora, card).unwrap()
}

/// A user message that makes a test server's worker panic (fault injection).
pub const PANIC_MARKER: &str = "\u{1}panic-here\u{1}";

/// The weights fingerprint test servers claim for the tiny model.
pub const TINY_SHA: &str = "tiny-weights";

/// Writes a gate card (and its logistic probe) for the tiny model whose class probabilities are
/// `softmax(logits)` whatever the question: zero weights, these biases. Returns the card path.
pub fn constant_gate(dir: &std::path::Path, logits: [f32; 4]) -> PathBuf {
    constant_gate_for(dir, logits, TINY_SHA)
}

/// [`constant_gate`] for weights whose fingerprint is `sha`.
pub fn constant_gate_for(dir: &std::path::Path, logits: [f32; 4], sha: &str) -> PathBuf {
    constant_gate_pass(dir, logits, sha, "pre")
}

/// [`constant_gate_for`] reading the features of `pass` (`pre` or `post`).
pub fn constant_gate_pass(
    dir: &std::path::Path,
    logits: [f32; 4],
    sha: &str,
    pass: &str,
) -> PathBuf {
    constant_card(dir, logits, sha, pass, "retrieval", "gate")
}

/// An adaptation gate for the tiny model (`adapt-gate.json` in `dir`), like [`constant_gate`]:
/// S2 first = adapt, S3 first = answer static (under the optimistic policy).
pub fn constant_adapt_gate(dir: &std::path::Path, logits: [f32; 4]) -> PathBuf {
    constant_card(dir, logits, TINY_SHA, "pre", "adaptation", "adapt-gate")
}

fn constant_card(
    dir: &std::path::Path,
    logits: [f32; 4],
    sha: &str,
    pass: &str,
    decides: &str,
    stem: &str,
) -> PathBuf {
    use candle_core::Tensor;
    let m = ttarag::model::tiny::tiny_model(3).unwrap();
    let cfg = m.decoder.config();
    let hidden = cfg.hidden_size;
    let dim = if pass == "post" { 2 * hidden } else { hidden };
    let cpu = Device::Cpu;
    let tensors = std::collections::HashMap::from([
        (
            "gate.meta".to_string(),
            Tensor::new(&[1u32, 0, dim as u32, 4, 0], &cpu).unwrap(),
        ),
        (
            "norm.mean".to_string(),
            Tensor::zeros(dim, DType::F32, &cpu).unwrap(),
        ),
        (
            "norm.std".to_string(),
            Tensor::ones(dim, DType::F32, &cpu).unwrap(),
        ),
        (
            "out.weight".to_string(),
            Tensor::zeros((4, dim), DType::F32, &cpu).unwrap(),
        ),
        ("out.bias".to_string(), Tensor::new(&logits, &cpu).unwrap()),
    ]);
    let weights = format!("{stem}.safetensors");
    candle_core::safetensors::save(&tensors, dir.join(&weights)).unwrap();
    let card = serde_json::json!({
        "format": 1,
        "decides": decides,
        "model": {"id": "tiny", "sha256": sha, "hidden_size": hidden,
                  "num_layers": cfg.num_hidden_layers},
        "features": {"pass": pass, "layer": 1, "position": "last"},
        "probe": {"kind": "logistic"},
        "weights": weights,
        "classes": ["S1", "S2", "S3", "S4"],
        "label_counts": {"S1": 1, "S2": 1, "S3": 1, "S4": 1},
        "validation": {"n": 4, "accuracy": 0.25, "macro_f1": 0.1,
                       "majority_class": "S1", "majority_accuracy": 0.25},
    });
    let path = dir.join(format!("{stem}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&card).unwrap()).unwrap();
    path
}

/// POSTs JSON to `base` + `path`; the status and the JSON body.
pub async fn post_json(
    base: &str,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// POSTs a chat completion request.
pub async fn post(base: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    post_json(base, "/v1/chat/completions", body).await
}

/// [`start_tiny_with`] over the defaults with `toml` layered on top (e.g. an `[auth]` block).
pub async fn start_tiny_toml(
    workers: usize,
    queue: usize,
    never_stop: bool,
    toml: &str,
) -> TestServer {
    let cfg = ttarag::config::Config::from_toml(toml).unwrap();
    start_tiny_with(workers, queue, never_stop, cfg).await
}

/// A child process (a server started for a test) killed and reaped when the test is done,
/// however it ends.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the real binary as `ttarag serve --port 0 ARGS...` and returns it with its base URL,
/// read from the line it prints once it listens, after `/ready` has said 200 (it listens at
/// once and warms up before it is ready).
pub fn spawn_serve<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ttarag"))
        .args(["serve", "--port", "0"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    wait_ready(&base);
    (child, base)
}

/// Polls `GET /ready` (plain HTTP/1.0 over a blocking socket) until it answers 200; 60 s at most.
pub fn wait_ready(base: &str) {
    use std::io::{Read, Write};
    let addr = base.strip_prefix("http://").expect("an http base URL");
    let started = std::time::Instant::now();
    loop {
        let status = std::net::TcpStream::connect(addr).ok().and_then(|mut s| {
            s.write_all(b"GET /ready HTTP/1.0\r\n\r\n").ok()?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head).ok()?;
            Some(String::from_utf8_lossy(&head[9..12]).to_string())
        });
        if status.as_deref() == Some("200") {
            return;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{base} never said ready (last status {status:?})"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Writes [`FACTS`] and a config file into `dir` whose default collection `facts` is built from
/// them at first start; `extra` (TOML tables) comes first. Returns the config's path.
pub fn facts_config(dir: &std::path::Path, extra: &str) -> PathBuf {
    let corpus = dir.join("facts.jsonl");
    std::fs::write(&corpus, FACTS).unwrap();
    let config = dir.join("test.toml");
    let retrieval = format!(
        "[retrieval]\ncollection = \"facts\"\nsample_corpus = \"{}\"\n",
        corpus.display()
    );
    std::fs::write(&config, format!("{extra}{retrieval}")).unwrap();
    config
}
