//! The keys and values of the positions a decoder has already seen, per layer, so that
//! generation computes each new position once instead of re-running the whole sequence.

use candle_core::{Result, Tensor};

/// One sequence batch's cached keys and values, (b, kv heads, positions, head dim) per layer,
/// before the grouped-query repeat.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        KvCache {
            layers: vec![None; layers],
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the new positions' `k`, `v` to layer `l`; returns every position's.
    pub fn append(&mut self, l: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let kv = match self.layers[l].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[l] = Some(kv.clone());
        Ok(kv)
    }
}
