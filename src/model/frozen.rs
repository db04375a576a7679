//! A frozen linear layer: `y = x Wᵀ` whose backward gives the gradient of `x` only.
//!
//! candle's own matmul backward always computes (and keeps) `dW`, a wasted GEMM and a
//! weight-sized buffer per layer when `W` is frozen. Routing every frozen matmul through
//! this op removes both. A 4-bit (NF4) weight is the second variant: it is dequantized into a
//! temporary of the input's dtype for each GEMM (forward, and again in backward), so only the
//! layer being computed ever has a full-precision copy.

use super::nf4::{Nf4Out, Nf4Tensor};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use std::sync::Arc;

/// `x (n, h) · wᵀ` for `w (o, h)`, with no weight gradient.
struct FrozenMatmul;

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h) = x_layout.shape().dims2()?;
        let (o, h_w) = w_layout.shape().dims2()?;
        if h != h_w {
            candle_core::bail!("frozen linear: input has {h} features, weight expects {h_w}");
        }
        let wt = w_layout.transpose(0, 1)?;
        let y = x.matmul(w, (1, n, o, h), x_layout, &wt)?;
        Ok((y, Shape::from((n, o))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad_y.matmul(w)?), None))
    }
}

/// Which product an [`Nf4Matmul`] computes with the dequantized `w (o, h)`.
#[derive(Clone, Copy)]
enum Nf4Product {
    /// `x (n, h) · wᵀ → (n, o)`: the forward.
    XWt,
    /// `g (n, o) · w → (n, h)`: the input gradient.
    GW,
}

/// A matmul with an NF4 weight held by the op itself (never a candle tensor, never a gradient).
struct Nf4Matmul {
    w: Arc<Nf4Tensor>,
    product: Nf4Product,
}

impl CustomOp1 for Nf4Matmul {
    fn name(&self) -> &'static str {
        "nf4-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = layout.shape().dims2()?;
        let (o, h) = (self.w.shape[0], self.w.shape[1]);
        fn deq<T: Nf4Out + Default + Clone>(w: &Nf4Tensor) -> Vec<T> {
            let mut v = vec![T::default(); w.elem_count()];
            w.dequantize_into(&mut v);
            v
        }
        // The full-precision weight exists only inside this call.
        let w = match x {
            CpuStorage::F32(_) => CpuStorage::F32(deq::<f32>(&self.w)),
            CpuStorage::F64(_) => CpuStorage::F64(deq::<f64>(&self.w)),
            CpuStorage::BF16(_) => CpuStorage::BF16(deq::<bf16>(&self.w)),
            CpuStorage::F16(_) => CpuStorage::F16(deq::<f16>(&self.w)),
            other => {
                candle_core::bail!("4-bit linear: unsupported input dtype {:?}", other.dtype())
            }
        };
        let w_layout = Layout::contiguous((o, h));
        match self.product {
            Nf4Product::XWt => {
                if k != h {
                    candle_core::bail!("4-bit linear: input has {k} features, weight expects {h}");
                }
                let y = x.matmul(&w, (1, n, o, h), layout, &w_layout.transpose(0, 1)?)?;
                Ok((y, Shape::from((n, o))))
            }
            Nf4Product::GW => {
                if k != o {
                    candle_core::bail!("4-bit linear: gradient has {k} features, weight gives {o}");
                }
                let y = x.matmul(&w, (1, n, h, o), layout, &w_layout)?;
                Ok((y, Shape::from((n, h))))
            }
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        // Each product's input gradient is the other product, dequantizing again.
        let product = match self.product {
            Nf4Product::XWt => Nf4Product::GW,
            Nf4Product::GW => Nf4Product::XWt,
        };
        let op = Nf4Matmul {
            w: self.w.clone(),
            product,
        };
        Ok(Some(grad_y.contiguous()?.apply_op1(op)?))
    }
}

/// The frozen weight: full precision, or 4-bit codes that are dequantized per use.
#[derive(Clone, Debug)]
enum Weight {
    Dense(Tensor),
    Nf4(Arc<Nf4Tensor>),
}

/// A weight that never trains.
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    weight: Weight,
}

impl FrozenLinear {
    pub fn new(weight: Tensor) -> Self {
        Self {
            weight: Weight::Dense(weight),
        }
    }

    /// A 4-bit layer; `w` has shape (out, in).
    pub fn nf4(w: Nf4Tensor) -> Self {
        Self {
            weight: Weight::Nf4(Arc::new(w)),
        }
    }

    /// The full-precision weight, when the layer is not 4-bit.
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            Weight::Nf4(_) => None,
        }
    }

    /// The NF4 weight, when the layer is 4-bit.
    pub fn as_nf4(&self) -> Option<&Nf4Tensor> {
        match &self.weight {
            Weight::Nf4(w) => Some(w),
            Weight::Dense(_) => None,
        }
    }

    /// (out, in)
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            Weight::Dense(w) => {
                let d = w.dims();
                (d[0], d[1])
            }
            Weight::Nf4(w) => (w.shape[0], w.shape[1]),
        }
    }

    /// Applies the layer to the last axis of `x` (any leading dims).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let h = dims[dims.len() - 1];
        let rows = x.elem_count() / h.max(1);
        let x2 = x.reshape((rows, h))?.contiguous()?;
        let y = match &self.weight {
            Weight::Dense(w) => x2.apply_op2(w, FrozenMatmul)?,
            Weight::Nf4(w) => x2.apply_op1(Nf4Matmul {
                w: w.clone(),
                product: Nf4Product::XWt,
            })?,
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("x has at least one dim") = self.dims().0;
        y.reshape(out_dims)
    }
}
