//! The LoRA linear as one op on the CPU: `y = x Wᵀ + s · (x Aᵀ) Bᵀ` for a frozen `W`, whose
//! backward gives dx, dA and dB directly.
//!
//! Composed, the linear is nine graph nodes (the base product, two transposes, two thin
//! GEMMs, a scaling, an addition) and candle's backward accumulates every node's gradient into
//! a zero-filled tensor: (n, out) and (n, in) buffers filled with zeros and added to, per
//! linear, per step. Here the rank-r update is added into the base product's own output
//! (forward) and into the input gradient (backward), and the factors' gradients are four thin
//! GEMMs.

use super::frozen::FrozenLinear;
use crate::kernels::low_rank::add_low_rank;
use crate::kernels::ops::slice;
use crate::kernels::vecmath::Real;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Whether [`forward`] computes `x` with the factor `a`: f32 or f64 on the CPU, one dtype.
pub fn supported(x: &Tensor, a: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && a.dtype() == x.dtype()
}

/// `x (n, in) → (n, out)`: the frozen `base` plus `scaling · (x Aᵀ) Bᵀ` for `a (r, in)`,
/// `b (out, r)`.
pub fn forward(
    base: &FrozenLinear,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
) -> Result<Tensor> {
    let op = BasePlusLowRank {
        base: base.clone(),
        scaling,
        input_grad: false,
    };
    x.contiguous()?.apply_op3(a, b, op)
}

/// The frozen product of the first argument plus the rank-r update through `a`, `b`: the
/// forward (`x Wᵀ + s (x Aᵀ) Bᵀ`) or, with `input_grad`, the input gradient
/// (`g W + s (g B) A`).
struct BasePlusLowRank {
    base: FrozenLinear,
    scaling: f64,
    input_grad: bool,
}

impl BasePlusLowRank {
    /// Adds the rank-r update of the first argument `x` to its frozen product `y`.
    fn add<T: Real>(
        &self,
        mut y: Vec<T>,
        (xs, xl): (&CpuStorage, &Layout),
        (a_s, al): (&CpuStorage, &Layout),
        (bs, bl): (&CpuStorage, &Layout),
    ) -> Result<Vec<T>> {
        let ((rank, in_features), (out, b_rank)) = (al.shape().dims2()?, bl.shape().dims2()?);
        let (n, k) = xl.shape().dims2()?;
        let want = if self.input_grad { out } else { in_features };
        if b_rank != rank || k != want {
            candle_core::bail!(
                "LoRA linear: factors A {:?} and B {:?} do not fit an input of {k} features",
                al.shape(),
                bl.shape()
            );
        }
        // down = x Aᵀ (forward) or g B (input gradient): a thin GEMM.
        let down = match self.input_grad {
            false => xs.matmul(a_s, (1, n, rank, k), xl, &al.transpose(0, 1)?)?,
            true => xs.matmul(bs, (1, n, rank, k), xl, bl)?,
        };
        let down = down.as_slice::<T>()?;
        let (a, b) = (slice::<T>(a_s, al)?, slice::<T>(bs, bl)?);
        let s = T::from_f64(self.scaling);
        if self.input_grad {
            add_low_rank(&mut y, down, a, rank, s);
        } else {
            // Bᵀ (r, out), read row by row.
            let mut bt = vec![T::zero(); rank * out];
            for (o, row) in b.chunks_exact(rank).enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    bt[j * out + o] = v;
                }
            }
            add_low_rank(&mut y, down, &bt, rank, s);
        }
        Ok(y)
    }
}

impl CustomOp3 for BasePlusLowRank {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, shape) = self.base.cpu_product(xs, xl, self.input_grad)?;
        let args = ((xs, xl), (a_s, al), (bs, bl));
        let y = match y {
            CpuStorage::F32(y) => CpuStorage::F32(self.add(y, args.0, args.1, args.2)?),
            CpuStorage::F64(y) => CpuStorage::F64(self.add(y, args.0, args.1, args.2)?),
            other => candle_core::bail!("LoRA linear: unsupported dtype {:?}", other.dtype()),
        };
        Ok((y, shape))
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
        let (a, b) = (a.detach(), b.detach());
        // An input that takes no gradient (the first layer's) gets none computed.
        let dx = if x.track_op() {
            let op = BasePlusLowRank {
                base: self.base.clone(),
                scaling: self.scaling,
                input_grad: true,
            };
            Some(g.apply_op3_no_bwd(&a, &b, &op)?)
        } else {
            None
        };
        let x = x.detach();
        // As the composed form: down = s · x Aᵀ; dA = (s · g B)ᵀ x; dB = gᵀ down.
        let down_grad = (g.matmul(&b)? * self.scaling)?;
        let da = down_grad.t()?.matmul(&x)?;
        let down = (x.matmul(&a.t()?)? * self.scaling)?;
        let db = g.t()?.matmul(&down)?;
        Ok((dx, Some(da), Some(db)))
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

    /// y, dx, dA and dB of `sum(y · weights)`, fused or composed as the LoRA adapter composes
    /// the linear (base product, then `(x Aᵀ · s) Bᵀ` added).
    fn run(base: &FrozenLinear, fused: bool, dtype: DType) -> [Vec<f64>; 4] {
        let (out, inp) = base.dims();
        let (n, rank, s) = (9, 4, 2.0);
        let dev = Device::Cpu;
        let var = |v: Vec<f64>, shape: (usize, usize)| {
            Var::from_tensor(
                &Tensor::from_vec(v, shape, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap()
        };
        let x = var(values(n * inp, 1, 1.0), (n, inp));
        let a = var(values(rank * inp, 2, 0.2), (rank, inp));
        let b = var(values(out * rank, 3, 0.2), (out, rank));
        let weights = Tensor::from_vec(values(n * out, 4, 1.0), (n, out), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
        let y = if fused {
            assert!(supported(xt, at));
            forward(base, xt, at, bt, s).unwrap()
        } else {
            let down = (xt.matmul(&at.t().unwrap()).unwrap() * s).unwrap();
            (base.forward(xt).unwrap() + down.matmul(&bt.t().unwrap()).unwrap()).unwrap()
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
        [
            flat(&y),
            flat(grads.get(xt).unwrap()),
            flat(grads.get(at).unwrap()),
            flat(grads.get(bt).unwrap()),
        ]
    }

    /// The fused op equals the composed ops: exactly up to rounding in f64 (1e-12 of the
    /// largest value), within f32 rounding of sums of a few hundred terms in f32 (1e-5).
    fn check(base_of: impl Fn(DType) -> FrozenLinear) {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let base = base_of(dtype);
            let (want, got) = (run(&base, false, dtype), run(&base, true, dtype));
            for (what, (w, g)) in ["y", "dx", "dA", "dB"].iter().zip(want.iter().zip(&got)) {
                assert_eq!(w.len(), g.len(), "{what}");
                let scale = w.iter().fold(0f64, |m, v| m.max(v.abs()));
                for (a, b) in w.iter().zip(g) {
                    assert!((a - b).abs() <= tol * scale, "{what} {dtype:?}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn equals_the_composed_lora_linear_dense() {
        let (out, inp) = (24, 40);
        let w = Tensor::from_vec(values(out * inp, 5, 0.3), (out, inp), &Device::Cpu).unwrap();
        check(|dtype| FrozenLinear::new(w.to_dtype(dtype).unwrap()));
    }

    #[test]
    fn equals_the_composed_lora_linear_nf4() {
        let (out, inp) = (16, 128);
        let w: Vec<f32> = values(out * inp, 6, 0.3)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let q = Nf4Tensor::quantize("w", &w, &[out, inp], true).unwrap();
        // The 4-bit weight is dequantized to the input's dtype.
        check(|_| FrozenLinear::nf4(q.clone(), &Device::Cpu).unwrap());
    }
}
