//! The adapters one by one: PRoLoRA against the authors' own expansion
//! (tests/fixtures/prolora-expansion, copied from the shared fixtures), its two forwards and its
//! ablations, save → load round trips, parameter counts, the optimizer's lr groups.

use candle_core::{DType, Device, Tensor, Var};
use prolora::adapters::{
    peft, Adapter, AdapterConfig, AdapterSet, Axis, Param, Prolora, ProloraConfig, ProloraForward,
    Target, TiedLoraConfig, VeraConfig,
};
use prolora::ctx::Ctx;
use prolora::model::llama::Delta;
use prolora::model::{preset, LlamaConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::HashMap;

mod common;
use common::fixture;

/// PRoLoRA's options u, m, n (the rest at their defaults).
fn opts(u: usize, m: usize, n: usize) -> ProloraConfig {
    ProloraConfig {
        unshared_rank: u,
        sharing_rate_a: m,
        sharing_rate_b: Some(n),
        ..Default::default()
    }
}

/// A PRoLoRA config of rank r, scaling α / r, no dropout.
fn with_rank(r: usize, alpha: f64, o: ProloraConfig) -> AdapterConfig {
    AdapterConfig {
        rank: r,
        alpha,
        dropout: 0.0,
        ..AdapterConfig::of(o)
    }
}

fn prolora_cfg(r: usize, u: usize, m: usize, n: usize, alpha: f64) -> AdapterConfig {
    with_rank(r, alpha, opts(u, m, n))
}

fn target(h: usize, o: usize) -> Target {
    Target {
        layer: 0,
        module: "q_proj",
        in_features: h,
        out_features: o,
    }
}

/// PRoLoRA of rank r with options `o` on one (o × h) linear, initialised from `seed`.
fn prolora(
    (r, alpha, o): (usize, f64, &ProloraConfig),
    h: usize,
    out: usize,
    dtype: DType,
    seed: u64,
) -> Prolora {
    let cfg = with_rank(r, alpha, o.clone());
    let mut rng = StdRng::seed_from_u64(seed);
    Prolora::init(o, &cfg, &target(h, out), dtype, &Device::Cpu, &mut rng).unwrap()
}

/// (name, var) pairs of an adapter's tensors.
fn named(params: Vec<Param>) -> Vec<(String, Var)> {
    params.into_iter().map(|p| (p.name, p.var)).collect()
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// max |a − b| / max |b| (0 for empty tensors).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    if b.elem_count() == 0 {
        return 0.0;
    }
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-30)
}

fn set_random(vars: &[(String, Var)], seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (_, var) in vars {
        let v = prolora::adapters::uniform(var.elem_count(), 1.0, &mut rng);
        let t = Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap();
        var.set(&t.to_dtype(var.dtype()).unwrap()).unwrap();
    }
}

/// The authors' `de_reduce` expansion, forward and autograd gradients, for every config of
/// the shared fixtures: A and B bit for bit, ΔW, y and the gradients within 1e-5 relative, in
/// both of our forwards.
#[test]
fn prolora_matches_the_authors_expansion_forward_and_gradients() {
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("prolora-expansion/configs.json")).unwrap(),
    )
    .unwrap();
    let configs = index["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 4);
    for c in configs {
        let get = |k: &str| c[k].as_u64().unwrap() as usize;
        let (r, u, m, n, h, o) = (get("r"), get("u"), get("m"), get("n"), get("h"), get("o"));
        let golden = candle_core::safetensors::load(
            fixture(&format!(
                "prolora-expansion/{}",
                c["file"].as_str().unwrap()
            )),
            &Device::Cpu,
        )
        .unwrap();
        let name = c["name"].as_str().unwrap();
        let mut results = Vec::new();
        for forward in [ProloraForward::Chunked, ProloraForward::Materialized] {
            let o_ = ProloraConfig {
                forward,
                ..opts(u, m, n)
            };
            let p = prolora(
                (r, c["lora_alpha"].as_f64().unwrap(), &o_),
                h,
                o,
                DType::F32,
                0,
            );
            assert_eq!(
                p.is_chunked(),
                forward == ProloraForward::Chunked && u < r,
                "{name}"
            );
            let keys = [
                ("lora_A.weight", "A0"),
                ("lora_B.weight", "B0"),
                ("lora_A_vec", "Au"),
                ("lora_B_vec", "Bu"),
            ];
            let params: HashMap<String, Var> = named(p.params()).into_iter().collect();
            for (ours, theirs) in keys {
                let want = &golden[theirs];
                match params.get(ours) {
                    Some(var) => var.set(want).unwrap(),
                    None => assert_eq!(want.elem_count(), 0, "{name}: {theirs} is not empty"),
                }
            }
            // The expansion is a pure gather: exact.
            let (a, b, scaling) = p.lora_factors().unwrap();
            assert_eq!(
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                golden["A"].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{name}: A"
            );
            assert_eq!(
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                golden["B"].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{name}: B"
            );
            assert_eq!(scaling, c["scaling"].as_f64().unwrap());
            let delta_w = (b.matmul(&a).unwrap() * scaling).unwrap();
            let e = rel_err(&delta_w, &golden["delta_w"]);
            assert!(e < 1e-5, "{name}: ΔW rel err {e}");

            let y = p.delta(&golden["x"], &Ctx::eval()).unwrap();
            let e = rel_err(&y, &golden["y"]);
            assert!(e < 1e-5, "{name} {forward:?}: y rel err {e}");
            let grads = (y * &golden["grad_y"])
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (ours, theirs) in keys {
                if let Some(var) = params.get(ours) {
                    let g = grads.get(var.as_tensor()).unwrap();
                    let want = &golden[&format!("grad_{theirs}")];
                    let e = rel_err(g, want);
                    assert!(e < 1e-5, "{name} {forward:?}: grad {theirs} rel err {e}");
                }
            }
            results.push(p.delta(&golden["x"], &Ctx::eval()).unwrap());
        }
        let e = rel_err(&results[0], &results[1]);
        assert!(e < 1e-6, "{name}: forwards differ by {e}");
    }
}

/// The paper's shapes: h = 4096 with m = 7 (cA = 586, the last chunk keeps 580 columns), both
/// forwards agree for every ablation, and chunk 6 of A reuses only A0's first 580 columns.
#[test]
fn prolora_forwards_agree_at_4096_over_7_for_every_ablation() {
    let (h, o) = (4096, 4096 + 3);
    let x = Tensor::randn(0f32, 1.0, (2, 3, h), &Device::Cpu).unwrap();
    let variants: Vec<(&str, usize, ProloraConfig)> = vec![
        ("prolora", 8, opts(1, 7, 7)),
        (
            "clora",
            8,
            ProloraConfig {
                rotation: false,
                ..opts(0, 7, 7)
            },
        ),
        ("rolora", 8, opts(0, 7, 7)),
        (
            "prolora-r",
            8,
            ProloraConfig {
                rotation: false,
                ..opts(1, 7, 5)
            },
        ),
        ("m≠n", 12, opts(2, 7, 3)),
    ];
    for (name, r, cfg) in variants {
        let chunked = prolora(
            (
                r,
                16.0,
                &ProloraConfig {
                    forward: ProloraForward::Chunked,
                    ..cfg.clone()
                },
            ),
            h,
            o,
            DType::F32,
            1,
        );
        assert!(chunked.is_chunked(), "{name}");
        let materialized = prolora(
            (
                r,
                16.0,
                &ProloraConfig {
                    forward: ProloraForward::Materialized,
                    ..cfg.clone()
                },
            ),
            h,
            o,
            DType::F32,
            1,
        );
        assert!(!materialized.is_chunked());
        let (pc, pm) = (named(chunked.params()), named(materialized.params()));
        set_random(&pc, 2);
        set_random(&pm, 2);
        let yc = chunked.delta(&x, &Ctx::eval()).unwrap();
        let ym = materialized.delta(&x, &Ctx::eval()).unwrap();
        assert_eq!(yc.dims(), &[2, 3, o]);
        let e = rel_err(&yc, &ym);
        assert!(e < 1e-5, "{name}: forwards differ by {e}");
    }
    // Columns of the last chunk (j = 6, width 580) are A0's first 580 columns rolled by 6·sA.
    let p = prolora((8, 16.0, &opts(1, 7, 7)), h, o, DType::F32, 3);
    let (a, _, _) = p.lora_factors().unwrap();
    let a0 = p.params()[0].var.as_tensor().clone();
    assert_eq!(a0.dims(), &[7, 586]);
    let a = a.to_vec2::<f32>().unwrap();
    let a0 = a0.to_vec2::<f32>().unwrap();
    for i in 0..7 {
        for k in [0, 579] {
            assert_eq!(a[i][6 * 586 + k], a0[(i + 6) % 7][k]);
        }
    }
}

/// With u = r (or m = n = 1) PRoLoRA is LoRA of rank r: same init stream, same Δ.
#[test]
fn prolora_without_sharing_is_lora() {
    let (h, o) = (24, 40);
    let x = Tensor::randn(0f32, 1.0, (5, h), &Device::Cpu).unwrap();
    for cfg in [opts(6, 4, 2), opts(0, 1, 1)] {
        let p = prolora((6, 12.0, &cfg), h, o, DType::F32, 9);
        let mut rng = StdRng::seed_from_u64(9);
        let lora =
            prolora::adapters::Lora::init(h, o, 6, 12.0, 0.0, DType::F32, &Device::Cpu, &mut rng)
                .unwrap();
        let (pa, _, ps) = p.lora_factors().unwrap();
        let (la, _, ls) = lora.lora_factors().unwrap();
        assert_eq!(ps, ls);
        if cfg.unshared_rank == 6 {
            // Same draws in the same order.
            assert_eq!(rel_err(&pa, &la), 0.0);
        }
        // Same B ⇒ same Δ.
        let b = Tensor::randn(0f32, 1.0, (o, 6), &Device::Cpu).unwrap();
        let (lp, ll) = (named(p.params()), named(lora.params()));
        let find = |v: &[(String, Var)], k: &str| v.iter().find(|(n, _)| n == k).unwrap().1.clone();
        ll[1].1.set(&b).unwrap();
        find(&ll, "lora_A.weight").set(&pa).unwrap();
        if cfg.unshared_rank == 6 {
            find(&lp, "lora_B_vec")
                .set(&b.t().unwrap().contiguous().unwrap())
                .unwrap();
        } else {
            find(&lp, "lora_B.weight").set(&b).unwrap();
        }
        let e = rel_err(
            &p.delta(&x, &Ctx::eval()).unwrap(),
            &lora.delta(&x, &Ctx::eval()).unwrap(),
        );
        assert!(e < 1e-6, "{e}");
    }
}

/// The Table 4 siblings, as docs/adapters.md defines them.
#[test]
fn prolora_table4_siblings_follow_their_definition() {
    let (h, o) = (10, 12);
    // Rank sharing, no rotation: the r_s = 6 shared ranks are 3 copies of 2 base rows.
    let cfg = ProloraConfig {
        share_axis: Axis::Rank,
        rotation: false,
        ..opts(1, 3, 3)
    };
    let p = prolora((7, 7.0, &cfg), h, o, DType::F32, 4);
    set_random(&named(p.params()), 5);
    let a0 = p.params()[0].var.as_tensor().to_vec2::<f32>().unwrap();
    assert_eq!((a0.len(), a0[0].len()), (2, h));
    let (a, b, _) = p.lora_factors().unwrap();
    let (a, b) = (a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    for i in 0..6 {
        assert_eq!(a[i], a0[i % 2]);
    }
    let b0 = p.params()[1].var.as_tensor().to_vec2::<f32>().unwrap();
    assert_eq!((b0.len(), b0[0].len()), (o, 2));
    for q in 0..o {
        for c in 0..6 {
            assert_eq!(b[q][c], b0[q][c % 2]);
        }
    }
    // Rank sharing, hidden rotation: copy j rolled along h by j·max(⌊h/m⌋, 1) = 3j.
    let cfg = ProloraConfig {
        share_axis: Axis::Rank,
        rotate_axis: Axis::Hidden,
        ..opts(1, 3, 3)
    };
    let p = prolora((7, 7.0, &cfg), h, o, DType::F32, 4);
    set_random(&named(p.params()), 5);
    let a0 = p.params()[0].var.as_tensor().to_vec2::<f32>().unwrap();
    let a = p.lora_factors().unwrap().0.to_vec2::<f32>().unwrap();
    for i in 0..6 {
        for col in 0..h {
            assert_eq!(a[i][col], a0[i % 2][(col + 3 * (i / 2)) % h]);
        }
    }
    // Hidden sharing, hidden rotation: chunk j (width cA = 4) rolled by j·max(⌊4/3⌋, 1) = j.
    let cfg = ProloraConfig {
        rotate_axis: Axis::Hidden,
        ..opts(1, 3, 3)
    };
    let p = prolora((7, 7.0, &cfg), h, o, DType::F32, 4);
    assert!(!p.is_chunked());
    set_random(&named(p.params()), 5);
    let a0 = p.params()[0].var.as_tensor().to_vec2::<f32>().unwrap();
    let a = p.lora_factors().unwrap().0.to_vec2::<f32>().unwrap();
    for i in 0..6 {
        for col in 0..h {
            let (j, k) = (col / 4, col % 4);
            assert_eq!(a[i][col], a0[i][(k + j) % 4]);
        }
    }
}

/// Rectified init: A0 within ±1/√h (h the full width), unrectified (⁻ⁱ) within ±1/√cA and
/// actually wider; B0 = Bu = 0.
#[test]
fn prolora_init_bounds() {
    let (h, o) = (4096, 256);
    let bound = |cfg: &ProloraConfig| {
        let p = prolora((8, 16.0, cfg), h, o, DType::F32, 6);
        let params = named(p.params());
        for (name, var) in &params[1..] {
            if name.starts_with("lora_B") {
                assert_eq!(max_abs(var.as_tensor()), 0.0, "{name}");
            }
        }
        max_abs(params[0].1.as_tensor())
    };
    let rectified = bound(&opts(1, 7, 7));
    assert!(
        rectified <= 1.0 / 64.0 && rectified > 0.9 / 64.0,
        "{rectified}"
    );
    let plain = bound(&ProloraConfig {
        rectified_init: false,
        ..opts(1, 7, 7)
    });
    let ca = (586f64).sqrt().recip();
    assert!(plain <= ca && plain > 0.9 * ca, "{plain}");
}

fn tiny() -> LlamaConfig {
    preset::preset("tiny").unwrap()
}

fn all_kinds() -> Vec<AdapterConfig> {
    vec![
        AdapterConfig::default(),
        prolora_cfg(8, 1, 7, 7, 16.0),
        with_rank(
            8,
            16.0,
            ProloraConfig {
                rotation: false,
                share_axis: Axis::Rank,
                ..opts(2, 3, 2)
            },
        ),
        AdapterConfig {
            rank: 16,
            ..AdapterConfig::of(VeraConfig::default())
        },
        AdapterConfig {
            rank: 16,
            targets: vec!["q_proj".into(), "k_proj".into(), "v_proj".into()],
            ..AdapterConfig::of(TiedLoraConfig::default())
        },
        AdapterConfig {
            rank: 4,
            targets: vec!["k_proj".into(), "q_proj".into()],
            ..AdapterConfig::of(TiedLoraConfig::default())
        },
    ]
}

/// Save → load gives every tensor back bit for bit, and the config with it.
#[test]
fn save_load_round_trip_is_bit_identical_for_every_kind() {
    let model = tiny();
    for cfg in all_kinds() {
        let set = AdapterSet::new(
            &cfg,
            &model,
            DType::F32,
            &Device::Cpu,
            &mut StdRng::seed_from_u64(1),
        )
        .unwrap();
        set_random(&named(set.tensors()), 2);
        let dir = tempfile::tempdir().unwrap();
        peft::save(dir.path(), &set, "tiny").unwrap();
        let back = peft::load(dir.path(), &model, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(back.cfg.kind(), cfg.kind());
        assert_eq!(back.cfg.rank, cfg.rank);
        let ours = named(set.tensors());
        let theirs: HashMap<String, Var> = named(back.tensors()).into_iter().collect();
        assert_eq!(ours.len(), theirs.len());
        for (key, var) in ours {
            let a = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = theirs[&key]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{}: {key}",
                cfg.kind()
            );
        }
    }
}

/// `param_count` (shapes only) equals the trainable elements the trainer creates.
#[test]
fn param_count_equals_trainable_elements() {
    let model = tiny();
    for cfg in all_kinds() {
        let set = AdapterSet::new(
            &cfg,
            &model,
            DType::F32,
            &Device::Cpu,
            &mut StdRng::seed_from_u64(1),
        )
        .unwrap();
        let actual: usize = set.trainable().iter().map(|(_, v, _)| v.elem_count()).sum();
        assert_eq!(cfg.param_count(&model).unwrap(), actual, "{:?}", cfg);
    }
}

/// docs/methods.md §9 on LLaMA-2-7B (a shape-only preset).
#[test]
fn param_counts_of_the_paper() {
    let m7 = preset::preset("llama2-7b").unwrap();
    let count = |cfg: AdapterConfig| cfg.param_count(&m7).unwrap();
    let lora = |r| AdapterConfig {
        rank: r,
        ..Default::default()
    };
    assert_eq!(count(lora(2)), 4_997_120);
    assert_eq!(count(lora(8)), 19_988_480);
    assert_eq!(count(lora(64)), 159_907_840);
    assert_eq!(count(prolora_cfg(8, 1, 7, 7, 16.0)), 4_999_520);
    assert_eq!(
        count(AdapterConfig {
            rank: 256,
            ..AdapterConfig::of(VeraConfig::default())
        }),
        1_417_216
    );
    assert_eq!(
        count(AdapterConfig {
            rank: 256,
            targets: vec!["q_proj".into(), "k_proj".into(), "v_proj".into()],
            ..AdapterConfig::of(TiedLoraConfig::default())
        }),
        4_595_712
    );
}

/// Two parameter groups: the same gradient moves a parameter twice as far at lr scale 2 (Adam's
/// first step is lr · g/|g|).
#[test]
fn adamw_parameter_groups_scale_the_learning_rate() {
    use prolora::train::optim::{AdamW, AdamWParams};
    let a = Var::zeros(3, DType::F64, &Device::Cpu).unwrap();
    let b = Var::zeros(3, DType::F64, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(
        vec![("a".into(), a.clone(), 1.0), ("b".into(), b.clone(), 2.0)],
        AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    );
    let loss = (a.sum_all().unwrap() + b.sum_all().unwrap()).unwrap();
    let store = loss.backward().unwrap();
    let grads = vec![store.get(&a).cloned(), store.get(&b).cloned()];
    opt.step(&grads, 0.1, 1.0).unwrap();
    let (a, b) = (
        a.to_vec1::<f64>().unwrap()[0],
        b.to_vec1::<f64>().unwrap()[0],
    );
    assert!((a + 0.1).abs() < 1e-6 && (b + 0.2).abs() < 1e-6, "{a} {b}");
}

/// Merging into a sharded f32 checkpoint keeps its shards and gives the logits of base +
/// adapter (PRoLoRA with rotation, and Tied-LoRA on a GQA model).
#[test]
fn merge_into_a_sharded_checkpoint_gives_the_adapted_logits() {
    use prolora::source::ModelSource;
    let dir = fixture("llama-gqa");
    let source = ModelSource::resolve(dir.to_str().unwrap(), "main").unwrap();
    let ids = Tensor::new(&[[1u32, 7, 42, 9, 200, 3]], &Device::Cpu).unwrap();
    let tied = AdapterConfig {
        rank: 4,
        targets: vec!["q_proj".into(), "k_proj".into(), "v_proj".into()],
        ..AdapterConfig::of(TiedLoraConfig::default())
    };
    for cfg in [prolora_cfg(8, 1, 7, 3, 16.0), tied] {
        let mut model = source.load(DType::F32, &Device::Cpu).unwrap();
        let set = AdapterSet::new(
            &cfg,
            &source.config,
            DType::F32,
            &Device::Cpu,
            &mut StdRng::seed_from_u64(1),
        )
        .unwrap();
        set_random(&named(set.tensors()), 3);
        set.attach_to(&mut model);
        let adapted = model.logits(&ids, &Ctx::eval()).unwrap();
        let base = source.load(DType::F32, &Device::Cpu).unwrap();
        let before = base.logits(&ids, &Ctx::eval()).unwrap();
        assert!(max_abs(&(&adapted - &before).unwrap()) > 1e-2);

        let tmp = tempfile::tempdir().unwrap();
        let adapter = tmp.path().join("adapter");
        peft::save(&adapter, &set, "llama-gqa").unwrap();
        let out = tmp.path().join("merged");
        prolora::export::merge(&dir, &source.config, &adapter, &out).unwrap();
        for f in std::fs::read_dir(&dir).unwrap() {
            let name = f.unwrap().file_name();
            assert!(out.join(&name).exists(), "{name:?} missing");
        }
        let merged = ModelSource::resolve(out.to_str().unwrap(), "main")
            .unwrap()
            .load(DType::F32, &Device::Cpu)
            .unwrap();
        let logits = merged.logits(&ids, &Ctx::eval()).unwrap();
        let e = max_abs(&(&logits - &adapted).unwrap());
        assert!(e < 1e-4, "{}: merged logits differ by {e}", cfg.kind());
    }
}
