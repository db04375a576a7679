//! NF4 quantization against bitsandbytes: every case of tests/fixtures/nf4 (copied from the
//! shared bitsandbytes 0.50.2 goldens, rules in its README) and the partial-block cases of
//! tests/fixtures/nf4-partial (scripts/reference/make_nf4_goldens.py).

use candle_core::{DType, Device, Tensor};
use prolora::model::nf4::{dynamic_map, Absmax, NestedAbsmax, Nf4Tensor, NF4};
use std::collections::HashMap;

mod common;
use common::fixture;

fn load(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

struct Case {
    name: String,
    shape: Vec<usize>,
    near_ties: Vec<usize>,
    t: HashMap<String, Tensor>,
}

fn cases(dir: &str) -> Vec<Case> {
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("{dir}/cases.json"))).unwrap(),
    )
    .unwrap();
    index["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_string(),
            shape: serde_json::from_value(c["shape"].clone()).unwrap(),
            near_ties: serde_json::from_value(c["nested_near_tie_indices"].clone()).unwrap(),
            t: load(&format!("{dir}/{}", c["file"].as_str().unwrap())),
        })
        .collect()
}

fn check_plain(c: &Case) {
    let x = f32s(&c.t["input"]);
    let q = Nf4Tensor::quantize(&c.name, &x, &c.shape, false).unwrap();
    assert_eq!(q.packed, u8s(&c.t["packed"]), "{}: packed codes", c.name);
    let Absmax::Plain(a) = &q.absmax else {
        panic!("plain")
    };
    assert_eq!(bits(a), bits(&f32s(&c.t["absmax"])), "{}: absmax", c.name);
    let deq = f32s(&q.to_tensor(DType::F32, &Device::Cpu).unwrap());
    assert_eq!(
        bits(&deq),
        bits(&f32s(&c.t["dequant"])),
        "{}: dequant",
        c.name
    );
    if let Some(want) = c.t.get("dequant_bf16") {
        let got = q.to_tensor(DType::BF16, &Device::Cpu).unwrap();
        let got: Vec<u16> = got
            .flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let want: Vec<u16> = want
            .flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(got, want, "{}: dequant_bf16", c.name);
    }
}

fn check_double(c: &Case, code_key: &str, absmax_key: &str, dequant_key: &str) {
    let x = f32s(&c.t["input"]);
    let q = Nf4Tensor::quantize(&c.name, &x, &c.shape, true).unwrap();
    assert_eq!(q.packed, u8s(&c.t["packed"]), "{}: 4-bit codes", c.name);
    let Absmax::Double(d) = &q.absmax else {
        panic!("double")
    };
    let offset = f32s(&c.t["dq.offset"])[0];
    assert!(
        ((d.offset - offset) / offset).abs() <= 1e-6,
        "{}: offset {} vs {offset}",
        c.name,
        d.offset
    );
    let scales = f32s(&c.t["dq.nested_absmax"]);
    assert_eq!(d.scales.len(), scales.len());
    for (g, w) in d.scales.iter().zip(&scales) {
        assert!(
            (g - w).abs() <= 1e-6 * offset.abs().max(*w),
            "{}: nested_absmax {g} vs {w}",
            c.name
        );
    }
    let want_codes = u8s(&c.t[code_key]);
    assert_eq!(d.codes.len(), want_codes.len());
    let mut compared = 0;
    for (i, (g, w)) in d.codes.iter().zip(&want_codes).enumerate() {
        if !c.near_ties.contains(&i) {
            assert_eq!(g, w, "{}: nested code of block {i}", c.name);
            compared += 1;
        }
    }
    assert!(compared > want_codes.len() / 2);
    // From the stored state the dequantization is exact.
    let stored = NestedAbsmax {
        codes: want_codes,
        scales,
        offset,
    };
    assert_eq!(
        bits(&stored.dequantize()),
        bits(&f32s(&c.t[absmax_key])),
        "{}: {absmax_key}",
        c.name
    );
    let q = Nf4Tensor {
        absmax: Absmax::Double(stored),
        ..q
    };
    let deq = f32s(&q.to_tensor(DType::F32, &Device::Cpu).unwrap());
    assert_eq!(
        bits(&deq),
        bits(&f32s(&c.t[dequant_key])),
        "{}: {dequant_key}",
        c.name
    );
}

#[test]
fn nf4_table_and_dynamic_map_equal_bitsandbytes() {
    for c in cases("nf4") {
        assert_eq!(bits(&NF4), bits(&f32s(&c.t["nf4_code"])));
        assert_eq!(bits(&NF4), bits(&f32s(&c.t["bnb_serialized.quant_map"])));
        let map = dynamic_map();
        assert_eq!(
            bits(&map),
            bits(&f32s(&c.t["dq.nested_code"])),
            "{}",
            c.name
        );
        assert_eq!(
            bits(&map),
            bits(&f32s(&c.t["bnb_serialized.nested_quant_map"]))
        );
    }
}

#[test]
fn nf4_quantize_and_dequantize_equal_bitsandbytes_on_every_shared_case() {
    let cases = cases("nf4");
    assert_eq!(cases.len(), 3);
    for c in &cases {
        check_plain(c);
    }
}

#[test]
fn nf4_double_quant_equals_bitsandbytes_exact_nearest_on_every_shared_case() {
    for c in &cases("nf4") {
        check_double(
            c,
            "dq.absmax_code_nearest",
            "dq.absmax_dequant_nearest",
            "dq.dequant_nearest",
        );
        // In these cases bitsandbytes' CPU kernel agrees with the exact nearest code.
        assert_eq!(
            u8s(&c.t["dq.absmax_code_bnb_cpu"]),
            u8s(&c.t["dq.absmax_code_nearest"])
        );
    }
}

#[test]
fn nf4_edge_case_rules() {
    let c = cases("nf4")
        .into_iter()
        .find(|c| c.name == "edge_128x64")
        .unwrap();
    let q = Nf4Tensor::quantize("edge", &f32s(&c.t["input"]), &c.shape, false).unwrap();
    // Block 7 is all zeros: code of 0 everywhere (0x77) and absmax 0.
    assert!(q.packed[7 * 32..8 * 32].iter().all(|&b| b == 0x77));
    assert_eq!(q.absmax_f32()[7], 0.0);
    // Block 0 holds the 15 thresholds: each exact threshold takes the lower code.
    let x = f32s(&c.t["input"]);
    let codes: Vec<u8> = q.packed.iter().flat_map(|b| [b >> 4, b & 15]).collect();
    let mut on_threshold = 0;
    for k in 0..15 {
        let mid = (NF4[k] + NF4[k + 1]) * 0.5;
        for i in 0..64 {
            if x[i] == mid {
                assert_eq!(codes[i] as usize, k, "threshold {k}");
                on_threshold += 1;
            }
        }
    }
    assert_eq!(on_threshold, 15);
}

#[test]
fn nf4_rejects_non_finite_values_naming_the_tensor() {
    let mut x = vec![0.5f32; 128];
    x[70] = f32::NAN;
    let e = Nf4Tensor::quantize("model.layers.0.mlp.up_proj.weight", &x, &[2, 64], true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.0.mlp.up_proj.weight") && e.contains("70"),
        "{e}"
    );
    x[70] = f32::INFINITY;
    assert!(Nf4Tensor::quantize("w", &x, &[2, 64], false).is_err());
}

#[test]
fn nf4_partial_blocks_and_odd_counts_equal_bitsandbytes() {
    let cases = cases("nf4-partial");
    assert_eq!(cases.len(), 3);
    for c in &cases {
        check_plain(c);
        check_double(
            c,
            "dq.absmax_code_bnb_cpu",
            "dq.absmax_dequant_bnb_cpu",
            "dq.dequant_bnb_cpu",
        );
    }
}

/// The 4-bit linear: forward equals a matmul with the dequantized weight, the input gradient
/// equals central finite differences.
#[test]
fn nf4_linear_forward_and_input_gradient() {
    use prolora::model::frozen::FrozenLinear;
    let dev = Device::Cpu;
    let (o, h, n) = (6, 100, 3); // 600 values: a partial last block
    let w: Vec<f32> = (0..o * h)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0)
        .collect();
    let q = Nf4Tensor::quantize("w", &w, &[o, h], true).unwrap();
    let dense = q.to_tensor(DType::F64, &dev).unwrap();
    let lin = FrozenLinear::nf4(q, &Device::Cpu).unwrap();
    assert_eq!(lin.dims(), (o, h));
    let x0: Vec<f64> = (0..n * h)
        .map(|i| ((i * 13 % 29) as f64 - 14.0) / 9.0)
        .collect();
    let r = Tensor::from_vec(
        (0..n * o)
            .map(|i| (i as f64 - 7.0) / 5.0)
            .collect::<Vec<_>>(),
        (n, o),
        &dev,
    )
    .unwrap();
    let x = candle_core::Var::from_vec(x0.clone(), (n, h), &dev).unwrap();
    let y = lin.forward(x.as_tensor()).unwrap();
    let want = x.as_tensor().matmul(&dense.t().unwrap()).unwrap();
    let diff: f64 = (&y - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(
        diff < 1e-12,
        "forward differs from the dequantized matmul by {diff}"
    );
    let loss = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap();
    let grads = loss(&y).backward().unwrap();
    let g: Vec<f64> = grads
        .get(x.as_tensor())
        .expect("input gradient")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for i in [0, 57, n * h - 1] {
        let probe = |d: f64| {
            let mut v = x0.clone();
            v[i] += d;
            let x = Tensor::from_vec(v, (n, h), &dev).unwrap();
            loss(&lin.forward(&x).unwrap()).to_scalar::<f64>().unwrap()
        };
        let numeric = (probe(1e-6) - probe(-1e-6)) / 2e-6;
        assert!(
            (g[i] - numeric).abs() < 1e-6 * (1.0 + numeric.abs()),
            "x[{i}]: backprop {} vs finite difference {numeric}",
            g[i]
        );
    }
}

/// The LLaMA-2 presets get random weights drawn directly in NF4: seeded, with about the init's
/// spread (std 0.02), and only in 4 bits.
#[test]
fn presets_draw_random_weights_directly_in_nf4() {
    use prolora::model::weights::{RandomWeights, WeightSource};
    let draw = || {
        RandomWeights::drawn_in_nf4(5)
            .get_nf4("w", &[256, 512], true)
            .unwrap()
    };
    let q = draw();
    assert_eq!(q, draw());
    assert_eq!(
        (q.packed.len(), q.blocks()),
        (256 * 512 / 2, 256 * 512 / 64)
    );
    let w = f32s(&q.to_tensor(DType::F32, &Device::Cpu).unwrap());
    let std = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
    assert!((0.015..0.03).contains(&std), "std {std}");
    let source = prolora::source::ModelSource::resolve("llama2-7b", "main").unwrap();
    let e = source
        .load(DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--quantize nf4"), "{e}");
}
