//! The engine end to end on the tiny model: failures, cancellation, the queue, and the
//! decode scheduler (batched answers equal lone ones, admission bounds, panics in a batch).

use super::*;
use crate::model::tiny::tiny_model;

fn job(question: &str) -> ChatJob {
    ChatJob {
        messages: vec![ChatMessage::new("user", question)],
        gen: GenParams {
            max_tokens: 4,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: vec![],
        },
        rag: RagParams::plain(RagMode::None, "none", 1),
        tta: None,
    }
}

fn outcome(mut t: Ticket) -> Result<Completion, EngineError> {
    loop {
        match t.blocking_recv().expect("the engine answers") {
            Event::Text(_) => {}
            Event::Done(c) => return Ok(*c),
            Event::Error(e) => return Err(e),
        }
    }
}

/// An engine over the tiny model that never stops early (no EOS) and whose answer text
/// comes 5 ms a piece: jobs long enough to cancel or time out.
fn slow_engine(request_timeout: Option<Duration>) -> Engine {
    let dir = std::env::temp_dir().join(format!("ttarag-engine-{}", std::process::id()));
    let mut m = tiny_model(1).unwrap();
    m.eos_ids.clear();
    let faults = Faults {
        text_delay: Some(Duration::from_millis(5)),
        ..Default::default()
    };
    let cfg = EngineConfig {
        request_timeout,
        faults,
        batch: one_at_a_time(),
        ..Default::default()
    };
    Engine::start(Arc::new(m), Arc::new(Collections::new(&dir)), &cfg).unwrap()
}

fn until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn a_panicking_job_is_answered_and_its_worker_replaced_and_workers_end_with_the_engine() {
    let dir = std::env::temp_dir().join(format!("ttarag-engine-{}", std::process::id()));
    let e = Engine::start(
        Arc::new(tiny_model(1).unwrap()),
        Arc::new(Collections::new(&dir)),
        &EngineConfig {
            workers: 2,
            queue_capacity: 4,
            faults: Faults {
                panic_on: Some("boom".into()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    let health = e.health().clone();
    assert_eq!(health.workers_alive(), 2);
    assert!(matches!(
        outcome(e.submit(job("boom")).unwrap()),
        Err(EngineError::Panicked)
    ));
    until("the replacement worker", || {
        health.workers_alive() == 2 && health.panics() == 1
    });
    for _ in 0..3 {
        assert!(outcome(e.submit(job("hello")).unwrap()).is_ok());
    }
    // The panic went through rayon's global pool, which candle's CPU matmul (gemm) also
    // runs on: a product big enough to be split across threads is still right.
    let n = 384;
    let a: Vec<f32> = (0..n * n).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
    let b: Vec<f32> = (0..n * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
    let cpu = candle_core::Device::Cpu;
    let ta = candle_core::Tensor::from_slice(&a, (n, n), &cpu).unwrap();
    let tb = candle_core::Tensor::from_slice(&b, (n, n), &cpu).unwrap();
    let c: Vec<Vec<f32>> = ta.matmul(&tb).unwrap().to_vec2().unwrap();
    for (i, j) in [(0, 0), (17, 300), (383, 383), (200, 5)] {
        let want: f32 = (0..n).map(|k| a[i * n + k] * b[k * n + j]).sum();
        assert_eq!(c[i][j], want, "({i}, {j})");
    }
    drop(e);
    until("the workers to exit", || health.workers_alive() == 0);
}

#[test]
fn a_job_past_its_deadline_answers_so_and_a_dropped_ticket_is_cancelled() {
    let e = slow_engine(Some(Duration::from_millis(50)));
    let mut long = job("hello");
    long.gen.max_tokens = 400;
    assert!(matches!(
        outcome(e.submit(long.clone()).unwrap()),
        Err(EngineError::DeadlineExceeded(50))
    ));
    drop(e.submit(long.clone()).unwrap());
    let health = e.health().clone();
    until("the dropped job to stop", || health.cancelled() == 1);
}

#[test]
fn a_waiting_job_whose_client_left_gives_its_queue_place_back_at_once() {
    let e = slow_engine(None);
    let mut long = job("hello");
    long.gen.max_tokens = 400;
    // One generating (for ~2 s; the scheduler runs one at a time here), one done with its
    // stages and held by the worker until the scheduler has room, one waiting in the queue
    // (capacity 1): the queue is full until the waiting one's client leaves, and then at once,
    // before any worker has reached that job.
    let running = e.submit(long.clone()).unwrap();
    until("the first job to reach the scheduler", || {
        e.health().running() == 1
    });
    let held = e.submit(long.clone()).unwrap();
    until("the second job to leave the queue", || e.queue_depth() == 0);
    let waiting = e.submit(long.clone()).unwrap();
    assert!(matches!(
        e.submit(long.clone()),
        Err(EngineError::Overloaded(1))
    ));
    drop(waiting);
    assert_eq!(e.queue_depth(), 0);
    let next = e.submit(long).expect("the abandoned job's place is free");
    drop((running, held, next));
}

/// An engine over the tiny model with q8_0 decode products (row-independent on every CPU)
/// and no end-of-turn token, so every answer runs its whole budget.
fn batch_engine(workers: usize, batch: BatchLimits, faults: Faults) -> Engine {
    let dir = std::env::temp_dir().join(format!("ttarag-engine-{}", std::process::id()));
    let mut m = tiny_model(1).unwrap();
    m.eos_ids.clear();
    m.decoder
        .quantize_for_decode(candle_core::quantized::GgmlDType::Q8_0)
        .unwrap();
    let cfg = EngineConfig {
        workers,
        queue_capacity: 16,
        batch,
        faults,
        ..Default::default()
    };
    Engine::start(Arc::new(m), Arc::new(Collections::new(&dir)), &cfg).unwrap()
}

/// Questions of different lengths and budgets, greedy and sampled.
fn mixed_jobs() -> Vec<ChatJob> {
    (0..6)
        .map(|i| {
            let mut j = job(&"why is the sky blue ".repeat(i + 1));
            j.gen.max_tokens = 6 + 5 * i;
            if i % 2 == 1 {
                j.gen.temperature = 0.8;
                j.gen.seed = i as u64;
            }
            j
        })
        .collect()
}

/// [`mixed_jobs`] submitted at once to `e`: their answers, and the most sequences the
/// scheduler ran at once meanwhile.
fn all_at_once(e: &Engine) -> (Vec<Completion>, usize) {
    let tickets: Vec<Ticket> = mixed_jobs()
        .into_iter()
        .map(|j| e.submit(j).unwrap())
        .collect();
    let health = e.health().clone();
    let watch = std::thread::spawn(move || {
        let mut peak = 0;
        for _ in 0..2000 {
            peak = peak.max(health.running());
            std::thread::sleep(Duration::from_millis(1));
        }
        peak
    });
    let got = tickets.into_iter().map(|t| outcome(t).unwrap()).collect();
    (got, watch.join().unwrap())
}

/// Decode steps [`mixed_jobs`] take one at a time: each answer's tokens after its first
/// (its budget: 6, 11, .., 31).
const LONE_STEPS: u64 = 5 + 10 + 15 + 20 + 25 + 30;

fn one_at_a_time() -> BatchLimits {
    BatchLimits {
        max_running: 1,
        ..Default::default()
    }
}

#[test]
fn answers_are_the_same_alone_and_batched() {
    // The same prefill chunks in both: chunking is part of a prompt's arithmetic.
    let chunked = |max_running| BatchLimits {
        max_running,
        prefill_chunk: 4,
        max_batch_tokens: 16,
        ..Default::default()
    };
    let alone = batch_engine(1, chunked(1), Faults::default());
    let want: Vec<Completion> = mixed_jobs()
        .into_iter()
        .map(|j| outcome(alone.submit(j).unwrap()).unwrap())
        .collect();
    // Text arrives slowly, so the answers overlap in the scheduler's batch.
    let slow = Faults {
        text_delay: Some(Duration::from_millis(3)),
        ..Default::default()
    };
    let batched = batch_engine(3, chunked(16), slow);
    let (got, peak) = all_at_once(&batched);
    assert!(peak > 1, "the answers never ran together");
    for (i, (a, b)) in want.iter().zip(&got).enumerate() {
        assert_eq!(a.text, b.text, "answer {i}");
        assert_eq!(a.completion_tokens, b.completion_tokens, "answer {i}");
        assert_eq!(b.completion_tokens, 6 + 5 * i, "answer {i} ran its budget");
    }
    // Alone, every token after an answer's first is a step of its own; batched, rows share
    // steps. Without step graphs none is made.
    let lone = alone.health().decode_counts();
    assert_eq!(lone.steps, LONE_STEPS);
    let shared = batched.health().decode_counts();
    assert!(shared.steps < lone.steps, "{shared:?}");
    assert_eq!((lone.graphs, shared.graphs, shared.replayed), (0, 0, 0));
    let h = batched.health();
    until("the batch to empty", || {
        h.running() == 0 && h.kv_bytes() == 0
    });
}

#[test]
fn step_graphs_answer_as_lone_steps_while_rows_join_and_leave_the_batch() {
    // Whole prompts in one pass: every admitted answer decodes from its first iteration, so
    // answers running together are rows of the same steps.
    let wide = |max_running, step_graphs, pad_steps| BatchLimits {
        max_running,
        prefill_chunk: 512,
        max_batch_tokens: 4096,
        step_graphs,
        pad_steps,
        ..Default::default()
    };
    let alone = batch_engine(1, wide(1, false, false), Faults::default());
    let want: Vec<Completion> = mixed_jobs()
        .into_iter()
        .map(|j| outcome(alone.submit(j).unwrap()).unwrap())
        .collect();
    assert_eq!(alone.health().decode_counts().steps, LONE_STEPS);
    // Batches as they come, and padded with ghost rows to a power of two (as on a GPU).
    for pad in [false, true] {
        let slow = Faults {
            text_delay: Some(Duration::from_millis(3)),
            ..Default::default()
        };
        let graphed = batch_engine(3, wide(16, true, pad), slow);
        let (got, peak) = all_at_once(&graphed);
        assert!(peak > 2, "the answers never decoded together");
        for (i, (a, b)) in want.iter().zip(&got).enumerate() {
            assert_eq!(a.text, b.text, "answer {i}, padded: {pad}");
            assert_eq!(b.completion_tokens, 6 + 5 * i, "answer {i} ran its budget");
        }
        // Rows joined and left. Unpadded, the batch's size changed with each (a graph per
        // size, made again where a longer cache outgrew it); padded, a size class's graph
        // took rows that joined or left within it in place. The CPU captures none, so no
        // step replays.
        let d = graphed.health().decode_counts();
        assert!(d.steps < LONE_STEPS, "{d:?}");
        assert!(d.graphs >= 2 && d.graphs + d.rebound < d.steps, "{d:?}");
        assert!(!pad || d.rebound >= 1, "{d:?}");
        assert_eq!(d.replayed, 0);
        let h = graphed.health();
        until("the batch to empty", || {
            h.running() == 0 && h.kv_bytes() == 0
        });
    }
}

#[test]
fn a_panic_in_the_batch_costs_only_its_own_request() {
    let faults = Faults {
        panic_in_decode: Some("boom".into()),
        text_delay: Some(Duration::from_millis(2)),
        ..Default::default()
    };
    let e = batch_engine(2, BatchLimits::default(), faults);
    let mut long = job("a question that runs beside the panic");
    long.gen.max_tokens = 40;
    let want = outcome(e.submit(long.clone()).unwrap()).unwrap();
    let running = e.submit(long.clone()).unwrap();
    until("the first answer to run", || e.health().running() == 1);
    let boom = e.submit(job("boom")).unwrap();
    assert!(matches!(outcome(boom), Err(EngineError::Panicked)));
    assert_eq!(outcome(running).unwrap().text, want.text);
    assert_eq!(e.health().panics(), 1);
    assert!(e.health().scheduler_alive());
    assert_eq!(outcome(e.submit(long).unwrap()).unwrap().text, want.text);
}

#[test]
fn kv_memory_bounds_admission_and_a_request_that_could_never_fit_is_refused() {
    let mut probe = tiny_model(1).unwrap();
    probe.eos_ids.clear();
    let per_token = probe.decoder.kv_bytes_per_token();
    let mut j = job("hello");
    let prompt = probe.encode_chat(&j.messages).unwrap().ids.len();
    j.gen.max_tokens = 30;
    // Room for one such answer at a time, not two.
    let one = (prompt + 30) * per_token;
    let limits = BatchLimits {
        kv_cache_bytes: one + one / 2,
        ..Default::default()
    };
    let slow = Faults {
        text_delay: Some(Duration::from_millis(2)),
        ..Default::default()
    };
    let e = batch_engine(2, limits, slow);
    let health = e.health().clone();
    let tickets: Vec<Ticket> = (0..3).map(|_| e.submit(j.clone()).unwrap()).collect();
    let watch = std::thread::spawn(move || {
        let (mut running, mut kv) = (0, 0);
        for _ in 0..1000 {
            running = running.max(health.running());
            kv = kv.max(health.kv_bytes());
            std::thread::sleep(Duration::from_millis(1));
        }
        (running, kv)
    });
    let texts: Vec<String> = tickets
        .into_iter()
        .map(|t| outcome(t).unwrap().text)
        .collect();
    let (running, kv) = watch.join().unwrap();
    assert!(texts.iter().all(|t| t == &texts[0]));
    assert_eq!(
        running, 1,
        "a second answer was admitted past the KV budget"
    );
    assert_eq!(kv, one);

    let mut huge = j.clone();
    huge.gen.max_tokens = 400;
    match outcome(e.submit(huge).unwrap()) {
        Err(EngineError::ContextExceeded(m)) => {
            assert!(
                m.contains("KV cache") && m.contains("lower max_tokens"),
                "{m}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// An engine over the tiny model with a `facts` collection to adapt on, answers whose text
/// comes 20 ms a piece (long enough to watch one run), and `adapt_memory_bytes` of
/// adaptation memory.
fn adapting_engine(adapt_memory_bytes: usize) -> (Engine, tempfile::TempDir) {
    adapting_engine_with(BatchLimits {
        adapt_memory_bytes,
        ..Default::default()
    })
}

fn adapting_engine_with(batch: BatchLimits) -> (Engine, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("facts.jsonl");
    std::fs::write(
        &corpus,
        "{\"id\": \"a\", \"text\": \"Plants need sunlight and water to grow tall. Roots take up \
         water from the wet soil below.\"}\n{\"id\": \"b\", \"text\": \"The moon pulls on the \
         oceans and makes the tides rise. Tides fall again as the earth turns.\"}\n",
    )
    .unwrap();
    let cols = Arc::new(Collections::new(dir.path().join("index")));
    crate::retrieval::ingest_path(&cols.get_or_create("facts").unwrap(), &corpus, 500, None)
        .unwrap();
    let mut m = tiny_model(1).unwrap();
    m.eos_ids.clear();
    let cfg = EngineConfig {
        workers: 2,
        queue_capacity: 4,
        batch,
        faults: Faults {
            text_delay: Some(Duration::from_millis(20)),
            ..Default::default()
        },
        ..Default::default()
    };
    (Engine::start(Arc::new(m), cols, &cfg).unwrap(), dir)
}

fn tta_job(question: &str, max_tokens: usize) -> ChatJob {
    let mut j = job(question);
    j.gen.max_tokens = max_tokens;
    j.rag.mode = RagMode::Tta;
    j.rag.collection = "facts".into();
    j.rag.top_k = 2;
    let mut c = crate::config::Config::default();
    c.tta.time_budget_ms = 0.0;
    let o = TtaOverrides {
        min_words: Some(3),
        ..Default::default()
    };
    j.tta = Some(resolve_tta(&c.tta, &o, 1).unwrap());
    j
}

#[test]
fn an_adaptation_larger_than_the_whole_memory_budget_is_refused_by_name() {
    let (e, _dir) = adapting_engine(64 << 10);
    match outcome(e.submit(tta_job("What do plants need?", 2)).unwrap()) {
        Err(EngineError::BadParam {
            param,
            code,
            message,
        }) => {
            assert_eq!((param, code), ("rag.tta", "adaptation_too_large"));
            assert!(message.contains("server.adapt_memory_mb"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(e.adapt_memory().used(), 0);
    // Requests that do not adapt are not concerned.
    let mut plain = tta_job("What do plants need?", 2);
    plain.rag.mode = RagMode::Static;
    assert!(outcome(e.submit(plain).unwrap()).is_ok());
}

#[test]
fn an_answer_holds_its_adapters_bytes_while_it_runs_and_gives_them_back() {
    let (e, _dir) = adapting_engine(64 << 20);
    let j = tta_job("What do plants need?", 40);
    let lora = j.tta.as_ref().unwrap().train.lora.clone();
    let adapter = crate::adapt::memory::lora_elements(e.model.decoder.config(), &lora) * 4;
    let t = e.submit(j).unwrap();
    until("the adapted answer to run", || e.health().running() == 1);
    assert_eq!(
        e.adapt_memory().used(),
        adapter,
        "the adapter alone, not the working set"
    );
    let c = outcome(t).unwrap();
    let report = c.rag.tta.expect("adapted");
    assert!(report.steps > 0 && report.fallback.is_none(), "{report:?}");
    // The scheduler drops the finished sequence, and its reservation, after answering.
    until("the adapter's bytes to come back", || {
        e.adapt_memory().used() == 0
    });
}

#[test]
fn an_adaptation_waits_while_others_hold_the_memory_and_runs_once_it_is_free() {
    let (e, _dir) = adapting_engine(64 << 20);
    // Everything but 1 KiB held elsewhere: the request passes its stages up to adaptation and
    // waits there (its worker checking on it), not refused: it would fit an empty budget.
    let hog = e
        .adapt_memory()
        .reserve((64 << 20) - 1024, || Ok::<(), ()>(()))
        .unwrap();
    let mut t = e.submit(tta_job("What do plants need?", 2)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(t.try_recv().is_err(), "no answer while the memory is held");
    assert_eq!(e.adapt_memory().used(), (64 << 20) - 1024);
    drop(hog);
    let c = outcome(t).unwrap();
    assert!(c.rag.tta.unwrap().steps > 0);
}

#[test]
fn a_scored_job_ranks_its_choices_after_the_prompt_and_answers_as_a_plain_one() {
    let dir = std::env::temp_dir().join(format!("ttarag-engine-{}", std::process::id()));
    let mut m = tiny_model(1).unwrap();
    m.eos_ids.clear();
    let e = Engine::start(
        Arc::new(m),
        Arc::new(Collections::new(&dir)),
        &EngineConfig::default(),
    )
    .unwrap();
    let plain = outcome(e.submit(job("hello")).unwrap()).unwrap();
    assert!(plain.choice_scores.is_empty());
    let choices = vec!["yes".to_string(), "No way".to_string()];
    let scored = outcome(e.submit_scored(job("hello"), choices.clone()).unwrap()).unwrap();
    assert_eq!(scored.text, plain.text);
    // The same scores as the choices scored alone after the prompt the engine built.
    let prompt = RagPrompt::new(&EngineConfig::default().prompt_template)
        .unwrap()
        .apply_for("none", false, &job("hello").messages, &[])
        .unwrap();
    let ids = e.model.encode_chat(&prompt).unwrap().ids;
    let conts: Vec<Vec<u32>> = choices
        .iter()
        .map(|c| e.model.tokenizer.encode_text(c).unwrap())
        .collect();
    let alone = crate::generate::score_continuations(&e.model.decoder, &ids, &conts, None).unwrap();
    assert_eq!(scored.choice_scores.len(), 2);
    for (a, b) in scored.choice_scores.iter().zip(&alone) {
        assert_eq!(a.tokens, b.tokens);
        assert!((a.logprob - b.logprob).abs() < 1e-4, "{a:?} vs {b:?}");
    }
}

#[test]
fn answers_with_their_own_adapters_are_the_same_through_step_graphs() {
    let questions = [
        "What do plants need?",
        "What makes the tides rise?",
        "Why do roots take up water?",
    ];
    let answers = |step_graphs, pad_steps| {
        let (e, _dir) = adapting_engine_with(BatchLimits {
            step_graphs,
            pad_steps,
            ..Default::default()
        });
        let tickets: Vec<Ticket> = questions
            .iter()
            .map(|q| e.submit(tta_job(q, 12)).unwrap())
            .collect();
        tickets
            .into_iter()
            .map(|t| {
                let c = outcome(t).unwrap();
                let report = c.rag.tta.expect("adapted");
                assert!(report.steps > 0 && report.fallback.is_none(), "{report:?}");
                c.text
            })
            .collect::<Vec<_>>()
    };
    let plain = answers(false, false);
    assert_eq!(plain, answers(true, false));
    assert_eq!(plain, answers(true, true), "padded");
}
