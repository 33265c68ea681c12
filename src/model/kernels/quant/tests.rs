use super::*;

/// Deterministic values in about [-1, 1], with a few large ones so scales differ per block.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0;
            if i % 37 == 0 {
                v * 8.0
            } else {
                v
            }
        })
        .collect()
}

const FORMATS: [Format; 2] = [Format::Q8_0, Format::Q4_1];

fn weight(n: usize, k: usize, format: Format) -> QWeight {
    let w = Tensor::from_vec(values(n * k, 1), (n, k), &Device::Cpu).unwrap();
    QWeight::quantize(&w, format).unwrap()
}

/// The values a weight's blocks stand for, row-major.
fn dequantize(w: &QWeight) -> Vec<f32> {
    match &w.blocks {
        Blocks::Q8 { d, qs } => qs
            .iter()
            .enumerate()
            .map(|(i, &q)| d[i / BLOCK] * q as f32)
            .collect(),
        Blocks::Q41 { d, m, qs } => (0..w.n * w.k)
            .map(|i| {
                let (b, e) = (i / BLOCK, i % BLOCK);
                let byte = qs[b * BLOCK / 2 + e % (BLOCK / 2)];
                let q = if e < BLOCK / 2 {
                    byte & 0x0F
                } else {
                    byte >> 4
                };
                d[b].to_f32() * q as f32 + m[b].to_f32()
            })
            .collect(),
    }
}

/// The kernels this CPU can run: the portable one always.
fn kernels() -> Vec<Kernel> {
    let mut k = vec![Kernel::Portable];
    if Kernel::best() != Kernel::Portable {
        k.push(Kernel::best());
    } else {
        eprintln!("no AVX2+FMA+F16C on this CPU: only the portable kernels were tested");
    }
    k
}

#[test]
fn every_row_is_the_same_bits_alone_or_in_any_batch_and_the_kernels_agree_exactly() {
    // 70 columns: not a multiple of the row tile or of a task's columns.
    let (n, k) = (70, 96);
    for format in FORMATS {
        let w = weight(n, k, format);
        let x = values(9 * k, 2);
        let alone: Vec<Vec<f32>> = (0..9)
            .map(|r| w.matmul(&x[r * k..(r + 1) * k], 1, Kernel::Portable))
            .collect();
        for kernel in kernels() {
            for m in 1..=9 {
                let y = w.matmul(&x[..m * k], m, kernel);
                for r in 0..m {
                    assert_eq!(
                        &y[r * n..(r + 1) * n],
                        alone[r].as_slice(),
                        "{format:?} {kernel:?}: row {r} of {m}"
                    );
                }
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let (n, k) = (300, 128);
    for format in FORMATS {
        let w = weight(n, k, format);
        let x = values(5 * k, 3);
        let on = |threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| w.matmul(&x, 5, Kernel::best()))
        };
        let one = on(1);
        assert_eq!(one, on(2), "{format:?}");
        assert_eq!(one, on(7), "{format:?}");
    }
}

#[test]
fn products_match_the_dequantized_weights_to_q8_activation_accuracy() {
    let (n, k) = (40, 256);
    let wf = Tensor::from_vec(values(n * k, 4), (n, k), &Device::Cpu).unwrap();
    let x = values(3 * k, 5);
    for format in FORMATS {
        let w = QWeight::quantize(&wf, format).unwrap();
        // The weights as quantized, so what is left is the activations' q8 rounding.
        let wd = dequantize(&w);
        for kernel in kernels() {
            let y = w.matmul(&x, 3, kernel);
            for r in 0..3 {
                for j in 0..n {
                    let exact: f32 = (0..k).map(|i| x[r * k + i] * wd[j * k + i]).sum();
                    let norm: f32 = (0..k).map(|i| (x[r * k + i] * wd[j * k + i]).abs()).sum();
                    let err = (y[r * n + j] - exact).abs();
                    assert!(
                        err <= 0.01 * norm,
                        "{format:?} {kernel:?} ({r}, {j}): {err} of {norm}"
                    );
                }
            }
        }
    }
}

#[test]
fn q4_1_weights_survive_the_f32_round_trip_of_loading_exactly() {
    // A GGUF's q4_1 tensor is dequantized to f32 at load; the decode copy must be the stored
    // blocks again, not a second rounding of them.
    let (n, k) = (24, 128);
    let wf = Tensor::from_vec(values(n * k, 8), (n, k), &Device::Cpu).unwrap();
    let stored = QTensor::quantize(&wf, GgmlDType::Q4_1).unwrap();
    let loaded = stored.dequantize(&Device::Cpu).unwrap();
    let ours = QWeight::quantize(&loaded, Format::Q4_1).unwrap();
    assert_eq!(
        dequantize(&ours),
        loaded.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    // And q4_1 really is coarser than q8_0 on values that were not q4_1 already.
    let err = |f| {
        let w = QWeight::quantize(&wf, f).unwrap();
        let exact = wf.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        dequantize(&w)
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    assert!(err(Format::Q4_1) > 4.0 * err(Format::Q8_0));
}

#[test]
fn the_candle_op_keeps_leading_dims_and_refuses_a_wrong_width() {
    let (n, k) = (20, 64);
    let wf = Tensor::from_vec(values(n * k, 6), (n, k), &Device::Cpu).unwrap();
    for (dtype, format) in [
        (GgmlDType::Q8_0, Format::Q8_0),
        (GgmlDType::Q4_1, Format::Q4_1),
    ] {
        let dm = DecodeMatmul::new(&wf, dtype).unwrap();
        let DecodeMatmul::Ours(w) = &dm else {
            panic!("{dtype:?} should be ours")
        };
        assert_eq!(w.format(), format);
        let x = Tensor::from_vec(values(3 * k, 7), (3, 1, k), &Device::Cpu).unwrap();
        let y = dm.forward(&x).unwrap();
        assert_eq!(y.dims(), &[3, 1, n]);
        let direct = w.matmul(
            &x.flatten_all().unwrap().to_vec1().unwrap(),
            3,
            Kernel::best(),
        );
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), direct);
        let bad = Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap();
        let err = dm.forward(&bad).unwrap_err().to_string();
        assert!(err.contains("has 32 features"), "{err}");
    }
    // Other formats stay candle's.
    assert!(matches!(
        DecodeMatmul::new(&wf, GgmlDType::Q4_0).unwrap(),
        DecodeMatmul::Candle(_)
    ));
}
