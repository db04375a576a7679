//! PRoLoRA (Wang et al., 2024), exactly as the authors' `chunkwise_sharing_LoRA.py` expands it
//! (docs/methods.md §2): `A (r × h)` is the shared chunk `A0 (r_s × ceil(h/m))` repeated along the
//! hidden axis, chunk j rolled along the rank axis by −j·sA, truncated to h columns, with the u
//! unshared rows `Au` after the shared ones; `B (o × r)` likewise from `B0` and `Bu` along the
//! output axis. `Δ(x) = α/r · (dropout(x) Aᵀ) Bᵀ` with the full rank r.
//!
//! Ablations are options of this one implementation (see docs/adapters.md):
//! CLoRA (u = 0, no rotation), RoLoRA (u = 0), PRoLoRA⁻ʳ (`rotation = false`), PRoLoRA⁻ⁱ
//! (`rectified_init = false`) and the Table 4 siblings (`share_axis`, `rotate_axis`).

use super::method::{lora_keys_and, Method, PeftKeys, PeftRead, Registration};
use super::{
    adapter_input, uniform_var, Adapter, AdapterConfig, Param, Parts, Role, Served, Target,
};
use crate::ctx::Ctx;
use crate::model::config::BLOCK_LINEARS;
use crate::model::llama::Delta;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::rc::Rc;

pub const REGISTRATION: Registration = Registration {
    kind: "prolora",
    peft_type: "PROLORA",
    from_toml: ProloraConfig::from_toml,
    from_peft: ProloraConfig::from_peft,
    default_targets: &BLOCK_LINEARS,
};

/// An axis of a LoRA factor: the hidden (feature) axis or the rank axis.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Axis {
    Hidden,
    Rank,
}

/// PRoLoRA's two forwards (same math, other summation order).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProloraForward {
    /// Never builds A and B (docs/methods.md §2): pads x to m·cA and works on the chunks.
    /// Slower on CPU (`examples/prolora_forwards.rs`: 3× at h 4096), as the padded copy of x
    /// costs more than gathering A (r × h) and B (o × r).
    Chunked,
    /// Gathers the full A and B, then two matmuls; the default.
    Materialized,
}

/// PRoLoRA's options (`[adapter]` keys with `kind = "prolora"`); the defaults are the paper's
/// method with its 7B setting (u 1, m = n = 7).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProloraConfig {
    /// Unshared rank u (part of the rank).
    pub unshared_rank: usize,
    /// Sharing rate m of A.
    pub sharing_rate_a: usize,
    /// Sharing rate n of B (default m).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sharing_rate_b: Option<usize>,
    /// Rotate the shared chunks (false: CLoRA / PRoLoRA⁻ʳ).
    pub rotation: bool,
    /// Rectified Kaiming init of A0 (false: PRoLoRA⁻ⁱ).
    pub rectified_init: bool,
    /// The axis the chunks are cut along (rank: a Table 4 sibling).
    pub share_axis: Axis,
    /// The axis the chunks are rolled along (hidden: a Table 4 sibling).
    pub rotate_axis: Axis,
    /// `materialized` (faster on CPU) or `chunked`.
    pub forward: ProloraForward,
    /// Learning-rate multiplier of the shared A0, B0.
    pub shared_lr_scale: f64,
    /// Learning-rate multiplier of the unshared Au, Bu.
    pub unshared_lr_scale: f64,
}

impl Default for ProloraConfig {
    fn default() -> Self {
        Self {
            unshared_rank: 1,
            sharing_rate_a: 7,
            sharing_rate_b: None,
            rotation: true,
            rectified_init: true,
            share_axis: Axis::Hidden,
            rotate_axis: Axis::Rank,
            forward: ProloraForward::Materialized,
            shared_lr_scale: 1.0,
            unshared_lr_scale: 1.0,
        }
    }
}

/// The options resolved against the shared rank.
#[derive(Clone, Copy, Debug)]
struct Shape {
    rank: usize,
    unshared: usize,
    rate_a: usize,
    rate_b: usize,
    rotation: bool,
    share_axis: Axis,
    rotate_axis: Axis,
}

impl ProloraConfig {
    /// Sharing rate n of B.
    pub fn rate_b(&self) -> usize {
        self.sharing_rate_b.unwrap_or(self.sharing_rate_a)
    }

    /// From the `[adapter]` keys, with `sharing_rate_b` resolved (absent: `sharing_rate_a`), so
    /// a config reads the same whichever way it spells the default.
    fn from_toml(table: toml::Table) -> std::result::Result<Box<dyn Method>, toml::de::Error> {
        let mut c: Self = table.try_into()?;
        c.sharing_rate_b.get_or_insert(c.sharing_rate_a);
        Ok(Box::new(c))
    }

    fn shape(&self, rank: usize) -> Shape {
        Shape {
            rank,
            unshared: self.unshared_rank,
            rate_a: self.sharing_rate_a,
            rate_b: self.rate_b(),
            rotation: self.rotation,
            share_axis: self.share_axis,
            rotate_axis: self.rotate_axis,
        }
    }

    /// The paper's keys are required; our Table 4 extensions (`share_axis`, `rotate_axis`)
    /// and the switches absent or `null` take the paper's method.
    fn from_peft(keys: &PeftKeys) -> Result<PeftRead> {
        let d = Self::default();
        let rate_a = keys.require("sharing_rate_a")?;
        let method = Self {
            unshared_rank: keys.require("unshared_r")?,
            sharing_rate_a: rate_a,
            sharing_rate_b: Some(keys.require("sharing_rate_b")?),
            rotation: keys.or("rotation", d.rotation)?,
            rectified_init: keys.or("rectified_init", d.rectified_init)?,
            share_axis: keys.or("share_axis", d.share_axis)?,
            rotate_axis: keys.or("rotate_axis", d.rotate_axis)?,
            ..d
        };
        PeftRead::with_lora_keys(keys, Box::new(method))
    }
}

impl Method for ProloraConfig {
    fn registration(&self) -> &'static Registration {
        &REGISTRATION
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        if self.unshared_rank > cfg.rank {
            bail!(
                "adapter.unshared_rank = {} exceeds adapter.rank = {}: the unshared ranks are part of the rank",
                self.unshared_rank,
                cfg.rank
            );
        }
        if self.sharing_rate_a == 0 || self.rate_b() == 0 {
            bail!("adapter.sharing_rate_a and sharing_rate_b must be at least 1 (1 = no sharing)");
        }
        for (key, scale) in [
            ("shared_lr_scale", self.shared_lr_scale),
            ("unshared_lr_scale", self.unshared_lr_scale),
        ] {
            if !(scale > 0.0 && scale.is_finite()) {
                bail!("adapter.{key} must be a positive number");
            }
        }
        Ok(())
    }

    /// Rejects shapes the chunks cannot cover, naming the linear and the key.
    fn check_target(&self, cfg: &AdapterConfig, t: &Target) -> Result<()> {
        let s = self.shape(cfg.rank);
        if s.shared_rank() == 0 {
            return Ok(());
        }
        for (key, rate, axis_len, what) in [
            ("sharing_rate_a", s.rate_a, t.in_features, "input features"),
            (
                "sharing_rate_b",
                s.rate_b,
                t.out_features,
                "output features",
            ),
        ] {
            let (len, what) = match s.share_axis {
                Axis::Hidden => (axis_len, what),
                Axis::Rank => (s.shared_rank(), "shared ranks (rank − unshared_rank)"),
            };
            if rate > len {
                bail!(
                    "adapter.{key} = {rate} exceeds the {len} {what} of {} (layer {}): every chunk needs at least one; lower it",
                    t.module,
                    t.layer
                );
            }
        }
        Ok(())
    }

    /// Per linear: `u·(h + o)` plus the two base chunks (rounded-up chunk sizes).
    fn trainable_count(&self, cfg: &AdapterConfig, targets: &[Target]) -> usize {
        let s = self.shape(cfg.rank);
        let size = |l: Layout| l.base().0 * l.base().1;
        targets
            .iter()
            .map(|t| {
                s.unshared * (t.in_features + t.out_features)
                    + size(s.layout(t.in_features, s.rate_a))
                    + size(s.layout(t.out_features, s.rate_b))
            })
            .sum()
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        targets: &[Target],
        dtype: DType,
        device: &Device,
        rng: &mut StdRng,
    ) -> Result<Parts> {
        let mut adapters = Vec::with_capacity(targets.len());
        for t in targets {
            let p = Prolora::init(self, cfg, t, dtype, device, rng)?;
            adapters.push(Rc::new(p) as Rc<dyn Adapter>);
        }
        Ok(Parts {
            adapters,
            shared: Vec::new(),
        })
    }

    fn peft_keys(&self, cfg: &AdapterConfig) -> Value {
        lora_keys_and(
            cfg,
            json!({
            "unshared_r": self.unshared_rank,
            "sharing_rate_a": self.sharing_rate_a,
            "sharing_rate_b": self.rate_b(),
            "rotation": self.rotation,
            "rectified_init": self.rectified_init,
            "share_axis": self.share_axis,
            "rotate_axis": self.rotate_axis,
            }),
        )
    }
}

impl Shape {
    fn shared_rank(&self) -> usize {
        self.rank - self.unshared
    }

    /// Whether the chunk-wise forward computes this layout (hidden-axis sharing, rotation
    /// along the rank or none).
    fn chunk_wise(&self) -> bool {
        self.share_axis == Axis::Hidden && (self.rotate_axis == Axis::Rank || !self.rotation)
    }

    /// The gather of A (`features` = h) or of Bᵀ (`features` = o).
    fn layout(&self, features: usize, rate: usize) -> Layout {
        Layout {
            ranks: self.shared_rank(),
            features,
            rate,
            share: self.share_axis,
            rotate: self.rotation.then_some(self.rotate_axis),
        }
    }
}

/// How an expanded factor, seen rank-major as (`ranks` × `features`), is gathered from its base
/// chunk: the factor is cut into `rate` chunks along the `share` axis (the last one truncated,
/// whole trailing chunks possibly absent), chunk j being the base rolled along the `rotate`
/// axis by −j·s, with s = max(⌊(base extent along that axis) / rate⌋, 1).
#[derive(Clone, Copy, Debug)]
struct Layout {
    ranks: usize,
    features: usize,
    rate: usize,
    share: Axis,
    rotate: Option<Axis>,
}

impl Layout {
    /// (rank rows, feature columns) of the base chunk.
    fn base(&self) -> (usize, usize) {
        match self.share {
            Axis::Hidden => (self.ranks, self.features.div_ceil(self.rate)),
            Axis::Rank => (self.ranks.div_ceil(self.rate), self.features),
        }
    }

    fn stride(&self) -> usize {
        let (rows, cols) = self.base();
        match self.rotate {
            None => 0,
            Some(Axis::Rank) => (rows / self.rate).max(1),
            Some(Axis::Hidden) => (cols / self.rate).max(1),
        }
    }

    /// The base element (row, col) that element (i, p) of the expanded factor copies.
    fn source(&self, i: usize, p: usize) -> (usize, usize) {
        let (rows, cols) = self.base();
        let s = self.stride();
        let (j, i0, p0) = match self.share {
            Axis::Hidden => (p / cols, i, p % cols),
            Axis::Rank => (i / rows, i % rows, p),
        };
        match self.rotate {
            None => (i0, p0),
            Some(Axis::Rank) => ((i0 + j * s) % rows, p0),
            Some(Axis::Hidden) => (i0, (p0 + j * s) % cols),
        }
    }

    /// Flat indices into the base for the expanded A (ranks × features), base stored rank-major.
    fn a_index(&self) -> Vec<u32> {
        let cols = self.base().1;
        (0..self.ranks)
            .flat_map(|i| (0..self.features).map(move |p| (i, p)))
            .map(|(i, p)| {
                let (r, c) = self.source(i, p);
                (r * cols + c) as u32
            })
            .collect()
    }

    /// Flat indices into the base for the expanded B (features × ranks), base stored
    /// feature-major (as B0 is: (features, ranks)).
    fn b_index(&self) -> Vec<u32> {
        let rows = self.base().0;
        (0..self.features)
            .flat_map(|q| (0..self.ranks).map(move |c| (q, c)))
            .map(|(q, c)| {
                let (r, f) = self.source(c, q);
                (f * rows + r) as u32
            })
            .collect()
    }
}

/// The precomputed gathers of the chunk-wise forward (hidden-axis sharing only).
struct Chunked {
    /// Chunk widths cA, cB.
    ca: usize,
    cb: usize,
    /// (m·r_s, r_s): z (…, m·r_s) times this is Σ_j roll(z_j, −j·sA).
    sum_rolls: Tensor,
    /// (r_s, n·r_s): z_shared times this is the n copies roll(z_shared, +i·sB).
    copies: Tensor,
}

impl Chunked {
    /// The chunk-wise forward's gathers for shape `s`; None where it does not apply (rank
    /// sharing, or rolling along the hidden axis, or no shared rank).
    fn new(
        s: &Shape,
        (la, lb): (Layout, Layout),
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Option<Self>> {
        let r_s = s.shared_rank();
        if !s.chunk_wise() || r_s == 0 {
            return Ok(None);
        }
        let (sa, sb) = (la.stride(), lb.stride());
        let (m, n) = (s.rate_a, s.rate_b);
        // 0/1 matrices: the rolls and the sum over chunks as two tiny GEMMs.
        let mut sum_rolls = vec![0f32; m * r_s * r_s];
        for j in 0..m {
            for i in 0..r_s {
                sum_rolls[(j * r_s + (i + j * sa) % r_s) * r_s + i] = 1.0;
            }
        }
        let mut copies = vec![0f32; r_s * n * r_s];
        for i in 0..n {
            for c in 0..r_s {
                copies[((c + r_s - (i * sb) % r_s) % r_s) * n * r_s + i * r_s + c] = 1.0;
            }
        }
        Ok(Some(Chunked {
            ca: la.base().1,
            cb: lb.base().1,
            sum_rolls: Tensor::from_vec(sum_rolls, (m * r_s, r_s), device)?.to_dtype(dtype)?,
            copies: Tensor::from_vec(copies, (r_s, n * r_s), device)?.to_dtype(dtype)?,
        }))
    }

    fn bytes(&self) -> usize {
        [&self.sum_rolls, &self.copies]
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

pub struct Prolora {
    /// (r_s, cA) or, rank sharing, (ceil(r_s/m), h); None when r_s = 0.
    a0: Option<Var>,
    /// (cB, r_s) or (o, ceil(r_s/n)); None when r_s = 0.
    b0: Option<Var>,
    /// (u, h); None when u = 0.
    au: Option<Var>,
    /// (u, o), B's unshared columns transposed; None when u = 0.
    bu: Option<Var>,
    a_index: Tensor,
    b_index: Tensor,
    chunked: Option<Chunked>,
    shape: Shape,
    /// A0, B0 and Au, Bu: two learning-rate groups.
    shared_role: Role,
    unshared_role: Role,
    in_features: usize,
    out_features: usize,
    scaling: f64,
    dropout: f64,
}

fn index_tensor(v: Vec<u32>, device: &Device) -> candle_core::Result<Tensor> {
    let n = v.len();
    Tensor::from_vec(v, n, device)
}

impl Prolora {
    /// Rectified init: `A0, Au ~ U(±1/√h)` with the full h (unrectified: A0's own fan-in),
    /// drawn A0 first; `B0 = Bu = 0`.
    pub fn init(
        opts: &ProloraConfig,
        cfg: &AdapterConfig,
        t: &Target,
        dtype: DType,
        device: &Device,
        rng: &mut StdRng,
    ) -> candle_core::Result<Self> {
        let (h, o) = (t.in_features, t.out_features);
        let s = opts.shape(cfg.rank);
        let (r_s, u) = (s.shared_rank(), s.unshared);
        let la = s.layout(h, s.rate_a);
        let lb = s.layout(o, s.rate_b);
        let kaiming = |fan_in: usize| 1.0 / (fan_in as f64).sqrt();
        let (a0, b0) = if r_s > 0 {
            let base_a = la.base();
            let bound = kaiming(if opts.rectified_init { h } else { base_a.1 });
            let a0 = uniform_var(base_a, bound, dtype, device, rng)?;
            let (rows, cols) = lb.base();
            (Some(a0), Some(Var::zeros((cols, rows), dtype, device)?))
        } else {
            (None, None)
        };
        let (au, bu) = if u > 0 {
            let au = uniform_var((u, h), kaiming(h), dtype, device, rng)?;
            (Some(au), Some(Var::zeros((u, o), dtype, device)?))
        } else {
            (None, None)
        };
        let chunked = match opts.forward {
            ProloraForward::Chunked => Chunked::new(&s, (la, lb), dtype, device)?,
            ProloraForward::Materialized => None,
        };
        Ok(Self {
            a0,
            b0,
            au,
            bu,
            a_index: index_tensor(la.a_index(), device)?,
            b_index: index_tensor(lb.b_index(), device)?,
            chunked,
            shape: s,
            shared_role: Role::Trained {
                lr_scale: opts.shared_lr_scale,
            },
            unshared_role: Role::Trained {
                lr_scale: opts.unshared_lr_scale,
            },
            in_features: h,
            out_features: o,
            scaling: cfg.alpha / cfg.rank as f64,
            dropout: cfg.dropout,
        })
    }

    /// The full `A (r × h)`: the gathered shared rows, then `Au`.
    pub fn expand_a(&self) -> candle_core::Result<Tensor> {
        let mut parts = Vec::new();
        if let Some(a0) = &self.a0 {
            let shape = (self.shape.shared_rank(), self.in_features);
            parts.push(gather(a0, &self.a_index, shape)?);
        }
        if let Some(au) = &self.au {
            parts.push(au.as_tensor().clone());
        }
        Tensor::cat(&parts, 0)
    }

    /// The full `B (o × r)`: the gathered shared columns, then `Buᵀ`.
    pub fn expand_b(&self) -> candle_core::Result<Tensor> {
        let mut parts = Vec::new();
        if let Some(b0) = &self.b0 {
            let shape = (self.out_features, self.shape.shared_rank());
            parts.push(gather(b0, &self.b_index, shape)?);
        }
        if let Some(bu) = &self.bu {
            parts.push(bu.t()?);
        }
        Tensor::cat(&parts, 1)
    }

    /// Whether `delta` uses the chunk-wise forward.
    pub fn is_chunked(&self) -> bool {
        self.chunked.is_some()
    }

    /// `(x Aᵀ) Bᵀ` without the scaling, for x (n, h), never building A or B.
    fn chunked_forward(&self, c: &Chunked, x: &Tensor) -> candle_core::Result<Tensor> {
        let shared = (
            self.a0.as_ref().unwrap().as_tensor(),
            self.b0.as_ref().unwrap().as_tensor(),
        );
        let unshared = self.au.as_ref().zip(self.bu.as_ref());
        let unshared = unshared.map(|(au, bu)| (au.as_tensor(), bu.as_tensor()));
        chunked_product(c, &self.shape, shared, unshared, self.out_features, x)
    }

    /// The adapter as a server keeps it: the compact tensors and, where it applies, the
    /// chunk-wise forward; never the index tensors, which are as large as the expanded A and B.
    pub fn compact(&self) -> candle_core::Result<CompactProlora> {
        let dtype = self.a0.as_ref().or(self.au.as_ref()).unwrap().dtype();
        let device = self.a_index.device();
        let layouts = (
            self.shape.layout(self.in_features, self.shape.rate_a),
            self.shape.layout(self.out_features, self.shape.rate_b),
        );
        Ok(CompactProlora {
            a0: self.a0.clone(),
            b0: self.b0.clone(),
            au: self.au.clone(),
            bu: self.bu.clone(),
            chunked: Chunked::new(&self.shape, layouts, dtype, device)?,
            layouts,
            shape: self.shape,
            in_features: self.in_features,
            out_features: self.out_features,
            scaling: self.scaling,
        })
    }
}

/// `(x Aᵀ) Bᵀ` of the chunk-wise forward, for x (n, h): the shared part from `A0`, `B0`, plus
/// `(x Auᵀ) Bu` of the unshared ranks.
fn chunked_product(
    c: &Chunked,
    s: &Shape,
    (a0, b0): (&Tensor, &Tensor),
    unshared: Option<(&Tensor, &Tensor)>,
    out_features: usize,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    let (n, h) = x.dims2()?;
    let (m, nb, r_s) = (s.rate_a, s.rate_b, s.shared_rank());
    let xp = x.pad_with_zeros(1, 0, m * c.ca - h)?;
    let z = xp
        .reshape((n * m, c.ca))?
        .matmul(&a0.t()?)?
        .reshape((n, m * r_s))?;
    let w = z
        .matmul(&c.sum_rolls)?
        .matmul(&c.copies)?
        .reshape((n * nb, r_s))?;
    let y = w
        .matmul(&b0.t()?)?
        .reshape((n, nb * c.cb))?
        .narrow(1, 0, out_features)?;
    match unshared {
        Some((au, bu)) => y + x.matmul(&au.t()?)?.matmul(bu)?,
        None => Ok(y),
    }
}

/// A PRoLoRA adapter as served (inference only): `A0, B0, Au, Bu` and the chunk-wise forward's
/// tiny roll matrices. Layouts the chunk-wise forward does not cover (Table 4's rank sharing
/// and hidden rotation) gather A and B for each call from indices computed for it, and free
/// both after it.
pub struct CompactProlora {
    a0: Option<Var>,
    b0: Option<Var>,
    au: Option<Var>,
    bu: Option<Var>,
    chunked: Option<Chunked>,
    layouts: (Layout, Layout),
    shape: Shape,
    in_features: usize,
    out_features: usize,
    scaling: f64,
}

impl CompactProlora {
    /// Bytes held beyond the adapter's own tensors (the roll matrices).
    pub fn extra_bytes(&self) -> usize {
        self.chunked.as_ref().map_or(0, Chunked::bytes)
    }

    /// `(x Aᵀ) Bᵀ` from A and B gathered for this call.
    fn gathered_product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let device = x.device();
        let (la, lb) = self.layouts;
        let r_s = self.shape.shared_rank();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        if let (Some(a0), Some(b0)) = (&self.a0, &self.b0) {
            let a_index = index_tensor(la.a_index(), device)?;
            let b_index = index_tensor(lb.b_index(), device)?;
            a.push(gather(a0, &a_index, (r_s, self.in_features))?);
            b.push(gather(b0, &b_index, (self.out_features, r_s))?);
        }
        if let (Some(au), Some(bu)) = (&self.au, &self.bu) {
            a.push(au.as_tensor().clone());
            b.push(bu.t()?);
        }
        x.matmul(&Tensor::cat(&a, 0)?.t()?)?
            .matmul(&Tensor::cat(&b, 1)?.t()?)
    }
}

impl Delta for CompactProlora {
    /// Inference only: no dropout.
    fn delta(&self, x: &Tensor, _ctx: &Ctx) -> candle_core::Result<Tensor> {
        let out_dtype = x.dtype();
        let dtype = self.a0.as_ref().or(self.au.as_ref()).unwrap().dtype();
        let mut dims = x.dims().to_vec();
        let x2 = x.to_dtype(dtype)?.reshape(((), self.in_features))?;
        let y = match (&self.chunked, &self.a0, &self.b0) {
            (Some(c), Some(a0), Some(b0)) => {
                let unshared = self.au.as_ref().zip(self.bu.as_ref());
                let unshared = unshared.map(|(au, bu)| (au.as_tensor(), bu.as_tensor()));
                let shared = (a0.as_tensor(), b0.as_tensor());
                chunked_product(c, &self.shape, shared, unshared, self.out_features, &x2)?
            }
            _ => self.gathered_product(&x2)?,
        };
        *dims.last_mut().unwrap() = self.out_features;
        (y * self.scaling)?.reshape(dims)?.to_dtype(out_dtype)
    }
}

/// The expanded factor: elements of `base` picked by `index`.
fn gather(base: &Tensor, index: &Tensor, shape: (usize, usize)) -> candle_core::Result<Tensor> {
    base.flatten_all()?.index_select(index, 0)?.reshape(shape)
}

impl Delta for Prolora {
    fn delta(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let out_dtype = x.dtype();
        let dtype = self.a0.as_ref().or(self.au.as_ref()).unwrap().dtype();
        let x = adapter_input(x, dtype, self.dropout, ctx)?;
        let mut dims = x.dims().to_vec();
        let x2 = x.reshape(((), self.in_features))?;
        let y = match &self.chunked {
            Some(c) => (self.chunked_forward(c, &x2)? * self.scaling)?,
            // Scaling the rank-r intermediate instead of the output: r values a row, not `out`.
            None => (x2.matmul(&self.expand_a()?.t()?)? * self.scaling)?
                .matmul(&self.expand_b()?.t()?)?,
        };
        *dims.last_mut().unwrap() = self.out_features;
        y.reshape(dims)?.to_dtype(out_dtype)
    }
}

impl Adapter for Prolora {
    fn params(&self) -> Vec<Param> {
        [
            ("lora_A.weight", &self.a0, self.shared_role),
            ("lora_B.weight", &self.b0, self.shared_role),
            ("lora_A_vec", &self.au, self.unshared_role),
            ("lora_B_vec", &self.bu, self.unshared_role),
        ]
        .into_iter()
        .filter_map(|(name, v, role)| v.as_ref().map(|v| Param::new(name, v, role)))
        .collect()
    }

    fn lora_factors(&self) -> candle_core::Result<(Tensor, Tensor, f64)> {
        Ok((self.expand_a()?, self.expand_b()?, self.scaling))
    }

    fn served(&self) -> candle_core::Result<Option<Served>> {
        let compact = self.compact()?;
        Ok(Some(Served {
            extra_bytes: compact.extra_bytes(),
            delta: Rc::new(compact),
        }))
    }

    /// The chunk-wise layouts (and no shared rank at all); None for rank sharing or rotation
    /// along the hidden axis.
    fn row_factors(&self) -> Option<super::RowFactors> {
        let (la, lb) = (
            self.shape.layout(self.in_features, self.shape.rate_a),
            self.shape.layout(self.out_features, self.shape.rate_b),
        );
        let shared = match (&self.a0, &self.b0) {
            (Some(a0), Some(b0)) if self.shape.chunk_wise() => Some(super::SharedChunks {
                a0: a0.as_tensor().clone(),
                b0: b0.as_tensor().clone(),
                chunk_a: la.base().1,
                chunk_b: lb.base().1,
                roll_a: la.stride(),
                roll_b: lb.stride(),
            }),
            (Some(_), Some(_)) => return None,
            _ => None,
        };
        let unshared = match (&self.au, &self.bu) {
            (Some(au), Some(bu)) => Some((au.as_tensor().clone(), bu.t().ok()?)),
            _ => None,
        };
        Some(super::RowFactors {
            shared,
            unshared,
            scaling: self.scaling,
        })
    }
}
