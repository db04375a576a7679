//! Decoder ops with real backwards, one row-parallel pass each way: RMSNorm and the causal
//! softmax of attention. Their composed forms make half a dozen passes forward and a dozen
//! backward, each with its own allocation.

use super::vecmath::{self, sigmoid, with_avx2, Computed, Real};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// Runs `$body` with `$t` bound to the element type of a float `dtype`, wrapping the result in
/// the matching `CpuStorage` variant.
macro_rules! per_float_dtype {
    ($dtype:expr, $op:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                CpuStorage::F32($body)
            }
            DType::F64 => {
                type $t = f64;
                CpuStorage::F64($body)
            }
            DType::BF16 => {
                type $t = half::bf16;
                CpuStorage::BF16($body)
            }
            DType::F16 => {
                type $t = half::f16;
                CpuStorage::F16($body)
            }
            other => candle_core::bail!("{}: unsupported dtype {other:?}", $op),
        }
    };
}
pub(crate) use per_float_dtype;

/// The contiguous data of a CPU tensor argument.
pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<T>()?[start..end]),
        None => candle_core::bail!("custom op: input must be contiguous"),
    }
}

/// `y = x · w / √(mean(x²) + ε)` over the last axis; the norm weight is frozen, so backward
/// gives the input gradient only.
struct RmsNorm {
    eps: f64,
}

/// 1/√(mean(x²) + ε) of one row, accumulated in f64.
fn inv_rms<T: WithDType>(row: &[T], eps: f64) -> f64 {
    let ss = sum_f64(row.len(), |i| row[i].to_f64() * row[i].to_f64());
    1.0 / (ss / row.len() as f64 + eps).sqrt()
}

/// `Σ_{i<n} term(i)` in f64, in four running sums: one sum waits on each add's latency (a
/// 576-value row took 0.8 µs, most of a decoding step's norm).
#[inline(always)]
fn sum_f64(n: usize, term: impl Fn(usize) -> f64) -> f64 {
    let mut acc = [0f64; 4];
    let body = n / 4 * 4;
    for i in (0..body).step_by(4) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += term(i + l);
        }
    }
    let tail: f64 = (body..n).map(&term).sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
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
        let y = per_float_dtype!(xs.dtype(), "rms-norm", T => forward(slice::<T>(xs, xl)?, slice(ws, wl)?, self.eps));
        Ok((y, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            crate::kernels::cuda::rms_norm(xs, xl, ws, wl, self.eps)?,
            xl.shape().clone(),
        ))
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
            let dot = sum_f64(d, |i| xr[i].to_f64() * dyr[i].to_f64() * w[i].to_f64());
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
        let dx = per_float_dtype!(xs.dtype(), "rms-norm", T => backward(slice::<T>(xs, xl)?, slice(ws, wl)?, slice(gs, gl)?, self.eps));
        Ok((dx, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dx = crate::kernels::cuda::rms_norm_grad((xs, xl), (ws, wl), (gs, gl), self.eps)?;
        Ok((dx, xl.shape().clone()))
    }
}

/// [`rms_norm`]'s values for rows `x` (…, d) on the CPU, without a tensor around them.
pub(crate) fn rms_norm_values(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    forward(x, w, eps)
}

/// RMSNorm of `x` (…, d) with the frozen weight `w` (d).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(w, RmsNorm { eps })
}

/// Softmax over the last axis of attention scores (…, t, t), scaled by `scale` first, with a
/// causal mask: row i keeps columns 0..=i, the rest is 0 (as adding −∞ before the softmax).
struct CausalSoftmax {
    scale: f64,
}

fn causal_softmax<T: Computed>(x: &[T], t: usize, scale: f64) -> Vec<T> {
    let scale = <T::In>::from_f64(scale);
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(t)
        .zip(x.par_chunks(t))
        .enumerate()
        .for_each_init(Vec::new, |row, (r, (yr, xr))| {
            let keep = r % t + 1;
            row.clear();
            row.extend(xr[..keep].iter().map(|v| v.up()));
            softmax_in_place(row, scale);
            for (o, &p) in yr.iter_mut().zip(row.iter()) {
                *o = T::down(p);
            }
        });
    y
}

with_avx2! {
    fn softmax_in_place<R: Real>(x: &mut [R], scale: R) -> () = vecmath::softmax_in_place
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = *xl.dims().last().unwrap_or(&1);
        let y = per_float_dtype!(xs.dtype(), "causal-softmax", T => causal_softmax(slice::<T>(xs, xl)?, t, self.scale));
        Ok((y, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::kernels::cuda::causal_softmax(xs, xl, self.scale)?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let grad = SoftmaxGrad { scale: self.scale };
        Ok(Some(y.apply_op2_no_bwd(&dy.contiguous()?, &grad)?))
    }
}

/// ∂x of a scaled softmax from its output: `scale · y · (dy − Σ dy·y)` per row (masked entries
/// have y = 0).
struct SoftmaxGrad {
    scale: f64,
}

fn softmax_grad<T: WithDType>(y: &[T], dy: &[T], t: usize, scale: f64) -> Vec<T> {
    let mut dx = vec![T::zero(); y.len()];
    dx.par_chunks_mut(t)
        .zip(y.par_chunks(t))
        .zip(dy.par_chunks(t))
        .for_each(|((o, yr), gr)| {
            let dot: f64 = yr
                .iter()
                .zip(gr)
                .map(|(a, g)| a.to_f64() * g.to_f64())
                .sum();
            for ((o, a), g) in o.iter_mut().zip(yr).zip(gr) {
                *o = T::from_f64(scale * a.to_f64() * (g.to_f64() - dot));
            }
        });
    dx
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let t = *yl.dims().last().unwrap_or(&1);
        let dx = per_float_dtype!(ys.dtype(), "softmax-grad", T => softmax_grad(slice::<T>(ys, yl)?, slice(gs, gl)?, t, self.scale));
        Ok((dx, yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dx = crate::kernels::cuda::softmax_grad(ys, yl, gs, gl, self.scale)?;
        Ok((dx, yl.shape().clone()))
    }
}

/// Causal softmax of attention scores (…, t, t) times `scale` (1/√head_dim): the scaling is
/// folded into the softmax's passes instead of a pass of its own, each way.
pub fn causal_attention_probs(scores: &Tensor, scale: f64) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax { scale })
}

/// `silu(g) · u`, the gated MLP's activation, with σ computed once per element.
struct SiluMul;

fn silu_mul<T: Computed>(g: &[T], u: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); g.len()];
    y.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(
            g.par_chunks(ELEMENTWISE_CHUNK)
                .zip(u.par_chunks(ELEMENTWISE_CHUNK)),
        )
        .for_each(|(y, (g, u))| silu_mul_chunk(y, g, u));
    y
}

with_avx2! {
    fn silu_mul_chunk<T: Computed>(y: &mut [T], g: &[T], u: &[T]) -> () = silu_mul_chunk_portable
}

#[inline(always)]
fn silu_mul_chunk_portable<T: Computed>(y: &mut [T], g: &[T], u: &[T]) {
    for ((o, gi), ui) in y.iter_mut().zip(g).zip(u) {
        let gv = gi.up();
        *o = T::down(gv * sigmoid(gv) * ui.up());
    }
}

/// Elements per parallel task of the elementwise ops.
pub(crate) const ELEMENTWISE_CHUNK: usize = 1 << 14;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = per_float_dtype!(gs.dtype(), "silu-mul", T => silu_mul(slice::<T>(gs, gl)?, slice(us, ul)?));
        Ok((y, gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dg = g.apply_op3_no_bwd(u, &dy, &SiluMulGrad { of_gate: true })?;
        let du = g.apply_op3_no_bwd(u, &dy, &SiluMulGrad { of_gate: false })?;
        Ok((Some(dg), Some(du)))
    }
}

/// ∂g = dy · u · σ(g) · (1 + g · (1 − σ(g))) or ∂u = dy · silu(g).
struct SiluMulGrad {
    of_gate: bool,
}

fn silu_mul_grad<T: Computed>(g: &[T], u: &[T], dy: &[T], of_gate: bool) -> Vec<T> {
    let mut out = vec![T::zero(); g.len()];
    out.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(g.par_chunks(ELEMENTWISE_CHUNK))
        .zip(
            u.par_chunks(ELEMENTWISE_CHUNK)
                .zip(dy.par_chunks(ELEMENTWISE_CHUNK)),
        )
        .for_each(|((o, g), (u, dy))| silu_mul_grad_chunk(o, g, u, dy, of_gate));
    out
}

with_avx2! {
    fn silu_mul_grad_chunk<T: Computed>(o: &mut [T], g: &[T], u: &[T], dy: &[T], of_gate: bool) -> () = silu_mul_grad_chunk_portable
}

#[inline(always)]
fn silu_mul_grad_chunk_portable<T: Computed>(
    o: &mut [T],
    g: &[T],
    u: &[T],
    dy: &[T],
    of_gate: bool,
) {
    for (((o, gi), ui), di) in o.iter_mut().zip(g).zip(u).zip(dy) {
        *o = T::down(silu_mul_grad_of(gi.up(), ui.up(), di.up(), of_gate));
    }
}

#[inline(always)]
fn silu_mul_grad_of<R: Real>(g: R, u: R, dy: R, of_gate: bool) -> R {
    let s = sigmoid(g);
    if of_gate {
        dy * u * s * (R::one() + g * (R::one() - s))
    } else {
        dy * g * s
    }
}

impl CustomOp3 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "silu-mul-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = per_float_dtype!(gs.dtype(), "silu-mul-grad", T => silu_mul_grad(slice::<T>(gs, gl)?, slice(us, ul)?, slice(ds, dl)?, self.of_gate));
        Ok((out, gl.shape().clone()))
    }
}

/// [`silu_mul_op`]'s values on the CPU, without tensors around them.
pub(crate) fn silu_mul_values(gate: &[f32], up: &[f32]) -> Vec<f32> {
    silu_mul(gate, up)
}

/// `silu(gate) · up`: one parallel pass each way on the CPU, the composed ops elsewhere.
pub fn silu_mul_op(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !gate.device().is_cpu() {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The largest |value| of an f64 tensor.
    fn largest(t: &Tensor) -> f64 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// RMSNorm and its input gradient equal the composed ops (f64; rows longer and shorter
    /// than the four running sums, and not a multiple of four).
    #[test]
    fn rms_norm_equals_the_composed_form() {
        let dev = Device::Cpu;
        for d in [3, 6, 576] {
            let x = Var::from_tensor(&Tensor::randn(0f64, 2.0, (5, d), &dev).unwrap()).unwrap();
            let w = Tensor::randn(1f64, 0.1, d, &dev).unwrap();
            let up = Tensor::randn(0f64, 1.0, (5, d), &dev).unwrap();
            let eps = 1e-5;
            let fused = rms_norm(x.as_tensor(), &w, eps).unwrap();
            let ms = x.as_tensor().sqr().unwrap().mean_keepdim(1).unwrap();
            let composed = x
                .as_tensor()
                .broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(&w)
                .unwrap();
            assert!(largest(&(&fused - &composed).unwrap()) < 1e-12, "d {d}");
            let gf = (fused * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gc = (composed * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (gf, gc) = (
                gf.get(x.as_tensor()).unwrap(),
                gc.get(x.as_tensor()).unwrap(),
            );
            assert!(largest(&(gf - gc).unwrap()) < 1e-12, "d {d}: gradient");
        }
    }

    /// The fused SwiGLU activation equals `silu(g) · u` composed, values and gradients (f64).
    #[test]
    fn silu_mul_equals_the_composed_form() {
        let dev = Device::Cpu;
        let g = Var::from_tensor(&Tensor::randn(0f64, 2.0, (3, 40_000), &dev).unwrap()).unwrap();
        let u = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 40_000), &dev).unwrap()).unwrap();
        let up = Tensor::randn(0f64, 1.0, (3, 40_000), &dev).unwrap();
        let fused = silu_mul_op(g.as_tensor(), u.as_tensor()).unwrap();
        let composed = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
        assert!(largest(&(&fused - &composed).unwrap()) < 1e-12);
        let grads = |y: &Tensor| (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let (gf, gc) = (grads(&fused), grads(&composed));
        for v in [&g, &u] {
            let d = (gf.get(v.as_tensor()).unwrap() - gc.get(v.as_tensor()).unwrap()).unwrap();
            assert!(largest(&d) < 1e-12);
        }
    }

    /// In f32 (the vectorised exponential, AVX2 where the CPU has it) the fused activation,
    /// its gradients and the causal softmax stay within f32 rounding of the f64 forms.
    #[test]
    fn f32_kernels_match_f64() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 4.0, (2, 3, 37, 37), &dev).unwrap();
        let u = Tensor::randn(0f64, 1.0, (5, 1003), &dev).unwrap();
        let g = (Tensor::randn(0f64, 5.0, (5, 1003), &dev).unwrap() - 1.0).unwrap();
        let rel = |a: Tensor, b: Tensor| {
            let a = a.to_dtype(DType::F64).unwrap();
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            d.to_scalar::<f64>().unwrap() / scale
        };
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let probs = |x: &Tensor| causal_attention_probs(x, 0.125).unwrap();
        assert!(rel(probs(&f32(&x)), probs(&x)) < 1e-6);
        let act = |g: &Tensor, u: &Tensor| silu_mul_op(g, u).unwrap();
        assert!(rel(act(&f32(&g), &f32(&u)), act(&g, &u)) < 1e-6);
        for of_gate in [true, false] {
            let op = SiluMulGrad { of_gate };
            let grad =
                |g: &Tensor, u: &Tensor| g.apply_op3_no_bwd(u, &(u * 0.5).unwrap(), &op).unwrap();
            assert!(rel(grad(&f32(&g), &f32(&u)), grad(&g, &u)) < 1e-6);
        }
    }
}
