//! Batch-1 greedy decoding steps on a team (`kernels::team`, as `prolora generate` runs them)
//! and on rayon's pool alone, alternated step by step in one process, so that this machine's
//! drift (a whole decode moves by up to 2× between runs) falls on both alike.
//!
//!   cargo bench --bench decode_team -- MODEL [STEPS] [--nf4]
//!
//! MODEL: a local transformers directory or a GGUF file, as `prolora generate --model` takes it
//! (a GGUF's quantized linears stay in their blocks; `--nf4` quantizes the linears as they
//! load). STEPS new tokens (default 256) after a short chat prompt, every other one on the team.
//! Prints each side's mean and median step and the team's time as a share of the other's.

mod greedy;

use candle_core::{DType, Device};
use prolora::model::nf4::Quantization;
use prolora::source::ModelSource;

const PROMPT: &str = "<|im_start|>user\nWrite a short story about a river and a stone in the \
                      mountains.<|im_end|>\n<|im_start|>assistant\n";

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let Some(model) = args.first().filter(|a| !a.starts_with("--")) else {
        eprintln!("usage: cargo bench --bench decode_team -- MODEL [STEPS] [--nf4]");
        std::process::exit(2);
    };
    let steps = args.iter().find_map(|a| a.parse().ok()).unwrap_or(256);
    let nf4 = args.iter().any(|a| a == "--nf4");
    // As `prolora` runs its commands: inside rayon's pool, which a team needs.
    let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
    pool.install(|| bench(model, steps, nf4));
}

fn bench(path: &str, steps: usize, nf4: bool) {
    let source = ModelSource::resolve(path, "main").unwrap();
    let model = if nf4 {
        let quant = Quantization::Nf4 { double_quant: true };
        source.load_quantized(DType::F32, quant, &Device::Cpu)
    } else {
        source.load(DType::F32, &Device::Cpu)
    }
    .unwrap();
    let tokenizer = source.tokenizer(None).unwrap().tokenizer().clone();
    let prompt = tokenizer.encode(PROMPT, false).unwrap().get_ids().to_vec();
    let (mut on_team, mut on_rayon) = (Vec::new(), Vec::new());
    for (teamed, s) in greedy::greedy_steps(&model, &prompt, steps, |i| i % 2 == 1) {
        match teamed {
            true => on_team.push(s * 1e3),
            false => on_rayon.push(s * 1e3),
        }
    }
    let threads = rayon::current_num_threads();
    let (team_mean, team_median) = summary(&mut on_team);
    let (rayon_mean, rayon_median) = summary(&mut on_rayon);
    println!(
        "| {path}{} | {threads} threads, {steps} steps | team {team_mean:.2} / {team_median:.2} ms | \
         rayon {rayon_mean:.2} / {rayon_median:.2} ms | team / rayon {:.3} / {:.3} |",
        if nf4 { " (NF4)" } else { "" },
        team_mean / rayon_mean,
        team_median / rayon_median
    );
}

/// Mean and median of `ms`.
fn summary(ms: &mut [f64]) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len().max(1) as f64;
    (mean, ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN))
}
