//! A frozen linear layer: `y = x Wᵀ` whose backward gives the gradient of `x` only.
//!
//! candle's own matmul backward always computes (and keeps) `dW`, a wasted GEMM and a
//! weight-sized buffer per layer when `W` is frozen. Routing every frozen matmul through
//! this op removes both. A 4-bit (NF4) weight is the second variant: it is dequantized into a
//! temporary of the input's dtype for each GEMM (forward, and again in backward) — on the CPU
//! a cache-sized tile at a time, on a GPU whole — so no full-precision copy outlives its use.

use super::nf4::{Absmax, Nf4Out, Nf4Tensor, BLOCK};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Device, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;
use std::sync::Arc;

/// `x (n, h) · wᵀ` for `w (o, h)`, with no weight gradient.
struct FrozenMatmul;

/// The product an op computes with the weight `w (o, h)`.
#[derive(Clone, Copy)]
enum Product {
    /// `x (n, h) · wᵀ → (n, o)`: the forward.
    XWt,
    /// `g (n, o) · w → (n, h)`: the input gradient.
    GW,
}

impl Product {
    /// The product that is this one's input gradient.
    fn transposed(self) -> Self {
        match self {
            Product::XWt => Product::GW,
            Product::GW => Product::XWt,
        }
    }

    /// `self` of `x (n, k)` and the weight `w (o, h)`, on any backend.
    fn apply<S: BackendStorage>(
        self,
        x: &S,
        x_layout: &Layout,
        w: &S,
        w_layout: &Layout,
    ) -> Result<(S, Shape)> {
        let (n, k) = x_layout.shape().dims2()?;
        let (o, h) = w_layout.shape().dims2()?;
        let (inner, out, w_layout) = match self {
            Product::XWt => (h, o, w_layout.transpose(0, 1)?),
            Product::GW => (o, h, w_layout.clone()),
        };
        if k != inner {
            candle_core::bail!("frozen linear: input has {k} features, the weight expects {inner}");
        }
        let y = x.matmul(w, (1, n, out, inner), x_layout, &w_layout)?;
        Ok((y, Shape::from((n, out))))
    }
}

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
        use crate::kernels::skinny;
        // A decoding step's few rows: the skinny product, which does not pack the weight.
        let ((n, h), (o, wh)) = (x_layout.shape().dims2()?, w_layout.shape().dims2()?);
        if let (CpuStorage::F32(xs), CpuStorage::F32(ws), Some((x0, x1)), Some((w0, w1))) = (
            x,
            w,
            x_layout.contiguous_offsets(),
            w_layout.contiguous_offsets(),
        ) {
            if skinny::ROWS.contains(&n) && h == wh && skinny::available() {
                let y = skinny::xwt(&xs[x0..x1], &ws[w0..w1], n, h, o);
                return Ok((CpuStorage::F32(y), Shape::from((n, o))));
            }
        }
        Product::XWt.apply(x, x_layout, w, w_layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        w: &candle_core::CudaStorage,
        w_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Product::XWt.apply(x, x_layout, w, w_layout)
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

/// 4-bit codes and block scales, where the layer computes.
#[derive(Debug)]
enum Nf4Codes {
    /// In host memory, dequantized by the CPU.
    Host(Nf4Tensor),
    /// On a GPU as u8/f32 tensors, dequantized by our CUDA kernel.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Device {
        shape: (usize, usize),
        packed: Tensor,
        /// Codes of double-quantized scales (then `scales` are the per-256-block scales).
        absmax_codes: Option<Tensor>,
        scales: Tensor,
        offset: f32,
    },
}

impl Nf4Codes {
    fn new(w: Nf4Tensor, device: &Device) -> Result<Self> {
        if device.is_cpu() {
            return Ok(Self::Host(w));
        }
        let shape = (w.shape[0], w.shape[1]);
        let n = w.packed.len();
        let packed = Tensor::from_vec(w.packed, n, device)?;
        Ok(match w.absmax {
            Absmax::Plain(a) => Self::Device {
                shape,
                packed,
                absmax_codes: None,
                scales: Tensor::from_vec(a.clone(), a.len(), device)?,
                offset: 0.0,
            },
            Absmax::Double(d) => Self::Device {
                shape,
                packed,
                absmax_codes: Some(Tensor::from_vec(d.codes.clone(), d.codes.len(), device)?),
                scales: Tensor::from_vec(d.scales.clone(), d.scales.len(), device)?,
                offset: d.offset,
            },
        })
    }

    /// (out, in)
    fn shape(&self) -> (usize, usize) {
        match self {
            Self::Host(w) => (w.shape[0], w.shape[1]),
            Self::Device { shape, .. } => *shape,
        }
    }
}

/// A matmul with an NF4 weight held by the op itself (never a candle variable, never a
/// gradient). The full-precision weight exists only inside each call.
struct Nf4Matmul {
    w: Arc<Nf4Codes>,
    product: Product,
}

impl CustomOp1 for Nf4Matmul {
    fn name(&self) -> &'static str {
        "nf4-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Nf4Codes::Host(q) = &*self.w else {
            candle_core::bail!("4-bit linear: the weight is on the GPU, the input on the CPU");
        };
        match x {
            CpuStorage::F32(_) => tiled::<f32>(q, self.product, x, layout, TILE_ELEMS),
            CpuStorage::F64(_) => tiled::<f64>(q, self.product, x, layout, TILE_ELEMS),
            CpuStorage::BF16(_) => tiled::<bf16>(q, self.product, x, layout, TILE_ELEMS),
            CpuStorage::F16(_) => tiled::<f16>(q, self.product, x, layout, TILE_ELEMS),
            other => {
                candle_core::bail!("4-bit linear: unsupported input dtype {:?}", other.dtype())
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::Storage;
        let Nf4Codes::Device {
            shape,
            packed,
            absmax_codes,
            scales,
            offset,
        } = &*self.w
        else {
            candle_core::bail!("4-bit linear: the weight is in host memory, the input on the GPU");
        };
        fn on_gpu<'a, T: candle_core::cuda::CudaDType>(
            s: &'a Storage,
        ) -> Result<candle_core::cuda::cudarc::driver::CudaView<'a, T>> {
            match s {
                Storage::Cuda(c) => Ok(c.as_cuda_slice::<T>()?.as_view()),
                _ => candle_core::bail!("4-bit linear: the codes are not on the GPU"),
            }
        }
        let (p, _) = packed.storage_and_layout();
        let (sc, _) = scales.storage_and_layout();
        let codes = absmax_codes.as_ref().map(|c| c.storage_and_layout().0);
        let q = crate::kernels::cuda::DeviceNf4 {
            packed: on_gpu::<u8>(&p)?,
            absmax_codes: codes.as_deref().map(on_gpu::<u8>).transpose()?,
            scales: on_gpu::<f32>(&sc)?,
            offset: *offset,
            elems: shape.0 * shape.1,
        };
        let w = crate::kernels::cuda::nf4_dequantize(x.device(), &q, x.dtype())?;
        self.product
            .apply(x, layout, &w, &Layout::contiguous(*shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        // Each product's input gradient is the other product, dequantizing again.
        let op = Nf4Matmul {
            w: self.w.clone(),
            product: self.product.transposed(),
        };
        Ok(Some(grad_y.contiguous()?.apply_op1(op)?))
    }
}

/// Weight elements dequantized at a time on the CPU (16 MB in f32): a tile stays in the
/// last-level cache for its GEMM, where a whole f32 weight (180 MB for a 7B MLP matrix) went
/// out to memory and was read back.
const TILE_ELEMS: usize = 1 << 22;

/// `product` of `x` with the NF4 weight `q (o, h)`, dequantized a tile at a time: the forward
/// `x Wᵀ` takes whole rows of W (output columns of y), the input gradient `g W` whole block
/// columns of W (output columns of dx); each tile's GEMM writes its own columns, so nothing
/// is summed across tiles. Rows that are not whole quantization blocks dequantize whole.
fn tiled<T: TileBuffer>(
    q: &Nf4Tensor,
    product: Product,
    xs: &CpuStorage,
    x_layout: &Layout,
    tile_elems: usize,
) -> Result<(CpuStorage, Shape)> {
    let (o, h) = (q.shape[0], q.shape[1]);
    let n = x_layout.shape().dims2()?.0;
    let (along, out_width) = match product {
        Product::XWt => (o, o),
        Product::GW => (h, h),
    };
    let step = match product {
        _ if h % BLOCK != 0 => along,
        Product::XWt => (tile_elems / h).max(1),
        Product::GW => (tile_elems / o / BLOCK).max(1) * BLOCK,
    }
    .clamp(1, along.max(1));
    let absmax = if step < along {
        q.absmax_f32()
    } else {
        Vec::new()
    };
    let mut w = T::to_cpu_storage_owned(Vec::new());
    let mut y = Vec::new();
    for first in (0..along).step_by(step) {
        let len = step.min(along - first);
        let (rows, cols) = match product {
            Product::XWt => (first..first + len, 0..h),
            Product::GW => (0..o, first..first + len),
        };
        let shape = (rows.len(), cols.len());
        let tile = T::buffer(&mut w);
        tile.resize(shape.0 * shape.1, T::default());
        if step == along {
            q.dequantize_into(tile);
        } else {
            q.dequantize_tile_into(rows, cols, &absmax, tile);
        }
        let (part, part_shape) = product.apply(xs, x_layout, &w, &Layout::contiguous(shape))?;
        if step == along {
            return Ok((part, part_shape));
        }
        y.resize(n * out_width, T::default());
        y.par_chunks_mut(out_width)
            .zip(T::cpu_storage_as_slice(&part)?.par_chunks(len))
            .for_each(|(yr, pr)| yr[first..first + len].copy_from_slice(pr));
    }
    Ok((T::to_cpu_storage_owned(y), Shape::from((n, out_width))))
}

/// The element types a tile is dequantized to, and their buffer inside a `CpuStorage` (so
/// one buffer serves every tile of a call).
trait TileBuffer: Nf4Out + candle_core::WithDType + Default {
    fn buffer(s: &mut CpuStorage) -> &mut Vec<Self>;
}

macro_rules! tile_buffer {
    ($t:ty, $variant:ident) => {
        impl TileBuffer for $t {
            fn buffer(s: &mut CpuStorage) -> &mut Vec<$t> {
                match s {
                    CpuStorage::$variant(v) => v,
                    _ => unreachable!("the buffer was made from this type"),
                }
            }
        }
    };
}
tile_buffer!(f32, F32);
tile_buffer!(f64, F64);
tile_buffer!(bf16, BF16);
tile_buffer!(f16, F16);

/// The frozen weight: full precision, or 4-bit codes that are dequantized per use.
#[derive(Clone, Debug)]
enum Weight {
    Dense(Tensor),
    Nf4(Arc<Nf4Codes>),
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

    /// A 4-bit layer computing on `device`; `w` has shape (out, in).
    pub fn nf4(w: Nf4Tensor, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: Weight::Nf4(Arc::new(Nf4Codes::new(w, device)?)),
        })
    }

    /// The full-precision weight, when the layer is not 4-bit.
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            Weight::Nf4(_) => None,
        }
    }

    /// (out, in)
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            Weight::Dense(w) => {
                let d = w.dims();
                (d[0], d[1])
            }
            Weight::Nf4(w) => w.shape(),
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
                product: Product::XWt,
            })?,
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("x has at least one dim") = self.dims().0;
        y.reshape(out_dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small tiles (uneven last ones, both products) give what one whole-weight GEMM gives.
    #[test]
    fn tiles_equal_the_whole_weight() {
        let (o, h, n) = (96, 192, 5);
        let w: Vec<f32> = (0..o * h)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0)
            .collect();
        let q = Nf4Tensor::quantize("w", &w, &[o, h], true).unwrap();
        for (product, k) in [(Product::XWt, h), (Product::GW, o)] {
            let x: Vec<f64> = (0..n * k)
                .map(|i| ((i * 13 % 29) as f64 - 14.0) / 9.0)
                .collect();
            let run = |tile_elems| {
                let xs = CpuStorage::F64(x.clone());
                let (y, shape) =
                    tiled::<f64>(&q, product, &xs, &Layout::contiguous((n, k)), tile_elems)
                        .unwrap();
                (y.as_slice::<f64>().unwrap().to_vec(), shape)
            };
            let (whole, shape) = run(usize::MAX);
            let (tiles, tiled_shape) = run(1000);
            assert_eq!(shape, tiled_shape);
            let worst = whole
                .iter()
                .zip(&tiles)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-12, "{worst}");
        }
    }
}
