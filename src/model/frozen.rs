//! A frozen linear layer: `y = x Wᵀ` whose backward gives the gradient of `x` only.
//!
//! candle's own matmul backward always computes (and keeps) `dW`, a wasted GEMM and a
//! weight-sized buffer per layer when `W` is frozen. Routing every frozen matmul through
//! this op removes both. The NF4 weight (issue 3) will be a second variant of the same type.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

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

/// A weight that never trains.
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    weight: Tensor,
}

impl FrozenLinear {
    pub fn new(weight: Tensor) -> Self {
        Self { weight }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// (out, in)
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    /// Applies the layer to the last axis of `x` (any leading dims).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let h = dims[dims.len() - 1];
        let rows = x.elem_count() / h.max(1);
        let x2 = x.reshape((rows, h))?.contiguous()?;
        let y = x2.apply_op2(&self.weight, FrozenMatmul)?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("x has at least one dim") = self.dims().0;
        y.reshape(out_dims)
    }
}
