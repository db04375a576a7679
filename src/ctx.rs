//! The forward pass's context: training or evaluation, and the seeded stream dropout draws
//! from. Below both the model and the adapters, so either can take it.

use crate::kernels::dropout;
use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::RngCore;
use rand::SeedableRng;
use std::cell::RefCell;

/// What the forward pass needs beyond the input: whether this is training (dropout on) and the
/// seeded generator that makes dropout reproducible.
pub struct Ctx {
    seed: Option<u64>,
    dropout_rng: Option<RefCell<StdRng>>,
}

/// A well-mixed 64-bit value from two (SplitMix64's finaliser), for deriving independent seeds.
pub fn mix_seed(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_add(0x9e37_79b9_7f4a_7c15)
        .wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Ctx {
    /// Evaluation: dropout is the identity.
    pub fn eval() -> Self {
        Self {
            seed: None,
            dropout_rng: None,
        }
    }

    /// Training: dropout masks drawn from generators derived from `seed`.
    pub fn train(seed: u64) -> Self {
        Self {
            seed: Some(seed),
            dropout_rng: Some(RefCell::new(StdRng::seed_from_u64(seed))),
        }
    }

    /// The context of decoder layer `l`: its own generator, so recomputing one layer (activation
    /// checkpointing, resume) draws exactly the masks of the first computation.
    pub fn for_layer(&self, l: usize) -> Self {
        match self.seed {
            Some(seed) => Self::train(mix_seed(seed, l as u64)),
            None => Self::eval(),
        }
    }

    /// Whether this is training (gradients wanted, dropout on).
    pub fn is_training(&self) -> bool {
        self.seed.is_some()
    }

    /// Inverted dropout with probability `p`, as `torch.nn.Dropout` in training mode.
    pub fn dropout(&self, x: &Tensor, p: f64) -> candle_core::Result<Tensor> {
        match self.dropout_seed(p) {
            Some(seed) => dropout::dropout(x, seed, p),
            None => Ok(x.clone()),
        }
    }

    /// The seed [`Self::dropout`] would draw for probability `p` (None where it is the
    /// identity), for ops that apply the mask themselves: one draw from the context's stream
    /// per call; the mask is a hash of it.
    pub fn dropout_seed(&self, p: f64) -> Option<u64> {
        let rng = self.dropout_rng.as_ref()?;
        (p > 0.0).then(|| rng.borrow_mut().next_u64())
    }
}
