//! Each fused op against candle's composed ops: the same values and the same gradients.

use candle_core::{DType, Device, Result, Tensor, Var, D};

use super::*;

/// Deterministic values in [-scale, scale].
fn data(shape: &[usize], seed: u32, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            scale * ((s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0)
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Largest difference relative to the largest magnitude of `want`.
fn rel_diff(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.shape(), want.shape());
    let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
    let m = want.abs().unwrap().max_all().unwrap();
    (d.to_scalar::<f32>().unwrap()) / m.to_scalar::<f32>().unwrap().max(1e-12)
}

/// The value of `f` at `inputs` and the gradients of `sum(f * r)` for the inputs flagged
/// trainable (`None` where a frozen input got none, as it must).
fn value_and_grads(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[(Tensor, bool)],
    r_seed: u32,
) -> (Tensor, Vec<Option<Tensor>>) {
    let vars: Vec<Tensor> = inputs
        .iter()
        .map(|(t, train)| match train {
            true => Var::from_tensor(t).unwrap().as_tensor().clone(),
            false => t.clone(),
        })
        .collect();
    let y = f(&vars).unwrap();
    let r = data(y.dims(), r_seed, 1.0);
    let store = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = vars.iter().map(|v| store.get(v).cloned()).collect();
    (y, grads)
}

/// Asserts that `fused` and `composed` agree in value and in every input's gradient.
fn assert_same(
    fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    composed: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[(Tensor, bool)],
) {
    let (yf, gf) = value_and_grads(fused, inputs, 99);
    let (yc, gc) = value_and_grads(composed, inputs, 99);
    assert!(
        rel_diff(&yf, &yc) < 1e-5,
        "values differ by {}",
        rel_diff(&yf, &yc)
    );
    for (i, ((f, c), (_, train))) in gf.iter().zip(&gc).zip(inputs).enumerate() {
        match (f, c) {
            (Some(f), Some(c)) => {
                assert!(*train, "input {i} is frozen but got a gradient");
                let d = rel_diff(f, c);
                assert!(d < 1e-4, "gradient of input {i} differs by {d}");
            }
            (None, None) => assert!(!*train, "input {i} got no gradient"),
            (f, c) => panic!(
                "input {i}: fused {:?}, composed {:?}",
                f.is_some(),
                c.is_some()
            ),
        }
    }
}

#[test]
fn rms_norm_matches_the_composed_norm_and_its_gradients() {
    let eps = 1e-5;
    let fused = |t: &[Tensor]| rms_norm(&t[0], &t[1], eps);
    let composed = |t: &[Tensor]| candle_nn::ops::rms_norm_slow(&t[0], &t[1], eps as f32);
    // 20 columns: not a multiple of the 8 running sums.
    let x = data(&[2, 3, 20], 1, 2.0);
    let w = (data(&[20], 2, 0.5) + 1.0).unwrap();
    assert_same(&fused, &composed, &[(x.clone(), true), (w.clone(), true)]);
    // A frozen norm weight gets no gradient (and costs none).
    assert_same(&fused, &composed, &[(x, true), (w, false)]);
}

#[test]
fn swiglu_matches_silu_times_up_and_its_gradients() {
    let fused = |t: &[Tensor]| swiglu(&t[0], &t[1]);
    let composed = |t: &[Tensor]| candle_nn::ops::silu(&t[0])? * &t[1];
    let (a, b) = (data(&[2, 3, 13], 3, 6.0), data(&[2, 3, 13], 4, 2.0));
    assert_same(&fused, &composed, &[(a, true), (b, true)]);
    assert!(swiglu(&data(&[2, 3], 5, 1.0), &data(&[3, 2], 6, 1.0)).is_err());
}

/// Rotary tables as the decoder builds them: `(positions, head_dim / 2)`.
fn rope_tables(positions: usize, head_dim: usize) -> (Tensor, Tensor) {
    let inv: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / head_dim as f32))
        .collect();
    let angles: Vec<f32> = (0..positions)
        .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
        .collect();
    let a = Tensor::from_vec(angles, (positions, head_dim / 2), &Device::Cpu).unwrap();
    (a.cos().unwrap(), a.sin().unwrap())
}

/// Causal attention composed from candle ops (rotate half, repeated kv heads, masked
/// softmax), in the layout of [`causal_attention`].
#[allow(clippy::too_many_arguments)]
fn composed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv: usize,
    d: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let (b, t, _) = q.dims3()?;
    let split = |y: &Tensor, h: usize| y.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous();
    let (cos, sin) = (cos.narrow(0, 0, t)?, sin.narrow(0, 0, t)?);
    let q = candle_nn::rotary_emb::rope_slow(&split(q, heads)?, &cos, &sin)?;
    let k = candle_nn::rotary_emb::rope_slow(&split(k, kv)?, &cos, &sin)?;
    let v = split(v, kv)?;
    let k = candle_transformers::utils::repeat_kv(k, heads / kv)?.contiguous()?;
    let v = candle_transformers::utils::repeat_kv(v, heads / kv)?.contiguous()?;
    let mask: Vec<f32> = (0..t * t)
        .map(|n| {
            if n % t > n / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)?;
    let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(&mask)?;
    let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
    p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, heads * d))
}

#[test]
fn causal_attention_matches_the_composed_attention_and_its_gradients() {
    // Grouped queries (6 heads over 2 kv heads), 2 sequences of 7, rotary tables longer than
    // the sequences.
    let (heads, kv, d, t) = (6, 2, 8, 7);
    let (cos, sin) = rope_tables(16, d);
    let fused = |x: &[Tensor]| causal_attention(&x[0], &x[1], &x[2], heads, kv, &cos, &sin);
    let composed = |x: &[Tensor]| composed_attention(&x[0], &x[1], &x[2], heads, kv, d, &cos, &sin);
    let q = data(&[2, t, heads * d], 7, 1.5);
    let k = data(&[2, t, kv * d], 8, 1.5);
    let v = data(&[2, t, kv * d], 9, 1.0);
    assert_same(
        &fused,
        &composed,
        &[(q.clone(), true), (k.clone(), true), (v.clone(), true)],
    );
    // Values from a frozen projection get no gradient.
    assert_same(
        &fused,
        &composed,
        &[(q.clone(), true), (k.clone(), true), (v.clone(), false)],
    );
    // One head per kv head, one position.
    let one = |x: &[Tensor]| causal_attention(&x[0], &x[1], &x[2], 2, 2, &cos, &sin);
    let one_c = |x: &[Tensor]| composed_attention(&x[0], &x[1], &x[2], 2, 2, d, &cos, &sin);
    let q1 = data(&[1, 1, 2 * d], 10, 1.0);
    let k1 = data(&[1, 1, 2 * d], 11, 1.0);
    assert_same(&one, &one_c, &[(q1, true), (k1.clone(), true), (k1, true)]);
}

#[test]
fn causal_attention_rejects_shapes_it_was_not_built_for() {
    let (cos, sin) = rope_tables(4, 8);
    let q = data(&[1, 3, 16], 1, 1.0);
    let kv = data(&[1, 3, 8], 2, 1.0);
    // Heads not a multiple of the kv heads; queries not heads * head size; more positions
    // than the rotary tables.
    assert!(causal_attention(&q, &kv, &kv, 3, 2, &cos, &sin).is_err());
    assert!(causal_attention(&q, &kv, &kv, 4, 1, &cos, &sin).is_err());
    let long = data(&[1, 5, 16], 3, 1.0);
    let long_kv = data(&[1, 5, 8], 4, 1.0);
    assert!(causal_attention(&long, &long_kv, &long_kv, 2, 1, &cos, &sin).is_err());
    assert!(applies(&q) && !applies(&q.to_dtype(DType::F64).unwrap()));
}

#[test]
fn rope_matches_the_composed_rotation_and_its_gradient() {
    // Tables longer than the sequence, as the decoder's are: only the first rows are read.
    let (cos, sin) = rope_tables(9, 8);
    let fused = |t: &[Tensor]| rope(&t[0], &cos, &sin);
    let composed = |t: &[Tensor]| {
        let (c, s) = (cos.narrow(0, 0, 5)?, sin.narrow(0, 0, 5)?);
        candle_nn::rotary_emb::rope_slow(&t[0], &c, &s)
    };
    assert_same(&fused, &composed, &[(data(&[2, 3, 5, 8], 7, 1.5), true)]);
    assert!(rope(&data(&[1, 1, 5, 7], 8, 1.0), &cos, &sin).is_err());
    assert!(rope(&data(&[1, 1, 12, 8], 8, 1.0), &cos, &sin).is_err());
}

#[test]
fn softmax_matches_the_composed_softmax_and_its_gradient_with_masked_entries() {
    let fused = |t: &[Tensor]| softmax_last_dim(&t[0]);
    let composed = |t: &[Tensor]| candle_nn::ops::softmax(&t[0], D::Minus1);
    // A causal mask's -inf entries, as attention's scores carry them.
    let mask = Tensor::from_vec(
        (0..6 * 11)
            .map(|i| {
                if i % 11 > 6 + i / 11 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect::<Vec<_>>(),
        (6, 11),
        &Device::Cpu,
    )
    .unwrap();
    let x = data(&[2, 6, 11], 9, 4.0).broadcast_add(&mask).unwrap();
    assert_same(&fused, &composed, &[(x, true)]);
}

#[test]
fn lora_delta_matches_the_composed_delta_and_its_gradients() {
    // Rows from 2 sequences of 5; rank 3; more outputs than inputs; a scale of 1.5.
    let (inp, rank, outs, s) = (12, 3, 17, 1.5);
    let fused = |t: &[Tensor]| lora_delta(&t[0], &t[1], &t[2], s);
    let composed = |t: &[Tensor]| {
        let h = t[0].broadcast_matmul(&t[1].t()?)?;
        h.broadcast_matmul(&t[2].t()?)? * s
    };
    let x = data(&[2, 5, inp], 21, 1.0);
    let a = data(&[rank, inp], 22, 0.5);
    let b = data(&[outs, rank], 23, 0.5);
    assert_same(
        &fused,
        &composed,
        &[(x.clone(), true), (a.clone(), true), (b.clone(), true)],
    );
    // A frozen adapter (a domain adapter's): the input's gradient only.
    assert_same(
        &fused,
        &composed,
        &[(x.clone(), true), (a.clone(), false), (b.clone(), false)],
    );
    // Bad shapes are refused, and the CPU keeps the composed delta.
    assert!(lora_delta(&x, &b, &a, s).is_err());
    assert!(lora_delta(&x.to_dtype(DType::F64).unwrap(), &a, &b, s).is_err());
    assert!(!lora_takes(&x, &a, &b));
}
