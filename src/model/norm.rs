//! RMSNorm as one op with a real backward: `y = x · w / √(mean(x²) + ε)` over the last axis.
//!
//! The composed form (square, mean, add, sqrt, divide, multiply) makes six passes over the
//! activations forward and a dozen backward, each with its own allocation; this makes one each
//! way, row-parallel. The norm weight is frozen: backward gives the input gradient only.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// The contiguous data of a CPU tensor argument.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<T>()?[start..end]),
        None => candle_core::bail!("rms-norm: input must be contiguous"),
    }
}

struct RmsNorm {
    eps: f64,
}

/// 1/√(mean(x²) + ε) of one row, accumulated in f64.
fn inv_rms<T: WithDType>(row: &[T], eps: f64) -> f64 {
    let ss: f64 = row.iter().map(|v| v.to_f64() * v.to_f64()).sum();
    1.0 / (ss / row.len() as f64 + eps).sqrt()
}

fn forward<T: WithDType>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(yr, xr)| {
            let r = inv_rms(xr, eps);
            for ((yo, xi), wi) in yr.iter_mut().zip(xr).zip(w) {
                *yo = T::from_f64(xi.to_f64() * r * wi.to_f64());
            }
        });
    y
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = match xs.dtype() {
            DType::F32 => CpuStorage::F32(forward(slice::<f32>(xs, xl)?, slice(ws, wl)?, self.eps)),
            DType::F64 => CpuStorage::F64(forward(slice::<f64>(xs, xl)?, slice(ws, wl)?, self.eps)),
            DType::BF16 => CpuStorage::BF16(forward(
                slice::<half::bf16>(xs, xl)?,
                slice(ws, wl)?,
                self.eps,
            )),
            DType::F16 => CpuStorage::F16(forward(
                slice::<half::f16>(xs, xl)?,
                slice(ws, wl)?,
                self.eps,
            )),
            other => candle_core::bail!("rms-norm: unsupported dtype {other:?}"),
        };
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(w, &dy.contiguous()?, &RmsNormGrad { eps: self.eps })?;
        Ok((Some(dx), None))
    }
}

/// ∂x of RMSNorm: `r·w·dy − x · r³/d · Σ(w·dy·x)` per row.
struct RmsNormGrad {
    eps: f64,
}

fn backward<T: WithDType>(x: &[T], w: &[T], dy: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(dy.par_chunks(d))
        .for_each(|((dxr, xr), dyr)| {
            let r = inv_rms(xr, eps);
            let dot: f64 = xr
                .iter()
                .zip(dyr)
                .zip(w)
                .map(|((a, g), wi)| a.to_f64() * g.to_f64() * wi.to_f64())
                .sum();
            let c = r * r * r * dot / d as f64;
            for (((o, a), g), wi) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
                *o = T::from_f64(r * wi.to_f64() * g.to_f64() - c * a.to_f64());
            }
        });
    dx
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dx = match xs.dtype() {
            DType::F32 => CpuStorage::F32(backward(
                slice::<f32>(xs, xl)?,
                slice(ws, wl)?,
                slice(gs, gl)?,
                self.eps,
            )),
            DType::F64 => CpuStorage::F64(backward(
                slice::<f64>(xs, xl)?,
                slice(ws, wl)?,
                slice(gs, gl)?,
                self.eps,
            )),
            DType::BF16 => CpuStorage::BF16(backward(
                slice::<half::bf16>(xs, xl)?,
                slice(ws, wl)?,
                slice(gs, gl)?,
                self.eps,
            )),
            DType::F16 => CpuStorage::F16(backward(
                slice::<half::f16>(xs, xl)?,
                slice(ws, wl)?,
                slice(gs, gl)?,
                self.eps,
            )),
            other => candle_core::bail!("rms-norm: unsupported dtype {other:?}"),
        };
        Ok((dx, xl.shape().clone()))
    }
}

/// RMSNorm of `x` (…, d) with the frozen weight `w` (d).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(w, RmsNorm { eps })
}
