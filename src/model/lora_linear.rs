//! The LoRA linears of one input as one op on the CPU: `y_p = x W_pᵀ + s_p · (drop_p(x) A_pᵀ)
//! B_pᵀ` for the frozen weights `W_p` of a block's projections that read the same input (q, k
//! and v; gate and up) stacked into one, whose backward gives dx, every dA and every dB directly.
//!
//! Composed, each linear is nine graph nodes (the base product, two transposes, two thin
//! GEMMs, a scaling, an addition) and candle's backward accumulates every node's gradient into
//! a zero-filled tensor: (n, out) and (n, in) buffers filled with zeros and added to, per
//! linear, per step, and the input gradients of q, k and v summed once more. Here the frozen
//! product is one wider GEMM, the rank-r updates are added into its output (forward) and into
//! the one input gradient (backward), and the factors' gradients are thin GEMMs. Dropout on an
//! adapter's input is the mask `Ctx::dropout` draws (same stream, same order), applied inside.

use super::frozen::FrozenLinear;
use crate::ctx::Ctx;
use crate::kernels::dropout::Dropout;
use crate::kernels::low_rank::{add_low_rank, Update};
use crate::kernels::ops::slice;
use crate::kernels::vecmath::Real;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// An adapter that is plain LoRA: `Δ(x) = scaling · (dropout(x) Aᵀ) Bᵀ` for `a (r, in)`,
/// `b (out, r)`, its gradients flowing.
pub struct PlainLora {
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
}

/// Whether [`forward`] computes `x` with these adapters (or none): f32 or f64 on the CPU, one
/// dtype, one rank.
pub fn supported(x: &Tensor, loras: &[Option<PlainLora>]) -> bool {
    let rank = loras.iter().flatten().next().map(|l| l.a.dim(0).ok());
    x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && loras
            .iter()
            .flatten()
            .all(|l| l.a.dtype() == x.dtype() && Some(l.a.dim(0).ok()) == rank)
}

/// Each part's output `x (n, in) → (n, out_p)`: the stacked frozen `base` (its parts `outs`
/// wide, in order) plus the part's LoRA update where it has one. Dropout masks are drawn from
/// `ctx` part by part, as the composed linears draw them.
///
/// Each part is a graph node of its own (a multi-output op does not exist in candle: one
/// stacked output narrowed three ways would get three zero-padded gradients, summed). They
/// share one [`Group`]: the forward computes all parts at once; in backward each part gives
/// its own factors' gradients and leaves its output gradient with the group, and the part
/// whose gradient arrives last computes the input gradient of all of them as one product.
pub fn forward(
    base: &FrozenLinear,
    outs: &[usize],
    loras: &[Option<PlainLora>],
    x: &Tensor,
    ctx: &Ctx,
) -> Result<Vec<Tensor>> {
    let mut segments = Vec::with_capacity(outs.len());
    let (mut col, mut rank, mut b_row) = (0, 0, 0);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (&out, lora) in outs.iter().zip(loras) {
        let lora = lora.as_ref().map(|l| {
            let r = l.a.dim(0).unwrap_or(0);
            a.push(l.a.clone());
            b.push(l.b.clone());
            let seg = SegmentLora {
                ranks: rank..rank + r,
                b_rows: b_row..b_row + out,
                scaling: l.scaling,
                mask: ctx
                    .dropout_seed(l.dropout)
                    .map(|seed| Dropout::new(seed, l.dropout)),
            };
            (rank, b_row) = (rank + r, b_row + out);
            seg
        });
        segments.push(Segment {
            cols: col..col + out,
            lora,
        });
        col += out;
    }
    let cat = |ts: &[Tensor]| match ts {
        [one] => Ok(one.detach()),
        _ => Tensor::cat(ts, 0).map(|t| t.detach()),
    };
    let x = x.contiguous()?;
    // With no adapter (the frozen products alone) the factors' places are never read.
    let (a_all, b_all) = match a.is_empty() {
        true => (x.detach(), x.detach()),
        false => (cat(&a)?, cat(&b)?),
    };
    let op = LoraGroup {
        base: base.clone(),
        segments: segments.into(),
        input_grad: false,
    };
    let y = x.apply_op3_no_bwd(&a_all, &b_all, &op)?;
    let n = x.dim(0)?;
    let parts = op
        .segments
        .iter()
        .map(|s| {
            let part = y.narrow(1, s.cols.start, s.cols.len())?.contiguous()?;
            let (storage, _) = part.storage_and_layout();
            match &*storage {
                candle_core::Storage::Cpu(c) => Ok(Some(c.clone())),
                _ => candle_core::bail!("LoRA linear: the output is not in host memory"),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    drop(y);
    let group = Arc::new(Group {
        pending: Mutex::new(Pending {
            outputs: parts,
            grads: vec![None; outs.len()],
            down_grads: vec![None; outs.len()],
        }),
        wants_dx: x.track_op(),
        a_all,
        op,
        rows: n,
    });
    let mut lora_factors = a.iter().zip(&b);
    (0..outs.len())
        .map(|index| {
            let part = Part {
                group: group.clone(),
                index,
            };
            match group.op.segments[index].lora {
                Some(_) => {
                    let (a, b) = lora_factors.next().expect("one A and B per adapted part");
                    x.apply_op3(a, b, part)
                }
                None => x.apply_op1(part),
            }
        })
        .collect()
}

/// What the parts of one group share.
struct Group {
    op: LoraGroup,
    pending: Mutex<Pending>,
    /// Whether the input takes a gradient (not the first layer's).
    wants_dx: bool,
    /// Every part's A stacked (r_total, in), detached: the input gradient's rank-r terms.
    a_all: Tensor,
    rows: usize,
}

/// Each part's forward output until the part takes it; its output gradient (and scaled
/// down-projection gradient `s · g B`) until the last one arrives.
struct Pending {
    outputs: Vec<Option<CpuStorage>>,
    grads: Vec<Option<Tensor>>,
    down_grads: Vec<Option<Tensor>>,
}

/// Part `index` of a group's output.
struct Part {
    group: Arc<Group>,
    index: usize,
}

impl Part {
    fn output(&self) -> Result<(CpuStorage, Shape)> {
        let seg = &self.group.op.segments[self.index];
        let mut pending = self.group.pending.lock().expect("not poisoned");
        match pending.outputs[self.index].take() {
            Some(y) => Ok((y, Shape::from((self.group.rows, seg.cols.len())))),
            None => candle_core::bail!("LoRA linear: a part's output was asked for twice"),
        }
    }

    /// The input gradient of the whole group once every part's output gradient is in (from the
    /// part whose gradient arrives last), None before.
    fn input_grad(&self, g: Tensor, down_g: Option<Tensor>) -> Result<Option<Tensor>> {
        if !self.group.wants_dx {
            return Ok(None);
        }
        let mut pending = self.group.pending.lock().expect("not poisoned");
        pending.grads[self.index] = Some(g);
        pending.down_grads[self.index] = down_g;
        if pending.grads.iter().any(|g| g.is_none()) {
            return Ok(None);
        }
        let grads: Vec<Tensor> = pending.grads.iter_mut().flat_map(|g| g.take()).collect();
        let downs: Vec<Tensor> = pending
            .down_grads
            .iter_mut()
            .flat_map(|g| g.take())
            .collect();
        drop(pending);
        let join = |mut ts: Vec<Tensor>| match ts.len() {
            1 => Ok(ts.pop().expect("one")),
            _ => Tensor::cat(&ts, 1),
        };
        let g = join(grads)?;
        // No adapter: the factors' places are never read.
        let down_g = match downs.is_empty() {
            true => g.clone(),
            false => join(downs)?,
        };
        let op = LoraGroup {
            base: self.group.op.base.clone(),
            segments: self.group.op.segments.clone(),
            input_grad: true,
        };
        g.apply_op3_no_bwd(&down_g, &self.group.a_all, &op)
            .map(Some)
    }
}

impl CustomOp1 for Part {
    fn name(&self) -> &'static str {
        "lora-linears-part"
    }

    fn cpu_fwd(&self, _x: &CpuStorage, _xl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output()
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        self.input_grad(g.contiguous()?, None)
    }
}

impl CustomOp3 for Part {
    fn name(&self) -> &'static str {
        "lora-linears-part"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _xl: &Layout,
        _a: &CpuStorage,
        _al: &Layout,
        _b: &CpuStorage,
        _bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.output()
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let lora = self.group.op.segments[self.index]
            .lora
            .as_ref()
            .expect("a part with factors has an adapter");
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let x = match &lora.mask {
            Some(m) => x.apply_op1_no_bwd(m)?,
            None => x,
        };
        // As the composed form: down_g = s · g B; dA = down_gᵀ drop(x); down = s · drop(x) Aᵀ;
        // dB = gᵀ down.
        let down_g = (g.matmul(&b)? * lora.scaling)?;
        let da = down_g.t()?.matmul(&x)?;
        let down = (x.matmul(&a.t()?)? * lora.scaling)?;
        let db = g.t()?.matmul(&down)?;
        let dx = self.input_grad(g, Some(down_g))?;
        Ok((dx, Some(da), Some(db)))
    }
}

/// One part of the stacked output: its columns and its adapter's place in the stacked factors.
struct Segment {
    cols: Range<usize>,
    lora: Option<SegmentLora>,
}

struct SegmentLora {
    /// Its rows of the stacked A (r_p rows each), its ranks of the stacked down-projection.
    ranks: Range<usize>,
    /// Its rows of the stacked B.
    b_rows: Range<usize>,
    scaling: f64,
    mask: Option<Dropout>,
}

/// The stacked frozen product plus every part's rank-r update: the forward of `(x, A, B)`, or
/// with `input_grad` the input gradient of `(g, down_g, A)` (`g W + Σ drop_p(down_g_p A_p)`, the
/// scaling already in `down_g`). Computes values only; [`Part`]s are the graph's nodes.
struct LoraGroup {
    base: FrozenLinear,
    segments: Arc<[Segment]>,
    input_grad: bool,
}

impl LoraGroup {
    fn loras(&self) -> impl Iterator<Item = (&Segment, &SegmentLora)> {
        self.segments
            .iter()
            .filter_map(|s| s.lora.as_ref().map(|l| (s, l)))
    }

    fn masked(&self) -> bool {
        self.loras().any(|(_, l)| l.mask.is_some())
    }

    /// Adds the rank-r updates of the first argument `x` to its frozen product `y`.
    fn forward_add<T: Real>(
        &self,
        mut y: Vec<T>,
        (xs, xl): (&CpuStorage, &Layout),
        (a_s, al): (&CpuStorage, &Layout),
        (bs, bl): (&CpuStorage, &Layout),
    ) -> Result<Vec<T>> {
        if self.loras().next().is_none() {
            return Ok(y);
        }
        let ((rank, in_features), (b_out, b_rank)) = (al.shape().dims2()?, bl.shape().dims2()?);
        let (n, k) = xl.shape().dims2()?;
        let width = self.segments.last().map_or(0, |s| s.cols.end);
        let r = self.loras().next().map_or(0, |(_, l)| l.ranks.len());
        if k != in_features || b_rank != r || y.len() != n * width || b_out == 0 {
            candle_core::bail!(
                "LoRA linear: factors A {:?} and B {:?} do not fit an input of {k} features",
                al.shape(),
                bl.shape()
            );
        }
        let a_t = al.transpose(0, 1)?;
        // down = drop(x) Aᵀ (n, rank): one thin GEMM, or one per part when inputs are dropped.
        let down: Vec<T> = if !self.masked() {
            xs.matmul(a_s, (1, n, rank, k), xl, &a_t)?
                .as_slice::<T>()?
                .to_vec()
        } else {
            let x = slice::<T>(xs, xl)?;
            let mut down = vec![T::zero(); n * rank];
            for (_, l) in self.loras() {
                let a_p = al
                    .narrow(0, l.ranks.start, l.ranks.len())?
                    .transpose(0, 1)?;
                let r_p = l.ranks.len();
                let part = match l.mask {
                    Some(m) => {
                        let dropped = T::to_cpu_storage_owned(m.apply(x));
                        dropped.matmul(a_s, (1, n, r_p, k), &Layout::contiguous((n, k)), &a_p)?
                    }
                    None => xs.matmul(a_s, (1, n, r_p, k), xl, &a_p)?,
                };
                for (row, p) in down
                    .chunks_exact_mut(rank)
                    .zip(part.as_slice::<T>()?.chunks_exact(r_p))
                {
                    row[l.ranks.clone()].copy_from_slice(p);
                }
            }
            down
        };
        // Each part's Bᵀ (r, out_p), read row by row.
        let b = slice::<T>(bs, bl)?;
        let bts: Vec<Vec<T>> = self
            .loras()
            .map(|(s, l)| {
                let out = s.cols.len();
                let mut bt = vec![T::zero(); r * out];
                for (o, row) in b[l.b_rows.start * r..l.b_rows.end * r]
                    .chunks_exact(r)
                    .enumerate()
                {
                    for (j, &v) in row.iter().enumerate() {
                        bt[j * out + o] = v;
                    }
                }
                bt
            })
            .collect();
        let updates: Vec<Update<T>> = self
            .loras()
            .zip(&bts)
            .map(|((s, l), bt)| Update {
                cols: s.cols.clone(),
                ranks: l.ranks.clone(),
                scale: T::from_f64(l.scaling),
                r: bt,
            })
            .collect();
        add_low_rank(&mut y, width, &down, rank, &updates);
        Ok(y)
    }

    /// Adds `Σ drop_p(down_g_p A_p)` to the frozen input gradient `dx`.
    fn input_grad_add<T: Real>(
        &self,
        mut dx: Vec<T>,
        (ds, dl): (&CpuStorage, &Layout),
        (a_s, al): (&CpuStorage, &Layout),
    ) -> Result<Vec<T>> {
        if self.loras().next().is_none() {
            return Ok(dx);
        }
        let (rank, in_features) = al.shape().dims2()?;
        let (down_g, a) = (slice::<T>(ds, dl)?, slice::<T>(a_s, al)?);
        if !self.masked() {
            let all = Update {
                cols: 0..in_features,
                ranks: 0..rank,
                scale: T::one(),
                r: a,
            };
            add_low_rank(&mut dx, in_features, down_g, rank, &[all]);
            return Ok(dx);
        }
        for (_, l) in self.loras() {
            let part = Update {
                cols: 0..in_features,
                ranks: l.ranks.clone(),
                scale: T::one(),
                r: &a[l.ranks.start * in_features..l.ranks.end * in_features],
            };
            match l.mask {
                None => add_low_rank(&mut dx, in_features, down_g, rank, &[part]),
                Some(m) => {
                    let mut lora = vec![T::zero(); dx.len()];
                    add_low_rank(&mut lora, in_features, down_g, rank, &[part]);
                    for (d, v) in dx.iter_mut().zip(m.apply(&lora)) {
                        *d += v;
                    }
                }
            }
        }
        Ok(dx)
    }
}

impl CustomOp3 for LoraGroup {
    fn name(&self) -> &'static str {
        "lora-linears"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, shape) = self.base.cpu_product(s1, l1, self.input_grad)?;
        let y = match (y, self.input_grad) {
            (CpuStorage::F32(y), false) => {
                CpuStorage::F32(self.forward_add(y, (s1, l1), (s2, l2), (s3, l3))?)
            }
            (CpuStorage::F64(y), false) => {
                CpuStorage::F64(self.forward_add(y, (s1, l1), (s2, l2), (s3, l3))?)
            }
            (CpuStorage::F32(y), true) => {
                CpuStorage::F32(self.input_grad_add(y, (s2, l2), (s3, l3))?)
            }
            (CpuStorage::F64(y), true) => {
                CpuStorage::F64(self.input_grad_add(y, (s2, l2), (s3, l3))?)
            }
            (other, _) => candle_core::bail!("LoRA linear: unsupported dtype {:?}", other.dtype()),
        };
        Ok((y, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::nf4::Nf4Tensor;
    use candle_core::{Device, Var};

    fn values(n: usize, salt: usize, scale: f64) -> Vec<f64> {
        (0..n)
            .map(|i| (((i * 37 + salt * 11) % 101) as f64 / 50.0 - 1.0) * scale)
            .collect()
    }

    /// The parts' outputs side by side, then the input gradient and every factor's gradient
    /// of `sum(y · weights)`, fused or composed as the LoRA adapter composes each linear (its
    /// own base product, then `(dropout(x) Aᵀ · s) Bᵀ` added). `adapted[p]`: part p has an
    /// adapter.
    fn run(
        parts: &[FrozenLinear],
        adapted: &[bool],
        dropout: f64,
        fused: bool,
        dtype: DType,
    ) -> Vec<Vec<f64>> {
        let inp = parts[0].dims().1;
        let (n, rank, s) = (9, 4, 2.0);
        let dev = Device::Cpu;
        let var = |v: Vec<f64>, shape: (usize, usize)| {
            let t = Tensor::from_vec(v, shape, &dev).unwrap();
            Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
        };
        let x = var(values(n * inp, 1, 1.0), (n, inp));
        let factors: Vec<Option<(Var, Var)>> = parts
            .iter()
            .zip(adapted)
            .enumerate()
            .map(|(p, (part, &on))| {
                let out = part.dims().0;
                on.then(|| {
                    let a = var(values(rank * inp, 2 + p, 0.2), (rank, inp));
                    (a, var(values(out * rank, 3 + p, 0.2), (out, rank)))
                })
            })
            .collect();
        let outs: Vec<usize> = parts.iter().map(|p| p.dims().0).collect();
        let width: usize = outs.iter().sum();
        let weights = Tensor::from_vec(values(n * width, 4, 1.0), (n, width), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let ctx = Ctx::train(5);
        let xt = x.as_tensor();
        let y = if fused {
            let loras: Vec<Option<PlainLora>> = factors
                .iter()
                .map(|f| {
                    f.as_ref().map(|(a, b)| PlainLora {
                        a: a.as_tensor().clone(),
                        b: b.as_tensor().clone(),
                        scaling: s,
                        dropout,
                    })
                })
                .collect();
            assert!(supported(xt, &loras));
            let base = FrozenLinear::stack(parts.to_vec()).unwrap();
            Tensor::cat(&forward(&base, &outs, &loras, xt, &ctx).unwrap(), 1).unwrap()
        } else {
            let ys: Vec<Tensor> = parts
                .iter()
                .zip(&factors)
                .map(|(part, f)| {
                    let y = part.forward(xt).unwrap();
                    match f {
                        None => y,
                        Some((a, b)) => {
                            let xd = ctx.dropout(xt, dropout).unwrap();
                            let down =
                                (xd.matmul(&a.as_tensor().t().unwrap()).unwrap() * s).unwrap();
                            (y + down.matmul(&b.as_tensor().t().unwrap()).unwrap()).unwrap()
                        }
                    }
                })
                .collect();
            Tensor::cat(&ys, 1).unwrap()
        };
        let grads = (&y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let flat = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let mut got = vec![flat(&y), flat(grads.get(xt).unwrap())];
        for (a, b) in factors.iter().flatten() {
            got.push(flat(grads.get(a.as_tensor()).unwrap()));
            got.push(flat(grads.get(b.as_tensor()).unwrap()));
        }
        got
    }

    /// The fused op equals the composed ops: exactly up to rounding in f64 (1e-12 of the
    /// largest value), within f32 rounding of sums of a few hundred terms in f32 (1e-5); with
    /// dropout the same masks (a wrong mask moves values by whole terms).
    fn check(parts_of: impl Fn(DType) -> Vec<FrozenLinear>, adapted: &[bool]) {
        for dropout in [0.0, 0.3] {
            for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
                let parts = parts_of(dtype);
                let want = run(&parts, adapted, dropout, false, dtype);
                let got = run(&parts, adapted, dropout, true, dtype);
                assert_eq!(want.len(), got.len());
                for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                    assert_eq!(w.len(), g.len(), "tensor {i}");
                    let scale = w.iter().fold(0f64, |m, v| m.max(v.abs()));
                    for (a, b) in w.iter().zip(g) {
                        assert!(
                            (a - b).abs() <= tol * scale,
                            "tensor {i} {dtype:?} dropout {dropout}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    fn dense(out: usize, inp: usize, salt: usize, dtype: DType) -> FrozenLinear {
        let w = Tensor::from_vec(values(out * inp, salt, 0.3), (out, inp), &Device::Cpu).unwrap();
        FrozenLinear::new(w.to_dtype(dtype).unwrap())
    }

    fn nf4(out: usize, inp: usize, salt: usize) -> FrozenLinear {
        let w: Vec<f32> = values(out * inp, salt, 0.3)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let q = Nf4Tensor::quantize("w", &w, &[out, inp], true).unwrap();
        FrozenLinear::nf4(q, &Device::Cpu).unwrap()
    }

    #[test]
    fn equals_the_composed_lora_linear_dense() {
        check(|dtype| vec![dense(24, 40, 5, dtype)], &[true]);
    }

    #[test]
    fn equals_the_composed_lora_linear_nf4() {
        // The 4-bit weight is dequantized to the input's dtype.
        check(|_| vec![nf4(16, 128, 6)], &[true]);
    }

    /// q, k and v of one input (the middle one without an adapter): stacked dense weights
    /// (one concatenated weight) and stacked 4-bit ones (kept apart).
    #[test]
    fn stacked_projections_equal_the_composed_linears() {
        let dense3 = |dtype| {
            vec![
                dense(24, 40, 5, dtype),
                dense(8, 40, 6, dtype),
                dense(8, 40, 7, dtype),
            ]
        };
        check(dense3, &[true, true, true]);
        check(dense3, &[true, false, true]);
        let nf4s = |_| vec![nf4(32, 128, 6), nf4(16, 128, 7), nf4(16, 128, 8)];
        check(nf4s, &[true, true, true]);
        check(nf4s, &[false, true, true]);
        check(dense3, &[false, false, false]);
    }
}
