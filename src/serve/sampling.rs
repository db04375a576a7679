//! Choosing a row's next token: the same rule and random stream as `prolora generate` (its
//! `choose`, which generate.rs keeps private), so a request served gets the tokens
//! `generate` gives it with the same seed.

use rand::rngs::StdRng;
use rand::Rng;

/// The next token: the argmax at temperature 0, else a sample from the tempered softmax
/// restricted to the nucleus (transformers' TopPLogitsWarper: the most probable tokens whose
/// probabilities sum to at least `top_p`, and never fewer than one).
pub fn choose(logits: &[f32], temperature: f64, top_p: f64, rng: &mut StdRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if temperature == 0.0 {
        return argmax();
    }
    let t = temperature;
    let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, ((v as f64 - top) / t).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    // Most probable first (ties by id). Only the head of that order is needed: sort the top k,
    // and widen k until the nucleus fits in it.
    let order = |a: &(usize, f64), b: &(usize, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut k = 64.min(probs.len());
    let kept = loop {
        if k < probs.len() {
            probs.select_nth_unstable_by(k, order);
        }
        probs[..k].sort_by(order);
        let mut mass = 0.0;
        let within = probs[..k].iter().position(|p| {
            mass += p.1;
            mass >= top_p
        });
        match within {
            Some(i) => break i + 1,
            None if k == probs.len() => break k,
            None => k = (4 * k).min(probs.len()),
        }
    };
    let mass: f64 = probs[..kept].iter().map(|p| p.1).sum();
    let nucleus = &probs[..kept];
    let mut u = rng.random::<f64>() * mass;
    for &(i, p) in nucleus {
        if u < p {
            return i as u32;
        }
        u -= p;
    }
    nucleus[kept - 1].0 as u32
}
