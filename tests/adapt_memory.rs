//! The adaptation memory estimate (`adapt::memory::footprint`) against what adaptations really
//! allocate, counted by this binary's global allocator: the estimate must never be below the
//! measured peak (admission would let an OOM through) nor far above it (it would refuse work
//! the machine can do).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use ttarag::adapt::memory::{footprint, Trained};
use ttarag::adapt::{adapt_full, adapt_lora, Example, PairSource, TrainParams};
use ttarag::config::Config;
use ttarag::engine::{resolve_tta, TtaOverrides};
use ttarag::model::Model;

/// Counts live heap bytes and their peak since the last reset.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
            grew(new);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The counters are global: one measuring test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Heap bytes `f` allocated at its peak beyond what was live when it started.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f();
    (out, PEAK.load(Ordering::SeqCst) - base)
}

fn examples(n: usize, len: usize, vocab: usize) -> Vec<Example> {
    (0..n)
        .map(|k| Example {
            ids: (0..len - k * 3)
                .map(|i| ((i * 7919 + k * 31 + 5) % (vocab - 3)) as u32)
                .collect(),
            suffix_start: (len - k * 3) / 2,
        })
        .collect()
}

/// Rank 32 on every projection: a large adapter.
fn wide() -> TtaOverrides {
    TtaOverrides {
        lora_rank: Some(32),
        lora_targets: Some(
            ["q", "k", "v", "o", "gate", "up", "down"]
                .map(String::from)
                .to_vec(),
        ),
        ..Default::default()
    }
}

fn params(o: TtaOverrides, recompute: bool) -> TrainParams {
    let mut cfg = Config::default();
    cfg.tta.time_budget_ms = 0.0;
    cfg.tta.recompute_activations = recompute;
    resolve_tta(&cfg.tta, &o, 3).unwrap().train
}

/// Runs the adaptation and checks it; with `warm`, runs it once before, unmeasured: a model's
/// first adaptation also makes what the model keeps for all later ones (the frozen weights'
/// bf16 copy), which belongs to the model, not the request.
fn check(model: &Model, name: &str, full: bool, ex: &[Example], p: &TrainParams, warm: bool) {
    let dec = &model.decoder;
    let run = || match full {
        false => adapt_lora(dec, None, ex, PairSource::Sentences, p)
            .unwrap()
            .0
            .map(|l| l.bytes()),
        true => adapt_full(dec, ex, PairSource::Sentences, p)
            .unwrap()
            .0
            .map(|_| 0),
    };
    if warm {
        run();
    }
    let (kept, measured) = peak_of(run);
    let trained = match full {
        false => Trained::Lora(&p.lora),
        true => Trained::Full,
    };
    let est = footprint(dec, trained, ex, p);
    eprintln!(
        "{name}: measured peak {:.1} MiB, estimate {:.1} MiB ({:.2}x); resident {:?} vs {}",
        measured as f64 / 1048576.0,
        est.working as f64 / 1048576.0,
        est.working as f64 / measured as f64,
        kept,
        est.resident
    );
    assert!(
        est.working >= measured,
        "{name}: estimate {} below the measured peak {measured}",
        est.working
    );
    assert!(
        est.working <= 4 * measured,
        "{name}: estimate {} over 4x the measured peak {measured}",
        est.working
    );
    if let Some(bytes) = kept.filter(|_| !full) {
        assert_eq!(est.resident, bytes, "{name}: the adapter's own size");
    }
}

#[test]
fn the_estimate_bounds_what_adaptations_of_the_tiny_model_allocate() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let model = ttarag::model::tiny::tiny_model(1).unwrap();
    let v = model.decoder.config().vocab_size;
    for recompute in [true, false] {
        let p = params(TtaOverrides::default(), recompute);
        check(
            &model,
            &format!("tiny lora recompute={recompute}"),
            false,
            &examples(3, 96, v),
            &p,
            recompute,
        );
        check(
            &model,
            &format!("tiny full recompute={recompute}"),
            true,
            &examples(3, 96, v),
            &p,
            false,
        );
        let wide = TtaOverrides {
            grad_accum: Some(4),
            ..wide()
        };
        let p = params(wide, recompute);
        check(
            &model,
            &format!("tiny wide lora recompute={recompute}"),
            false,
            &examples(6, 300, v),
            &p,
            false,
        );
    }
}

#[test]
fn the_estimate_bounds_what_lora_adaptations_of_the_real_model_allocate() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let model = common::default_model();
    let v = model.decoder.config().vocab_size;
    // The server's default recipe; the tiny model covers the other paths.
    let p = params(TtaOverrides::default(), true);
    check(&model, "real lora", false, &examples(3, 96, v), &p, true);
    check(
        &model,
        "real wide lora",
        false,
        &examples(3, 200, v),
        &params(wide(), true),
        false,
    );
}
