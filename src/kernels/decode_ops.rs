//! Grouped-query attention of a decoding step's few new positions over the key/value cache,
//! in one pass on the CPU. Composed, each step copied every cached key and value once per
//! query head that shares it (`repeat_kv`), multiplied (b·heads) one-row matrices by the cache
//! in two batched products, and built, added and normalised a mask; here each query reads
//! its key/value head in place (strided, in the cache's buffer) and sees the keys the cache's
//! padding allows. No backward: decoding computes no gradient.

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// New positions per row for which the fused pass is used; a long prompt's prefill keeps the
/// batched products, which reuse each key across many queries.
pub const QUERIES: std::ops::RangeInclusive<usize> = 1..=16;

/// `softmax(scale · q kᵀ + mask) · v` for queries `q` (b, heads, t, hd) and the cache's `k`,
/// `v` (b, kv heads, len, hd), the last `t` positions being the queries' own: query i of row r
/// (column `len − t + i`) sees keys `pads[r]..=` its column, and a padding query (column below
/// `pads[r]`) itself alone, as [`crate::model::kv_cache::KvCache::mask`] says. Query head h
/// reads key/value head `h / (heads / kv heads)`, as transformers' `repeat_kv`. Returns None
/// where the pass does not apply (not f32 on the CPU, or more than [`QUERIES`] positions):
/// the caller then composes the ops.
pub fn cached_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pads: &[usize],
    scale: f64,
) -> Result<Option<Tensor>> {
    let (b, nh, t, hd) = q.dims4()?;
    let (kb, nkv, len, khd) = k.dims4()?;
    if !q.device().is_cpu() || !QUERIES.contains(&t) {
        return Ok(None);
    }
    if (kb, khd) != (b, hd) || v.dims() != k.dims() || nkv == 0 || nh % nkv != 0 || len < t {
        candle_core::bail!(
            "cached attention: queries {:?} do not fit keys {:?} and values {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (
        Storage::Cpu(CpuStorage::F32(qs)),
        Storage::Cpu(CpuStorage::F32(ks)),
        Storage::Cpu(CpuStorage::F32(vs)),
    ) = (&*qs, &*ks, &*vs)
    else {
        return Ok(None);
    };
    let (Some(keys), Some(values)) = (Heads::of(kl), Heads::of(vl)) else {
        return Ok(None);
    };
    let qs = &qs[ql.start_offset()..ql.start_offset() + b * nh * t * hd];
    let (group, past) = (nh / nkv, len - t);
    let scale = scale as f32;
    let mut y = vec![0f32; b * nh * t * hd];
    // One task per (row, query head): its t queries against one key/value head.
    let mut heads: Vec<&mut [f32]> = y.chunks_mut(t * hd).collect();
    super::team::for_each_mut(&mut heads, |rh, out| {
        SCORES.with_borrow_mut(|scores| {
            let (r, h) = (rh / nh, rh % nh);
            let pad = pads.get(r).copied().unwrap_or(0);
            let (kh, vh) = (keys.at(ks, r, h / group), values.at(vs, r, h / group));
            for i in 0..t {
                let column = past + i;
                let first = if pad <= column { pad } else { column };
                let query = &qs[(rh * t + i) * hd..][..hd];
                attend(
                    query,
                    kh,
                    vh,
                    (first, column + 1),
                    scale,
                    scores,
                    &mut out[i * hd..(i + 1) * hd],
                );
            }
        })
    });
    Tensor::from_vec(y, (b, nh, t, hd), q.device()).map(Some)
}

thread_local! {
    /// A task's scores over the cache, kept per thread across tasks and steps (one allocation
    /// a thread, not one per head, layer and token).
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Where one (row, kv head)'s positions lie in a cache buffer: `hd` contiguous values per
/// position, positions `step` apart (the buffer's room, not its fill, sets the strides).
#[derive(Clone, Copy)]
struct Heads {
    start: usize,
    row: usize,
    head: usize,
    step: usize,
    hd: usize,
    len: usize,
}

impl Heads {
    fn of(l: &Layout) -> Option<Self> {
        match (l.dims(), l.stride()) {
            (&[_, _, len, hd], &[row, head, step, 1]) if step >= hd => Some(Heads {
                start: l.start_offset(),
                row,
                head,
                step,
                hd,
                len,
            }),
            _ => None,
        }
    }

    /// The (row `r`, head `h`) positions: `len` of them, the last `hd` values long.
    fn at<'a>(&self, data: &'a [f32], r: usize, h: usize) -> Strided<'a> {
        let from = self.start + r * self.row + h * self.head;
        let span = if self.len == 0 {
            0
        } else {
            (self.len - 1) * self.step + self.hd
        };
        Strided {
            data: &data[from..from + span],
            step: self.step,
        }
    }
}

/// Positions `step` apart in `data`.
#[derive(Clone, Copy)]
struct Strided<'a> {
    data: &'a [f32],
    step: usize,
}

/// One query's attention over keys `visible.0..visible.1`, written to `out` (hd): the
/// portable loops compiled for AVX2's 8-wide registers where the CPU has them.
#[allow(clippy::too_many_arguments)]
fn attend(
    query: &[f32],
    keys: Strided<'_>,
    values: Strided<'_>,
    visible: (usize, usize),
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(
            query: &[f32],
            keys: Strided<'_>,
            values: Strided<'_>,
            visible: (usize, usize),
            scale: f32,
            scores: &mut Vec<f32>,
            out: &mut [f32],
        ) {
            attend_portable(query, keys, values, visible, scale, scores, out)
        }
        // SAFETY: the CPU has AVX2.
        return unsafe { avx2(query, keys, values, visible, scale, scores, out) };
    }
    attend_portable(query, keys, values, visible, scale, scores, out)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_portable(
    query: &[f32],
    keys: Strided<'_>,
    values: Strided<'_>,
    (first, end): (usize, usize),
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = query.len();
    scores.clear();
    // A plain loop, not an iterator adapter: a closure would be compiled apart from the
    // AVX2 caller, without its registers.
    for j in first..end {
        scores.push(scale * dot(query, &keys.data[j * keys.step..][..hd]));
    }
    let max = super::vecmath::max(scores);
    let total = super::vecmath::exp_into_self(scores, max);
    out.fill(0.0);
    for (j, p) in (first..end).zip(scores.iter()) {
        let value = &values.data[j * values.step..][..hd];
        for (o, &x) in out.iter_mut().zip(value) {
            *o += p * x;
        }
    }
    let inv = 1.0 / total;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// Σ a·b in eight independent accumulators (the loop vectorises).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kv_cache::KvCache;
    use candle_core::{DType, Device, D};

    /// The composed form the decoder used: repeat_kv, the two products, the cache's mask.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
        let (b, nkv, len, hd) = k.dims4().unwrap();
        let group = q.dim(1).unwrap() / nkv;
        let repeat = |x: &Tensor| {
            Tensor::cat(&vec![x; group], 2)
                .unwrap()
                .reshape((b, nkv * group, len, hd))
                .unwrap()
        };
        let scores = q.matmul(&repeat(k).t().unwrap()).unwrap();
        let scores = (scores * scale).unwrap().broadcast_add(mask).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        probs.matmul(&repeat(v)).unwrap()
    }

    /// Rows, query heads, kv heads, new positions, cached positions, head dim, pads.
    type Case = (usize, usize, usize, usize, usize, usize, &'static [usize]);

    /// Ragged rows (padding keys and a padding query), several queries after cached ones, and
    /// keys that are views of a larger buffer, as the cache hands them out: equal to the
    /// composed form within 1e-5 (f32 summation order and the vectorised exp, 2ε).
    #[test]
    fn cached_attention_equals_the_composed_form() {
        let dev = Device::Cpu;
        let cases: &[Case] = &[
            (1, 9, 3, 1, 7, 64, &[0]),
            (3, 4, 2, 1, 12, 20, &[0, 5, 11]),
            (2, 6, 3, 4, 6, 16, &[0, 8]),
            (2, 2, 2, 3, 0, 8, &[1, 0]),
        ];
        for &(b, nh, nkv, t, past, hd, pads) in cases {
            let mut cache = KvCache::with_padding(1, pads.to_vec());
            let cached = || Tensor::randn(0f32, 1.0, (b, nkv, past, hd), &dev).unwrap();
            if past > 0 {
                cache.append(0, cached(), cached()).unwrap();
            }
            let mask = cache.mask(b, t, DType::F32, &dev).unwrap();
            let k1 = Tensor::randn(0f32, 1.0, (b, nkv, t, hd), &dev).unwrap();
            let v1 = Tensor::randn(0f32, 1.0, (b, nkv, t, hd), &dev).unwrap();
            let (k, v) = cache.append(0, k1, v1).unwrap();
            let q = Tensor::randn(0f32, 1.0, (b, nh, t, hd), &dev).unwrap();
            let scale = 1.0 / (hd as f64).sqrt();
            let fused = cached_attention(&q, &k, &v, pads, scale).unwrap().unwrap();
            let want = composed(&q, &k, &v, &mask, scale);
            let diff = (fused - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_keepdim(D::Minus1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff < 1e-5,
                "b {b} heads {nh}/{nkv} t {t} past {past}: {diff}"
            );
        }
    }

    /// Beyond its few queries, or in another dtype, the pass declines (the caller composes).
    #[test]
    fn cached_attention_declines_what_it_does_not_cover() {
        let dev = Device::Cpu;
        let k = Tensor::zeros((1, 1, 20, 8), DType::F32, &dev).unwrap();
        let q = Tensor::zeros((1, 1, 17, 8), DType::F32, &dev).unwrap();
        assert!(cached_attention(&q, &k, &k, &[0], 1.0).unwrap().is_none());
        let k16 = k.to_dtype(DType::BF16).unwrap();
        let q16 = Tensor::zeros((1, 1, 1, 8), DType::BF16, &dev).unwrap();
        assert!(cached_attention(&q16, &k16, &k16, &[0], 1.0)
            .unwrap()
            .is_none());
    }
}
