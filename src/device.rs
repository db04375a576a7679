//! The compute device of a command: `auto` (a CUDA GPU when this binary was built with CUDA and
//! one is present, else the CPU), `cpu`, `cuda` or `cuda:N`; and what to tell the user when the
//! GPU runs out of memory.

use anyhow::{bail, Result};
use candle_core::Device;

/// The device `spec` names.
pub fn open(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        // A CUDA build on a machine whose driver finds no GPU falls back to the CPU.
        "auto" => Ok(cuda(0).unwrap_or(Device::Cpu)),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda(ordinal),
            _ => bail!("unknown device {other:?} (use auto, cpu, cuda or cuda:N)"),
        },
    }
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| {
        // The driver's error, without the backtrace candle attaches to it.
        let e = e.to_string();
        let cause = e.lines().next().unwrap_or_default();
        anyhow::anyhow!(
            "device cuda:{ordinal}: no usable GPU ({cause}); check that `nvidia-smi` lists it, \
             or use --device cpu"
        )
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda(_ordinal: usize) -> Result<Device> {
    bail!(
        "this prolora was built without CUDA; rebuild with `cargo build --release --features cuda` \
         (scripts/cuda-build.sh does it on a machine without a CUDA toolkit), or use --device cpu"
    )
}

/// Short name of the device for logs: `cpu`, or the GPU's name.
pub fn describe(device: &Device) -> String {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .name()
            .unwrap_or_else(|_| "cuda".into()),
        _ => "cpu".into(),
    }
}

/// Peak device memory in MiB since the process started, for a GPU (the CPU's is the RSS).
pub fn peak_memory_mib(device: &Device) -> Option<f64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            crate::cuda::peak_memory_bytes(d).map(|b| b as f64 / (1u64 << 20) as f64)
        }
        _ => None,
    }
}

/// `err` with advice when it is the GPU running out of memory.
pub fn explain(err: anyhow::Error) -> anyhow::Error {
    let text = format!("{err:#}");
    if text.contains("OUT_OF_MEMORY") || text.contains("out of memory") {
        anyhow::anyhow!(
            "the GPU ran out of memory ({text}); reduce train.batch_size or set \
             train.micro_batch_size (gradient accumulation), set \
             train.gradient_checkpointing = true, or shorten data.max_seq_len"
        )
    } else {
        err
    }
}
