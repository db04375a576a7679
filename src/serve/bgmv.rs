//! The per-row adapter kernel (Punica's BGMV): one pass over a batch's rows, each row's delta
//! from its own adapter's factors, so a batch of many distinct adapters costs what one adapter
//! costs, not one chain of small products per adapter. PRoLoRA's shared chunks are read
//! compact: each input chunk meets `A0` at its rolled ranks, and each output chunk is `B0`
//! times the rank vector rolled back, so nothing is ever expanded.

use crate::adapters::RowFactors;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// One adapter's factors on one linear, as f32 rows in the order the kernel reads them.
pub struct Factors {
    shared: Option<Shared>,
    /// A's unshared rows (u, in), and B's columns for them as rows (u, out).
    a: Vec<f32>,
    bt: Vec<f32>,
    in_features: usize,
    out_features: usize,
    scaling: f32,
}

/// PRoLoRA's shared ranks: `a0` (r_s, chunk_a) and `b0` transposed (r_s, chunk_b).
struct Shared {
    a0: Vec<f32>,
    b0t: Vec<f32>,
    ranks: usize,
    chunk_a: usize,
    chunk_b: usize,
    roll_a: usize,
    roll_b: usize,
}

/// Row-major f32 values of `t` (a CPU f32 tensor), or None for other dtypes and devices.
fn values(t: &Tensor) -> candle_core::Result<Option<Vec<f32>>> {
    if t.dtype() != DType::F32 || !t.device().is_cpu() {
        return Ok(None);
    }
    Ok(Some(t.flatten_all()?.to_vec1()?))
}

impl Factors {
    /// The kernel's copy of `f` for a linear `in_features` → `out_features`; None when its
    /// tensors are not f32 on the CPU (such adapters keep their own delta).
    pub fn new(
        f: &RowFactors,
        in_features: usize,
        out_features: usize,
    ) -> candle_core::Result<Option<Self>> {
        let shared = match &f.shared {
            None => None,
            Some(s) => {
                let (ranks, chunk_a) = s.a0.dims2()?;
                let (Some(a0), Some(b0t)) = (values(&s.a0)?, values(&s.b0.t()?)?) else {
                    return Ok(None);
                };
                Some(Shared {
                    a0,
                    b0t,
                    ranks,
                    chunk_a,
                    chunk_b: s.b0.dim(0)?,
                    roll_a: s.roll_a,
                    roll_b: s.roll_b,
                })
            }
        };
        let (a, bt) = match &f.unshared {
            None => (Vec::new(), Vec::new()),
            Some((a, b)) => match (values(a)?, values(&b.t()?)?) {
                (Some(a), Some(bt)) => (a, bt),
                _ => return Ok(None),
            },
        };
        Ok(Some(Factors {
            shared,
            a,
            bt,
            in_features,
            out_features,
            scaling: f.scaling as f32,
        }))
    }

    /// The bytes it holds.
    pub fn bytes(&self) -> usize {
        let shared = self.shared.as_ref().map_or(0, |s| s.a0.len() + s.b0t.len());
        4 * (shared + self.a.len() + self.bt.len())
    }

    /// `y += Δ(x)` for one row: first the rank vector (each shared rank rolled into place,
    /// then the unshared ones), then every output once, eight at a time, with all its ranks'
    /// terms added in registers (not one pass over y per rank).
    #[inline(always)]
    fn add_row(&self, x: &[f32], y: &mut [f32]) {
        let r = self.shared.as_ref().map_or(0, |s| s.ranks);
        let u = self.a.len() / self.in_features.max(1);
        let mut stack = [0f32; 2 * STACK_RANKS];
        let mut heap = Vec::new();
        let scratch: &mut [f32] = if 2 * r + u <= stack.len() {
            &mut stack[..2 * r + u]
        } else {
            heap.resize(2 * r + u, 0.0);
            &mut heap
        };
        let (v, rolled) = scratch.split_at_mut(r + u);
        let (w, wu) = v.split_at_mut(r);
        if let Some(s) = &self.shared {
            // w = Σ_j roll(x_j A0ᵀ, −j·roll_a).
            for (j, xj) in x.chunks(s.chunk_a).enumerate() {
                let shift = (j * s.roll_a) % r;
                for (k, a0k) in s.a0.chunks_exact(s.chunk_a).enumerate() {
                    w[(k + r - shift) % r] += dot(xj, &a0k[..xj.len()]);
                }
            }
        }
        for (wu, ak) in wu.iter_mut().zip(self.a.chunks_exact(self.in_features)) {
            *wu = dot(x, ak);
        }
        v.iter_mut().for_each(|c| *c *= self.scaling);
        let (w, wu) = v.split_at(r);
        let chunk_b = self
            .shared
            .as_ref()
            .map_or(self.out_features, |s| s.chunk_b);
        let none: &[f32] = &[];
        let b0t = self.shared.as_ref().map_or(none, |s| &s.b0t);
        for (i, yi) in y.chunks_mut(chunk_b).enumerate() {
            // y_i = B0 roll(w, +i·roll_b) + the unshared columns' part of y_i.
            if let Some(s) = &self.shared {
                let shift = (i * s.roll_b) % r;
                for (c, rc) in rolled.iter_mut().enumerate() {
                    *rc = w[(c + r - shift) % r];
                }
            }
            let base = i * chunk_b;
            let done = yi.len() / 8 * 8;
            for (o, yb) in (0..).step_by(8).zip(yi.chunks_exact_mut(8)) {
                let mut acc = [0f32; 8];
                acc.copy_from_slice(yb);
                for (&k, b0c) in rolled.iter().zip(b0t.chunks_exact(chunk_b)) {
                    let b = &b0c[o..o + 8];
                    for l in 0..8 {
                        acc[l] += k * b[l];
                    }
                }
                for (&k, btq) in wu.iter().zip(self.bt.chunks_exact(self.out_features)) {
                    let b = &btq[base + o..base + o + 8];
                    for l in 0..8 {
                        acc[l] += k * b[l];
                    }
                }
                yb.copy_from_slice(&acc);
            }
            for (o, yo) in yi.iter_mut().enumerate().skip(done) {
                for (&k, b0c) in rolled.iter().zip(b0t.chunks_exact(chunk_b)) {
                    *yo += k * b0c[o];
                }
                for (&k, btq) in wu.iter().zip(self.bt.chunks_exact(self.out_features)) {
                    *yo += k * btq[base + o];
                }
            }
        }
    }
}

/// Ranks whose coefficients a row keeps on the stack (more: on the heap).
const STACK_RANKS: usize = 64;

/// Independent accumulators of a dot product: two AVX registers of f32.
const LANES: usize = 16;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// [`deltas`] for the whole rows in `x` and `y`.
#[inline(always)]
fn rows_portable(
    x: &[f32],
    y: &mut [f32],
    factors: &[Option<&Factors>],
    d_in: usize,
    d_out: usize,
) {
    for ((x, y), f) in x
        .chunks_exact(d_in)
        .zip(y.chunks_exact_mut(d_out))
        .zip(factors)
    {
        if let Some(f) = f {
            f.add_row(x, y);
        }
    }
}

/// [`rows_portable`] compiled for AVX2's 8-wide registers when the CPU has them.
fn rows(x: &[f32], y: &mut [f32], factors: &[Option<&Factors>], d_in: usize, d_out: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(x: &[f32], y: &mut [f32], f: &[Option<&Factors>], i: usize, o: usize) {
            rows_portable(x, y, f, i, o)
        }
        // SAFETY: the CPU has AVX2.
        return unsafe { avx2(x, y, factors, d_in, d_out) };
    }
    rows_portable(x, y, factors, d_in, d_out)
}

/// Rows a rayon task takes at least: a row is a few microseconds of work.
const ROWS_PER_TASK: usize = 4;

/// The deltas (n, out) of `x` (n, in): row r from `factors[r]`'s adapter, zero where None.
pub fn deltas(x: &[f32], factors: &[Option<&Factors>], d_in: usize, d_out: usize) -> Vec<f32> {
    added(x, Start::Zero, factors, d_in, d_out)
}

/// What a row of the result holds before its delta is added.
#[derive(Clone, Copy)]
enum Start<'a> {
    Zero,
    /// Row r is `all[first + r·stride..][..out]`: a linear's output, or a part of a stacked one.
    Rows {
        all: &'a [f32],
        first: usize,
        stride: usize,
    },
}

/// `start` (n, out) plus the deltas of `x` (n, in), each row's in one pass of the thread pool;
/// each task also fills its own rows of the result first (done before on the calling thread
/// alone, it left the pool waiting at every linear of a decoding step).
fn added(
    x: &[f32],
    start: Start,
    factors: &[Option<&Factors>],
    d_in: usize,
    d_out: usize,
) -> Vec<f32> {
    let n = factors.len();
    let mut y: Vec<f32> = Vec::with_capacity(n * d_out);
    y.spare_capacity_mut()
        .par_chunks_mut(ROWS_PER_TASK * d_out.max(1))
        .zip(x.par_chunks(ROWS_PER_TASK * d_in.max(1)))
        .zip(factors.par_chunks(ROWS_PER_TASK))
        .enumerate()
        .for_each(|(t, ((y, x), f))| {
            for (i, row) in y.chunks_mut(d_out).enumerate() {
                match start {
                    Start::Zero => row.fill(MaybeUninit::new(0.0)),
                    Start::Rows { all, first, stride } => {
                        let from = first + (t * ROWS_PER_TASK + i) * stride;
                        for (to, v) in row.iter_mut().zip(&all[from..from + d_out]) {
                            to.write(*v);
                        }
                    }
                }
            }
            // SAFETY: every element of these rows was written just above.
            let y = unsafe { &mut *(y as *mut [MaybeUninit<f32>] as *mut [f32]) };
            rows(x, y, f, d_in, d_out);
        });
    // SAFETY: the tasks wrote all n rows.
    unsafe { y.set_len(n * d_out) };
    y
}

/// (n, in, out) of a routed linear's input `x`, checked against its rows' factors.
fn routed_dims(
    x: &Tensor,
    factors: &[Option<&Factors>],
) -> candle_core::Result<(usize, usize, usize)> {
    let (n, d_in) = x.dims2()?;
    let Some(d_out) = factors.iter().flatten().map(|f| f.out_features).next() else {
        candle_core::bail!("no row of the batch has an adapter on this linear");
    };
    if factors.len() != n {
        candle_core::bail!("{} rows routed, the linear has {n}", factors.len());
    }
    if let Some(f) = factors.iter().flatten().find(|f| f.in_features != d_in) {
        candle_core::bail!(
            "an adapter for {} inputs on a linear with {d_in}",
            f.in_features
        );
    }
    Ok((n, d_in, d_out))
}

/// [`deltas`] on tensors: `x` (n, in) in any float dtype on the CPU, the result in x's dtype.
pub fn deltas_of(x: &Tensor, factors: &[Option<&Factors>]) -> candle_core::Result<Tensor> {
    let (n, d_in, d_out) = routed_dims(x, factors)?;
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let y = {
        let (storage, layout) = x32.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("the per-row adapter kernel runs on the CPU");
        };
        deltas(
            crate::kernels::ops::slice(cpu, layout)?,
            factors,
            d_in,
            d_out,
        )
    };
    Tensor::from_vec(y, (n, d_out), &Device::Cpu)?.to_dtype(x.dtype())
}

/// `base` (n, out), the linear's frozen output, plus [`deltas_of`] `x`: for f32 the deltas
/// are added into a copy of `base` by the kernel itself, not by a separate elementwise op
/// (one on the engine's thread alone, for every linear of every step).
pub fn added_to(
    x: &Tensor,
    base: &Tensor,
    factors: &[Option<&Factors>],
) -> candle_core::Result<Tensor> {
    let (n, d_in, d_out) = routed_dims(x, factors)?;
    if base.dims2()? != (n, d_out) {
        candle_core::bail!("a base output {:?} for {n} rows of {d_out}", base.dims());
    }
    if base.dtype() != DType::F32 || x.dtype() != DType::F32 || !base.device().is_cpu() {
        return base + deltas_of(x, factors)?;
    }
    let x32 = x.contiguous()?;
    let y = {
        let (storage, layout) = x32.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("the per-row adapter kernel runs on the CPU");
        };
        let xs = crate::kernels::ops::slice::<f32>(cpu, layout)?;
        let (base_storage, base_layout) = base.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(all)) = &*base_storage else {
            candle_core::bail!("the per-row adapter kernel adds into f32 rows on the CPU");
        };
        let stride = base_layout.stride();
        if n > 0 && d_out > 1 && stride[1] != 1 {
            drop(base_storage);
            return base + deltas_of(x, factors)?;
        }
        let start = Start::Rows {
            all,
            first: base_layout.start_offset(),
            stride: stride[0],
        };
        added(xs, start, factors, d_in, d_out)
    };
    Tensor::from_vec(y, (n, d_out), &Device::Cpu)
}
