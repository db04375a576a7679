//! Our CUDA kernels (`kernels.cu`), compiled once per process with NVRTC and loaded into a
//! device on first use, and the launches that the custom ops' `cuda_fwd` make. Every launch
//! takes contiguous inputs and writes a fresh output; dtypes are f32, f64 and bf16.

use super::nf4_codes::{dynamic_map, BLOCK, NESTED_BLOCK, NF4};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result};
use std::sync::OnceLock;

/// The name the compiled module is cached under in each device.
const MODULE: &str = "prolora-kernels";

/// Threads per block of every launch (a multiple of the warp size).
const THREADS: u32 = 256;

/// Blocks of a grid-stride launch at most: enough to fill any GPU several times over.
const MAX_BLOCKS: u64 = 1 << 16;

/// The kernel source with the NF4 tables it needs, written from the CPU code's own constants.
fn source() -> String {
    let list = |v: &[f32]| {
        v.iter()
            .map(|x| format!("{x:e}f"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "#define NF4_BLOCK {BLOCK}\n#define NESTED_BLOCK {NESTED_BLOCK}\n\
         __device__ const float NF4[16] = {{{}}};\n\
         __device__ const float DYNAMIC_MAP[256] = {{{}}};\n{}",
        list(&NF4),
        list(&dynamic_map()),
        include_str!("kernels.cu")
    )
}

/// PTX of the kernels, compiled on first use (a few hundred ms) and kept for the process.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let compiled = PTX.get_or_init(|| {
        let opts = nvrtc::CompileOptions {
            name: Some("prolora_kernels.cu".into()),
            ..Default::default()
        };
        nvrtc::compile_ptx_with_opts(source(), opts)
            .map(|ptx| ptx.to_src())
            .map_err(|e| format!("{e:?}"))
    });
    match compiled {
        Ok(ptx) => Ok(ptx),
        Err(e) => bail!("compiling prolora's CUDA kernels with NVRTC failed: {e}"),
    }
}

/// The kernel `{name}_{dtype}` on `dev`.
fn kernel(
    dev: &CudaDevice,
    name: &str,
    dtype: DType,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaFunction> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::BF16 => "bf16",
        other => bail!("{name}: {other:?} is not supported on CUDA (use bf16, f32 or f64)"),
    };
    let f = dev.get_or_load_custom_func(&format!("{name}_{suffix}"), MODULE, ptx()?)?;
    Ok(f.into_cuda_function())
}

/// The contiguous data of a tensor argument.
fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, op: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// One block per row.
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride loop over `n` items.
fn per_item(n: usize) -> LaunchConfig {
    let blocks = (n as u64).div_ceil(THREADS as u64).clamp(1, MAX_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Runs `$body` with `$t` bound to the element type of a CUDA float dtype.
macro_rules! per_cuda_dtype {
    ($dtype:expr, $op:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => bail!(
                "{}: {other:?} is not supported on CUDA (use bf16, f32 or f64)",
                $op
            ),
        }
    };
}

fn wrap<T: CudaDType>(out: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(out, dev.clone())
}

/// RMSNorm of the rows of `x` with weight `w` (the row width).
pub fn rms_norm(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    eps: f64,
) -> Result<CudaStorage> {
    let dev = x.device();
    let d = wl.shape().elem_count();
    let rows = xl.shape().elem_count() / d.max(1);
    per_cuda_dtype!(x.dtype(), "rms-norm", T => {
        let (xv, wv) = (view::<T>(x, xl, "rms-norm")?, view::<T>(w, wl, "rms-norm")?);
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(rows * d)? };
        let f = kernel(dev, "rms_norm", x.dtype())?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let d = d as i32;
        b.arg(&xv).arg(&wv).arg(&y).arg(&d).arg(&eps);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { b.launch(per_row(rows)) }.w()?;
        Ok(wrap(y, dev))
    })
}

/// ∂x of RMSNorm from `x`, `w` and the upstream gradient `dy`.
pub fn rms_norm_grad(
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    (dy, dyl): (&CudaStorage, &Layout),
    eps: f64,
) -> Result<CudaStorage> {
    let dev = x.device();
    let d = wl.shape().elem_count();
    let rows = xl.shape().elem_count() / d.max(1);
    per_cuda_dtype!(x.dtype(), "rms-norm-grad", T => {
        let op = "rms-norm-grad";
        let (xv, wv, gv) = (view::<T>(x, xl, op)?, view::<T>(w, wl, op)?, view::<T>(dy, dyl, op)?);
        // SAFETY: every element is written by the kernel.
        let dx = unsafe { dev.alloc::<T>(rows * d)? };
        let f = kernel(dev, "rms_norm_grad", x.dtype())?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let d = d as i32;
        b.arg(&xv).arg(&wv).arg(&gv).arg(&dx).arg(&d).arg(&eps);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { b.launch(per_row(rows)) }.w()?;
        Ok(wrap(dx, dev))
    })
}

/// Causal softmax of `scale` times attention scores (…, t, t), over the last axis.
pub fn causal_softmax(x: &CudaStorage, xl: &Layout, scale: f64) -> Result<CudaStorage> {
    let dev = x.device();
    let t = *xl.dims().last().unwrap_or(&1);
    let rows = xl.shape().elem_count() / t.max(1);
    per_cuda_dtype!(x.dtype(), "causal-softmax", T => {
        let xv = view::<T>(x, xl, "causal-softmax")?;
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(rows * t)? };
        let f = kernel(dev, "causal_softmax", x.dtype())?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let t = t as i32;
        b.arg(&xv).arg(&y).arg(&t).arg(&scale);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { b.launch(per_row(rows)) }.w()?;
        Ok(wrap(y, dev))
    })
}

/// ∂x of a scaled softmax from its output `y` and the upstream gradient `dy`.
pub fn softmax_grad(
    y: &CudaStorage,
    yl: &Layout,
    dy: &CudaStorage,
    dyl: &Layout,
    scale: f64,
) -> Result<CudaStorage> {
    let dev = y.device();
    let t = *yl.dims().last().unwrap_or(&1);
    let rows = yl.shape().elem_count() / t.max(1);
    per_cuda_dtype!(y.dtype(), "softmax-grad", T => {
        let (yv, gv) = (view::<T>(y, yl, "softmax-grad")?, view::<T>(dy, dyl, "softmax-grad")?);
        // SAFETY: every element is written by the kernel.
        let dx = unsafe { dev.alloc::<T>(rows * t)? };
        let f = kernel(dev, "softmax_grad", y.dtype())?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let t = t as i32;
        b.arg(&yv).arg(&gv).arg(&dx).arg(&t).arg(&scale);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { b.launch(per_row(rows)) }.w()?;
        Ok(wrap(dx, dev))
    })
}

/// `x · mask` with element i dropped when `element_hash(seed, i) < threshold`, else scaled.
pub fn dropout(
    x: &CudaStorage,
    xl: &Layout,
    seed: u64,
    threshold: u32,
    scale: f32,
) -> Result<CudaStorage> {
    let dev = x.device();
    let n = xl.shape().elem_count();
    per_cuda_dtype!(x.dtype(), "dropout", T => {
        let xv = view::<T>(x, xl, "dropout")?;
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(n)? };
        let f = kernel(dev, "dropout", x.dtype())?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let n64 = n as u64;
        let scale = <T as candle_core::WithDType>::from_f64(scale as f64);
        b.arg(&xv).arg(&y).arg(&n64).arg(&seed).arg(&threshold).arg(&scale);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { b.launch(per_item(n)) }.w()?;
        Ok(wrap(y, dev))
    })
}

/// NF4 codes resident on a CUDA device.
pub struct DeviceNf4<'a> {
    pub packed: CudaView<'a, u8>,
    /// Double-quantized scales' codes; `None` when `scales` are the plain block scales.
    pub absmax_codes: Option<CudaView<'a, u8>>,
    pub scales: CudaView<'a, f32>,
    pub offset: f32,
    pub elems: usize,
}

/// The dequantized weight in `dtype`, a temporary for one GEMM.
pub fn nf4_dequantize(dev: &CudaDevice, q: &DeviceNf4, dtype: DType) -> Result<CudaStorage> {
    per_cuda_dtype!(dtype, "nf4-dequantize", T => {
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(q.elems)? };
        let f = kernel(dev, "nf4_dequantize", dtype)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let n = q.elems as u64;
        let null = 0u64;
        b.arg(&q.packed);
        match &q.absmax_codes {
            Some(codes) => b.arg(codes),
            None => b.arg(&null),
        };
        b.arg(&q.scales).arg(&q.offset).arg(&out).arg(&n);
        // SAFETY: the arguments match the kernel's signature (a null pointer is 8 zero bytes).
        unsafe { b.launch(per_item(q.elems.div_ceil(2))) }.w()?;
        Ok(wrap(out, dev))
    })
}

/// A scalar f32 (or f64, for f64 inputs) on `dev`.
pub fn scalar(dev: &CudaDevice, value: f64, dtype: DType) -> Result<CudaStorage> {
    Ok(match dtype {
        DType::F64 => wrap(dev.clone_htod(&[value][..])?, dev),
        _ => wrap(dev.clone_htod(&[value as f32][..])?, dev),
    })
}

/// Bytes of device memory in use at most since the process started (the stream-ordered
/// allocator's high-water mark), or `None` where the driver does not report it.
pub fn peak_memory_bytes(dev: &CudaDevice) -> Option<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().ok()?;
    let mut pool = std::ptr::null_mut();
    let mut high: u64 = 0;
    // SAFETY: plain queries of the device's default memory pool into locals.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) != sys::CUresult::CUDA_SUCCESS
        {
            return None;
        }
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        if sys::cuMemPoolGetAttribute(pool, attr, &mut high as *mut u64 as *mut _)
            != sys::CUresult::CUDA_SUCCESS
        {
            return None;
        }
    }
    Some(high)
}

/// Bytes of device memory free now, or `None` where the driver does not say.
pub fn free_memory_bytes(dev: &CudaDevice) -> Option<u64> {
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread().ok()?;
    let (free, _total) = candle_core::cuda_backend::cudarc::driver::result::mem_get_info().ok()?;
    Some(free as u64)
}

#[cfg(test)]
mod tests {
    /// NVRTC runs on the host: the kernels must compile on any machine with the CUDA libraries,
    /// GPU or not (`cargo test --features cuda`).
    #[test]
    fn kernels_compile_with_nvrtc() {
        let ptx = super::ptx().unwrap();
        for kernel in [
            "rms_norm",
            "rms_norm_grad",
            "causal_softmax",
            "softmax_grad",
            "dropout",
            "nf4_dequantize",
        ] {
            for dtype in ["f32", "f64", "bf16"] {
                let entry = format!(".entry {kernel}_{dtype}(");
                assert!(ptx.contains(&entry), "{entry} missing from the PTX");
            }
        }
    }
}
