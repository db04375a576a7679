//! The numerical kernels of the training path: fused CPU passes with their own backwards (and
//! CUDA forms, in `cuda/`, where one exists), each equal to the composed candle ops it replaces. Nothing
//! here knows about models or adapters.

pub mod attention;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod decode_ops;
pub mod dropout;
pub mod heads;
pub mod low_rank;
pub mod nf4_codes;
pub mod ops;
pub mod quant_dot8;
pub mod quant_gemv;
pub mod skinny;
pub mod team;
pub mod tile_dequant;
pub(crate) mod vecmath;
