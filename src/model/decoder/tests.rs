//! The decoder against itself: cached against full forward passes, batched against alone,
//! quantized against full precision, fused against composed blocks (values and gradients).

use super::*;
use crate::model::tiny::{random_weights, tiny_config};
use crate::model::Arch;

fn tiny(arch: Arch) -> Decoder {
    let cfg = tiny_config(arch);
    Decoder::load(
        &cfg,
        random_weights(&cfg, 7, &Device::Cpu, DType::F32).unwrap(),
    )
    .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

const IDS: [u32; 9] = [3, 17, 200, 45, 45, 9, 120, 258, 33];

/// [`IDS`] as a `(1, seq)` batch.
fn ids() -> Tensor {
    Tensor::new(&IDS, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

#[test]
fn kv_cached_decoding_matches_full_forward() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let m = tiny(arch);
        let all = ids();
        let full_opts = ForwardOpts {
            logits: Logits::All,
            ..Default::default()
        };
        let full = m.forward(&all, None, &full_opts).unwrap().logits.unwrap();
        // Prefill 4 positions, then feed one at a time.
        let mut cache = m.new_cache(4);
        let first = all.narrow(1, 0, 4).unwrap();
        let pre = m.forward(&first, Some(&mut cache), &full_opts).unwrap();
        assert!(max_diff(&pre.logits.unwrap(), &full.narrow(1, 0, 4).unwrap()) < 1e-4);
        for t in 4..IDS.len() {
            let one = all.narrow(1, t, 1).unwrap();
            let step = m
                .forward(&one, Some(&mut cache), &ForwardOpts::default())
                .unwrap()
                .logits
                .unwrap();
            let want = full.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
            assert!(max_diff(&step, &want) < 1e-4, "{arch:?} position {t}");
        }
        assert_eq!(cache.len(), IDS.len());
    }
}

/// Three sequences of different lengths, each prefilled alone, then decoded greedily:
/// alone (a step each) and together (one batched step), with `adapters[i]` on row `i`.
/// Returns both runs' logits per step and row.
fn alone_and_batched(
    m: &Decoder,
    adapters: &[Option<&dyn Adapter>],
) -> (Vec<Vec<Tensor>>, Vec<Vec<Tensor>>) {
    let prompts: [&[u32]; 3] = [&IDS[..2], &IDS, &IDS[3..7]];
    fn opts<'a>(a: Option<&'a dyn Adapter>) -> ForwardOpts<'a> {
        ForwardOpts {
            adapter: a,
            ..Default::default()
        }
    }
    let prefill = |i: usize| {
        let mut c = m.new_cache(32);
        let ids = Tensor::new(prompts[i], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let l = m
            .forward(&ids, Some(&mut c), &opts(adapters[i]))
            .unwrap()
            .logits
            .unwrap();
        (c, l.squeeze(0).unwrap())
    };
    let argmax = |l: &Tensor| l.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap();
    let steps = 4;
    // Alone.
    let mut alone = vec![];
    for (i, &adapter) in adapters.iter().enumerate() {
        let (mut c, mut l) = prefill(i);
        let mut out = vec![];
        for _ in 0..steps {
            let ids = Tensor::new(&[argmax(&l)], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            l = m
                .forward(&ids, Some(&mut c), &opts(adapter))
                .unwrap()
                .logits
                .unwrap()
                .squeeze(0)
                .unwrap();
            out.push(l.clone());
        }
        alone.push(out);
    }
    // Together.
    let (mut caches, mut last): (Vec<Cache>, Vec<Tensor>) = (0..3).map(prefill).unzip();
    let per_row = PerRow::new(adapters.to_vec());
    let mut batched = vec![vec![]; 3];
    for _ in 0..steps {
        let tokens: Vec<u32> = last.iter().map(argmax).collect();
        let mut refs: Vec<&mut Cache> = caches.iter_mut().collect();
        let o = ForwardOpts {
            adapter: adapters
                .iter()
                .any(Option::is_some)
                .then_some(&per_row as &dyn Adapter),
            ..Default::default()
        };
        let l = m.decode_step(&tokens, &mut refs, &o).unwrap();
        last = (0..3).map(|i| l.get(i).unwrap()).collect();
        for (i, r) in last.iter().enumerate() {
            batched[i].push(r.clone());
        }
    }
    (alone, batched)
}

/// A sequence decodes to the same bits whatever else shares its step: every kernel of
/// the batched step computes a row from that row alone.
#[test]
fn a_batched_decode_step_equals_each_sequence_decoded_alone() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        for quant in [None, Some(GgmlDType::Q8_0), Some(GgmlDType::Q4_1)] {
            let mut m = tiny(arch);
            if let Some(q) = quant {
                m.quantize_for_decode(q).unwrap();
            }
            let quant = quant.is_some();
            let (alone, batched) = alone_and_batched(&m, &[None, None, None]);
            // f32 products are row-independent only on the few-row kernels; without
            // them (no AVX2) gemm's blocking follows the row count, so rows agree to
            // rounding only. Quantized products are row-independent everywhere.
            let exact = quant || crate::model::kernels::few_rows::fits(3);
            if !exact {
                eprintln!("no few-row f32 kernels on this CPU: f32 rows compared to 1e-5");
            }
            for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
                for (t, (x, y)) in a.iter().zip(b).enumerate() {
                    let d = max_diff(x, y);
                    let ok = if exact { d == 0.0 } else { d < 1e-5 };
                    assert!(ok, "{arch:?} quant {quant}: row {i} step {t}: {d}");
                }
            }
        }
    }
    let m = tiny(Arch::Llama);
    let mut a = m.new_cache(4);
    let err = m
        .decode_step(&[1, 2], &mut [&mut a], &ForwardOpts::default())
        .unwrap_err();
    assert!(err.to_string().contains("2 tokens for 1 caches"), "{err}");
}

/// Each part of a joint product is its projection's own product with its own bias and
/// delta; the whole product is offered only where no part added anything to its slice (a
/// GPU kernel then reads the parts from it in place).
#[test]
fn joint_decode_products_equal_each_projections_own_product() {
    struct OnUp;
    impl Adapter for OnUp {
        fn delta(&self, _: usize, target: Target, x: &Tensor) -> Result<Option<Tensor>> {
            if target != Target::Up {
                return Ok(None);
            }
            let (b, t, _) = x.dims3()?;
            Ok(Some(Tensor::ones((b, t, 64), x.dtype(), x.device())?))
        }
    }
    // Qwen2 has q, k and v biases: the joint product must add each part's own.
    let m = tiny(Arch::Qwen2);
    let (a, mlp) = (&m.blocks[1].attn, &m.blocks[1].mlp);
    assert_eq!(
        mlp.up.linear.weight().dim(0).unwrap(),
        64,
        "the delta's width"
    );
    let x = Tensor::randn(0f32, 1.0, (3, 1, m.cfg.hidden_size), &Device::Cpu).unwrap();
    let on_up = OnUp;
    for (opts, adapted) in [
        (ForwardOpts::default(), false),
        (
            ForwardOpts {
                adapter: Some(&on_up),
                ..Default::default()
            },
            true,
        ),
    ] {
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            for (parts, plain) in [
                (vec![&a.q, &a.k, &a.v], false),
                (vec![&mlp.gate, &mlp.up], !adapted),
            ] {
                let joint = Joint::new(&parts, dtype).unwrap();
                let out = joint.forward(&parts, &x, 1, &opts).unwrap();
                assert_eq!(out.whole.is_some(), plain, "{dtype:?}, adapted {adapted}");
                if let Some(whole) = &out.whole {
                    let cat = Tensor::cat(&out.parts, 2).unwrap();
                    assert_eq!(max_diff(whole, &cat), 0.0);
                }
                check_parts(&parts, out.parts, &x, dtype, &opts);
            }
        }
    }
}

/// Each of `ys` is its part's own quantized product of `x`, its bias and delta added.
fn check_parts(parts: &[&Proj], ys: Vec<Tensor>, x: &Tensor, dtype: GgmlDType, opts: &ForwardOpts) {
    assert_eq!(ys.len(), parts.len());
    for (p, y) in parts.iter().zip(ys) {
        let own = crate::model::kernels::quant::DecodeMatmul::new(p.linear.weight(), dtype)
            .unwrap()
            .forward(x)
            .unwrap();
        let own = p.finish_decode(own, x, 1, opts).unwrap();
        assert_eq!(y.dims(), own.dims());
        assert_eq!(max_diff(&y, &own), 0.0, "{dtype:?}");
    }
}

/// Canary adapters on rows 0 and 2 of a batch: each row equals its own sequence run alone
/// with its own adapter (row 1, with none, equals the base model), and the canaries do
/// change their rows.
#[test]
fn per_row_adapters_touch_only_their_own_rows() {
    struct Canary(f32);
    impl Adapter for Canary {
        fn delta(&self, layer: usize, target: Target, x: &Tensor) -> Result<Option<Tensor>> {
            if layer == 1 && target == Target::V {
                let (b, t, _) = x.dims3()?;
                return Ok(Some(
                    (Tensor::ones((b, t, 16), x.dtype(), x.device())? * self.0 as f64)?,
                ));
            }
            Ok(None)
        }
    }
    // Quantized products are row-independent on every CPU (see the test above).
    let mut m = tiny(Arch::Llama);
    m.quantize_for_decode(GgmlDType::Q8_0).unwrap();
    let (one, two) = (Canary(1.0), Canary(-3.0));
    let adapters: [Option<&dyn Adapter>; 3] = [Some(&one), None, Some(&two)];
    let (alone, batched) = alone_and_batched(&m, &adapters);
    let (base, _) = alone_and_batched(&m, &[None, None, None]);
    for i in 0..3 {
        for t in 0..alone[i].len() {
            assert_eq!(
                max_diff(&alone[i][t], &batched[i][t]),
                0.0,
                "row {i} step {t}"
            );
        }
    }
    assert_eq!(max_diff(&base[1][0], &batched[1][0]), 0.0, "the plain row");
    assert!(
        max_diff(&base[0][0], &batched[0][0]) > 1e-3,
        "canary 1 changed nothing"
    );
    assert!(
        max_diff(&base[2][0], &batched[2][0]) > 1e-3,
        "canary 2 changed nothing"
    );
}

/// Attention reads K and V in place, as views into the cache's buffer: the spare room of
/// a large cache (rows past the cached length) must never be read as positions.
#[test]
fn decoding_reads_only_the_cached_positions_whatever_the_cache_capacity() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let m = tiny(arch);
        let all = ids();
        let decode = |capacity: usize| {
            let mut cache = m.new_cache(capacity);
            let mut out = vec![logits(&m, &all.narrow(1, 0, 3).unwrap(), &mut cache)];
            for t in 3..IDS.len() {
                out.push(logits(&m, &all.narrow(1, t, 1).unwrap(), &mut cache));
            }
            out
        };
        let exact = decode(IDS.len());
        let roomy = decode(256);
        for (t, (a, b)) in exact.iter().zip(&roomy).enumerate() {
            assert!(
                max_diff(a, b) < 1e-6,
                "{arch:?} step {t}: {}",
                max_diff(a, b)
            );
        }
    }
}

#[test]
fn differentiable_path_equals_fast_path_and_hidden_states_are_exposed() {
    let m = tiny(Arch::Llama);
    let ids = ids();
    let mut opts = ForwardOpts {
        logits: Logits::All,
        hidden_states: true,
        ..Default::default()
    };
    let fast = m.forward(&ids, None, &opts).unwrap();
    opts.differentiable = true;
    let slow = m.forward(&ids, None, &opts).unwrap();
    assert!(max_diff(fast.logits.as_ref().unwrap(), slow.logits.as_ref().unwrap()) < 1e-4);
    let n = m.config().num_hidden_layers;
    assert_eq!(fast.hidden_states.len(), n + 1);
    assert_eq!(fast.hidden_states[0].dims(), &[1, IDS.len(), 32]);
    // hidden_states[0] is the raw embedding of the ids.
    let emb = m.embed.index_select(&ids.squeeze(0).unwrap(), 0).unwrap();
    assert!(max_diff(&fast.hidden_states[0].squeeze(0).unwrap(), &emb) == 0.0);
    // The last hidden state, normed and projected, gives the logits.
    let h = m.norm(&fast.hidden_states[n], &m.norm, false).unwrap();
    let logits = h.broadcast_matmul(&m.lm_head.t().unwrap()).unwrap();
    assert!(max_diff(&logits, fast.logits.as_ref().unwrap()) < 1e-5);
}

/// The mask built by ops (off the CPU) has the host's values, bit for bit.
#[test]
fn a_mask_built_by_ops_equals_the_host_filled_one() {
    for (t, offset, group) in [(2, 0, 1), (5, 0, 3), (4, 7, 2), (1 + 8, 3, 3)] {
        let dev = &Device::Cpu;
        let host = host_mask(t, offset, group, dev).unwrap();
        let ops = device_mask(t, offset, group, dev).unwrap();
        assert_eq!(host.dims(), ops.dims());
        let (a, b): (Vec<f32>, Vec<f32>) = (
            host.flatten_all().unwrap().to_vec1().unwrap(),
            ops.flatten_all().unwrap().to_vec1().unwrap(),
        );
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b), "t {t}, offset {offset}, group {group}");
        assert!(a.iter().any(|x| x.is_infinite()) && a.contains(&0.0));
    }
    // A thread keeps its last mask: the same shape again is not built again, another is.
    let builds = std::cell::Cell::new(0);
    let build = |t| {
        builds.set(builds.get() + 1);
        device_mask(t, 0, 1, &Device::Cpu)
    };
    let first = remembered((3, 0, 1), &Device::Cpu, || build(3)).unwrap();
    let again = remembered((3, 0, 1), &Device::Cpu, || build(3)).unwrap();
    assert_eq!((builds.get(), first.id()), (1, again.id()));
    let other = remembered((4, 0, 1), &Device::Cpu, || build(4)).unwrap();
    assert_eq!((builds.get(), other.dims()), (2, &[4usize, 4][..]));
}

#[test]
fn causal_mask_blocks_the_future() {
    let m = tiny(Arch::Llama);
    let opts = ForwardOpts {
        logits: Logits::All,
        ..Default::default()
    };
    let a = Tensor::new(&[1u32, 2, 3, 4], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let b = Tensor::new(&[1u32, 2, 99, 100], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let la = m.forward(&a, None, &opts).unwrap().logits.unwrap();
    let lb = m.forward(&b, None, &opts).unwrap().logits.unwrap();
    assert!(max_diff(&la.narrow(1, 0, 2).unwrap(), &lb.narrow(1, 0, 2).unwrap()) < 1e-6);
    assert!(max_diff(&la.narrow(1, 2, 2).unwrap(), &lb.narrow(1, 2, 2).unwrap()) > 1e-3);
}

#[test]
fn context_overflow_is_an_error_not_a_panic() {
    let m = tiny(Arch::Llama);
    let ids = Tensor::zeros((1, 513), DType::U32, &Device::Cpu).unwrap();
    let err = m
        .forward(&ids, None, &ForwardOpts::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("context"), "{err}");
}

struct AddOne;
impl Adapter for AddOne {
    fn delta(&self, layer: usize, target: Target, x: &Tensor) -> Result<Option<Tensor>> {
        if layer == 1 && target == Target::V {
            let (b, t, _) = x.dims3()?;
            return Ok(Some(Tensor::ones((b, t, 16), x.dtype(), x.device())?));
        }
        Ok(None)
    }
}

/// Inference passes run on a pool thread: a panic inside one (here an adapter's) must still
/// reach the caller, whose `catch_unwind` answers the request, and the pool must serve the
/// next pass.
#[test]
fn a_panic_inside_an_inference_pass_reaches_the_caller_and_the_pool_goes_on() {
    struct Boom;
    impl Adapter for Boom {
        fn delta(&self, layer: usize, _: Target, _: &Tensor) -> Result<Option<Tensor>> {
            assert!(layer < 1, "boom in layer {layer}");
            Ok(None)
        }
    }
    let mut m = tiny(Arch::Llama);
    m.quantize_for_decode(GgmlDType::Q8_0).unwrap();
    let boom = ForwardOpts {
        adapter: Some(&Boom),
        ..Default::default()
    };
    let mut cache = m.new_cache(8);
    let want = {
        let mut c = m.new_cache(8);
        m.forward(&ids(), Some(&mut c), &ForwardOpts::default())
            .unwrap();
        m.decode_step(&[3], &mut [&mut c], &ForwardOpts::default())
            .unwrap()
    };
    let prefill = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        m.forward(&ids(), None, &boom)
    }));
    let Err(msg) = prefill else {
        panic!("the adapter's panic did not reach the caller")
    };
    assert!(msg
        .downcast_ref::<String>()
        .unwrap()
        .contains("boom in layer 1"));
    m.forward(&ids(), Some(&mut cache), &ForwardOpts::default())
        .unwrap();
    let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut fork = cache.fork(1).unwrap();
        m.decode_step(&[3], &mut [&mut fork], &boom)
    }));
    assert!(step.is_err());
    let got = m
        .decode_step(&[3], &mut [&mut cache], &ForwardOpts::default())
        .unwrap();
    assert_eq!(max_diff(&got, &want), 0.0);
}

#[test]
fn adapter_delta_changes_the_output() {
    let m = tiny(Arch::Llama);
    let ids = ids();
    let base = m
        .forward(&ids, None, &ForwardOpts::default())
        .unwrap()
        .logits
        .unwrap();
    let opts = ForwardOpts {
        adapter: Some(&AddOne),
        ..Default::default()
    };
    let adapted = m.forward(&ids, None, &opts).unwrap().logits.unwrap();
    assert!(max_diff(&base, &adapted) > 1e-3);
    let again = m
        .forward(&ids, None, &ForwardOpts::default())
        .unwrap()
        .logits
        .unwrap();
    assert_eq!(
        max_diff(&base, &again),
        0.0,
        "adapters must not touch the base weights"
    );
}

fn logits(d: &Decoder, ids: &Tensor, cache: &mut Cache) -> Tensor {
    d.forward(ids, Some(cache), &ForwardOpts::default())
        .unwrap()
        .logits
        .unwrap()
}

#[test]
fn quantized_decode_steps_stay_close_to_full_precision_and_prefill_is_unchanged() {
    let cfg = tiny_config(Arch::Qwen2);
    let w = random_weights(&cfg, 9, &Device::Cpu, DType::F32).unwrap();
    let full = Decoder::load(&cfg, w.clone()).unwrap();
    let mut quant = Decoder::load(&cfg, w).unwrap();
    quant.quantize_for_decode(GgmlDType::Q8_0).unwrap();
    let ids = Tensor::new(&[5u32, 80, 12, 200, 7, 7, 31, 99], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let (mut c1, mut c2) = (full.new_cache(16), quant.new_cache(16));
    let prefill = ids.narrow(1, 0, 6).unwrap();
    // Only the output head is quantized in a prefill: logits agree to Q8_0 precision.
    let d = max_diff(
        &logits(&full, &prefill, &mut c1),
        &logits(&quant, &prefill, &mut c2),
    );
    assert!(d < 0.05, "prefill diff {d}");
    for t in 6..8 {
        let one = ids.narrow(1, t, 1).unwrap();
        let a = logits(&full, &one, &mut c1);
        let d = max_diff(&a, &logits(&quant, &one, &mut c2));
        let scale = max_diff(&a, &a.zeros_like().unwrap());
        assert!(d > 0.0, "decode must take the quantized path");
        assert!(d < 0.05 * scale, "decode diff {d} vs scale {scale}");
    }
    // Training ignores the quantized copy entirely.
    let train = ForwardOpts {
        logits: Logits::All,
        differentiable: true,
        ..Default::default()
    };
    let a = full.forward(&ids, None, &train).unwrap().logits.unwrap();
    let b = quant.forward(&ids, None, &train).unwrap().logits.unwrap();
    assert_eq!(max_diff(&a, &b), 0.0);
}

#[test]
fn fused_blocks_match_composed_blocks_in_value_and_every_gradient() {
    use candle_core::Var;
    for arch in [Arch::Llama, Arch::Qwen2] {
        let cfg = tiny_config(arch);
        let vars: HashMap<String, Var> = random_weights(&cfg, 3, &Device::Cpu, DType::F32)
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, Var::from_tensor(&t).unwrap()))
            .collect();
        let weights = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone()));
        let dec = Decoder::load(&cfg, weights.collect()).unwrap();
        // Two sequences, the second right-padded as adaptation's batches are.
        let ids = Tensor::new(&[IDS, [5, 80, 13, 250, 0, 0, 0, 0, 0]], &Device::Cpu).unwrap();
        let r = Tensor::arange(0f32, (2 * IDS.len() * cfg.hidden_size) as f32, &Device::Cpu)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((2, IDS.len(), cfg.hidden_size))
            .unwrap();
        let run = |composed_ops: bool| {
            let opts = ForwardOpts {
                logits: Logits::None,
                differentiable: true,
                composed_ops,
                ..Default::default()
            };
            let mut x = dec.embed_ids(&ids).unwrap();
            for l in 0..dec.num_blocks() {
                x = dec.block_step(l, &x, &opts).unwrap();
            }
            let store = (&x * &r).unwrap().sum_all().unwrap().backward().unwrap();
            // The final norm and an untied head are past the blocks: no gradient.
            let grads: HashMap<String, Tensor> = vars
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), store.get(v.as_tensor())?.clone())))
                .collect();
            (x, grads)
        };
        let (yf, gf) = run(false);
        let (yc, gc) = run(true);
        assert!(
            max_diff(&yf, &yc) < 1e-4,
            "{arch:?}: {}",
            max_diff(&yf, &yc)
        );
        let mut names: Vec<&String> = gf.keys().collect();
        names.sort();
        let mut want: Vec<&String> = gc.keys().collect();
        want.sort();
        assert_eq!(names, want, "{arch:?}: not the same weights got gradients");
        assert_eq!(
            gc.len(),
            vars.len() - if cfg.tie_word_embeddings { 1 } else { 2 }
        );
        for (name, c) in &gc {
            let scale = c
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = max_diff(&gf[name], c);
            assert!(
                d <= 1e-4 * scale.max(1e-3),
                "{arch:?} {name}: {d} of {scale}"
            );
        }
    }
}

#[test]
fn bf16_inference_in_its_own_dtype_stays_close_to_f32_norms_and_attention() {
    // The native path (norms, attention and the cache in bf16, sums in f32 inside the ops)
    // against the converting one, over a prefill and cached decode steps, batched too.
    let cfg = tiny_config(Arch::Qwen2);
    let w = random_weights(&cfg, 5, &Device::Cpu, DType::BF16).unwrap();
    let native = Decoder::load(&cfg, w.clone()).unwrap();
    let mut f32_ops = Decoder::load(&cfg, w).unwrap();
    f32_ops.set_f32_norms_attention(true);
    assert_eq!(
        native.kv_bytes_per_token() * 2,
        f32_ops.kv_bytes_per_token()
    );
    let to32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
    let ids = Tensor::new(&[5u32, 80, 12, 200, 7, 7, 31, 99], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let (mut c1, mut c2) = (native.new_cache(16), f32_ops.new_cache(16));
    let prefill = ids.narrow(1, 0, 6).unwrap();
    let (a, b) = (
        to32(logits(&native, &prefill, &mut c1)),
        to32(logits(&f32_ops, &prefill, &mut c2)),
    );
    let scale = max_diff(&b, &b.zeros_like().unwrap());
    let d = max_diff(&a, &b);
    assert!(d > 0.0, "the native path must not convert");
    assert!(d < 0.05 * scale, "prefill diff {d} vs scale {scale}");
    // The cache holds bf16 on the native path, f32 on the other.
    let (k1, k2) = (
        c1.layers[0].k().unwrap().unwrap(),
        c2.layers[0].k().unwrap().unwrap(),
    );
    assert_eq!((k1.dtype(), k2.dtype()), (DType::BF16, DType::F32));
    for t in 6..8 {
        let one = ids.narrow(1, t, 1).unwrap();
        let a = to32(logits(&native, &one, &mut c1));
        let b = to32(logits(&f32_ops, &one, &mut c2));
        let d = max_diff(&a, &b);
        assert!(d < 0.05 * scale, "decode diff {d} at {t}");
    }
    // A batched step of two rows over their own bf16 caches gives each row's own logits.
    let mut caches = [native.new_cache(16), native.new_cache(16)];
    for (c, n) in caches.iter_mut().zip([3usize, 5]) {
        logits(&native, &ids.narrow(1, 0, n).unwrap(), c);
    }
    let mut alone = Vec::new();
    for (c, n) in caches.iter().zip([3usize, 5]) {
        let mut c = c.fork(1).unwrap();
        alone.push(to32(logits(&native, &ids.narrow(1, n, 1).unwrap(), &mut c)));
    }
    let [c0, c1b] = &mut caches;
    let mut rows = [c0, c1b];
    let both = to32(
        native
            .decode_step(&[200, 7], &mut rows, &ForwardOpts::default())
            .unwrap(),
    );
    for (i, a) in alone.iter().enumerate() {
        let d = max_diff(&both.narrow(0, i, 1).unwrap(), a);
        assert!(d < 0.05 * scale, "batched row {i} diff {d}");
    }
}

/// A low-rank adapter on Q and O of every layer, `scale * B A x`, that says so.
struct LowRankTest {
    id: u64,
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl LowRankTest {
    fn new(id: u64, rank: usize, seed: f64) -> Self {
        let dev = Device::Cpu;
        let r = |n: usize, m: usize, k: f64| {
            Tensor::arange(0f32, (n * m) as f32, &dev)
                .unwrap()
                .reshape((n, m))
                .unwrap()
                .affine(0.37 * k, 0.0)
                .unwrap()
                .sin()
                .unwrap()
        };
        Self {
            id,
            a: r(rank, 32, seed),
            b: r(32, rank, seed + 1.0),
            scale: 0.5 * seed,
        }
    }
}

impl Adapter for LowRankTest {
    fn delta(&self, _l: usize, target: Target, x: &Tensor) -> Result<Option<Tensor>> {
        if !matches!(target, Target::Q | Target::O) {
            return Ok(None);
        }
        let y = x
            .broadcast_matmul(&self.a.t()?)?
            .broadcast_matmul(&self.b.t()?)?;
        Ok(Some((y * self.scale)?))
    }

    fn low_rank(&self, _l: usize, target: Target) -> Option<LowRank<'_>> {
        matches!(target, Target::Q | Target::O).then_some(LowRank {
            id: self.id,
            a: &self.a,
            b: &self.b,
            scale: self.scale,
        })
    }

    fn is_low_rank(&self) -> bool {
        true
    }
}

#[test]
fn gathered_low_rank_rows_equal_each_row_alone_and_a_cache_follows_its_adapters() {
    // Quantized products are row-independent on every CPU (see the tests above).
    let mut m = tiny(Arch::Llama);
    m.quantize_for_decode(GgmlDType::Q8_0).unwrap();
    let (one, two, three) = (
        LowRankTest::new(1, 4, 1.0),
        LowRankTest::new(2, 4, 2.0),
        LowRankTest::new(3, 4, 3.0),
    );
    // Through `alone_and_batched` (a fresh stack per step): exact, and each adapter acts.
    let adapters: [Option<&dyn Adapter>; 3] = [Some(&one), None, Some(&two)];
    let (alone, batched) = alone_and_batched(&m, &adapters);
    let (base, _) = alone_and_batched(&m, &[None, None, None]);
    for i in 0..3 {
        for t in 0..alone[i].len() {
            let d = max_diff(&alone[i][t], &batched[i][t]);
            assert_eq!(d, 0.0, "row {i} step {t}");
        }
    }
    assert_eq!(max_diff(&base[1][0], &batched[1][0]), 0.0, "the plain row");
    assert!(
        max_diff(&base[0][0], &batched[0][0]) > 1e-3,
        "adapter 1 acted"
    );

    // One cache across steps whose rows change adapters: every step equals its rows alone.
    let cache = Gathered::default();
    let step = |rows: [Option<&dyn Adapter>; 2]| {
        let mut caches = [m.new_cache(8), m.new_cache(8)];
        for c in caches.iter_mut() {
            logits(&m, &ids().narrow(1, 0, 3).unwrap(), c);
        }
        let mut alone = Vec::new();
        for (c, a) in caches.iter().zip(rows) {
            let mut c = c.fork(1).unwrap();
            let o = ForwardOpts {
                adapter: a,
                ..Default::default()
            };
            let one = Tensor::new(&[[IDS[3]]], &Device::Cpu).unwrap();
            alone.push(m.forward(&one, Some(&mut c), &o).unwrap().logits.unwrap());
        }
        let per_row = PerRow::with_cache(rows.to_vec(), &cache);
        let o = ForwardOpts {
            adapter: Some(&per_row),
            ..Default::default()
        };
        let [c0, c1] = &mut caches;
        let both = m.decode_step(&[IDS[3]; 2], &mut [c0, c1], &o).unwrap();
        for (i, a) in alone.iter().enumerate() {
            assert_eq!(max_diff(&both.narrow(0, i, 1).unwrap(), a), 0.0, "row {i}");
        }
    };
    step([Some(&one), Some(&two)]);
    let held = cache.entries();
    assert_eq!(
        held,
        2 * m.config().num_hidden_layers,
        "Q and O of every layer"
    );
    step([Some(&two), Some(&one)]); // the same adapters, swapped rows
    step([Some(&three), Some(&one)]); // a new adapter in a row
    step([None, Some(&three)]);
    assert_eq!(cache.entries(), held);
    // Factors of different shapes: each row alone, nothing stacked.
    let wide = LowRankTest::new(4, 8, 4.0);
    let fresh = Gathered::default();
    let per_row = PerRow::with_cache(vec![Some(&one as &dyn Adapter), Some(&wide)], &fresh);
    let x = Tensor::ones((2, 1, 32), DType::F32, &Device::Cpu).unwrap();
    let d = per_row.delta(0, Target::Q, &x).unwrap().unwrap();
    let want = Tensor::cat(
        &[
            one.delta(0, Target::Q, &x.narrow(0, 0, 1).unwrap())
                .unwrap()
                .unwrap(),
            wide.delta(0, Target::Q, &x.narrow(0, 1, 1).unwrap())
                .unwrap()
                .unwrap(),
        ],
        0,
    )
    .unwrap();
    assert_eq!(max_diff(&d, &want), 0.0);
    assert_eq!(fresh.entries(), 0);
}

#[test]
fn row_factors_describe_each_rows_delta() {
    // What the GPU's one-launch LoRA add computes from them, y + s_i B_i (A_i x_i), must be
    // what each row's adapter adds: checked here with candle's ops on the factors.
    let (one, two) = (LowRankTest::new(1, 4, 1.0), LowRankTest::new(2, 4, 2.0));
    let x = Tensor::randn(0f32, 1.0, (3, 1, 32), &Device::Cpu).unwrap();
    let from = |a: &Tensor, b: &Tensor, s: f64, x: &Tensor| {
        (x.broadcast_matmul(&a.t().unwrap())
            .unwrap()
            .broadcast_matmul(&b.t().unwrap())
            .unwrap()
            * s)
            .unwrap()
    };
    match one.row_factors(0, Target::Q, &x).unwrap() {
        Some(RowFactors::Shared { a, b, scale }) => {
            let want = one.delta(0, Target::Q, &x).unwrap().unwrap();
            assert_eq!(max_diff(&from(&a, &b, scale, &x), &want), 0.0);
        }
        _ => panic!("a single low-rank adapter shares its factors across rows"),
    }
    assert!(one.row_factors(0, Target::V, &x).unwrap().is_none());
    let cache = Gathered::default();
    let rows: Vec<Option<&dyn Adapter>> = vec![Some(&one), None, Some(&two)];
    let per_row = PerRow::with_cache(rows.clone(), &cache);
    let Some(RowFactors::Stacked { a, b, scales }) = per_row.row_factors(0, Target::Q, &x).unwrap()
    else {
        panic!("a batch of low-rank adapters stacks its factors");
    };
    assert_eq!((a.dims(), b.dims()), (&[3, 4, 32][..], &[3, 32, 4][..]));
    let s = scales.to_vec1::<f32>().unwrap();
    assert_eq!(s, vec![0.5, 0.0, 1.0]);
    for (i, adapter) in rows.iter().enumerate() {
        let xi = x.narrow(0, i, 1).unwrap();
        let got = from(&a.get(i).unwrap(), &b.get(i).unwrap(), s[i] as f64, &xi);
        match adapter {
            Some(ad) => {
                let want = ad.delta(0, Target::Q, &xi).unwrap().unwrap();
                assert!(max_diff(&got, &want) < 1e-6, "row {i}");
            }
            None => assert_eq!(max_diff(&got, &got.zeros_like().unwrap()), 0.0),
        }
    }
    // Not gathered, or a batch of another size: no factors.
    let alone = PerRow::each_alone(rows);
    assert!(alone.row_factors(0, Target::Q, &x).unwrap().is_none());
    assert!(per_row
        .row_factors(0, Target::Q, &x.narrow(0, 0, 2).unwrap())
        .unwrap()
        .is_none());
}

#[test]
fn joined_projections_give_the_separate_products_and_leave_trained_weights_apart() {
    // What a GPU load does: q, k, v and gate, up as one product each over views of one stack.
    let cfg = tiny_config(Arch::Qwen2); // with q, k, v biases
    let w = random_weights(&cfg, 4, &Device::Cpu, DType::F32).unwrap();
    let apart = Decoder::load(&cfg, w.clone()).unwrap();
    let mut joined = Decoder::load(&cfg, w).unwrap();
    joined.join_projections().unwrap();
    assert!(joined.blocks.iter().all(|b| matches!(
        (&b.attn.qkv, &b.mlp.gate_up),
        (
            Some(Joint {
                body: JointBody::Full { .. },
                ..
            }),
            Some(_)
        )
    )));
    let lora = LowRankTest::new(9, 4, 1.5);
    for adapter in [None, Some(&lora as &dyn Adapter)] {
        let o = ForwardOpts {
            adapter,
            ..Default::default()
        };
        let (mut c1, mut c2) = (apart.new_cache(16), joined.new_cache(16));
        let pre = ids().narrow(1, 0, 5).unwrap();
        let a = apart
            .forward(&pre, Some(&mut c1), &o)
            .unwrap()
            .logits
            .unwrap();
        let b = joined
            .forward(&pre, Some(&mut c2), &o)
            .unwrap()
            .logits
            .unwrap();
        assert!(max_diff(&a, &b) < 1e-5, "prefill");
        for t in 5..IDS.len() {
            let one = ids().narrow(1, t, 1).unwrap();
            let a = apart
                .forward(&one, Some(&mut c1), &o)
                .unwrap()
                .logits
                .unwrap();
            let b = joined
                .forward(&one, Some(&mut c2), &o)
                .unwrap()
                .logits
                .unwrap();
            assert!(max_diff(&a, &b) < 1e-5, "step {t}");
        }
        // A batched step (q, k, v apart, gate and up joined).
        let mut two = [c1.fork(1).unwrap(), c1.fork(1).unwrap()];
        let mut four = [c2.fork(1).unwrap(), c2.fork(1).unwrap()];
        let [x0, x1] = &mut two;
        let a = apart.decode_step(&[3, 4], &mut [x0, x1], &o).unwrap();
        let [y0, y1] = &mut four;
        let b = joined.decode_step(&[3, 4], &mut [y0, y1], &o).unwrap();
        assert!(max_diff(&a, &b) < 1e-5, "batched step");
    }
    // Trained weights (a full-scope copy) are not joined: their variables stay multiplied.
    let vars: HashMap<String, Tensor> = apart
        .named_weights()
        .into_iter()
        .map(|(n, t)| {
            (
                n,
                candle_core::Var::from_tensor(&t)
                    .unwrap()
                    .as_tensor()
                    .clone(),
            )
        })
        .collect();
    let mut trained = Decoder::load(&cfg, vars).unwrap();
    trained.join_projections().unwrap();
    assert!(trained
        .blocks
        .iter()
        .all(|b| b.attn.qkv.is_none() && b.mlp.gate_up.is_none()));
}

/// Steps written at positions held on the device (what a captured graph replays) give the bits
/// of ordinary decode steps, row for row, with per-row adapters, quantized decode weights and
/// rows of different lengths; the caches end up holding the same keys.
#[test]
fn device_steps_give_the_bits_of_decode_steps() {
    let one = LowRankTest::new(1, 4, 1.0);
    let two = LowRankTest::new(2, 4, 2.0);
    let mut quant = tiny(Arch::Llama);
    quant.quantize_for_decode(GgmlDType::Q8_0).unwrap();
    for m in [tiny(Arch::Llama), tiny(Arch::Qwen2), quant] {
        let prompts: [&[u32]; 3] = [&IDS[..2], &IDS, &IDS[3..7]];
        let adapters: [Option<&dyn Adapter>; 3] = [Some(&one), None, Some(&two)];
        let gathered = Gathered::default();
        let per_row = PerRow::with_cache(adapters.to_vec(), &gathered);
        let opts = ForwardOpts {
            adapter: Some(&per_row),
            ..Default::default()
        };
        // Small capacities: the graph's reserve must grow them before its first step.
        let mut eager: Vec<Cache> = prompts.iter().map(|_| m.new_cache(4)).collect();
        let mut tokens = Vec::new();
        for (c, (p, a)) in eager.iter_mut().zip(prompts.iter().zip(adapters)) {
            let o = ForwardOpts {
                adapter: a,
                ..Default::default()
            };
            let ids = Tensor::new(*p, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let l = m.forward(&ids, Some(c), &o).unwrap().logits.unwrap();
            tokens.push(
                l.argmax(D::Minus1)
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
                    .to_scalar::<u32>()
                    .unwrap(),
            );
        }
        // Two ghost slots beside the three rows: they write and read only their own buffers.
        let mut graphed: Vec<Cache> = eager.iter().map(|c| c.fork(0).unwrap()).collect();
        let mut refs: Vec<&mut Cache> = graphed.iter_mut().collect();
        let mut g = StepGraph::with_slots(&m, &mut refs, 6, 5).unwrap();
        assert!(!g.captured(), "no graph on the CPU");
        assert_eq!(g.slots(), 5);
        let mut next = tokens.clone();
        for step in 0..6 {
            let mut e: Vec<&mut Cache> = eager.iter_mut().collect();
            let want = m.decode_step(&tokens, &mut e, &opts).unwrap();
            let (got, rebound) = g.step(&m, &next, &mut refs, &adapters).unwrap();
            assert!(!rebound, "the same rows every step");
            assert_eq!(max_diff(&want, &got), 0.0, "step {step}");
            tokens = want.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
            next = got.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
        }
        drop(refs);
        assert_same_caches(&eager, &graphed);
    }
}

/// A step graph refuses what would write outside its rows' buffers: more rows than slots, a
/// cache longer than it was sized for, a step past a cache's room.
#[test]
fn a_step_graph_refuses_more_rows_than_slots_and_steps_past_its_room() {
    let m = tiny(Arch::Llama);
    let prefill = |c: &mut Cache| {
        logits(&m, &ids().narrow(1, 0, 3).unwrap(), c);
    };
    let (mut a, mut b, mut long) = (m.new_cache(8), m.new_cache(8), m.new_cache(40));
    prefill(&mut a);
    prefill(&mut b);
    prefill(&mut long);
    let mut g = StepGraph::new(&m, &mut [&mut a], 2).unwrap();
    assert!(
        g.step(&m, &[5, 6], &mut [&mut a, &mut b], &[None, None])
            .is_err(),
        "two rows, one slot"
    );
    assert!(!g.serves(&[&a, &b], &[None, None]));
    assert!(
        g.step(&m, &[5, 6], &mut [&mut a], &[None]).is_err(),
        "two tokens, one row"
    );
    assert_eq!(
        (a.len(), b.len()),
        (3, 3),
        "the refused steps counted nothing"
    );
    // Sized for 8 positions: a cache of 40 does not fit its attention.
    assert!(!g.serves(&[&long], &[None]));
    assert!(g.step(&m, &[5], &mut [&mut long], &[None]).is_err());
    assert_eq!(long.len(), 3);
    // Room for 2 more positions past the prefill: capacity 8 already holds them, and more.
    for _ in 0..5 {
        g.step(&m, &[5], &mut [&mut a], &[None]).unwrap();
    }
    assert_eq!(a.len(), 8);
    let err = g.step(&m, &[5], &mut [&mut a], &[None]).unwrap_err();
    assert!(err.to_string().contains("past the room"), "{err}");
    assert_eq!(a.len(), 8);
    // An empty cache has no buffers to write into.
    let mut empty = m.new_cache(8);
    assert!(StepGraph::new(&m, &mut [&mut empty], 2).is_err());
    assert!(!g.serves(&[&empty], &[None]));
}

/// Rows join and leave a step graph without a new one: a sequence keeps its slot, a new one
/// takes a free slot, a slot left empty is a ghost, and every step gives each row the bits of
/// a plain step of the same rows (its own cache, position and adapter).
#[test]
fn a_step_graph_rebinds_to_rows_that_join_and_leave() {
    let m = tiny(Arch::Llama);
    let (one, two, three) = (
        LowRankTest::new(11, 4, 1.0),
        LowRankTest::new(12, 4, 2.0),
        LowRankTest::new(13, 4, 3.0),
    );
    let adapters: [Option<&dyn Adapter>; 4] = [Some(&one), None, Some(&two), Some(&three)];
    // Four sequences of different prompts; each has an eager twin.
    let mut graphed: Vec<Cache> = (0..4)
        .map(|i| {
            let mut c = m.new_cache(16);
            logits(&m, &ids().narrow(1, i, 3 + i).unwrap(), &mut c);
            c
        })
        .collect();
    let mut eager: Vec<Cache> = graphed.iter().map(|c| c.fork(12).unwrap()).collect();
    let mut tokens = [3u32, 5, 7, 9];
    let mut g = {
        let mut refs: Vec<&mut Cache> = graphed.iter_mut().take(3).collect();
        StepGraph::with_slots(&m, &mut refs, 0, 4).unwrap()
    };
    // Which sequences decode together at each step (by index), and whether the graph's
    // slots change then.
    let plan: [(&[usize], bool); 6] = [
        (&[0, 1, 2], false),
        (&[0, 1, 2], false),
        (&[2, 0], true),    // 1 leaves, the others keep their slots in another order
        (&[0, 3, 2], true), // 3 joins: slot 1, 1's old one
        (&[3, 2, 0, 1], true), // 1 is back, in the ghost slot
        (&[3, 2, 0, 1], false),
    ];
    for (step, (rows, rebind)) in plan.iter().enumerate() {
        let ads: Vec<Option<&dyn Adapter>> = rows.iter().map(|&i| adapters[i]).collect();
        let toks: Vec<u32> = rows.iter().map(|&i| tokens[i]).collect();
        let gathered = Gathered::default();
        let per_row = PerRow::with_cache(ads.clone(), &gathered);
        let opts = ForwardOpts {
            adapter: Some(&per_row),
            ..Default::default()
        };
        let want = {
            let mut e: Vec<&mut Cache> = pick(&mut eager, rows);
            m.decode_step(&toks, &mut e, &opts).unwrap()
        };
        let live: Vec<&Cache> = rows.iter().map(|&i| &graphed[i]).collect();
        assert!(g.serves(&live, &ads), "step {step}");
        g.release(&live).unwrap();
        let mut refs = pick(&mut graphed, rows);
        let (got, rebound) = g.step(&m, &toks, &mut refs, &ads).unwrap();
        assert_eq!(rebound, *rebind, "step {step}");
        assert_eq!(max_diff(&want, &got), 0.0, "step {step}");
        let next = want.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
        for (&i, t) in rows.iter().zip(next) {
            tokens[i] = t;
        }
    }
    assert_same_caches(&eager, &graphed);
}

/// Each pair of caches holds as many positions, and the same keys.
fn assert_same_caches(eager: &[Cache], graphed: &[Cache]) {
    for (a, b) in eager.iter().zip(graphed) {
        assert_eq!(a.len(), b.len());
        let (ka, kb) = (
            a.layers[1].k().unwrap().unwrap(),
            b.layers[1].k().unwrap().unwrap(),
        );
        assert_eq!(max_diff(&ka, &kb), 0.0, "cached keys");
    }
}

/// `rows` of `caches`, in that order, mutably.
fn pick<'a>(caches: &'a mut [Cache], rows: &[usize]) -> Vec<&'a mut Cache> {
    let mut slots: Vec<Option<&'a mut Cache>> = caches.iter_mut().map(Some).collect();
    rows.iter()
        .map(|&i| slots[i].take().expect("each row once"))
        .collect()
}

/// Restacking writes the rows' factors into the stacks already held (the buffers a captured
/// step reads), copying only what changed, and the result is what stacking them afresh gives.
#[test]
fn restacking_rewrites_the_held_stacks_in_place() {
    let (one, two, three) = (
        LowRankTest::new(21, 4, 1.0),
        LowRankTest::new(22, 4, 2.0),
        LowRankTest::new(23, 4, 3.0),
    );
    let x = Tensor::ones((3, 1, 32), DType::F32, &Device::Cpu).unwrap();
    let held = Gathered::default();
    let factors =
        |rows: Vec<Option<&dyn Adapter>>, cache: &Gathered| match PerRow::with_cache(rows, cache)
            .row_factors(0, Target::Q, &x)
            .unwrap()
        {
            Some(RowFactors::Stacked { a, b, scales }) => (a, b, scales),
            _ => panic!("stacked"),
        };
    let (a0, b0, s0) = factors(vec![Some(&one), None, Some(&two)], &held);
    // Only layer 0's Q is held: an adapter with factors elsewhere (O) does not fit.
    assert!(!held.restackable(&[Some(&three), None, None], 1));
    let (q_two, q_three) = (OnlyQ(&two), OnlyQ(&three));
    let rows: Vec<Option<&dyn Adapter>> = vec![Some(&q_two), Some(&q_three), None];
    assert!(held.restackable(&rows, 1));
    held.restack(&rows, 1).unwrap();
    let (a1, b1, s1) = factors(rows.clone(), &held);
    assert_eq!(
        (a1.id(), b1.id(), s1.id()),
        (a0.id(), b0.id(), s0.id()),
        "in place"
    );
    let (fa, fb, fs) = factors(rows.clone(), &Gathered::default());
    assert_eq!(
        max_diff(&a1.narrow(0, 0, 2).unwrap(), &fa.narrow(0, 0, 2).unwrap()),
        0.0
    );
    assert_eq!(
        max_diff(&b1.narrow(0, 0, 2).unwrap(), &fb.narrow(0, 0, 2).unwrap()),
        0.0
    );
    assert_eq!(s1.to_vec1::<f32>().unwrap(), fs.to_vec1::<f32>().unwrap());
    assert_eq!(s1.to_vec1::<f32>().unwrap(), vec![1.0, 1.5, 0.0]);
    // Another row count, another rank, or an adapter that is not purely low-rank: refused.
    assert!(!held.restackable(&[Some(&one), None], 1));
    let wide = LowRankTest::new(24, 6, 1.0);
    assert!(!held.restackable(&[Some(&OnlyQ(&wide)), None, None], 1));
    assert!(!held.restackable(&[Some(&AddOne), None, None], 1));
    assert!(held.restack(&[Some(&AddOne), None, None], 1).is_err());
    assert_eq!(
        s1.to_vec1::<f32>().unwrap(),
        vec![1.0, 1.5, 0.0],
        "nothing written"
    );
}

/// A low-rank adapter on layer 0's Q only.
struct OnlyQ<'a>(&'a LowRankTest);

impl Adapter for OnlyQ<'_> {
    fn delta(&self, l: usize, t: Target, x: &Tensor) -> Result<Option<Tensor>> {
        match (l, t) {
            (0, Target::Q) => self.0.delta(l, t, x),
            _ => Ok(None),
        }
    }

    fn low_rank(&self, l: usize, t: Target) -> Option<LowRank<'_>> {
        match (l, t) {
            (0, Target::Q) => self.0.low_rank(l, t),
            _ => None,
        }
    }

    fn is_low_rank(&self) -> bool {
        true
    }
}

/// A cache grows by its capacity again until it holds what is asked, keeping what it holds,
/// and counts positions written on the device only within its buffers.
#[test]
fn a_cache_grows_keeping_what_it_holds_and_counts_device_writes_within_its_room() {
    let m = tiny(Arch::Llama);
    let mut c = m.new_cache(4);
    logits(&m, &ids().narrow(1, 0, 3).unwrap(), &mut c);
    let held = c.layers[1].k().unwrap().unwrap();
    assert_eq!((c.len(), c.capacity()), (3, 4));
    c.reserve(9).unwrap();
    assert_eq!((c.len(), c.capacity()), (3, 12), "4, then 8, then 12");
    assert_eq!(max_diff(&held, &c.layers[1].k().unwrap().unwrap()), 0.0);
    c.advance(9).unwrap();
    assert_eq!(c.len(), 12);
    assert!(c.advance(1).is_err(), "past the buffers");
    assert_eq!(c.len(), 12, "a refused advance counts nothing");
    let mut empty = m.new_cache(4);
    assert!(empty.reserve(8).is_err(), "no shape to grow yet");
    assert!(empty.advance(1).is_err(), "no buffers written");
}
