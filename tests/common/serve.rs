//! Adapters for the serving tests: every method, every tensor random (so each one changes the
//! logits), saved as adapter directories.

use prolora::adapters::{peft, registry, AdapterConfig, AdapterSet};
use prolora::model::LlamaConfig;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::Path;

/// Rank 4 of `kind` on its default targets; PRoLoRA with u 1 and sharing rates 2 (they fit
/// the tiny models' 8 key/value features).
pub fn method_config(kind: &str) -> AdapterConfig {
    let reg = registry::by_kind(kind).unwrap();
    AdapterConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: reg.default_targets.iter().map(|s| s.to_string()).collect(),
        init_from: None,
        method: (reg.from_toml)(match kind {
            "prolora" => toml::toml! { unshared_rank = 1 sharing_rate_a = 2 sharing_rate_b = 2 },
            _ => toml::Table::new(),
        })
        .unwrap(),
    }
}

/// Writes an adapter of `cfg` for `model` to `dir`, its tensors U(±`scale`) from `seed`.
pub fn write_adapter(dir: &Path, cfg: &AdapterConfig, model: &LlamaConfig, seed: u64, scale: f64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let device = candle_core::Device::Cpu;
    let set = AdapterSet::new(cfg, model, candle_core::DType::F32, &device, &mut rng).unwrap();
    for var in set.tensors().into_iter().map(|p| p.var) {
        let v = prolora::adapters::uniform(var.elem_count(), scale, &mut rng);
        var.set(&candle_core::Tensor::from_vec(v, var.shape(), &device).unwrap())
            .unwrap();
    }
    peft::save(dir, &set, "test").unwrap();
}
