use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::adapt::{mean_loss, Example};
use crate::model::fingerprint::WeightsDigest;
use crate::model::tiny::tiny_model;
use crate::model::Model;
use crate::retrieval::Fingerprint;

fn settings() -> DomainTrain {
    let mut s = crate::config::Config::default().domain.train;
    s.rank = 4;
    s.alpha = 8.0;
    s.batch = 2;
    s.lr = 1e-2;
    s.epochs = 2;
    s.checkpoint_every = 2;
    s
}

fn examples(model: &Model) -> Vec<Example> {
    [
        "Rivers carry sediment to the sea.",
        "Ice floats on water.",
        "Magnets attract iron.",
        "Plants need light.",
    ]
    .iter()
    .map(|t| {
        let ids = model.tokenizer.encode_text(t).unwrap();
        Example {
            suffix_start: ids.len() / 2,
            ids,
        }
    })
    .collect()
}

fn weights(l: &crate::adapt::Lora) -> HashMap<String, Vec<f32>> {
    l.named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn training_lowers_the_loss_and_is_deterministic_for_a_seed() {
    let model = tiny_model(1).unwrap();
    let ex = examples(&model);
    let s = settings();
    let before = mean_loss(&model.decoder, None, &ex).unwrap();
    let a = train_domain(&model.decoder, &ex, &s, None, &mut |_, _, _| true).unwrap();
    assert_eq!(a.steps, 4, "2 epochs of 4 examples in batches of 2");
    let after = mean_loss(&model.decoder, Some(&a.lora), &ex).unwrap();
    assert!(after < before, "{before} -> {after}");
    let b = train_domain(&model.decoder, &ex, &s, None, &mut |_, _, _| true).unwrap();
    assert_eq!(weights(&a.lora), weights(&b.lora));
    assert_eq!(a.curve, b.curve);
    let other = DomainTrain { seed: 9, ..s };
    let c = train_domain(&model.decoder, &ex, &other, None, &mut |_, _, _| true).unwrap();
    assert_ne!(weights(&a.lora), weights(&c.lora));
}

#[test]
fn an_interrupted_run_resumes_to_the_same_weights_and_refuses_other_data() {
    let model = tiny_model(1).unwrap();
    let ex = examples(&model);
    let s = settings();
    let whole = train_domain(&model.decoder, &ex, &s, None, &mut |_, _, _| true).unwrap();

    let work = tempfile::tempdir().unwrap();
    let err = train_domain(
        &model.decoder,
        &ex,
        &s,
        Some(work.path()),
        &mut |done, _, _| done < 3,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("resume"), "{err}");
    // Other data: the checkpoint is refused, not silently mixed in.
    let err = train_domain(
        &model.decoder,
        &ex[..3],
        &s,
        Some(work.path()),
        &mut |_, _, _| true,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("other data or settings"), "{err}");
    let mut seen = vec![];
    let resumed = train_domain(
        &model.decoder,
        &ex,
        &s,
        Some(work.path()),
        &mut |done, _, _| {
            seen.push(done);
            true
        },
    )
    .unwrap();
    assert_eq!(
        seen,
        vec![4],
        "only the step after the checkpoint runs again"
    );
    assert_eq!(resumed.ran, 1);
    assert_eq!(weights(&resumed.lora), weights(&whole.lora));
    assert_eq!(resumed.curve, whole.curve);
    assert!(
        std::fs::read_dir(work.path()).unwrap().next().is_none(),
        "checkpoint left behind"
    );
}

fn card_for(model_sha: &str, fp: Fingerprint, s: &DomainTrain) -> DomainCard {
    DomainCard {
        format: CARD_FORMAT,
        collection: "facts".into(),
        model_id: "tiny".into(),
        model_sha256: model_sha.into(),
        fingerprint: fp,
        shape: Shape {
            rank: s.rank,
            alpha: s.alpha,
            targets: s.targets.clone(),
        },
        settings: serde_json::json!({}),
        data: TrainingData {
            questions: 0,
            questions_file: None,
            questions_excluded: 0,
            corpus_examples: 4,
            examples_sha256: String::new(),
        },
        loss_curve: vec![],
        steps: 1,
        train_seconds: 0.0,
        adapter_sha256: String::new(),
        adapter_bytes: 0,
    }
}

#[test]
fn the_store_serves_a_matching_adapter_and_refuses_other_weights_content_or_bytes() {
    let model = tiny_model(1).unwrap();
    let ex = examples(&model);
    let s = settings();
    let trained = train_domain(&model.decoder, &ex, &s, None, &mut |_, _, _| true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fp = Fingerprint {
        passages: 4,
        content_sha256: "c0ffee".into(),
    };
    let store = |sha: &str| {
        DomainAdapters::new(
            dir.path(),
            WeightsDigest::known(sha),
            model.decoder.config().clone(),
            Device::Cpu,
            DType::F32,
        )
    };
    let ok = store("weights-1");
    assert!(ok.get("facts", &fp).unwrap().is_none(), "no adapter yet");
    save_adapter(
        &adapter_dir(dir.path(), "facts"),
        &trained.lora,
        card_for("weights-1", fp.clone(), &s),
    )
    .unwrap();

    let loaded = ok
        .get("facts", &fp)
        .unwrap()
        .expect("a matching adapter loads");
    assert_eq!(weights(&loaded.lora), weights(&trained.lora));
    assert!(loaded.lora.vars().is_empty(), "served adapters are frozen");
    let again = ok.get("facts", &fp).unwrap().unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&loaded, &again),
        "loaded once, shared"
    );
    // It acts like the trained one.
    let l1 = mean_loss(&model.decoder, Some(&loaded.lora), &ex).unwrap();
    let l2 = mean_loss(&model.decoder, Some(&trained.lora), &ex).unwrap();
    assert!((l1 - l2).abs() < 1e-6, "{l1} vs {l2}");

    let err = store("weights-2").get("facts", &fp).err().unwrap();
    assert!(err.contains("other model weights"), "{err}");
    let changed = Fingerprint {
        passages: 5,
        ..fp.clone()
    };
    let err = ok.get("facts", &changed).err().unwrap();
    assert!(err.contains("changed since it was trained"), "{err}");

    // Damaged bytes are refused by the card's digest.
    let file = adapter_dir(dir.path(), "facts").join(ADAPTER_FILE);
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let err = store("weights-1").get("facts", &fp).err().unwrap();
    assert!(err.contains("does not match its card"), "{err}");
}

#[test]
fn a_stack_adds_both_deltas_and_trains_only_the_top() {
    let model = tiny_model(1).unwrap();
    let ex = examples(&model);
    let s = settings();
    let under = train_domain(&model.decoder, &ex, &s, None, &mut |_, _, _| true)
        .unwrap()
        .lora;
    let before = weights(&under);
    let params = crate::adapt::TrainParams {
        lr: 1e-2,
        weight_decay: 0.0,
        eps: 1e-8,
        grad_accum: 2,
        clip_norm: 1.0,
        steps: Some(3),
        max_tokens_per_pair: 64,
        condition_on_query: false,
        lora: s.lora(),
        seed: 3,
        time_budget_ms: None,
        recompute: true,
        recompute_on_gpu: false,
        score_in_first_step: true,
        bf16: false,
        cancel: Default::default(),
    };
    let src = crate::adapt::PairSource::Sentences;
    let (top, report) =
        crate::adapt::adapt_lora(&model.decoder, Some(&under), &ex, src, &params).unwrap();
    let top = top.unwrap();
    assert_eq!(
        weights(&under),
        before,
        "the domain adapter must never be written"
    );
    // Adaptation started from the domain-adapted model, not the base one.
    let domain_loss = mean_loss(&model.decoder, Some(&under), &ex).unwrap();
    assert!(
        (report.loss_before.unwrap() - domain_loss).abs() < 1e-4,
        "{report:?} vs {domain_loss}"
    );
    let stack = crate::adapt::Stack {
        under: &under,
        over: &top,
    };
    let x = Tensor::ones(
        (1, 3, model.decoder.config().hidden_size),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    use crate::model::{Adapter, Target};
    let sum = (under.delta(0, Target::Q, &x).unwrap().unwrap()
        + top.delta(0, Target::Q, &x).unwrap().unwrap())
    .unwrap();
    let both = stack.delta(0, Target::Q, &x).unwrap().unwrap();
    let d = (sum - both)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-6);
    assert!(report.loss_after.unwrap() < report.loss_before.unwrap());
}
