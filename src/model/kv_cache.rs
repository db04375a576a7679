//! The keys and values of the positions a decoder has already seen, per layer, so that
//! generation computes each new position once instead of re-running the whole sequence.
//! Sequences of different lengths decode together left-padded: row r's first `pads[r]` cached
//! positions are padding that attention masks out (zeros, or a left-padded prompt batch's
//! padding tokens, which see only themselves so that they stay finite).

use candle_core::{DType, Device, Result, Tensor};

/// One sequence batch's cached keys and values, (b, kv heads, positions, head dim) per layer,
/// before the grouped-query repeat. Each layer's buffers hold room for more positions than
/// are filled, so a step writes its own position in place instead of copying the whole cache.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Filled positions per layer (the first layers of a step are one ahead of the rest).
    filled: Vec<usize>,
    /// Per batch row, how many leading cached positions are padding.
    pads: Vec<usize>,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        KvCache {
            layers: vec![None; layers],
            filled: vec![0; layers],
            pads: Vec::new(),
        }
    }

    /// An empty cache for prompts prefilled together, left-padded: row r's first `pads[r]`
    /// positions are padding.
    pub fn with_padding(layers: usize, pads: Vec<usize>) -> Self {
        KvCache {
            pads,
            ..KvCache::new(layers)
        }
    }

    /// Cached positions (columns, padding included).
    pub fn len(&self) -> usize {
        self.filled.first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Batch rows (0 before the first append).
    pub fn rows(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(0).unwrap_or(0))
    }

    /// The position of row `r`'s next token: its real tokens so far.
    pub fn next_position(&self, r: usize) -> usize {
        self.len()
            .saturating_sub(self.pads.get(r).copied().unwrap_or(0))
    }

    /// The positions of row `r`'s next `t` columns (padding columns at 0: they are masked).
    pub fn positions(&self, r: usize, t: usize) -> impl Iterator<Item = usize> {
        let pad = self.pads.get(r).copied().unwrap_or(0);
        (self.len()..self.len() + t).map(move |c| c.saturating_sub(pad))
    }

    /// Per batch row, how many leading cached positions are padding (empty before the first
    /// append of an unpadded cache).
    pub fn pads(&self) -> &[usize] {
        &self.pads
    }

    /// Whether some row starts with padding.
    pub fn is_ragged(&self) -> bool {
        self.pads.iter().any(|&p| p > 0)
    }

    /// The additive attention mask (b, 1, t, len + t) for `t` new positions: −∞ where a key is
    /// padding or lies after the query; a padding query sees itself alone (a row of −∞ only
    /// would make its softmax, and the keys and values made from it, NaN).
    pub fn mask(&self, b: usize, t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let (past, keys) = (self.len(), self.len() + t);
        let mask: Vec<f32> = (0..b)
            .flat_map(|r| {
                let pad = self.pads.get(r).copied().unwrap_or(0);
                (0..t).flat_map(move |i| {
                    (0..keys).map(move |j| {
                        if j > past + i || (j < pad && j != past + i) {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
            })
            .collect();
        Tensor::from_vec(mask, (b, 1, t, keys), device)?.to_dtype(dtype)
    }

    /// Appends the new positions' `k`, `v` to layer `l`; returns every position's (views of
    /// the buffers, valid until the next append).
    pub fn append(&mut self, l: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        if self.pads.is_empty() {
            self.pads = vec![0; k.dim(0)?];
        }
        let (len, t) = (self.filled[l], k.dim(2)?);
        let room = self.layers[l]
            .as_ref()
            .map_or(0, |(kb, _)| kb.dim(2).unwrap_or(0));
        if len + t > room {
            // Grow geometrically: a copy of the cache every doubling, not every step.
            let cap = (2 * room).max(len + t).max(16);
            let grow = |old: Option<&Tensor>, new: &Tensor| -> Result<Tensor> {
                let (b, h, _, d) = new.dims4()?;
                let buf = Tensor::zeros((b, h, cap, d), new.dtype(), new.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            let old = self.layers[l].take();
            self.layers[l] = Some((
                grow(old.as_ref().map(|o| &o.0), &k)?,
                grow(old.as_ref().map(|o| &o.1), &v)?,
            ));
        }
        let (kb, vb) = self.layers[l].as_ref().expect("allocated above");
        kb.slice_set(&k.contiguous()?, 2, len)?;
        vb.slice_set(&v.contiguous()?, 2, len)?;
        self.filled[l] = len + t;
        Ok((kb.narrow(2, 0, len + t)?, vb.narrow(2, 0, len + t)?))
    }

    /// Layer `l`'s filled keys and values.
    fn filled(&self, l: usize) -> Option<(Tensor, Tensor)> {
        let (k, v) = self.layers[l].as_ref()?;
        let n = self.filled[l];
        Some((k.narrow(2, 0, n).ok()?, v.narrow(2, 0, n).ok()?))
    }

    /// One batch of every row of `caches`, each left-padded to the longest.
    pub fn stack(caches: Vec<KvCache>) -> Result<KvCache> {
        let longest = caches.iter().map(KvCache::len).max().unwrap_or(0);
        let layers = caches.first().map_or(0, |c| c.layers.len());
        let pad = |t: &Tensor, n: usize| -> Result<Tensor> {
            if n == 0 {
                return Ok(t.clone());
            }
            let (b, h, _, d) = t.dims4()?;
            let zeros = Tensor::zeros((b, h, n, d), t.dtype(), t.device())?;
            Tensor::cat(&[&zeros, t], 2)
        };
        let mut stacked = KvCache::new(layers);
        for l in 0..layers {
            let (mut ks, mut vs) = (Vec::new(), Vec::new());
            for c in &caches {
                let Some((k, v)) = c.filled(l) else {
                    candle_core::bail!("stacking a cache with an empty layer {l}");
                };
                ks.push(pad(&k, longest - c.len())?);
                vs.push(pad(&v, longest - c.len())?);
            }
            stacked.layers[l] = Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?));
            stacked.filled[l] = longest;
        }
        stacked.pads = caches
            .iter()
            .flat_map(|c| c.pads.iter().map(move |p| p + longest - c.len()))
            .collect();
        Ok(stacked)
    }

    /// Keeps only batch rows `keep` (in that order), and drops leading columns that became
    /// padding for every remaining row.
    pub fn retain(&mut self, keep: &[usize]) -> Result<()> {
        let Some(first) = self.layers.first().and_then(|l| l.as_ref()) else {
            return Ok(());
        };
        let index = Tensor::from_vec(
            keep.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            keep.len(),
            first.0.device(),
        )?;
        let pads: Vec<usize> = keep.iter().map(|&r| self.pads[r]).collect();
        let trim = pads.iter().copied().min().unwrap_or(0);
        let len = self.len();
        for (layer, filled) in self.layers.iter_mut().zip(&mut self.filled) {
            if let Some((k, v)) = layer.as_mut() {
                // Rows kept, leading padding dropped, the room after the filled part kept.
                let select = |t: &Tensor| {
                    t.index_select(&index, 0)?
                        .narrow(2, trim, t.dim(2)? - trim)?
                        .contiguous()
                };
                *layer = Some((select(k)?, select(v)?));
                *filled = len - trim;
            }
        }
        self.pads = pads.iter().map(|p| p - trim).collect();
        Ok(())
    }
}
