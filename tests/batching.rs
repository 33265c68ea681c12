//! Answers through the decode scheduler's batch equal the same requests answered one at a
//! time: static, no-retrieval and per-request LoRA requests mixed in one batch, each with its
//! own adapter, none leaking into another's rows; greedy rows (picked for the whole step at
//! once) beside sampled ones (each sampled from its own row).

mod common;

use serde_json::json;

fn request(question: &str, rag: serde_json::Value) -> serde_json::Value {
    json!({
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 40,
        "temperature": 0,
        "rag": rag,
    })
}

/// Static, none and tta requests over the same few questions; the tta ones adapt strongly so
/// their answers move.
fn mixed() -> Vec<serde_json::Value> {
    let questions = [
        "What can damage buildings?",
        "What do plants need to grow?",
        "At what temperature does water boil?",
    ];
    let tta = json!({"mode": "tta", "tta": {"steps": 3, "lr": 0.05, "min_words": 3}});
    let mut out = vec![];
    for q in questions {
        out.push(request(q, json!({"mode": "static"})));
        out.push(request(q, tta.clone()));
    }
    out.push(request(questions[0], json!({"mode": "none"})));
    // Sampled, seeded: the same tokens alone or beside greedy rows.
    let mut sampled = request(questions[1], json!({"mode": "static"}));
    sampled["temperature"] = json!(0.9);
    sampled["seed"] = json!(7);
    out.push(sampled);
    out
}

/// The scheduler's decode steps so far (`/metrics`).
async fn decode_steps(base: &str) -> u64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("ttarag_decode_steps_total ")?.parse().ok())
        .expect("the decode step count")
}

fn config(max_running: usize) -> ttarag::config::Config {
    let mut cfg = ttarag::config::Config::default();
    cfg.server.max_running = max_running;
    cfg
}

async fn answers(base: &str, bodies: &[serde_json::Value], together: bool) -> Vec<String> {
    let one = |b: serde_json::Value| async move {
        let (st, v) = common::post(base, &b).await;
        assert_eq!(st, 200, "{v}");
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    if together {
        futures::future::join_all(bodies.iter().cloned().map(one)).await
    } else {
        let mut out = vec![];
        for b in bodies {
            out.push(one(b.clone()).await);
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mixed_batch_answers_as_each_request_would_alone() {
    let alone = common::start_tiny_opts(1, 16, true, config(1), None, true).await;
    let want = answers(&alone.base, &mixed(), false).await;
    // Slow text keeps the answers overlapping in one batch; two stage workers adapt while
    // the batch decodes.
    let delay = Some(std::time::Duration::from_millis(5));
    let batched = common::start_tiny_opts(2, 16, true, config(16), delay, true).await;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = {
        let (base, done) = (batched.base.clone(), done.clone());
        tokio::spawn(async move {
            let (mut peak, mut held) = (0, 0);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let v: serde_json::Value = reqwest::get(format!("{base}/health"))
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                peak = peak.max(v["running"].as_u64().unwrap());
                held = held.max(v["adapt_memory_bytes"].as_u64().unwrap());
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            (peak, held)
        })
    };
    let got = answers(&batched.base, &mixed(), true).await;
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (peak, held) = watch.await.unwrap();
    assert!(peak > 1, "the requests never shared a batch");
    // Running together is not yet decoding together: the batch took fewer decode steps than
    // the same answers one at a time.
    let (lone, shared) = (
        decode_steps(&alone.base).await,
        decode_steps(&batched.base).await,
    );
    assert!(shared < lone, "{shared} decode steps batched, {lone} alone");
    assert!(held > 0, "adaptations never showed in the memory budget");
    assert_eq!(got, want);
    // Every reservation came back once its request finished.
    let mut left = u64::MAX;
    for _ in 0..200 {
        let v: serde_json::Value = reqwest::get(format!("{}/health", batched.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        left = v["adapt_memory_bytes"].as_u64().unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        left, 0,
        "adaptation memory still reserved after every answer"
    );
    // The adapters are in effect: at least one adapted answer differs from the static answer
    // to the same question (so the equality above is not that of unadapted rows).
    assert!(
        (0..3).any(|i| want[2 * i] != want[2 * i + 1]),
        "adaptation changed no answer: {want:?}"
    );
}
