//! Causal grouped-query attention for training on the CPU as one graph node. For every sequence
//! of a batch: queries and keys rotated (RoPE), scores, the causal softmax and the weighted
//! values; its backward gives dq, dk and dv at once and recomputes each query's probabilities
//! instead of keeping them. Composed, the same is a dozen nodes a layer (head splits, kv heads
//! repeated for their groups, two batched products, the softmax, the merge, the padding's
//! unpack and pack), and candle's backward accumulates the gradient of each into a zero-filled
//! tensor of its own. Other devices, and half precisions, keep the composed form.

use super::heads::Rope;
use super::ops::slice;
use super::vecmath::{self, with_avx2, Real, LANES};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// What one attention call covers: `heads` query heads sharing `kv_heads` key/value heads
/// (`heads / kv_heads` queries each), `head_dim` values a head, and each sequence's rows of
/// the batch as (first row, length), its positions counted from 0.
#[derive(Clone)]
pub struct Sequences {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub spans: Vec<(usize, usize)>,
}

/// `softmax(scale · q kᵀ, causal) v` per head for q (…, heads·hd), k and v (…, kv_heads·hd)
/// holding the rows of `seqs` (q and k rotated by `rope` first); the output has q's shape.
/// None where the fused op does not apply (not the CPU, not f32/f64, per-row rope tables).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqs: &Sequences,
    rope: &Rope,
    scale: f64,
) -> Result<Option<Tensor>> {
    if !q.device().is_cpu() || !matches!(q.dtype(), DType::F32 | DType::F64) {
        return Ok(None);
    }
    let longest = seqs.spans.iter().map(|s| s.1).max().unwrap_or(0);
    if rope.shared_rows(longest, seqs.head_dim).is_none() {
        return Ok(None);
    }
    let op = CausalAttention {
        seqs: seqs.clone(),
        rope: rope.clone(),
        scale,
    };
    Ok(Some(q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        op,
    )?))
}

struct CausalAttention {
    seqs: Sequences,
    rope: Rope,
    scale: f64,
}

/// The rope tables of positions 0.. (hd values a position, as `Rope` keeps them).
struct Tables<'a> {
    cos: &'a [f64],
    sin: &'a [f64],
}

impl CausalAttention {
    fn tables(&self) -> Tables<'_> {
        let longest = self.seqs.spans.iter().map(|s| s.1).max().unwrap_or(0);
        let (cos, sin) = self
            .rope
            .shared_rows(longest, self.seqs.head_dim)
            .expect("checked when the op was made");
        Tables { cos, sin }
    }

    /// The (sequence, kv head) pairs: one task each.
    fn tasks(&self) -> Vec<(usize, usize)> {
        let s = &self.seqs;
        (0..s.spans.len())
            .flat_map(|i| (0..s.kv_heads).map(move |g| (i, g)))
            .collect()
    }

    /// Task (i, g)'s rotated queries (len, group·hd), rotated keys (len, hd) and values.
    fn inputs<R: Real>(
        &self,
        (i, g): (usize, usize),
        [q, k, v]: [&[R]; 3],
        tables: &Tables,
    ) -> [Vec<R>; 3] {
        let s = &self.seqs;
        let (hd, group) = (s.head_dim, s.heads / s.kv_heads);
        let (span, rope) = (s.spans[i], Some((tables, 1.0)));
        [
            rows(
                q,
                s.heads * hd,
                span,
                (g * group * hd, group * hd),
                hd,
                rope,
            ),
            rows(k, s.kv_heads * hd, span, (g * hd, hd), hd, rope),
            rows(v, s.kv_heads * hd, span, (g * hd, hd), hd, None),
        ]
    }

    /// [`Self::backward`] on the storages of q, k, v and the output's gradient, as tensors
    /// shaped like q, k and v.
    fn gradients<R: Real>(
        &self,
        inputs: [(&CpuStorage, &Layout); 4],
        like: [&Tensor; 3],
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [q, k, v, dy] = inputs.map(|(s, l)| slice::<R>(s, l));
        let grads = self.backward(q?, k?, v?, dy?);
        let tensor = |(g, t): (Vec<R>, &Tensor)| Tensor::from_vec(g, t.shape(), t.device());
        let [dq, dk, dv] = grads;
        Ok((
            Some(tensor((dq, like[0]))?),
            Some(tensor((dk, like[1]))?),
            Some(tensor((dv, like[2]))?),
        ))
    }

    fn forward<R: Real>(&self, q: &[R], k: &[R], v: &[R]) -> Vec<R> {
        let s = &self.seqs;
        let (hd, group) = (s.head_dim, s.heads / s.kv_heads);
        let qw = s.heads * hd;
        let tables = self.tables();
        let scale = R::from_f64(self.scale);
        let parts: Vec<_> = self
            .tasks()
            .into_par_iter()
            .map(|task| {
                let [queries, keys, values] = self.inputs(task, [q, k, v], &tables);
                group_forward((&queries, &keys, &values), hd, scale)
            })
            .collect();
        let mut y = vec![R::zero(); q.len()];
        for ((i, g), part) in self.tasks().into_iter().zip(parts) {
            scatter(&mut y, qw, s.spans[i], g * group * hd, &part);
        }
        y
    }

    fn backward<R: Real>(&self, q: &[R], k: &[R], v: &[R], dy: &[R]) -> [Vec<R>; 3] {
        let s = &self.seqs;
        let (hd, group) = (s.head_dim, s.heads / s.kv_heads);
        let (qw, kw) = (s.heads * hd, s.kv_heads * hd);
        let tables = self.tables();
        let scale = R::from_f64(self.scale);
        let parts: Vec<_> = self
            .tasks()
            .into_par_iter()
            .map(|(i, g)| {
                let span = s.spans[i];
                let [queries, keys, values] = self.inputs((i, g), [q, k, v], &tables);
                let grads = rows(dy, qw, span, (g * group * hd, group * hd), hd, None);
                let [dq, dk, dv] = group_backward((&queries, &keys, &values, &grads), hd, scale);
                // Back through the rotation: orthogonal, so the opposite angles.
                let back = |x: Vec<R>, width: usize| {
                    rows(
                        &x,
                        width,
                        (0, span.1),
                        (0, width),
                        hd,
                        Some((&tables, -1.0)),
                    )
                };
                [back(dq, group * hd), back(dk, hd), dv]
            })
            .collect();
        let mut grads = [
            vec![R::zero(); q.len()],
            vec![R::zero(); k.len()],
            vec![R::zero(); v.len()],
        ];
        for ((i, g), [pq, pk, pv]) in self.tasks().into_iter().zip(parts) {
            let span = s.spans[i];
            scatter(&mut grads[0], qw, span, g * group * hd, &pq);
            scatter(&mut grads[1], kw, span, g * hd, &pk);
            scatter(&mut grads[2], kw, span, g * hd, &pv);
        }
        grads
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = match q.dtype() {
            DType::F32 => {
                CpuStorage::F32(self.forward(slice::<f32>(q, ql)?, slice(k, kl)?, slice(v, vl)?))
            }
            DType::F64 => {
                CpuStorage::F64(self.forward(slice::<f64>(q, ql)?, slice(k, kl)?, slice(v, vl)?))
            }
            other => candle_core::bail!("causal-attention: unsupported dtype {other:?}"),
        };
        Ok((y, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (gs, gl) = dy.storage_and_layout();
        let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs), Storage::Cpu(gs)) =
            (&*qs, &*ks, &*vs, &*gs)
        else {
            candle_core::bail!("causal-attention: the fused op runs on the CPU only")
        };
        let inputs = [(qs, ql), (ks, kl), (vs, vl), (gs, gl)];
        match qs.dtype() {
            DType::F32 => self.gradients::<f32>(inputs, [q, k, v]),
            DType::F64 => self.gradients::<f64>(inputs, [q, k, v]),
            other => candle_core::bail!("causal-attention: unsupported dtype {other:?}"),
        }
    }
}

/// The values `col..col + width` of rows `first..first + len` of `x` (rows of `stride`), each
/// head of `hd` values rotated by its row's position (`sign` −1: the inverse rotation), in
/// f64 as the head-split op rotates, so both paths see the same rotated values.
fn rows<R: Real>(
    x: &[R],
    stride: usize,
    (first, len): (usize, usize),
    (col, width): (usize, usize),
    hd: usize,
    rope: Option<(&Tables, f64)>,
) -> Vec<R> {
    let mut out = Vec::with_capacity(len * width);
    for p in 0..len {
        let row = &x[(first + p) * stride + col..][..width];
        let Some((t, sign)) = rope else {
            out.extend_from_slice(row);
            continue;
        };
        let (cos, sin) = (&t.cos[p * hd..][..hd], &t.sin[p * hd..][..hd]);
        let half = hd / 2;
        for head in row.chunks_exact(hd) {
            out.extend((0..hd).map(|i| {
                let rotated = if i < half {
                    -head[i + half].to_f64()
                } else {
                    head[i - half].to_f64()
                };
                R::from_f64(head[i].to_f64() * cos[i] + sign * rotated * sin[i])
            }));
        }
    }
    out
}

/// Writes `part` (len rows of `width`) into the columns `col..` of rows `first..` of `y`.
fn scatter<R: Real>(
    y: &mut [R],
    stride: usize,
    (first, len): (usize, usize),
    col: usize,
    part: &[R],
) {
    let width = part.len() / len.max(1);
    for (p, src) in part.chunks_exact(width.max(1)).enumerate().take(len) {
        y[(first + p) * stride + col..][..width].copy_from_slice(src);
    }
}

/// Σ a·b in `LANES` independent sums (the loop vectorises).
#[inline(always)]
fn dot<R: Real>(a: &[R], b: &[R]) -> R {
    let mut acc = [R::zero(); LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let mut tail = R::zero();
    for (x, y) in ac.remainder().iter().zip(bc.remainder()) {
        tail += *x * *y;
    }
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.into_iter().fold(tail, |s, v| s + v)
}

/// `y += a · x`.
#[inline(always)]
fn axpy<R: Real>(y: &mut [R], a: R, x: &[R]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// One group's query heads against its key/value head, one sequence: `queries` (len,
/// group·hd) rotated, `keys` (len, hd) rotated, `values` (len, hd); returns (len, group·hd).
#[inline(always)]
fn group_forward_portable<R: Real>(
    (queries, keys, values): (&[R], &[R], &[R]),
    hd: usize,
    scale: R,
) -> Vec<R> {
    let len = keys.len() / hd;
    let width = queries.len() / len.max(1);
    let mut out = vec![R::zero(); queries.len()];
    let mut probs = Vec::with_capacity(len);
    for i in 0..len {
        for (h, q) in queries[i * width..][..width].chunks_exact(hd).enumerate() {
            probs.clear();
            for j in 0..=i {
                probs.push(dot(q, &keys[j * hd..][..hd]));
            }
            vecmath::softmax_in_place(&mut probs, scale);
            let o = &mut out[i * width + h * hd..][..hd];
            for (j, &p) in probs.iter().enumerate() {
                axpy(o, p, &values[j * hd..][..hd]);
            }
        }
    }
    out
}

with_avx2! {
    fn group_forward<R: Real>(qkv: (&[R], &[R], &[R]), hd: usize, scale: R) -> Vec<R> = group_forward_portable
}

/// The gradients of [`group_forward`] for its output's gradient `grads` (len, group·hd):
/// [dq, dk, dv] with respect to the rotated queries and keys and the values, the
/// probabilities recomputed query by query.
#[inline(always)]
fn group_backward_portable<R: Real>(
    (queries, keys, values, grads): (&[R], &[R], &[R], &[R]),
    hd: usize,
    scale: R,
) -> [Vec<R>; 3] {
    let len = keys.len() / hd;
    let width = queries.len() / len.max(1);
    let mut dq = vec![R::zero(); queries.len()];
    let mut dk = vec![R::zero(); keys.len()];
    let mut dv = vec![R::zero(); values.len()];
    let (mut probs, mut dp) = (Vec::with_capacity(len), Vec::with_capacity(len));
    for i in 0..len {
        for h in 0..width / hd {
            let at = i * width + h * hd;
            let (q, g) = (&queries[at..][..hd], &grads[at..][..hd]);
            probs.clear();
            dp.clear();
            for j in 0..=i {
                probs.push(dot(q, &keys[j * hd..][..hd]));
                dp.push(dot(g, &values[j * hd..][..hd]));
            }
            vecmath::softmax_in_place(&mut probs, scale);
            // ∂score_j = scale · p_j · (∂p_j − Σ p·∂p), the scaled softmax's backward.
            let mean = probs
                .iter()
                .zip(&dp)
                .fold(R::zero(), |s, (&p, &d)| s + p * d);
            for j in 0..=i {
                let ds = scale * probs[j] * (dp[j] - mean);
                axpy(&mut dq[at..][..hd], ds, &keys[j * hd..][..hd]);
                axpy(&mut dk[j * hd..][..hd], ds, q);
                axpy(&mut dv[j * hd..][..hd], probs[j], g);
            }
        }
    }
    [dq, dk, dv]
}

with_avx2! {
    fn group_backward<R: Real>(qkvg: (&[R], &[R], &[R], &[R]), hd: usize, scale: R) -> [Vec<R>; 3] = group_backward_portable
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::heads::{merge_heads, split_heads};
    use crate::kernels::ops::causal_attention_probs;
    use candle_core::{Device, Var};

    /// The composed form the model runs elsewhere, one sequence (1, len, ·) at a time.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, seqs: &Sequences, rope: &Rope) -> Tensor {
        let (nh, nkv) = (seqs.heads, seqs.kv_heads);
        let scale = 1.0 / (seqs.head_dim as f64).sqrt();
        let outs: Vec<Tensor> = seqs
            .spans
            .iter()
            .map(|&(first, len)| {
                let part = |x: &Tensor| x.narrow(0, first, len).unwrap().unsqueeze(0).unwrap();
                // The CPU head split reads positions 0..len of the f64 tables.
                let q = split_heads(&part(q), nh, Some(rope)).unwrap();
                let repeat = |x: Tensor| {
                    let (b, kv, t, hd) = x.dims4().unwrap();
                    Tensor::cat(&vec![&x; nh / nkv], 2)
                        .unwrap()
                        .reshape((b, kv * nh / nkv, t, hd))
                        .unwrap()
                };
                let k = repeat(split_heads(&part(k), nkv, Some(rope)).unwrap());
                let v = repeat(split_heads(&part(v), nkv, None).unwrap());
                let scores = q.matmul(&k.t().unwrap()).unwrap();
                let probs = causal_attention_probs(&scores, scale).unwrap();
                merge_heads(&probs.matmul(&v).unwrap())
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
            })
            .collect();
        Tensor::cat(&outs, 0).unwrap()
    }

    /// Ragged sequences (one of a single token), grouped heads, an odd head size: output and
    /// the three input gradients equal the composed form's (f64, 1e-12 of the largest value).
    #[test]
    fn fused_attention_equals_the_composed_form() {
        let dev = Device::Cpu;
        for (nh, nkv, hd, lens) in [
            (6, 2, 10, vec![5, 1, 7]),
            (4, 4, 8, vec![9]),
            (3, 1, 6, vec![2, 3]),
        ] {
            let n: usize = lens.iter().sum();
            let spans: Vec<_> = lens
                .iter()
                .scan(0, |first, &len| {
                    *first += len;
                    Some((*first - len, len))
                })
                .collect();
            let seqs = Sequences {
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                spans,
            };
            let longest = *lens.iter().max().unwrap();
            let angles: Vec<f64> = (0..longest * hd / 2)
                .map(|i| (i / (hd / 2)) as f64 * 0.3f64.powi((i % (hd / 2)) as i32 + 1))
                .collect();
            let rope = Rope::new(&angles, longest, DType::F64, &dev).unwrap();
            let var = |w: usize| Var::randn(0f64, 1.0, (n, w), &dev).unwrap();
            let (q, k, v) = (var(nh * hd), var(nkv * hd), var(nkv * hd));
            let upstream = Tensor::randn(0f64, 1.0, (n, nh * hd), &dev).unwrap();
            let run = |out: Tensor| {
                let grads = (&out * &upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let grad = |x: &Var| grads.get(x.as_tensor()).unwrap().clone();
                [out, grad(&q), grad(&k), grad(&v)]
            };
            let scale = 1.0 / (hd as f64).sqrt();
            let fused = causal_attention(&q, &k, &v, &seqs, &rope, scale)
                .unwrap()
                .unwrap();
            let fused = run(fused);
            let reference = run(composed(&q, &k, &v, &seqs, &rope));
            for (what, (a, b)) in ["output", "dq", "dk", "dv"]
                .iter()
                .zip(fused.iter().zip(&reference))
            {
                let largest = b
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                let diff = (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(
                    diff <= 1e-12 * largest.max(1.0),
                    "{what} ({nh}/{nkv} heads, {lens:?}): {diff}"
                );
            }
        }
    }
}
