//! Times PRoLoRA's two forwards (forward + backward of one adapted linear), interleaved so
//! machine load hits both alike. The faster one is the default (`adapter.forward`).
//!
//!     cargo run --release --example prolora_forwards [tokens] [h] [o]

use candle_core::{DType, Device, Tensor};
use prolora::adapters::{Adapter, AdapterConfig, Prolora, ProloraConfig, ProloraForward, Target};
use prolora::ctx::Ctx;
use prolora::model::llama::Delta;
use rand::SeedableRng;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a number"))
        .collect();
    let tokens = args.first().copied().unwrap_or(512);
    let h = args.get(1).copied().unwrap_or(4096);
    let o = args.get(2).copied().unwrap_or(11008);
    let target = Target {
        layer: 0,
        module: "up_proj",
        in_features: h,
        out_features: o,
    };
    let x = Tensor::randn(0f32, 1.0, (tokens, h), &Device::Cpu)?;
    let build = |forward| -> anyhow::Result<Prolora> {
        let opts = ProloraConfig {
            unshared_rank: 1,
            sharing_rate_a: 7,
            forward,
            ..Default::default()
        };
        let cfg = AdapterConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            ..AdapterConfig::of(opts.clone())
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let p = Prolora::init(&opts, &cfg, &target, DType::F32, &Device::Cpu, &mut rng)?;
        for v in p.params().into_iter().map(|p| p.var) {
            v.set(&Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu)?)?;
        }
        Ok(p)
    };
    let forwards = [ProloraForward::Chunked, ProloraForward::Materialized];
    let adapters = forwards.map(|f| build(f).expect("builds"));
    let mut best = [f64::INFINITY; 2];
    for _ in 0..10 {
        for (i, p) in adapters.iter().enumerate() {
            let t = Instant::now();
            let y = p.delta(&x, &Ctx::eval())?;
            y.sum_all()?.backward()?;
            best[i] = best[i].min(t.elapsed().as_secs_f64());
        }
    }
    println!(
        "tokens {tokens}, h {h}, o {o}, r 8, u 1, m = n = 7: forward+backward best of 10: \
         chunked {:.2} ms, materialized {:.2} ms",
        best[0] * 1e3,
        best[1] * 1e3
    );
    Ok(())
}
