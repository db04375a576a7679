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

/// The endless order in which training examples are drawn. Each epoch's order is a function of
/// (seed, epoch) alone, so a resumed run restores its position from a count.
pub struct Sampler {
    len: usize,
    seed: u64,
    shuffle: bool,
    epoch: u64,
    order: Vec<usize>,
    pos: usize,
    consumed: u64,
}

impl Sampler {
    /// `shuffle = false` keeps strict file order (for parity checks against other trainers).
    pub fn new(len: usize, seed: u64, shuffle: bool) -> Self {
        let mut s = Self {
            len,
            seed,
            shuffle,
            epoch: 0,
            order: Vec::new(),
            pos: 0,
            consumed: 0,
        };
        s.start_epoch(0);
        s
    }

    fn start_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.order = (0..self.len).collect();
        if self.shuffle {
            self.order
                .shuffle(&mut StdRng::seed_from_u64(crate::adapters::mix_seed(
                    self.seed, epoch,
                )));
        }
        self.pos = 0;
    }

    /// The next `n` example indices (wrapping into the next epoch as needed).
    pub fn take(&mut self, n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| {
                if self.pos == self.order.len() {
                    self.start_epoch(self.epoch + 1);
                }
                self.pos += 1;
                self.consumed += 1;
                self.order[self.pos - 1]
            })
            .collect()
    }

    /// Examples drawn so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Epochs started so far (1 during the first pass).
    pub fn epoch(&self) -> u64 {
        self.epoch + 1
    }

    /// Moves to the position after `consumed` draws, as if they had been taken.
    pub fn skip_to(&mut self, consumed: u64) {
        let len = self.len.max(1) as u64;
        self.start_epoch(consumed / len);
        self.pos = (consumed % len) as usize;
        self.consumed = consumed;
    }
}

/// Consecutive batches of at most `size` examples, in order (evaluation).
pub fn in_order(examples: &[Encoded], size: usize) -> impl Iterator<Item = Batch> + '_ {
    examples
        .chunks(size.max(1))
        .map(|c| Batch::new(&c.iter().collect::<Vec<_>>()))
}
