//! Padded batches of encoded examples, in HF's length-grouped order.

use crate::choice::named_enum;
use crate::data::chat::{Encoded, IGNORE_INDEX};
use crate::data::rng::Mt19937;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// Right-padded examples of one batch; padding carries label −100.
pub struct Batch {
    ids: Vec<u32>,
    labels: Vec<i64>,
    rows: usize,
    len: usize,
    /// Each example's own length (≤ `len`; the rest of its row is padding).
    lengths: Vec<usize>,
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
            lengths: examples.iter().map(|e| e.input_ids.len()).collect(),
        }
    }

    /// Each example's length before padding.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// (rows, len) token ids.
    pub fn input_ids(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.ids, (self.rows, self.len), device)
    }

    /// (rows, len) labels, −100 on padding and on positions not trained on.
    pub fn labels(&self) -> &[i64] {
        &self.labels
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

/// HF's `get_length_grouped_indices(lengths, batch_size)` given the permutation it would draw
/// (`torch.randperm(len(lengths))`): mega-batches of `min(N / (4·bs), 50)·bs` (at least `bs`)
/// consecutive permuted indices, each sorted by length, longest first (a stable sort, as
/// Python's `sorted(..., reverse=True)`); then the longest example overall is swapped to the
/// front, so an out-of-memory batch shows up at the first step.
pub fn length_grouped_order(lengths: &[usize], batch_size: usize, perm: &[usize]) -> Vec<usize> {
    assert_eq!(lengths.len(), perm.len());
    let mult = (lengths.len() / (batch_size * 4)).clamp(1, 50);
    let mega = mult * batch_size;
    let mut groups: Vec<Vec<usize>> = perm
        .chunks(mega)
        .map(|c| {
            let mut g = c.to_vec();
            g.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
            g
        })
        .collect();
    if groups.is_empty() {
        return Vec::new();
    }
    // torch.argmax: the first maximum.
    let mut max_idx = 0;
    for (i, g) in groups.iter().enumerate() {
        if lengths[g[0]] > lengths[groups[max_idx][0]] {
            max_idx = i;
        }
    }
    let longest = groups[max_idx][0];
    groups[max_idx][0] = groups[0][0];
    groups[0][0] = longest;
    groups.concat()
}

named_enum! {
/// The order examples are drawn in within an epoch (`data.order`).
pub enum Order {
    /// HF's `group_by_length` (the paper's setting).
    LengthGrouped = "length_grouped",
    /// A fresh random permutation each epoch (HF's `RandomSampler`).
    Shuffle = "shuffle",
    /// File order, every epoch (for parity checks against another trainer).
    File = "file",
}
}

/// Endless training batches, epoch after epoch, as HF's `Trainer`: each epoch is an order of
/// the whole set (length-grouped by the effective batch `micro_batch_size · grad_accum`, by
/// default), cut into micro-batches; the last micro-batch and the last step of an epoch may be
/// short (the DataLoader's `drop_last=False`).
///
/// The permutations come from `torch.Generator().manual_seed(seed)` replayed bit for bit
/// ([`Mt19937::torch`]), one `randperm` per epoch from the same generator, as a
/// `LengthGroupedSampler(generator=g)` iterated once per epoch. The position is a count of
/// examples drawn, so a resumed run replays the generator to the same place.
pub struct Batcher<'a> {
    examples: &'a [Encoded],
    micro_batch_size: usize,
    grad_accum: usize,
    kind: Order,
    seed: u64,
    rng: Mt19937,
    order: Vec<usize>,
    pos: usize,
    consumed: u64,
    /// Epochs started so far (1 during the first).
    pub epoch: usize,
}

impl<'a> Batcher<'a> {
    /// One micro-batch per optimizer step.
    pub fn new(examples: &'a [Encoded], batch_size: usize, seed: u64) -> Self {
        Self::with_grad_accum(examples, batch_size, 1, seed)
    }

    /// `grad_accum` micro-batches of `micro_batch_size` per optimizer step, length-grouped.
    pub fn with_grad_accum(
        examples: &'a [Encoded],
        micro_batch_size: usize,
        grad_accum: usize,
        seed: u64,
    ) -> Self {
        assert!(micro_batch_size > 0 && grad_accum > 0 && !examples.is_empty());
        Self {
            examples,
            micro_batch_size,
            grad_accum,
            kind: Order::LengthGrouped,
            seed,
            rng: Mt19937::torch(seed),
            order: Vec::new(),
            pos: 0,
            consumed: 0,
            epoch: 0,
        }
    }

    /// The same with another within-epoch order.
    pub fn with_order(mut self, kind: Order) -> Self {
        self.kind = kind;
        self
    }

    /// The order of the next epoch (draws from the generator unless in file order).
    fn draw_epoch(&mut self) -> Vec<usize> {
        let n = self.examples.len();
        match self.kind {
            Order::File => (0..n).collect(),
            Order::Shuffle => self.rng.randperm(n),
            Order::LengthGrouped => {
                let lengths: Vec<usize> = self.examples.iter().map(|e| e.input_ids.len()).collect();
                let perm = self.rng.randperm(n);
                length_grouped_order(&lengths, self.micro_batch_size * self.grad_accum, &perm)
            }
        }
    }

    /// The next micro-batch.
    pub fn next_batch(&mut self) -> Batch {
        if self.pos == self.order.len() {
            self.order = self.draw_epoch();
            self.pos = 0;
            self.epoch += 1;
        }
        let end = (self.pos + self.micro_batch_size).min(self.order.len());
        let picked: Vec<&Encoded> = self.order[self.pos..end]
            .iter()
            .map(|&i| &self.examples[i])
            .collect();
        self.consumed += (end - self.pos) as u64;
        self.pos = end;
        Batch::new(&picked)
    }

    /// The micro-batches of the next optimizer step: `grad_accum` of them, fewer at the end
    /// of an epoch.
    pub fn next_step(&mut self) -> Vec<Batch> {
        let mut step = vec![self.next_batch()];
        while step.len() < self.grad_accum && self.pos < self.order.len() {
            step.push(self.next_batch());
        }
        step
    }

    /// Examples drawn so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Moves to where `consumed` draws from a fresh batcher would have left it.
    pub fn skip_to(&mut self, consumed: u64) {
        let n = self.examples.len() as u64;
        self.rng = Mt19937::torch(self.seed);
        self.order.clear();
        self.pos = 0;
        self.epoch = 0;
        for _ in 0..consumed / n {
            self.draw_epoch();
            self.epoch += 1;
        }
        if consumed % n > 0 {
            self.order = self.draw_epoch();
            self.epoch += 1;
            self.pos = (consumed % n) as usize;
        }
        self.consumed = consumed;
    }
}

/// Splits off `eval_size` examples as a held-out set: the first `eval_size` indices of the
/// seeded permutation ([`Mt19937::torch`]`(seed).randperm`) are held out; both parts keep file
/// order. Returns (train, eval).
pub fn split_eval(
    examples: Vec<Encoded>,
    eval_size: usize,
    seed: u64,
) -> Result<(Vec<Encoded>, Vec<Encoded>)> {
    if eval_size >= examples.len() {
        bail!(
            "data.eval_size = {eval_size} leaves no training example (the set has {}); lower data.eval_size",
            examples.len()
        );
    }
    let mut held = vec![false; examples.len()];
    for &i in &Mt19937::torch(seed).randperm(examples.len())[..eval_size] {
        held[i] = true;
    }
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (e, h) in examples.into_iter().zip(held) {
        if h {
            eval.push(e)
        } else {
            train.push(e)
        }
    }
    Ok((train, eval))
}

/// Consecutive batches of at most `size` examples, in order (evaluation).
pub fn in_order(examples: &[Encoded], size: usize) -> impl Iterator<Item = Batch> + '_ {
    examples
        .chunks(size.max(1))
        .map(|c| Batch::new(&c.iter().collect::<Vec<_>>()))
}
