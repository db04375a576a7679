//! A frozen linear layer: `y = x Wᵀ` whose backward gives the gradient of `x` only.
//!
//! candle's own matmul backward always computes (and keeps) `dW`, a wasted GEMM and a
//! weight-sized buffer per layer when `W` is frozen. Routing every frozen matmul through
//! this op removes both. A 4-bit (NF4) weight is the second variant: it is dequantized into a
//! temporary of the input's dtype for each GEMM (forward, and again in backward) — on the CPU
//! a cache-sized tile at a time, on a GPU whole — so no full-precision copy outlives its use.
//! A weight kept in a GGUF file's ggml blocks (Q4_K, Q8_0, …) is the third, dequantized tile by
//! tile the same way (on the CPU; on a GPU it is loaded dense, see [`FrozenLinear::blocks`]).

use super::huge_pages;
use super::nf4::{Absmax, Nf4Out, Nf4Tensor, BLOCK};
use crate::gguf::quants::BlockMatrix;
use crate::kernels::quant_gemv::{self, QuantMatrix};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;
use std::ops::Range;
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
        // A decoding step's few rows: the skinny product, which does not pack the weight and
        // reads a bf16 one as bf16 (computing in f32).
        let ((n, h), (o, wh)) = (x_layout.shape().dims2()?, w_layout.shape().dims2()?);
        if let (Some((x0, x1)), Some((w0, w1))) =
            (x_layout.contiguous_offsets(), w_layout.contiguous_offsets())
        {
            if skinny::ROWS.contains(&n) && h == wh && skinny::available() {
                let shape = Shape::from((n, o));
                match (x, w) {
                    (CpuStorage::F32(xs), CpuStorage::F32(ws)) => {
                        let y = skinny::xwt(&xs[x0..x1], &ws[w0..w1], n, h, o);
                        return Ok((CpuStorage::F32(y), shape));
                    }
                    (CpuStorage::BF16(xs), CpuStorage::BF16(ws)) => {
                        let x32: Vec<f32> = xs[x0..x1].iter().map(|v| v.to_f32()).collect();
                        let y = skinny::xwt(&x32, &ws[w0..w1], n, h, o);
                        let y = y.into_iter().map(bf16::from_f32).collect();
                        return Ok((CpuStorage::BF16(y), shape));
                    }
                    // f32 activations of a bf16 model (decoding on the CPU computes in f32).
                    (CpuStorage::F32(xs), CpuStorage::BF16(ws)) => {
                        let y = skinny::xwt(&xs[x0..x1], &ws[w0..w1], n, h, o);
                        return Ok((CpuStorage::F32(y), shape));
                    }
                    _ => {}
                }
            }
        }
        if let (CpuStorage::F32(_), CpuStorage::BF16(_)) = (x, w) {
            // More rows (a prompt's prefill): the weight widened for one f32 GEMM.
            let ws = crate::kernels::ops::slice::<bf16>(w, w_layout)?;
            let wide = CpuStorage::F32(ws.iter().map(|v| v.to_f32()).collect());
            let (o, h) = w_layout.shape().dims2()?;
            return Product::XWt.apply(x, x_layout, &wide, &Layout::contiguous((o, h)));
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
        if let Some(y) = fused(q.fused(), self.product, x, layout)? {
            return Ok(y);
        }
        tiled_any(q, self.product, x, layout)
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

/// A weight `(o, h)` kept in quantization blocks that dequantizes a tile of itself.
trait Tiles: Sync {
    /// What a call computes once for all its tiles (NF4: the block scales).
    type Prepared;
    /// (o, h)
    fn shape(&self) -> (usize, usize);
    /// Whether tiles may split the weight (no block straddles two rows).
    fn tileable(&self) -> bool;
    /// Column tiles (those of the input gradient) are multiples of this.
    fn block_cols(&self) -> usize;
    fn prepare(&self) -> Self::Prepared;
    fn whole_into<T: TileBuffer>(&self, out: &mut [T]);
    fn tile_into<T: TileBuffer>(
        &self,
        prepared: &Self::Prepared,
        rows: Range<usize>,
        cols: Range<usize>,
        out: &mut [T],
    );
}

impl Tiles for Nf4Tensor {
    type Prepared = Vec<f32>;

    fn shape(&self) -> (usize, usize) {
        (self.shape[0], self.shape[1])
    }

    fn tileable(&self) -> bool {
        self.shape[1].is_multiple_of(BLOCK)
    }

    fn block_cols(&self) -> usize {
        BLOCK
    }

    fn prepare(&self) -> Vec<f32> {
        self.absmax_f32()
    }

    fn whole_into<T: TileBuffer>(&self, out: &mut [T]) {
        self.dequantize_into(out)
    }

    fn tile_into<T: TileBuffer>(
        &self,
        absmax: &Vec<f32>,
        rows: Range<usize>,
        cols: Range<usize>,
        out: &mut [T],
    ) {
        self.dequantize_tile_into(rows, cols, absmax, out)
    }
}

impl Tiles for BlockMatrix {
    type Prepared = ();

    fn shape(&self) -> (usize, usize) {
        BlockMatrix::shape(self)
    }

    fn tileable(&self) -> bool {
        true
    }

    fn block_cols(&self) -> usize {
        self.block_size()
    }

    fn prepare(&self) {}

    fn whole_into<T: TileBuffer>(&self, out: &mut [T]) {
        let (o, h) = BlockMatrix::shape(self);
        self.tile_into(&(), 0..o, 0..h, out)
    }

    /// Runs of rows in parallel, written in place in f32, else through an f32 row buffer.
    fn tile_into<T: TileBuffer>(
        &self,
        _: &(),
        rows: Range<usize>,
        cols: Range<usize>,
        out: &mut [T],
    ) {
        let width = cols.len().max(1);
        let run = (ELEMS_PER_TASK / width).max(1);
        out.par_chunks_mut(width * run)
            .enumerate()
            .for_each(|(t, chunk)| {
                let first = rows.start + t * run;
                if let Some(chunk) = T::as_f32(chunk) {
                    for (i, o) in chunk.chunks_exact_mut(width).enumerate() {
                        self.row_part_into(first + i, cols.clone(), o);
                    }
                    return;
                }
                let mut row = vec![0f32; width];
                for (i, o) in chunk.chunks_exact_mut(width).enumerate() {
                    self.row_part_into(first + i, cols.clone(), &mut row);
                    for (o, &v) in o.iter_mut().zip(&row) {
                        *o = T::from_f32(v);
                    }
                }
            });
    }
}

/// Weight elements a parallel task dequantizes (whole rows of ggml blocks).
const ELEMS_PER_TASK: usize = 1 << 15;

/// A decoding step's forward (a few f32 rows times a weight the fused kernels read): the
/// codes and scales are read once, dequantized in registers. `None`: use the tiled GEMM.
fn fused(
    w: Option<QuantMatrix>,
    product: Product,
    x: &CpuStorage,
    layout: &Layout,
) -> Result<Option<(CpuStorage, Shape)>> {
    fused_stacked(w.map(|w| vec![w]), product, x, layout)
}

/// [`fused`] of weights stacked along the output, in one pass of the thread pool.
fn fused_stacked(
    ws: Option<Vec<QuantMatrix>>,
    product: Product,
    x: &CpuStorage,
    layout: &Layout,
) -> Result<Option<(CpuStorage, Shape)>> {
    let (Some(ws), Product::XWt, CpuStorage::F32(xs), Some((start, end))) =
        (ws, product, x, layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    let (n, h) = layout.shape().dims2()?;
    if !quant_gemv::ROWS.contains(&n) || ws.iter().any(|w| h != w.shape().1) {
        return Ok(None);
    }
    let out: usize = ws.iter().map(|w| w.shape().0).sum();
    Ok(quant_gemv::xwt_stacked(&ws, &xs[start..end], n)
        .map(|y| (CpuStorage::F32(y), Shape::from((n, out)))))
}

/// [`tiled`] in the dtype of `x`.
fn tiled_any<W: Tiles>(
    w: &W,
    product: Product,
    x: &CpuStorage,
    layout: &Layout,
) -> Result<(CpuStorage, Shape)> {
    match x {
        CpuStorage::F32(_) => tiled::<f32, W>(w, product, x, layout, TILE_ELEMS),
        CpuStorage::F64(_) => tiled::<f64, W>(w, product, x, layout, TILE_ELEMS),
        CpuStorage::BF16(_) => tiled::<bf16, W>(w, product, x, layout, TILE_ELEMS),
        CpuStorage::F16(_) => tiled::<f16, W>(w, product, x, layout, TILE_ELEMS),
        other => {
            candle_core::bail!(
                "quantized linear: unsupported input dtype {:?}",
                other.dtype()
            )
        }
    }
}

/// `product` of `x` with the quantized weight `q (o, h)`, dequantized a tile at a time: the
/// forward `x Wᵀ` takes whole rows of W (output columns of y), the input gradient `g W` whole
/// block columns of W (output columns of dx); each tile's GEMM writes its own columns, so
/// nothing is summed across tiles. A weight whose blocks straddle rows dequantizes whole.
fn tiled<T: TileBuffer, W: Tiles>(
    q: &W,
    product: Product,
    xs: &CpuStorage,
    x_layout: &Layout,
    tile_elems: usize,
) -> Result<(CpuStorage, Shape)> {
    let (o, h) = q.shape();
    let n = x_layout.shape().dims2()?.0;
    let (along, out_width) = match product {
        Product::XWt => (o, o),
        Product::GW => (h, h),
    };
    let block = q.block_cols();
    let step = match product {
        _ if !q.tileable() => along,
        Product::XWt => (tile_elems / h.max(1)).max(1),
        Product::GW => (tile_elems / o.max(1) / block).max(1) * block,
    }
    .clamp(1, along.max(1));
    let prepared = (step < along).then(|| q.prepare());
    let mut y = Vec::new();
    for first in (0..along).step_by(step) {
        let len = step.min(along - first);
        let (rows, cols) = match product {
            Product::XWt => (first..first + len, 0..h),
            Product::GW => (0..o, first..first + len),
        };
        let shape = (rows.len(), cols.len());
        let (part, part_shape) = T::with_scratch(|w| {
            // The buffer only grows: a tile is its prefix, so no call zero-fills it again.
            let tile = T::buffer(w);
            if tile.len() < shape.0 * shape.1 {
                tile.resize(shape.0 * shape.1, T::default());
            }
            let tile = &mut tile[..shape.0 * shape.1];
            match &prepared {
                None => q.whole_into(tile),
                Some(p) => q.tile_into(p, rows, cols, tile),
            }
            product.apply(xs, x_layout, w, &Layout::contiguous(shape))
        })?;
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

/// One quantized weight in host memory, as a part of a stack.
#[derive(Clone, Copy)]
enum QuantPart<'a> {
    Nf4(&'a Nf4Tensor),
    Blocks(&'a BlockMatrix),
}

impl<'a> QuantPart<'a> {
    fn of(layer: &'a FrozenLinear) -> Option<Self> {
        match &layer.weight {
            Weight::Nf4(w) => match &**w {
                Nf4Codes::Host(q) => Some(Self::Nf4(q)),
                Nf4Codes::Device { .. } => None,
            },
            Weight::Blocks(w) => Some(Self::Blocks(w)),
            Weight::Dense(_) | Weight::Stacked(_) => None,
        }
    }

    /// The weight as the fused few-row product reads it.
    fn fused(&self) -> Option<QuantMatrix<'a>> {
        match *self {
            Self::Nf4(q) => q.fused(),
            Self::Blocks(w) => w.fused(),
        }
    }
}

/// Quantized weights stacked along the output, dequantized into one tile: one GEMM of the
/// stacked width (the forward), or of the stacked depth (the input gradient, whose sum over
/// the parts is then the GEMM's own).
struct StackedTiles<'a>(Vec<QuantPart<'a>>);

impl StackedTiles<'_> {
    /// Each part with its first row in the stack.
    fn parts(&self) -> impl Iterator<Item = (usize, QuantPart<'_>)> {
        self.0.iter().scan(0, |first, &p| {
            let at = *first;
            *first += p.shape().0;
            Some((at, p))
        })
    }
}

impl Tiles for QuantPart<'_> {
    type Prepared = Option<Vec<f32>>;

    fn shape(&self) -> (usize, usize) {
        match self {
            Self::Nf4(q) => Tiles::shape(*q),
            Self::Blocks(q) => Tiles::shape(*q),
        }
    }

    fn tileable(&self) -> bool {
        match self {
            Self::Nf4(q) => q.tileable(),
            Self::Blocks(q) => q.tileable(),
        }
    }

    fn block_cols(&self) -> usize {
        match self {
            Self::Nf4(q) => q.block_cols(),
            Self::Blocks(q) => q.block_cols(),
        }
    }

    fn prepare(&self) -> Option<Vec<f32>> {
        match self {
            Self::Nf4(q) => Some(q.prepare()),
            Self::Blocks(_) => None,
        }
    }

    fn whole_into<T: TileBuffer>(&self, out: &mut [T]) {
        match self {
            Self::Nf4(q) => q.whole_into(out),
            Self::Blocks(q) => q.whole_into(out),
        }
    }

    fn tile_into<T: TileBuffer>(
        &self,
        prepared: &Option<Vec<f32>>,
        rows: Range<usize>,
        cols: Range<usize>,
        out: &mut [T],
    ) {
        match (self, prepared) {
            (Self::Nf4(q), Some(absmax)) => q.tile_into(absmax, rows, cols, out),
            (Self::Nf4(q), None) => q.tile_into(&q.prepare(), rows, cols, out),
            (Self::Blocks(q), _) => q.tile_into(&(), rows, cols, out),
        }
    }
}

impl Tiles for StackedTiles<'_> {
    type Prepared = Vec<Option<Vec<f32>>>;

    fn shape(&self) -> (usize, usize) {
        let h = self.0.first().map_or(0, |p| p.shape().1);
        (self.0.iter().map(|p| p.shape().0).sum(), h)
    }

    fn tileable(&self) -> bool {
        self.0.iter().all(|p| p.tileable())
    }

    /// A column tile must be whole blocks of every part (the least common multiple).
    fn block_cols(&self) -> usize {
        fn gcd(a: usize, b: usize) -> usize {
            if b == 0 {
                a
            } else {
                gcd(b, a % b)
            }
        }
        self.0
            .iter()
            .fold(1, |l, p| l / gcd(l, p.block_cols()) * p.block_cols())
    }

    fn prepare(&self) -> Self::Prepared {
        self.0.iter().map(|p| p.prepare()).collect()
    }

    /// The parts in one parallel pass (each part's own loop nested in it), so the pool does
    /// not drain between parts.
    fn whole_into<T: TileBuffer>(&self, out: &mut [T]) {
        let h = self.shape().1;
        let mut rest = out;
        let mut jobs = Vec::with_capacity(self.0.len());
        for p in &self.0 {
            let (mine, tail) = rest.split_at_mut(p.shape().0 * h);
            jobs.push((p, mine));
            rest = tail;
        }
        jobs.into_par_iter().for_each(|(p, o)| p.whole_into(o));
    }

    /// Each part dequantizes the rows of the tile that are its own (a tile is row-major, so
    /// they are one run of it), all parts in one parallel pass.
    fn tile_into<T: TileBuffer>(
        &self,
        prepared: &Self::Prepared,
        rows: Range<usize>,
        cols: Range<usize>,
        out: &mut [T],
    ) {
        let width = cols.len();
        let mut rest = out;
        let mut jobs = Vec::with_capacity(self.0.len());
        for ((first, p), prep) in self.parts().zip(prepared) {
            let (start, end) = (rows.start.max(first), rows.end.min(first + p.shape().0));
            if start >= end {
                continue;
            }
            let (mine, tail) = rest.split_at_mut((end - start) * width);
            jobs.push((p, prep, start - first..end - first, mine));
            rest = tail;
        }
        jobs.into_par_iter()
            .for_each(|(p, prep, part_rows, o)| p.tile_into(prep, part_rows, cols.clone(), o));
    }
}

/// A matmul with a weight in ggml blocks held by the op (never a variable, never a gradient).
struct BlockMatmul {
    w: Arc<BlockMatrix>,
    product: Product,
}

impl CustomOp1 for BlockMatmul {
    fn name(&self) -> &'static str {
        "ggml-block-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        if let Some(y) = fused(self.w.fused(), self.product, x, layout)? {
            return Ok(y);
        }
        tiled_any(&*self.w, self.product, x, layout)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        let op = BlockMatmul {
            w: self.w.clone(),
            product: self.product.transposed(),
        };
        Ok(Some(grad_y.contiguous()?.apply_op1(op)?))
    }
}

/// The element types a tile is dequantized to, and their buffer inside a `CpuStorage` (so
/// one buffer serves every tile of every call on a thread).
trait TileBuffer: Nf4Out + candle_core::WithDType + Default {
    fn buffer(s: &mut CpuStorage) -> &mut Vec<Self>;

    /// The tile as f32 where it is f32 (dequantizers write it directly).
    fn as_f32(_tile: &mut [Self]) -> Option<&mut [f32]> {
        None
    }

    /// Runs `f` with this thread's tile buffer of this type, kept between calls: a training
    /// step dequantizes every weight twice, and a fresh buffer each time was zero-filled first.
    fn with_scratch<R>(f: impl FnOnce(&mut CpuStorage) -> R) -> R;
}

macro_rules! tile_buffer {
    ($t:ty, $variant:ident $(, $own:item)?) => {
        impl TileBuffer for $t {
            $($own)?

            fn buffer(s: &mut CpuStorage) -> &mut Vec<$t> {
                match s {
                    CpuStorage::$variant(v) => v,
                    _ => unreachable!("the buffer was made from this type"),
                }
            }

            fn with_scratch<R>(f: impl FnOnce(&mut CpuStorage) -> R) -> R {
                thread_local! {
                    static SCRATCH: std::cell::RefCell<CpuStorage> =
                        std::cell::RefCell::new(CpuStorage::$variant(Vec::new()));
                }
                SCRATCH.with(|s| f(&mut s.borrow_mut()))
            }
        }
    };
}
tile_buffer!(
    f32,
    F32,
    fn as_f32(tile: &mut [f32]) -> Option<&mut [f32]> {
        Some(tile)
    }
);
tile_buffer!(f64, F64);
tile_buffer!(bf16, BF16);
tile_buffer!(f16, F16);

/// The frozen weight: full precision, or quantized codes that are dequantized per use.
#[derive(Clone, Debug)]
enum Weight {
    Dense(Tensor),
    Nf4(Arc<Nf4Codes>),
    /// ggml blocks from a GGUF file, in host memory.
    Blocks(Arc<BlockMatrix>),
    /// Quantized weights stacked along the output (a block's q, k and v): each keeps its own
    /// codes and scales (double quantization's scales are per tensor, so they cannot merge).
    Stacked(Arc<[FrozenLinear]>),
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

    /// Moves a quantized weight's host memory onto 2 MiB pages ([`huge_pages::collapse`]):
    /// decoding reads every weight once per token. A dense weight stays where it is: an f32
    /// model's decode reads its weights near the memory's rate already, and moving them cost
    /// 0.6–1.5 s for SmolLM2's 550 MiB here (docs/performance.md).
    pub(crate) fn collapse_codes(&self) {
        match &self.weight {
            Weight::Dense(_) => {}
            Weight::Nf4(codes) => {
                if let Nf4Codes::Host(q) = &**codes {
                    huge_pages::collapse(&q.packed);
                }
            }
            Weight::Blocks(b) => huge_pages::collapse(b.bytes()),
            Weight::Stacked(parts) => parts.iter().for_each(Self::collapse_codes),
        }
    }

    /// The host memory a quantized weight's products stream (its codes or blocks, the parts
    /// of a stacked one in order); nothing for a dense weight.
    pub(crate) fn host_codes<'a>(&'a self, out: &mut Vec<&'a [u8]>) {
        match &self.weight {
            Weight::Dense(_) => {}
            Weight::Nf4(codes) => {
                if let Nf4Codes::Host(q) = &**codes {
                    out.push(&q.packed);
                }
            }
            Weight::Blocks(b) => out.push(b.bytes()),
            Weight::Stacked(parts) => parts.iter().for_each(|p| p.host_codes(out)),
        }
    }

    /// A 4-bit layer computing on `device`; `w` has shape (out, in).
    pub fn nf4(w: Nf4Tensor, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: Weight::Nf4(Arc::new(Nf4Codes::new(w, device)?)),
        })
    }

    /// A layer whose weight `w` (out, in) stays in its ggml blocks, dequantized tile by tile
    /// per product, on the CPU. candle has no kernel for ggml blocks on a GPU here, so there
    /// the weight is dequantized once, to `dtype`.
    pub fn blocks(w: BlockMatrix, dtype: DType, device: &Device) -> Result<Self> {
        if device.is_cpu() {
            return Ok(Self {
                weight: Weight::Blocks(Arc::new(w)),
            });
        }
        let dense = Tensor::from_vec(w.to_f32(), w.shape(), device)?.to_dtype(dtype)?;
        Ok(Self::new(dense))
    }

    /// The layers `parts` (same input) as one whose output is theirs side by side: dense
    /// weights concatenated into one (one wider product), quantized ones kept as they are and
    /// computed one after another. The parts' weights are not kept beside it.
    pub fn stack(mut parts: Vec<FrozenLinear>) -> Result<Self> {
        let inputs: Vec<usize> = parts.iter().map(|p| p.dims().1).collect();
        if inputs.windows(2).any(|w| w[0] != w[1]) {
            candle_core::bail!("frozen linear: cannot stack layers of {inputs:?} input features");
        }
        if parts.len() == 1 {
            return Ok(parts.pop().expect("one part"));
        }
        let dense: Option<Vec<&Tensor>> = parts.iter().map(|p| p.dense_weight()).collect();
        Ok(match dense {
            Some(ws) => Self::new(Tensor::cat(&ws, 0)?),
            None => Self {
                weight: Weight::Stacked(parts.into()),
            },
        })
    }

    /// The full-precision weight, when the layer is not quantized.
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            Weight::Nf4(_) | Weight::Blocks(_) | Weight::Stacked(_) => None,
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
            Weight::Blocks(w) => w.shape(),
            Weight::Stacked(parts) => (parts.iter().map(|p| p.dims().0).sum(), parts[0].dims().1),
        }
    }

    /// Whether [`Self::forward`] of `x` reads the weight in place with the fused few-row
    /// product (a quantized weight, a few f32 rows on the CPU).
    pub fn fused_for(&self, x: &Tensor) -> bool {
        let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
        x.device().is_cpu() && self.fused_for_rows(x.dtype(), rows)
    }

    /// Whether `rows` rows of `dtype` on the CPU take the fused few-row product.
    fn fused_for_rows(&self, dtype: DType, rows: usize) -> bool {
        let fused = match &self.weight {
            Weight::Dense(_) => false,
            Weight::Nf4(w) => matches!(&**w, Nf4Codes::Host(q) if q.fused().is_some()),
            Weight::Blocks(w) => w.fused().is_some(),
            Weight::Stacked(parts) => parts.iter().all(|p| p.fused_for_rows(dtype, rows)),
        };
        fused && dtype == DType::F32 && quant_gemv::ROWS.contains(&rows)
    }

    /// On the CPU, the layer's product of the rows `x (n, in)` — or with `input_grad` the
    /// input gradient `x (n, out) · W` — computed as the layer's own ops compute it, for ops
    /// that fuse more work around the frozen product (see `model::lora_linear`).
    pub(crate) fn cpu_product(
        &self,
        x: &CpuStorage,
        layout: &Layout,
        input_grad: bool,
    ) -> Result<(CpuStorage, Shape)> {
        let product = if input_grad {
            Product::GW
        } else {
            Product::XWt
        };
        match &self.weight {
            Weight::Dense(w) => {
                let (storage, w_layout) = w.storage_and_layout();
                let candle_core::Storage::Cpu(ws) = &*storage else {
                    candle_core::bail!("frozen linear: the weight is not in host memory");
                };
                match product {
                    Product::XWt => FrozenMatmul.cpu_fwd(x, layout, ws, w_layout),
                    Product::GW => product.apply(x, layout, ws, w_layout),
                }
            }
            Weight::Nf4(w) => Nf4Matmul {
                w: w.clone(),
                product,
            }
            .cpu_fwd(x, layout),
            Weight::Blocks(w) => BlockMatmul {
                w: w.clone(),
                product,
            }
            .cpu_fwd(x, layout),
            Weight::Stacked(parts) => {
                let quant: Option<Vec<QuantPart>> = parts.iter().map(QuantPart::of).collect();
                let n = layout.shape().dims2()?.0;
                // A decoding step's few rows: each part's fused product reads it in place.
                let few = !input_grad && parts.iter().all(|p| p.fused_for_rows(x.dtype(), n));
                match quant {
                    Some(quant) if !few => tiled_any(&StackedTiles(quant), product, x, layout),
                    Some(quant) => {
                        let ws = quant.iter().map(|q| q.fused()).collect();
                        match fused_stacked(ws, product, x, layout)? {
                            Some(y) => Ok(y),
                            None => stacked_product(parts, x, layout, input_grad),
                        }
                    }
                    None => stacked_product(parts, x, layout, input_grad),
                }
            }
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
            Weight::Blocks(w) => x2.apply_op1(BlockMatmul {
                w: w.clone(),
                product: Product::XWt,
            })?,
            Weight::Stacked(_) if x2.device().is_cpu() => x2.apply_op1(StackedMatmul {
                layer: self.clone(),
                input_grad: false,
            })?,
            // On a GPU the parts' own ops, side by side.
            Weight::Stacked(parts) => {
                let ys: Vec<Tensor> = parts
                    .iter()
                    .map(|p| p.forward(&x2))
                    .collect::<Result<_>>()?;
                Tensor::cat(&ys, 1)?
            }
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("x has at least one dim") = self.dims().0;
        y.reshape(out_dims)
    }
}

/// The product of a layer of stacked quantized weights on the CPU (never a gradient).
struct StackedMatmul {
    layer: FrozenLinear,
    input_grad: bool,
}

impl CustomOp1 for StackedMatmul {
    fn name(&self) -> &'static str {
        "stacked-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.layer.cpu_product(x, layout, self.input_grad)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        let op = StackedMatmul {
            layer: self.layer.clone(),
            input_grad: !self.input_grad,
        };
        Ok(Some(grad_y.contiguous()?.apply_op1(op)?))
    }
}

/// [`FrozenLinear::cpu_product`] of stacked `parts`: the forward writes each part's product into
/// its columns; the input gradient sums each part's product of its columns of `x`.
fn stacked_product(
    parts: &[FrozenLinear],
    x: &CpuStorage,
    layout: &Layout,
    input_grad: bool,
) -> Result<(CpuStorage, Shape)> {
    let n = layout.shape().dims2()?.0;
    let (outs, h) = (parts.iter().map(|p| p.dims().0), parts[0].dims().1);
    let width: usize = outs.clone().sum();
    let mut first = 0;
    let mut products = Vec::with_capacity(parts.len());
    for (part, o) in parts.iter().zip(outs) {
        let part_layout = match input_grad {
            true => layout.narrow(1, first, o)?,
            false => layout.clone(),
        };
        products.push(part.cpu_product(x, &part_layout, input_grad)?.0);
        first += o;
    }
    fn combine<T: candle_core::WithDType>(
        products: &[CpuStorage],
        n: usize,
        width: usize,
        input_grad: bool,
    ) -> Result<CpuStorage> {
        let parts: Vec<&[T]> = products
            .iter()
            .map(|p| T::cpu_storage_as_slice(p))
            .collect::<Result<_>>()?;
        let y = match input_grad {
            true => {
                let mut y = parts[0].to_vec();
                for p in &parts[1..] {
                    y.par_iter_mut()
                        .zip(p.par_iter())
                        .for_each(|(a, &b)| *a += b);
                }
                y
            }
            false => {
                let mut y = vec![T::zero(); n * width];
                y.par_chunks_mut(width).enumerate().for_each(|(i, row)| {
                    let mut at = 0;
                    for p in &parts {
                        let o = p.len() / n.max(1);
                        row[at..at + o].copy_from_slice(&p[i * o..(i + 1) * o]);
                        at += o;
                    }
                });
                y
            }
        };
        Ok(T::to_cpu_storage_owned(y))
    }
    let y = match products[0] {
        CpuStorage::F32(_) => combine::<f32>(&products, n, width, input_grad)?,
        CpuStorage::F64(_) => combine::<f64>(&products, n, width, input_grad)?,
        CpuStorage::BF16(_) => combine::<bf16>(&products, n, width, input_grad)?,
        CpuStorage::F16(_) => combine::<f16>(&products, n, width, input_grad)?,
        ref other => candle_core::bail!("stacked linear: unsupported dtype {:?}", other.dtype()),
    };
    let out = if input_grad { h } else { width };
    Ok((y, Shape::from((n, out))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgmlType;
    use half::f16;

    /// Small tiles (uneven last ones, both products) give what one whole-weight GEMM gives.
    fn check_tiles<W: Tiles>(q: &W) {
        let (o, h) = q.shape();
        let n = 5;
        for (product, k) in [(Product::XWt, h), (Product::GW, o)] {
            let x: Vec<f64> = (0..n * k)
                .map(|i| ((i * 13 % 29) as f64 - 14.0) / 9.0)
                .collect();
            let run = |tile_elems| {
                let xs = CpuStorage::F64(x.clone());
                let (y, shape) =
                    tiled::<f64, _>(q, product, &xs, &Layout::contiguous((n, k)), tile_elems)
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

    /// f32 inputs of a bf16 weight (a bf16 model decoding on the CPU): a few rows (the skinny
    /// product) and many (the widened GEMM) equal the f32 product with the weight's values.
    #[test]
    fn f32_inputs_of_a_bf16_weight_equal_the_widened_product() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (70, 40), &dev).unwrap();
        let w16 = w.to_dtype(DType::BF16).unwrap();
        let widened = w16.to_dtype(DType::F32).unwrap();
        for rows in [1, 3, 16, 17, 40] {
            let x = Tensor::randn(0f32, 1.0, (rows, 40), &dev).unwrap();
            let got = FrozenLinear::new(w16.clone()).forward(&x).unwrap();
            assert_eq!(got.dtype(), DType::F32);
            let want = x.matmul(&widened.t().unwrap()).unwrap();
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-4, "{rows} rows: {diff}");
        }
    }

    #[test]
    fn nf4_tiles_equal_the_whole_weight() {
        let (o, h) = (96, 192);
        let w: Vec<f32> = (0..o * h)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0)
            .collect();
        check_tiles(&Nf4Tensor::quantize("w", &w, &[o, h], true).unwrap());
    }

    /// Deterministic bytes of `rows` × `cols` values of `ty`, with finite f16 scales.
    fn blocks_of(ty: GgmlType, rows: usize, cols: usize) -> BlockMatrix {
        let n_blocks = rows * cols / ty.block_size();
        let mut bytes: Vec<u8> = (0..n_blocks * ty.type_size())
            .map(|i| (i * 131 % 251) as u8)
            .collect();
        for (b, block) in bytes.chunks_exact_mut(ty.type_size()).enumerate() {
            let scale = f16::from_f32(0.01 + 0.002 * (b % 7) as f32).to_le_bytes();
            let at = if ty == GgmlType::Q6_K { 208 } else { 0 };
            block[at..at + 2].copy_from_slice(&scale);
            // Q4_K's second scale, Q4_1's minimum.
            if matches!(ty, GgmlType::Q4_K | GgmlType::Q4_1) {
                block[2..4].copy_from_slice(&scale);
            }
        }
        BlockMatrix::new(ty, rows, cols, bytes).unwrap()
    }

    #[test]
    fn stacked_tiles_equal_the_whole_weight() {
        let w = |o: usize, h: usize, salt: usize| -> Nf4Tensor {
            let v: Vec<f32> = (0..o * h)
                .map(|i| ((i * 37 + salt) % 101) as f32 / 70.0 - 0.7)
                .collect();
            Nf4Tensor::quantize("w", &v, &[o, h], true).unwrap()
        };
        let (a, b, c) = (w(24, 128, 1), w(8, 128, 2), w(8, 128, 3));
        check_tiles(&StackedTiles(vec![
            QuantPart::Nf4(&a),
            QuantPart::Nf4(&b),
            QuantPart::Nf4(&c),
        ]));
        let (d, e) = (
            blocks_of(GgmlType::Q4_1, 20, 256),
            blocks_of(GgmlType::Q8_0, 12, 256),
        );
        check_tiles(&StackedTiles(vec![
            QuantPart::Blocks(&d),
            QuantPart::Blocks(&e),
        ]));
    }

    /// A stack of quantized layers computes what its parts compute side by side: the output
    /// (a decoding step's few rows through each part's fused product, more rows through one
    /// stacked tile) and the input gradient (the parts' summed), within f32 rounding.
    #[test]
    fn stacked_layers_equal_their_parts_side_by_side() {
        let dev = Device::Cpu;
        let nf4 = |o: usize, salt: usize| {
            let v: Vec<f32> = (0..o * 128)
                .map(|i| ((i * 37 + salt) % 101) as f32 / 70.0 - 0.7)
                .collect();
            FrozenLinear::nf4(
                Nf4Tensor::quantize("w", &v, &[o, 128], false).unwrap(),
                &dev,
            )
            .unwrap()
        };
        let blocks = |o: usize| {
            FrozenLinear::blocks(blocks_of(GgmlType::Q4_1, o, 128), DType::F32, &dev).unwrap()
        };
        for parts in [
            vec![nf4(24, 1), nf4(8, 2), nf4(8, 3)],
            vec![blocks(16), blocks(32)],
        ] {
            let stack = FrozenLinear::stack(parts.clone()).unwrap();
            let out: usize = parts.iter().map(|p| p.dims().0).sum();
            assert_eq!(stack.dims(), (out, 128));
            for rows in [2, 40] {
                let x: Vec<f32> = (0..rows * 128)
                    .map(|i| ((i * 29 % 61) as f32 - 30.0) / 40.0)
                    .collect();
                let x = candle_core::Var::from_vec(x, (rows, 128), &dev).unwrap();
                let weights = Tensor::arange(0f32, (rows * out) as f32, &dev)
                    .unwrap()
                    .reshape((rows, out))
                    .unwrap();
                let ys: Vec<Tensor> = parts
                    .iter()
                    .map(|p| p.forward(x.as_tensor()).unwrap())
                    .collect();
                let want = output_and_input_grad(&x, &weights, Tensor::cat(&ys, 1).unwrap());
                let got =
                    output_and_input_grad(&x, &weights, stack.forward(x.as_tensor()).unwrap());
                assert_close(want, got, 1e-5);
            }
        }
    }

    #[test]
    fn ggml_tiles_equal_the_whole_weight() {
        check_tiles(&blocks_of(GgmlType::Q8_0, 96, 192));
        check_tiles(&blocks_of(GgmlType::Q4_K, 40, 512));
        check_tiles(&blocks_of(GgmlType::Q6_K, 40, 512));
    }

    /// A layer kept in ggml blocks computes what the layer of its dequantized weight computes:
    /// the output and the input gradient, within f32 rounding (the two GEMMs sum in different
    /// orders: 1e-6 of the largest value).
    #[test]
    fn ggml_blocks_equal_the_dense_weight() {
        let q = blocks_of(GgmlType::Q4_K, 48, 512);
        let dense = Tensor::from_vec(q.to_f32(), q.shape(), &Device::Cpu).unwrap();
        let dense = FrozenLinear::new(dense);
        let blocks = FrozenLinear::blocks(q, DType::F32, &Device::Cpu).unwrap();
        let x: Vec<f32> = (0..7 * 512)
            .map(|i| ((i * 29 % 61) as f32 - 30.0) / 40.0)
            .collect();
        let x = candle_core::Var::from_vec(x, (7, 512), &Device::Cpu).unwrap();
        let weights = Tensor::arange(0f32, 7.0 * 48.0, &Device::Cpu)
            .unwrap()
            .reshape((7, 48))
            .unwrap();
        let run = |layer: &FrozenLinear| {
            output_and_input_grad(&x, &weights, layer.forward(x.as_tensor()).unwrap())
        };
        assert_close(run(&dense), run(&blocks), 1e-6);
    }

    /// `y` flattened, and the gradient of Σ y ⊙ `weights` with respect to `x`.
    fn output_and_input_grad(
        x: &candle_core::Var,
        weights: &Tensor,
        y: Tensor,
    ) -> (Vec<f32>, Vec<f32>) {
        let grads = (&y * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap();
        let y = y.flatten_all().unwrap();
        (y.to_vec1::<f32>().unwrap(), dx.to_vec1::<f32>().unwrap())
    }

    /// Outputs and input gradients equal within `tol` of each one's largest value.
    fn assert_close(want: (Vec<f32>, Vec<f32>), got: (Vec<f32>, Vec<f32>), tol: f32) {
        for (want, got) in [(want.0, got.0), (want.1, got.1)] {
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in want.iter().zip(&got) {
                assert!((a - b).abs() <= tol * scale, "{a} vs {b} (largest {scale})");
            }
        }
    }
}
