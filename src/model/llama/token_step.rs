//! One sequence's decoding step of one token on the CPU, layer by layer in plain buffers. The
//! composed step wraps every op's few hundred values in a tensor (shapes, layouts, reference
//! counts, the op's bookkeeping), narrows, reshapes and copies around each product, and
//! checks each linear for an adapter: on a quantized SmolLM2 a quarter of the step went to the
//! caller's work between the parallel loops, while the other core and the memory idled. Here
//! the same kernels run on the values themselves, in the same order, so the step's bits are
//! the composed step's (tests below); only the cache and the attention over it keep their
//! tensors.

use super::{Block, Llama, GROUPS};
use crate::ctx::Ctx;
use crate::kernels::decode_ops::cached_attention;
use crate::kernels::heads::{split_row, Rope};
use crate::kernels::ops::{rms_norm_values, silu_mul_values};
use crate::model::frozen::FrozenLinear;
use crate::model::kv_cache::KvCache;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

impl Llama {
    /// [`Llama::hidden_cached`] of one token `ids` (1, 1) after `cache`, in plain buffers, or
    /// None where the step is not one sequence's one token on the CPU with f32 activations and
    /// no adapter (the composed step takes it).
    pub(super) fn token_step(
        &self,
        ids: &Tensor,
        ctx: &Ctx,
        cache: &mut KvCache,
    ) -> Result<Option<Tensor>> {
        let plain = self
            .blocks
            .iter()
            .all(|b| b.linears.iter().all(|l| l.adapter.is_none()));
        if ids.dims() != [1, 1]
            || !self.device.is_cpu()
            || self.activations() != DType::F32
            || ctx.is_training()
            || cache.is_ragged()
            || !plain
        {
            return Ok(None);
        }
        let pos = cache.len();
        let rope = Rope::new(&self.angles(pos..pos + 1), 1, DType::F32, &self.device)?;
        let mut x: Vec<f32> = self
            .embed(ids)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        for (l, block) in self.blocks.iter().enumerate() {
            self.token_layer(l, block, &mut x, &rope, cache)?;
        }
        let h = rms_norm_values(&x, &values(&self.norm)?, self.cfg.rms_norm_eps);
        Tensor::from_vec(h, (1, 1, self.cfg.hidden_size), &self.device).map(Some)
    }

    /// Layer `l` on the hidden state `x` (d), which it updates, appending its key and value
    /// to `cache`: `Llama::block_cached`'s ops one after another.
    fn token_layer(
        &self,
        l: usize,
        block: &Block,
        x: &mut [f32],
        rope: &Rope,
        cache: &mut KvCache,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let eps = cfg.rms_norm_eps;

        block.read_ahead(0);
        let h = rms_norm_values(x, &values(&block.input_norm)?, eps);
        let qkv = product(&block.bases[0], h)?;
        block.read_ahead(1);
        let (q, kv) = qkv.split_at(nh * hd);
        let (k, v) = kv.split_at(nkv * hd);
        let q = Tensor::from_vec(split_row(q, nh, rope), (1, nh, 1, hd), &self.device)?;
        let k = Tensor::from_vec(split_row(k, nkv, rope), (1, nkv, 1, hd), &self.device)?;
        let v = Tensor::from_slice(v, (1, nkv, 1, hd), &self.device)?;
        let (k, v) = cache.append(l, k, v)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let Some(heads) = cached_attention(&q, &k, &v, cache.pads(), scale)? else {
            candle_core::bail!("decoding step: the cache is not f32 on the CPU");
        };
        // (1, heads, 1, hd) holds the merged heads' order already.
        add(
            x,
            &product(&block.bases[1], heads.flatten_all()?.to_vec1()?)?,
        );
        block.read_ahead(2);

        let h = rms_norm_values(x, &values(&block.post_attention_norm)?, eps);
        let gate_up = product(&block.bases[2], h)?;
        block.read_ahead(3);
        let (gate, up) = gate_up.split_at(block.linears[GROUPS[2].start].out);
        add(x, &product(&block.bases[3], silu_mul_values(gate, up))?);
        Ok(())
    }
}

/// The frozen product of the row `x`, as the layer's own op computes it.
fn product(base: &FrozenLinear, x: Vec<f32>) -> Result<Vec<f32>> {
    let layout = Layout::contiguous((1, x.len()));
    match base.cpu_product(&CpuStorage::F32(x), &layout, false)? {
        (CpuStorage::F32(y), _) => Ok(y),
        (other, _) => candle_core::bail!(
            "decoding step: a frozen product gave {:?}, not f32",
            other.dtype()
        ),
    }
}

/// A norm's weight in f32 (a bf16 model's widened, as its composed step widens it).
fn values(w: &Tensor) -> Result<Vec<f32>> {
    w.to_dtype(DType::F32)?.to_vec1()
}

/// `x += y`, as the composed step's residual sums.
fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use crate::ctx::Ctx;
    use crate::model::nf4::Quantization;
    use crate::model::preset;
    use crate::model::weights::RandomWeights;
    use crate::model::Llama;
    use candle_core::{DType, Device, Tensor};

    /// Decoding a token at a time in plain buffers gives the composed step's hidden states
    /// bit for bit, for f32, bf16 and NF4 weights, on a team as `prolora generate` runs it,
    /// from a prefilled prompt on.
    #[test]
    fn token_steps_equal_the_composed_steps() {
        let cases = [
            (DType::F32, Quantization::None),
            (DType::BF16, Quantization::None),
            (DType::F32, Quantization::Nf4 { double_quant: true }),
        ];
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap()
            .install(|| {
                for (dtype, quant) in cases {
                    let cfg = preset::preset("tiny").unwrap();
                    let model = Llama::load_quantized(
                        &cfg,
                        &RandomWeights::new(7),
                        dtype,
                        quant,
                        &Device::Cpu,
                    )
                    .unwrap();
                    let ctx = Ctx::eval();
                    let prompt: &[u32] = &[5, 17, 3, 250, 9];
                    let (_, mut plain) = model.prefill(&[prompt], &ctx).unwrap();
                    let (_, mut composed) = model.prefill(&[prompt], &ctx).unwrap();
                    for (i, token) in [11u32, 42, 7, 300, 1].into_iter().enumerate() {
                        let ids = Tensor::new(&[[token]], &Device::Cpu).unwrap();
                        let a = crate::kernels::team::run(|| {
                            model.token_step(&ids, &ctx, &mut plain).unwrap()
                        })
                        .expect("the step is one token with no adapter");
                        let b = crate::kernels::team::run(|| {
                            model
                                .hidden_cached_packed(&ids, &ctx, &mut composed, None)
                                .unwrap()
                        });
                        let bits = |t: &Tensor| -> Vec<u32> {
                            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                            v.into_iter().map(f32::to_bits).collect()
                        };
                        assert_eq!(bits(&a), bits(&b), "{dtype:?} {quant:?}, step {i}");
                    }
                }
            });
    }
}
