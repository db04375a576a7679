//! What the decoding benches share: batch-1 greedy steps, each timed.

use candle_core::{Device, Tensor};
use prolora::ctx::Ctx;
use prolora::kernels::team;
use prolora::model::Llama;
use std::time::Instant;

/// Greedy decoding of `model` (on the CPU) from `prompt`: the prefill, then `steps` new
/// tokens, step `i` (from 1) on a team (`kernels::team`, as `prolora generate` runs its steps)
/// where `on_team(i)`, else on rayon's pool alone. Returns each new token's step: whether it
/// ran on a team, and its seconds. A team needs rayon's pool: call inside `ThreadPool::install`.
pub fn greedy_steps(
    model: &Llama,
    prompt: &[u32],
    steps: usize,
    on_team: impl Fn(usize) -> bool,
) -> Vec<(bool, f64)> {
    let ctx = Ctx::eval();
    let mut cache = model.new_cache();
    let mut input = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut timed = Vec::new();
    for i in 0..=steps {
        let teamed = i > 0 && on_team(i);
        let t = Instant::now();
        let mut step = || {
            let h = model.hidden_cached(&input, &ctx, &mut cache).unwrap();
            let last = h.dim(1).unwrap() - 1;
            model.head(&h.narrow(1, last, 1).unwrap()).unwrap()
        };
        let logits = if teamed { team::run(step) } else { step() };
        let next: u32 = logits
            .flatten_all()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        if i > 0 {
            timed.push((teamed, t.elapsed().as_secs_f64()));
        }
        input = Tensor::new(&[next], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
    }
    timed
}
