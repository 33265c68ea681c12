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

fn weight(n: usize, k: usize) -> Q8Weight {
    let w = Tensor::from_vec(values(n * k, 1), (n, k), &Device::Cpu).unwrap();
    Q8Weight::quantize(&w).unwrap()
}

/// The kernels this CPU can run: the portable one always.
fn kernels() -> Vec<Kernel> {
    let mut k = vec![Kernel::Portable];
    if Kernel::best() != Kernel::Portable {
        k.push(Kernel::best());
    } else {
        eprintln!("no AVX2+FMA on this CPU: only the portable q8 kernel was tested");
    }
    k
}

#[test]
fn every_row_is_the_same_bits_alone_or_in_any_batch_and_the_kernels_agree_exactly() {
    // 70 columns: not a multiple of the row tile or of a task's columns.
    let (n, k) = (70, 96);
    let w = weight(n, k);
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
                    "{kernel:?}: row {r} of {m}"
                );
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let (n, k) = (300, 128);
    let w = weight(n, k);
    let x = values(5 * k, 3);
    let on = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| w.matmul(&x, 5, Kernel::best()))
    };
    let one = on(1);
    assert_eq!(one, on(2));
    assert_eq!(one, on(7));
}

#[test]
fn products_match_full_precision_to_q8_accuracy() {
    let (n, k) = (40, 256);
    let wf = values(n * k, 4);
    let w =
        Q8Weight::quantize(&Tensor::from_vec(wf.clone(), (n, k), &Device::Cpu).unwrap()).unwrap();
    let x = values(3 * k, 5);
    for kernel in kernels() {
        let y = w.matmul(&x, 3, kernel);
        for r in 0..3 {
            for j in 0..n {
                let exact: f32 = (0..k).map(|i| x[r * k + i] * wf[j * k + i]).sum();
                let norm: f32 = (0..k).map(|i| (x[r * k + i] * wf[j * k + i]).abs()).sum();
                let err = (y[r * n + j] - exact).abs();
                assert!(err <= 0.02 * norm, "{kernel:?} ({r}, {j}): {err} of {norm}");
            }
        }
    }
}

#[test]
fn the_candle_op_keeps_leading_dims_and_refuses_a_wrong_width() {
    let (n, k) = (20, 64);
    let wf = Tensor::from_vec(values(n * k, 6), (n, k), &Device::Cpu).unwrap();
    let dm = DecodeMatmul::new(&wf, GgmlDType::Q8_0).unwrap();
    assert!(matches!(dm, DecodeMatmul::Q8(_)));
    let x = Tensor::from_vec(values(3 * k, 7), (3, 1, k), &Device::Cpu).unwrap();
    let y = dm.forward(&x).unwrap();
    assert_eq!(y.dims(), &[3, 1, n]);
    let DecodeMatmul::Q8(w) = &dm else {
        unreachable!()
    };
    let direct = w.matmul(
        &x.flatten_all().unwrap().to_vec1().unwrap(),
        3,
        Kernel::best(),
    );
    assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), direct);
    let bad = Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap();
    let err = dm.forward(&bad).unwrap_err().to_string();
    assert!(
        err.contains("32 input features") || err.contains("has 32 features"),
        "{err}"
    );
    // Other formats stay candle's.
    assert!(matches!(
        DecodeMatmul::new(&wf, GgmlDType::Q4_1).unwrap(),
        DecodeMatmul::Candle(_)
    ));
}
