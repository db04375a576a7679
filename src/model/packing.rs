//! Training on right-padded batches, and prefilling left-padded prompts, without computing the
//! padding. Every op of a block but
//! attention works row by row, so the residual stream is kept as the real tokens alone, packed
//! (n, d); only attention sees the padded (b, t, ·) layout, rebuilt by one gather. Chat batches
//! are a fifth to a third padding, which the linears would otherwise multiply.
//!
//! The gathered padding positions copy a real row of their own sequence: with right padding and
//! the causal mask (or left padding and the cache's mask) no real query sees them, and the
//! packing back drops their outputs, so their gradient is exactly zero and the real rows'
//! values and gradients are those of the padded computation.

use candle_core::{Device, Result, Tensor};

pub struct Packing {
    /// (n,) the padded (flat) index of each real token, in order.
    real: Tensor,
    /// (b·t,) for each padded position, the packed row it is gathered from.
    source: Vec<u32>,
    source_t: Tensor,
    rows: usize,
    len: usize,
    /// Each sequence's real positions `start..end` of `len`.
    spans: Vec<(usize, usize)>,
}

impl Packing {
    /// For `lengths` of sequences right-padded to `len`; None when nothing is padding.
    pub fn new(lengths: &[usize], len: usize, device: &Device) -> Result<Option<Self>> {
        let spans: Vec<_> = lengths.iter().map(|&l| (0, l.min(len))).collect();
        Self::of_spans(&spans, len, device)
    }

    /// For prompts left-padded to `len`, row r's first `pads[r]` positions padding (a batch
    /// prefilled together); None when nothing is padding.
    pub fn left(pads: &[usize], len: usize, device: &Device) -> Result<Option<Self>> {
        let spans: Vec<_> = pads.iter().map(|&p| (p.min(len), len)).collect();
        Self::of_spans(&spans, len, device)
    }

    /// Row r's real tokens are positions `spans[r].0 .. spans[r].1` of `len`.
    fn of_spans(spans: &[(usize, usize)], len: usize, device: &Device) -> Result<Option<Self>> {
        let rows = spans.len();
        let n: usize = spans.iter().map(|&(a, b)| b - a).sum();
        if n == rows * len || n == 0 {
            return Ok(None);
        }
        let mut real = Vec::with_capacity(n);
        let mut source = Vec::with_capacity(rows * len);
        let mut packed = 0u32;
        for (r, &(start, end)) in spans.iter().enumerate() {
            real.extend((start..end).map(|t| (r * len + t) as u32));
            let first = packed;
            packed += (end - start) as u32;
            // Padding copies the sequence's nearest real row (an empty one, any row).
            let last = if end > start { packed - 1 } else { 0 };
            source.extend((0..len).map(|t| match t {
                t if t < start => first.min(last),
                t if t < end => first + (t - start) as u32,
                _ => last,
            }));
        }
        Ok(Some(Self {
            real: Tensor::from_vec(real, n, device)?,
            source_t: Tensor::from_slice(&source, rows * len, device)?,
            source,
            rows,
            len,
            spans: spans.to_vec(),
        }))
    }

    /// (b, t, f) → (n, f): the real rows.
    pub fn pack(&self, x: &Tensor) -> Result<Tensor> {
        let f = x.dim(candle_core::D::Minus1)?;
        x.reshape((self.rows * self.len, f))?
            .index_select(&self.real, 0)
    }

    /// (n, f) → (b, t, f), padding positions filled with a real row of their sequence.
    pub fn unpack(&self, x: &Tensor) -> Result<Tensor> {
        let f = x.dim(candle_core::D::Minus1)?;
        x.index_select(&self.source_t, 0)?
            .reshape((self.rows, self.len, f))
    }

    /// Each sequence's packed rows as (first row, count) where every sequence starts at
    /// position 0 (right padding, as training batches are); None for left padding.
    pub fn sequences(&self) -> Option<Vec<(usize, usize)>> {
        let mut first = 0;
        self.spans
            .iter()
            .map(|&(start, end)| {
                let span = (first, end - start);
                first += end - start;
                (start == 0).then_some(span)
            })
            .collect()
    }

    /// The packed row of each padded (flat) index of a real token.
    pub fn packed_rows(&self, padded: &[u32]) -> Vec<u32> {
        padded.iter().map(|&p| self.source[p as usize]).collect()
    }
}

/// [`Packing::pack`] when there is a packing, else `x` as it is.
pub fn pack(packing: Option<&Packing>, x: Tensor) -> Result<Tensor> {
    match packing {
        Some(p) => p.pack(&x),
        None => Ok(x),
    }
}

/// [`Packing::unpack`] when there is a packing, else `x` as it is.
pub fn unpack(packing: Option<&Packing>, x: Tensor) -> Result<Tensor> {
    match packing {
        Some(p) => p.unpack(&x),
        None => Ok(x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packing keeps the real rows in order; unpacking puts them back and fills padding with
    /// the sequence's last real row; prediction rows map to their packed rows.
    #[test]
    fn packs_real_rows_and_unpacks_them_in_place() {
        let dev = Device::Cpu;
        let p = Packing::new(&[2, 3, 1], 3, &dev).unwrap().unwrap();
        let x = Tensor::arange(0f32, 18.0, &dev)
            .unwrap()
            .reshape((3, 3, 2))
            .unwrap();
        let packed = p.pack(&x).unwrap();
        let want: Vec<f32> = [0, 1, 3, 4, 5, 6]
            .iter()
            .flat_map(|&r| [2.0 * r as f32, 2.0 * r as f32 + 1.0])
            .collect();
        assert_eq!(
            packed.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want
        );
        let back = p.unpack(&packed).unwrap();
        let rows: Vec<Vec<f32>> = back.reshape((9, 2)).unwrap().to_vec2().unwrap();
        let padded_from = [0, 1, 1, 3, 4, 5, 6, 6, 6];
        for (row, &src) in rows.iter().zip(&padded_from) {
            assert_eq!(row, &vec![2.0 * src as f32, 2.0 * src as f32 + 1.0]);
        }
        assert_eq!(p.packed_rows(&[0, 1, 3, 5, 6]), vec![0, 1, 2, 4, 5]);
        assert!(Packing::new(&[3, 3], 3, &dev).unwrap().is_none());
    }

    /// Left padding: the real rows are each sequence's last positions, padding copies its first
    /// real row.
    #[test]
    fn left_padding_packs_the_last_positions() {
        let dev = Device::Cpu;
        let p = Packing::left(&[1, 0, 2], 3, &dev).unwrap().unwrap();
        let x = Tensor::arange(0f32, 9.0, &dev)
            .unwrap()
            .reshape((3, 3, 1))
            .unwrap();
        let packed = p.pack(&x).unwrap().flatten_all().unwrap();
        assert_eq!(
            packed.to_vec1::<f32>().unwrap(),
            [1.0, 2.0, 3.0, 4.0, 5.0, 8.0]
        );
        let back = p.unpack(&p.pack(&x).unwrap()).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 8.0, 8.0, 8.0]
        );
        assert!(Packing::left(&[0, 0], 3, &dev).unwrap().is_none());
    }
}
