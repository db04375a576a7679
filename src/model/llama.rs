//! The LLaMA decoder, written for training: every op in the path has a backward, frozen
//! weights take no gradient, and adapters plug into the seven linears of each block.
//!
//! Matches transformers' `LlamaForCausalLM` (eager attention): RMSNorm, RoPE (rotate-half),
//! grouped-query attention with a causal mask, SwiGLU MLP, tied or untied head.

use super::config::{linear_path, LlamaConfig, BLOCK_LINEARS};
use super::frozen::FrozenLinear;
use super::huge_pages;
use super::kv_cache::KvCache;
use super::lora_linear::{self, PlainLora};
use super::nf4::Quantization;
use super::packing::{pack, unpack, Packing};
use super::weights::WeightSource;
use crate::ctx::Ctx;
use crate::kernels::attention::{causal_attention, Sequences};
use crate::kernels::decode_ops::cached_attention;
use crate::kernels::heads::{merge_heads, split_heads, Rope};
use crate::kernels::ops::{causal_attention_probs, rms_norm, silu_mul_op};
use crate::kernels::team;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::ops::Range;
use std::rc::Rc;

mod token_step;

/// What an adapter adds to a frozen linear's output.
pub trait Delta {
    /// The addition for input rows `x` (n, in) → (n, out).
    fn delta(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor>;

    /// [`Self::delta`], or None where it is zero for every row (a server's batch in which no
    /// row uses an adapter on this linear): the linear then adds nothing.
    fn delta_if_any(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Option<Tensor>> {
        self.delta(x, ctx).map(Some)
    }

    /// `y`, the linear's frozen output for `x`, plus [`Self::delta_if_any`]: an adapter that
    /// adds its delta into `y` itself (a server's per-row kernel) saves the separate add.
    fn added_to(&self, x: &Tensor, y: Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        Ok(match self.delta_if_any(x, ctx)? {
            Some(delta) => (y + delta)?,
            None => y,
        })
    }

    /// The factors where, under `ctx`, [`Self::delta`] is exactly `scaling · (dropout(x) Aᵀ)
    /// Bᵀ` with dropout drawn from `ctx` as `Ctx::dropout` draws it, and gradients flow
    /// (training): the linears of one input then compute bases and deltas as one op with its
    /// own backward (`model::lora_linear`).
    fn plain_lora(&self, _ctx: &Ctx) -> Option<PlainLora> {
        None
    }
}

/// The adapter slot of a block linear (its frozen weight is in its [`GROUPS`] stack).
pub struct Linear {
    adapter: Option<Rc<dyn Delta>>,
    /// Output features.
    out: usize,
    /// The model's dtype, the adapter's: inputs in another one (a bf16 model decoding in
    /// f32) reach the adapter converted, and its delta comes back in the input's.
    dtype: DType,
}

impl Linear {
    /// The base product `y` of `x` plus the adapter's delta, as separate ops (the adapter in the
    /// model's dtype where the activations are not: a bf16 model decoding in f32 on the CPU).
    fn delta_added(&self, x: &Tensor, y: Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let Some(adapter) = self.adapter.as_ref() else {
            return Ok(y);
        };
        if x.dtype() == self.dtype {
            return adapter.added_to(x, y, ctx);
        }
        let delta = adapter
            .delta_if_any(&x.to_dtype(self.dtype)?, ctx)?
            .map(|d| d.to_dtype(x.dtype()))
            .transpose()?;
        Ok(match delta {
            Some(delta) => (y + delta)?,
            None => y,
        })
    }
}

/// The block linears that read the same input, as ranges of BLOCK_LINEARS: q, k, v; o; gate,
/// up; down. Each group's frozen weights are stacked into one product.
const GROUPS: [Range<usize>; 4] = [0..3, 3..4, 4..6, 6..7];

/// Refuses attention whose scores cannot fit in the memory left: the CPU allocator aborts the
/// process on a request it cannot meet (a 40,000-word prompt asks for hundreds of GiB), where
/// an error can say what to shorten. `queries` are (b, heads, t, head_dim); the scores and the
/// probabilities made from them exist at once.
fn scores_fit(
    queries: &[usize],
    keys: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<()> {
    let rows: f64 = queries[..queries.len() - 1]
        .iter()
        .map(|&d| d as f64)
        .product();
    let need = 2.0 * rows * keys as f64 * dtype.size_in_bytes() as f64;
    // Ordinary passes need no look at the machine. On a GPU a failed allocation is an error
    // that reaches the user already (and freed memory held for reuse would read as taken).
    if need < (256u64 << 20) as f64 || !device.is_cpu() {
        return Ok(());
    }
    match crate::train::memory::available(device) {
        Some((have, what)) if need > have as f64 => Err(candle_core::Error::Msg(format!(
            "attention over {keys} positions needs about {:.1} GiB at once, {:.1} GiB {what}: shorten the input",
            need / (1u64 << 30) as f64,
            have as f64 / (1u64 << 30) as f64
        ))),
        _ => Ok(()),
    }
}

/// Repeats each key/value head `n` times, as transformers' `repeat_kv`.
fn repeat_kv(x: Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        return Ok(x);
    }
    let (b, kv, t, hd) = x.dims4()?;
    Tensor::cat(&vec![&x; n], 2)?.reshape((b, kv * n, t, hd))
}

/// [`causal_attention`] over the batch's sequences (the packing's, or b rows of t), where it
/// applies: None sends the caller to the composed form.
fn fused_causal_attention(
    qkv: &[Tensor],
    packing: Option<&Packing>,
    (heads, kv_heads, head_dim): (usize, usize, usize),
    rope: &Rope,
) -> candle_core::Result<Option<Tensor>> {
    let spans = match (packing, qkv[0].dims()) {
        (Some(p), _) => p.sequences(),
        (None, &[b, t, _]) => Some((0..b).map(|i| (i * t, t)).collect()),
        _ => None,
    };
    let Some(spans) = spans else {
        return Ok(None);
    };
    let seqs = Sequences {
        heads,
        kv_heads,
        head_dim,
        spans,
    };
    let scale = 1.0 / (head_dim as f64).sqrt();
    causal_attention(&qkv[0], &qkv[1], &qkv[2], &seqs, rope, scale)
}

pub struct Block {
    input_norm: Tensor,
    post_attention_norm: Tensor,
    /// The seven linears' adapters in BLOCK_LINEARS order.
    linears: Vec<Linear>,
    /// The frozen weights of each of [`GROUPS`], stacked.
    bases: Vec<FrozenLinear>,
}

impl Block {
    /// The outputs of the linears of group `g` (…, out) for their input `x` (…, in). Rows are
    /// flattened first so that the adapters' products are single 2-D GEMMs (and their
    /// gradients single GEMMs, not per-batch ones summed).
    fn project(&self, g: usize, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Vec<Tensor>> {
        let members = &self.linears[GROUPS[g].clone()];
        let base = &self.bases[g];
        let dims = x.dims().to_vec();
        let x = x.flatten_to(dims.len().saturating_sub(2))?;
        let outs: Vec<usize> = members.iter().map(|m| m.out).collect();
        let loras: Vec<Option<PlainLora>> = members
            .iter()
            .map(|m| m.adapter.as_ref().and_then(|a| a.plain_lora(ctx)))
            .collect();
        let all_plain = members
            .iter()
            .zip(&loras)
            .all(|(m, l)| m.adapter.is_none() || l.is_some());
        let split = |y: Tensor| -> candle_core::Result<Vec<Tensor>> {
            if outs.len() == 1 {
                return Ok(vec![y]);
            }
            let mut first = 0;
            outs.iter()
                .map(|&o| {
                    first += o;
                    y.narrow(1, first - o, o)
                })
                .collect()
        };
        let cpu_training = ctx.is_training() && lora_linear::supported(&x, &loras);
        let ys = if cpu_training && all_plain {
            lora_linear::forward(base, &outs, &loras, &x, ctx)?
        } else {
            let ys = match cpu_training && outs.len() > 1 {
                // Other methods: the frozen products as the group's parts (narrowed views
                // would get gradients candle pads with zeros), their deltas added after.
                true => {
                    let none: Vec<Option<PlainLora>> = outs.iter().map(|_| None).collect();
                    lora_linear::forward(base, &outs, &none, &x, ctx)?
                }
                false => split(base.forward(&x)?)?,
            };
            members
                .iter()
                .zip(ys)
                .map(|(m, y)| m.delta_added(&x, y, ctx))
                .collect::<candle_core::Result<_>>()?
        };
        ys.into_iter()
            .zip(outs)
            .map(|(y, o)| {
                let mut dims = dims.clone();
                *dims.last_mut().expect("x has at least one dim") = o;
                y.reshape(dims)
            })
            .collect()
    }

    /// [`Self::project`] of a group of one linear.
    fn project_one(&self, g: usize, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        Ok(self.project(g, x, ctx)?.remove(0))
    }

    /// Tells a decoding step's idle threads that group `g`'s product comes next
    /// ([`team::prefetch`]).
    fn read_ahead(&self, g: usize) {
        if !team::in_step() {
            return;
        }
        let mut codes = Vec::new();
        self.bases[g].host_codes(&mut codes);
        team::prefetch(&codes);
    }
}

/// Rotary tables for one sequence length.
pub struct Llama {
    pub cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: FrozenLinear,
    /// The tied head as the source stores it, where a decoding step's few rows read it in
    /// place (see [`WeightSource::get_decode_blocks`]).
    decode_head: Option<FrozenLinear>,
    inv_freq: Vec<f64>,
    dtype: DType,
    device: Device,
}

impl Llama {
    /// Builds the model from `weights` (names as in transformers' checkpoints), in `dtype`.
    pub fn load(
        cfg: &LlamaConfig,
        weights: &dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_quantized(cfg, weights, dtype, Quantization::None, device)
    }

    /// As [`Llama::load`], with the block linears stored as `quant` says (each one quantized as
    /// soon as it is read, so the full-precision model never exists); `dtype` is the compute
    /// dtype. Embeddings, norms and the head stay in `dtype`, as in the reference.
    pub fn load_quantized(
        cfg: &LlamaConfig,
        weights: &dyn WeightSource,
        dtype: DType,
        quant: Quantization,
        device: &Device,
    ) -> Result<Self> {
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        let embed = weights.get("model.embed_tokens.weight", &[v, d], dtype, device)?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let input_norm =
                weights.get(&format!("{p}.input_layernorm.weight"), &[d], dtype, device)?;
            let post_attention_norm = weights.get(
                &format!("{p}.post_attention_layernorm.weight"),
                &[d],
                dtype,
                device,
            )?;
            let mut linears = Vec::with_capacity(BLOCK_LINEARS.len());
            let mut bases = Vec::with_capacity(GROUPS.len());
            for group in GROUPS {
                let mut parts = Vec::with_capacity(group.len());
                for m in &BLOCK_LINEARS[group] {
                    let (o, i) = cfg.linear_shape(m).expect("a block linear");
                    let name = format!("{p}.{}.weight", linear_path(m));
                    parts.push(match quant {
                        Quantization::None => weights.get_linear(&name, &[o, i], dtype, device)?,
                        Quantization::Nf4 { double_quant } => FrozenLinear::nf4(
                            weights.get_nf4(&name, &[o, i], double_quant)?,
                            device,
                        )?,
                    });
                    linears.push(Linear {
                        adapter: None,
                        out: o,
                        dtype,
                    });
                }
                bases.push(FrozenLinear::stack(parts)?);
            }
            blocks.push(Block {
                input_norm,
                post_attention_norm,
                linears,
                bases,
            });
        }
        let norm = weights.get("model.norm.weight", &[d], dtype, device)?;
        let tied = cfg.tie_word_embeddings && !weights.contains("lm_head.weight");
        let decode_head = match tied {
            true => weights.get_decode_blocks("model.embed_tokens.weight", &[v, d], device)?,
            false => None,
        };
        let lm_head = if tied {
            FrozenLinear::new(embed.clone())
        } else {
            FrozenLinear::new(weights.get("lm_head.weight", &[v, d], dtype, device)?)
        };
        // Every weight is written now: the quantized ones and the head onto 2 MiB pages
        // (decoding streams them once a token; 1–12 % off a SmolLM2 step, the f32 head being
        // 70 % of what an NF4 model reads: docs/performance.md).
        for w in blocks.iter().flat_map(|b| &b.bases) {
            w.collapse_codes();
        }
        match (&decode_head, lm_head.dense_weight()) {
            (Some(head), _) => head.collapse_codes(),
            // Tied: the embedding itself.
            (None, Some(head)) => huge_pages::collapse_tensor(head),
            (None, None) => {}
        }
        Ok(Self {
            inv_freq: cfg.rope_inv_freq(),
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            decode_head,
            dtype,
            device: device.clone(),
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Gives every block linear the adapter `adapter_of(layer, module)` returns (or none).
    pub fn attach(&mut self, adapter_of: impl Fn(usize, &str) -> Option<Rc<dyn Delta>>) {
        for (l, block) in self.blocks.iter_mut().enumerate() {
            for (m, lin) in BLOCK_LINEARS.iter().zip(block.linears.iter_mut()) {
                lin.adapter = adapter_of(l, m);
            }
        }
    }

    /// Rotary tables for positions 0..t.
    pub fn rope(&self, t: usize) -> candle_core::Result<Rope> {
        self.rope_from(0, t)
    }

    /// Rotary tables for positions start..start + t.
    fn rope_from(&self, start: usize, t: usize) -> candle_core::Result<Rope> {
        Rope::new(&self.angles(start..start + t), t, self.dtype, &self.device)
    }

    /// The rotary angles (t, hd/2) of `t` positions.
    fn angles(&self, positions: impl Iterator<Item = usize>) -> Vec<f64> {
        positions
            .flat_map(|pos| self.inv_freq.iter().map(move |f| pos as f64 * f))
            .collect()
    }

    /// Token embeddings of `ids` (b, t) → (b, t, d).
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))
    }

    /// Decoder layers.
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// One decoder block: (b, t, d) → (b, t, d), or with a `packing` its real rows (n, d) →
    /// (n, d); `ctx` is the layer's own (`Ctx::for_layer`).
    pub fn block(
        &self,
        l: usize,
        x: &Tensor,
        rope: &Rope,
        ctx: &Ctx,
        packing: Option<&Packing>,
    ) -> candle_core::Result<Tensor> {
        self.block_cached(l, x, rope, ctx, None, packing)
    }

    /// [`Self::block`] for positions that follow those in `cache` (whose keys and values this
    /// layer attends to as well, and to which it appends its own), under the cache's additive
    /// `mask` when it has one (padding, or several new positions after cached ones). With a
    /// `packing` (training only) `x` holds the real rows alone and attention alone unpacks them.
    /// Layer `l`'s attention in composed ops (and over the cache when decoding): its q, k, v
    /// projections `qkv` to the output heads merged, packed as the layer's rows are.
    fn attention(
        &self,
        l: usize,
        qkv: &[Tensor],
        rope: &Rope,
        ctx: &Ctx,
        cache: Option<(&mut KvCache, Option<&Tensor>)>,
        packing: Option<&Packing>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let heads = |y: &Tensor, n: usize, rope: Option<&Rope>| {
            split_heads(&unpack(packing, y.clone())?, n, rope)
        };
        let q = heads(&qkv[0], nh, Some(rope))?;
        let k = heads(&qkv[1], nkv, Some(rope))?;
        let v = heads(&qkv[2], nkv, None)?;
        // `cached`: None in training and full forwards; Some(mask) when decoding from a cache.
        let (k, v, cached, pads) = match cache {
            // The cached paths' softmax and fused attention have no backward: a gradient
            // through them would vanish silently.
            Some(_) if ctx.is_training() => {
                candle_core::bail!(
                    "attention over a KV cache is for decoding; training runs without one"
                )
            }
            Some((cache, mask)) => {
                let (k, v) = cache.append(l, k, v)?;
                let cache: &KvCache = cache;
                (k, v, Some(mask), cache.pads())
            }
            None => (k, v, None, &[][..]),
        };
        let scale = 1.0 / (hd as f64).sqrt();
        // A decoding step's few positions on the CPU: one fused pass over the cache in place.
        let fused = match cached {
            Some(_) => cached_attention(&q, &k, &v, pads, scale)?,
            None => None,
        };
        let heads_out = match fused {
            Some(out) => out,
            None => {
                let past = k.dim(2)? - q.dim(2)?;
                let k = repeat_kv(k, nh / nkv)?;
                let v = repeat_kv(v, nh / nkv)?;

                scores_fit(q.dims(), k.dim(2)?, q.dtype(), q.device())?;
                let scores = q.matmul(&k.t()?)?;
                let probs = match cached {
                    // Every query from position 0: the causal op (with its backward, for
                    // training).
                    None | Some(None) if past == 0 => causal_attention_probs(&scores, scale)?,
                    // Decoding only (candle's fused softmax has no backward, and no gradient
                    // flows here): one new position that sees every cached key, or the
                    // cache's mask.
                    Some(None) => candle_nn::ops::softmax_last_dim(&(scores * scale)?)?,
                    Some(Some(mask)) => {
                        candle_nn::ops::softmax_last_dim(&(scores * scale)?.broadcast_add(mask)?)?
                    }
                    None => {
                        candle_core::bail!("attention after {past} positions needs a cache")
                    }
                };
                probs.matmul(&v)?
            }
        };
        pack(packing, merge_heads(&heads_out)?)
    }

    fn block_cached(
        &self,
        l: usize,
        x: &Tensor,
        rope: &Rope,
        ctx: &Ctx,
        cache: Option<(&mut KvCache, Option<&Tensor>)>,
        packing: Option<&Packing>,
    ) -> candle_core::Result<Tensor> {
        let block = &self.blocks[l];
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );

        // A bf16 model decoding on the CPU has f32 activations (`Self::activations`).
        let norm = |w: &Tensor| w.to_dtype(x.dtype());
        block.read_ahead(0);
        let h = rms_norm(x, &norm(&block.input_norm)?, cfg.rms_norm_eps)?;
        let qkv = block.project(0, &h, ctx)?;
        block.read_ahead(1);
        // Without a cache (training, full forwards) on the CPU: the whole attention as one op.
        let fused = match cache {
            None => fused_causal_attention(&qkv, packing, (nh, nkv, hd), rope)?,
            Some(_) => None,
        };
        let attn = match fused {
            Some(attn) => attn,
            None => self.attention(l, &qkv, rope, ctx, cache, packing)?,
        };
        let x = (x + block.project_one(1, &attn, ctx)?)?;
        block.read_ahead(2);

        let h = rms_norm(&x, &norm(&block.post_attention_norm)?, cfg.rms_norm_eps)?;
        let gate_up = block.project(2, &h, ctx)?;
        block.read_ahead(3);
        let mlp = block.project_one(3, &silu_mul_op(&gate_up[0], &gate_up[1])?, ctx)?;
        x + mlp
    }

    /// The final norm: hidden states ready for the head.
    pub fn final_norm(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        rms_norm(x, &self.norm.to_dtype(x.dtype())?, self.cfg.rms_norm_eps)
    }

    /// The dtype a cached (decoding) forward computes in: f32 for a bf16 model on the CPU,
    /// which has no bf16 arithmetic (each bf16 op would widen and narrow every element), with
    /// the linears' bf16 weights widened in registers; the model's dtype elsewhere.
    fn activations(&self) -> DType {
        match self.dtype {
            DType::BF16 if self.device.is_cpu() => DType::F32,
            dtype => dtype,
        }
    }

    /// Normalised hidden states of the last layer, (b, t) ids → (b, t, d).
    pub fn hidden(&self, ids: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        self.hidden_with(ids, None, ctx, |_, x, _| Ok(x))
    }

    /// The forward: embeddings, the decoder layers, the final norm. After each layer `l`,
    /// `after_layer(l, output, input)` decides what the next layer gets (activation
    /// checkpointing detaches it and keeps the input). With a `packing` of `ids`' padding the
    /// layers and the result hold the real rows alone, (n, d).
    pub fn hidden_with(
        &self,
        ids: &Tensor,
        packing: Option<&Packing>,
        ctx: &Ctx,
        mut after_layer: impl FnMut(usize, Tensor, Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let rope = self.rope(t)?;
        let mut x = pack(packing, self.embed(ids)?)?;
        for l in 0..self.blocks.len() {
            let out = self.block(l, &x, &rope, &ctx.for_layer(l), packing)?;
            x = after_layer(l, out, x)?;
        }
        self.final_norm(&x)
    }

    /// [`Self::hidden`] of `ids` (b, t), the positions after those in `cache`, which it
    /// extends: prefill with the prompt, then one position per step. In a ragged cache each row
    /// goes on from its own position and never sees the padding. A bf16 model on the CPU
    /// computes (and returns) f32 here, its cache included (see [`Self::activations`]). One
    /// sequence's one token with no adapter on the CPU runs in plain buffers (`token_step`,
    /// the same bits).
    pub fn hidden_cached(
        &self,
        ids: &Tensor,
        ctx: &Ctx,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        if let Some(hidden) = self.token_step(ids, ctx, cache)? {
            return Ok(hidden);
        }
        self.hidden_cached_packed(ids, ctx, cache, None)
    }

    /// [`Self::hidden_cached`]; with a `packing` of `ids`' padding the layers and the result
    /// hold the real rows alone, (n, d).
    fn hidden_cached_packed(
        &self,
        ids: &Tensor,
        ctx: &Ctx,
        cache: &mut KvCache,
        packing: Option<&Packing>,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let act = self.activations();
        let rope_from =
            |start: usize| Rope::new(&self.angles(start..start + t), t, act, &self.device);
        let (rope, mask) = if cache.is_ragged() {
            let angles = self.angles((0..b).flat_map(|r| cache.positions(r, t)));
            let rope = Rope::per_row(&angles, b, t, act, &self.device)?;
            (rope, Some(cache.mask(b, t, act, &self.device)?))
        } else if cache.is_empty() || t == 1 {
            (rope_from(cache.len())?, None)
        } else {
            let mask = cache.mask(b, t, act, &self.device)?;
            (rope_from(cache.len())?, Some(mask))
        };
        let mut x = pack(packing, self.embed(ids)?.to_dtype(act)?)?;
        for l in 0..self.blocks.len() {
            let layer = Some((&mut *cache, mask.as_ref()));
            x = self.block_cached(l, &x, &rope, &ctx.for_layer(l), layer, packing)?;
        }
        self.final_norm(&x)
    }

    /// Prompts prefilled together, left-padded to the longest: each one's last hidden state
    /// (b, 1, d) and the cache they go on from. Only attention sees the padding (the rest
    /// computes the real tokens alone); the padding positions see only themselves and no prompt
    /// sees them, so each row is the prompt prefilled alone up to summation order.
    pub fn prefill(&self, prompts: &[&[u32]], ctx: &Ctx) -> candle_core::Result<(Tensor, KvCache)> {
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        if longest == 0 || prompts.iter().any(|p| p.is_empty()) {
            candle_core::bail!("prefill needs at least one token in every prompt");
        }
        let pads: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
        let ids: Vec<u32> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(0, longest - p.len()).chain(p.iter().copied()))
            .collect();
        let ids = Tensor::from_vec(ids, (prompts.len(), longest), &self.device)?;
        let packing = Packing::left(&pads, longest, &self.device)?;
        let mut cache = KvCache::with_padding(self.blocks.len(), pads);
        let hidden = self.hidden_cached_packed(&ids, ctx, &mut cache, packing.as_ref())?;
        let last = match packing {
            None => hidden.narrow(1, longest - 1, 1)?,
            Some(_) => {
                let ends: Vec<u32> = prompts
                    .iter()
                    .scan(0, |end, p| {
                        *end += p.len() as u32;
                        Some(*end - 1)
                    })
                    .collect();
                let ends = Tensor::from_vec(ends, prompts.len(), &self.device)?;
                hidden.index_select(&ends, 0)?.unsqueeze(1)?
            }
        };
        Ok((last, cache))
    }

    /// An empty cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.blocks.len())
    }

    /// The vocabulary head's weight (vocab, d) (the embedding when tied).
    pub fn head_weight(&self) -> &Tensor {
        self.lm_head
            .dense_weight()
            .expect("the head stays in full precision")
    }

    /// Vocabulary logits for hidden states (…, d) → (…, vocab).
    pub fn head(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        match &self.decode_head {
            Some(head) if head.fused_for(h) => head.forward(h),
            _ => self.lm_head.forward(h),
        }
    }

    /// Full logits (b, t, vocab), as transformers' forward.
    pub fn logits(&self, ids: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        self.head(&self.hidden(ids, ctx)?)
    }
}
