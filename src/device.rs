//! The compute device of a command: `auto` (a CUDA GPU when this binary was built with CUDA and
//! one is present, else the CPU), `cpu`, `cuda` or `cuda:N`; and what to tell the user when the
//! GPU runs out of memory.

use crate::choice::named_enum;
use anyhow::Result;
use candle_core::{DType, Device};

/// Where a command computes (`device`, `--device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// A CUDA GPU when this binary has CUDA and the driver finds one, else the CPU.
    Auto,
    Cpu,
    /// GPU `N` (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(Self::Cuda(ordinal)),
                _ => Err(format!(
                    "unknown device {other:?} (use auto, cpu, cuda or cuda:N)"
                )),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        s.parse().map_err(<D::Error as serde::de::Error>::custom)
    }
}

named_enum! {
/// The compute dtype of the frozen base (`model.dtype`, `--dtype`).
pub enum ComputeDtype {
    /// bf16 on a GPU (the paper's), f32 on the CPU (its fast path).
    Auto = "auto",
    F32 = "f32",
    Bf16 = "bf16",
    F16 = "f16",
    F64 = "f64",
}
}

impl ComputeDtype {
    /// The dtype on `device`.
    pub fn on(self, device: &Device) -> DType {
        match self {
            Self::Auto if device.is_cpu() => DType::F32,
            Self::Auto | Self::Bf16 => DType::BF16,
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::F64 => DType::F64,
        }
    }
}

/// The device `spec` names.
pub fn open(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        // A CUDA build on a machine whose driver finds no GPU falls back to the CPU.
        DeviceSpec::Auto => Ok(cuda(0).unwrap_or(Device::Cpu)),
        DeviceSpec::Cuda(ordinal) => cuda(ordinal),
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
    anyhow::bail!(
        "this prolora was built without CUDA; rebuild with `cargo build --release --features cuda` \
         (scripts/cuda-build.sh does it on a machine without a CUDA toolkit), or use --device cpu"
    )
}

/// GPUs the driver sees (0 in a build without CUDA).
pub fn gpu_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::result;
        if result::init().is_ok() {
            return result::device::get_count().map_or(0, |n| n.max(0) as usize);
        }
    }
    0
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
            crate::kernels::cuda::peak_memory_bytes(d).map(|b| b as f64 / (1u64 << 20) as f64)
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
