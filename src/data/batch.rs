//! Padded batches of encoded examples.

use crate::data::chat::{Encoded, IGNORE_INDEX};
use candle_core::{Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Right-padded examples of one batch; padding carries label −100.
pub struct Batch {
    ids: Vec<u32>,
    labels: Vec<i64>,
    rows: usize,
    len: usize,
}

impl Batch {
    pub fn new(examples: &[&Encoded]) -> Self {
        let len = examples
            .iter()
            .map(|e| e.input_ids.len())
            .max()
            .unwrap_or(0);
        let rows = examples.len();
        let mut ids = vec![0u32; rows * len];
        let mut labels = vec![IGNORE_INDEX; rows * len];
        for (r, e) in examples.iter().enumerate() {
            ids[r * len..r * len + e.input_ids.len()].copy_from_slice(&e.input_ids);
            labels[r * len..r * len + e.labels.len()].copy_from_slice(&e.labels);
        }
        Self {
            ids,
            labels,
            rows,
            len,
        }
    }

    /// (rows, len) token ids.
    pub fn input_ids(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_slice(&self.ids, (self.rows, self.len), device)
    }

    /// Tokens in the batch, padding included (what the model computes on).
    pub fn tokens(&self) -> usize {
        self.rows * self.len
    }

    /// For every label token: the flat index of the position that predicts it and its id.
    pub fn prediction_rows(&self) -> (Vec<u32>, Vec<u32>) {
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for r in 0..self.rows {
            for t in 1..self.len {
                let label = self.labels[r * self.len + t];
                if label != IGNORE_INDEX {
                    rows.push((r * self.len + t - 1) as u32);
                    targets.push(label as u32);
                }
            }
        }
        (rows, targets)
    }

    /// How many label tokens count towards the loss.
    pub fn label_tokens(&self) -> usize {
        self.prediction_rows().0.len()
    }
}

/// Endless shuffled batches: a fresh seeded permutation each epoch.
pub struct Batcher<'a> {
    examples: &'a [Encoded],
    batch_size: usize,
    rng: StdRng,
    order: Vec<usize>,
    pos: usize,
    pub epoch: usize,
}

impl<'a> Batcher<'a> {
    pub fn new(examples: &'a [Encoded], batch_size: usize, seed: u64) -> Self {
        Self {
            examples,
            batch_size,
            rng: StdRng::seed_from_u64(seed),
            order: Vec::new(),
            pos: 0,
            epoch: 0,
        }
    }

    pub fn next_batch(&mut self) -> Batch {
        let mut picked = Vec::with_capacity(self.batch_size);
        while picked.len() < self.batch_size.min(self.examples.len()) {
            if self.pos == self.order.len() {
                self.order = (0..self.examples.len()).collect();
                self.order.shuffle(&mut self.rng);
                self.pos = 0;
                self.epoch += 1;
            }
            picked.push(&self.examples[self.order[self.pos]]);
            self.pos += 1;
        }
        Batch::new(&picked)
    }
}

/// Consecutive batches of at most `size` examples, in order (evaluation).
pub fn in_order(examples: &[Encoded], size: usize) -> impl Iterator<Item = Batch> + '_ {
    examples
        .chunks(size.max(1))
        .map(|c| Batch::new(&c.iter().collect::<Vec<_>>()))
}
