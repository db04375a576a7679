//! PRoLoRA (Wang et al., 2024), exactly as the authors' `chunkwise_sharing_LoRA.py` expands it
//! (METHODS.md §2): `A (r × h)` is the shared chunk `A0 (r_s × ceil(h/m))` repeated along the
//! hidden axis, chunk j rolled along the rank axis by −j·sA, truncated to h columns, with the u
//! unshared rows `Au` after the shared ones; `B (o × r)` likewise from `B0` and `Bu` along the
//! output axis. `Δ(x) = α/r · (dropout(x) Aᵀ) Bᵀ` with the full rank r.
//!
//! Ablations are options of this one implementation (see docs/adapters.md):
//! CLoRA (u = 0, no rotation), RoLoRA (u = 0), PRoLoRA⁻ʳ (`rotation = false`), PRoLoRA⁻ⁱ
//! (`rectified_init = false`) and the Table 4 siblings (`share_axis`, `rotate_axis`).

use super::{
    adapter_input, uniform_var, Adapter, AdapterConfig, Axis, Ctx, Parts, ProloraForward, Target,
};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use std::rc::Rc;

/// PRoLoRA's hyper-parameters with the defaults applied.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Options {
    pub rank: usize,
    pub unshared: usize,
    pub rate_a: usize,
    pub rate_b: usize,
    pub rotation: bool,
    pub rectified_init: bool,
    pub share_axis: Axis,
    pub rotate_axis: Axis,
    pub forward: ProloraForward,
}

impl Options {
    pub fn from_config(cfg: &AdapterConfig) -> Result<Self> {
        let rate_a = cfg.sharing_rate_a.unwrap_or(7);
        let o = Self {
            rank: cfg.rank,
            unshared: cfg.unshared_rank.unwrap_or(1),
            rate_a,
            rate_b: cfg.sharing_rate_b.unwrap_or(rate_a),
            rotation: cfg.rotation.unwrap_or(true),
            rectified_init: cfg.rectified_init.unwrap_or(true),
            share_axis: cfg.share_axis.unwrap_or(Axis::Hidden),
            rotate_axis: cfg.rotate_axis.unwrap_or(Axis::Rank),
            forward: cfg.forward.unwrap_or(ProloraForward::Materialized),
        };
        if o.unshared > o.rank {
            bail!(
                "adapter.unshared_rank = {} exceeds adapter.rank = {}: the unshared ranks are part of the rank",
                o.unshared,
                o.rank
            );
        }
        if o.rate_a == 0 || o.rate_b == 0 {
            bail!("adapter.sharing_rate_a and sharing_rate_b must be at least 1 (1 = no sharing)");
        }
        for (key, scale) in [
            ("shared_lr_scale", cfg.shared_lr_scale),
            ("unshared_lr_scale", cfg.unshared_lr_scale),
        ] {
            if scale.is_some_and(|s| !(s > 0.0 && s.is_finite())) {
                bail!("adapter.{key} must be a positive number");
            }
        }
        Ok(o)
    }

    fn shared_rank(&self) -> usize {
        self.rank - self.unshared
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

    /// Rejects shapes the chunks cannot cover, naming the linear and the key.
    fn check(&self, t: &Target) -> Result<()> {
        if self.shared_rank() == 0 {
            return Ok(());
        }
        for (key, rate, axis_len, what) in [
            (
                "sharing_rate_a",
                self.rate_a,
                t.in_features,
                "input features",
            ),
            (
                "sharing_rate_b",
                self.rate_b,
                t.out_features,
                "output features",
            ),
        ] {
            let (len, what) = match self.share_axis {
                Axis::Hidden => (axis_len, what),
                Axis::Rank => (self.shared_rank(), "shared ranks (rank − unshared_rank)"),
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
    opts: Options,
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
        opts: &Options,
        t: &Target,
        alpha: f64,
        dropout: f64,
        dtype: DType,
        device: &Device,
        rng: &mut StdRng,
    ) -> candle_core::Result<Self> {
        let (h, o) = (t.in_features, t.out_features);
        let (r_s, u) = (opts.shared_rank(), opts.unshared);
        let la = opts.layout(h, opts.rate_a);
        let lb = opts.layout(o, opts.rate_b);
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
        let chunked = match (
            opts.forward,
            opts.share_axis,
            opts.rotate_axis,
            opts.rotation,
        ) {
            (ProloraForward::Chunked, Axis::Hidden, Axis::Rank, _)
            | (ProloraForward::Chunked, Axis::Hidden, _, false)
                if r_s > 0 =>
            {
                let (sa, sb) = (la.stride(), lb.stride());
                let (m, n) = (opts.rate_a, opts.rate_b);
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
                Some(Chunked {
                    ca: la.base().1,
                    cb: lb.base().1,
                    sum_rolls: Tensor::from_vec(sum_rolls, (m * r_s, r_s), device)?
                        .to_dtype(dtype)?,
                    copies: Tensor::from_vec(copies, (r_s, n * r_s), device)?.to_dtype(dtype)?,
                })
            }
            _ => None,
        };
        Ok(Self {
            a0,
            b0,
            au,
            bu,
            a_index: index_tensor(la.a_index(), device)?,
            b_index: index_tensor(lb.b_index(), device)?,
            chunked,
            opts: *opts,
            in_features: h,
            out_features: o,
            scaling: alpha / opts.rank as f64,
            dropout,
        })
    }

    /// The full `A (r × h)`: the gathered shared rows, then `Au`.
    pub fn expand_a(&self) -> candle_core::Result<Tensor> {
        let mut parts = Vec::new();
        if let Some(a0) = &self.a0 {
            let shape = (self.opts.shared_rank(), self.in_features);
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
            let shape = (self.out_features, self.opts.shared_rank());
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
        let (a0, b0) = (self.a0.as_ref().unwrap(), self.b0.as_ref().unwrap());
        let n = x.dim(0)?;
        let (m, nb, r_s) = (self.opts.rate_a, self.opts.rate_b, self.opts.shared_rank());
        let xp = x.pad_with_zeros(1, 0, m * c.ca - self.in_features)?;
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
            .narrow(1, 0, self.out_features)?;
        match (&self.au, &self.bu) {
            (Some(au), Some(bu)) => y + x.matmul(&au.t()?)?.matmul(bu)?,
            _ => Ok(y),
        }
    }
}

/// The expanded factor: elements of `base` picked by `index`.
fn gather(base: &Var, index: &Tensor, shape: (usize, usize)) -> candle_core::Result<Tensor> {
    base.flatten_all()?.index_select(index, 0)?.reshape(shape)
}

impl Adapter for Prolora {
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

    fn params(&self) -> Vec<(String, Var)> {
        [
            ("lora_A.weight", &self.a0),
            ("lora_B.weight", &self.b0),
            ("lora_A_vec", &self.au),
            ("lora_B_vec", &self.bu),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.as_ref().map(|v| (name.to_string(), v.clone())))
        .collect()
    }

    fn lora_factors(&self) -> candle_core::Result<(Tensor, Tensor, f64)> {
        Ok((self.expand_a()?, self.expand_b()?, self.scaling))
    }
}

pub fn build(
    cfg: &AdapterConfig,
    targets: &[Target],
    dtype: DType,
    device: &Device,
    rng: &mut StdRng,
) -> Result<Parts> {
    let opts = Options::from_config(cfg)?;
    let mut adapters = Vec::with_capacity(targets.len());
    for t in targets {
        opts.check(t)?;
        let p = Prolora::init(&opts, t, cfg.alpha, cfg.dropout, dtype, device, rng)?;
        adapters.push(Rc::new(p) as Rc<dyn Adapter>);
    }
    Ok(Parts {
        adapters,
        shared: Vec::new(),
    })
}

/// Per linear: `u·(h + o)` plus the two base chunks (rounded-up chunk sizes).
pub fn count(cfg: &AdapterConfig, targets: &[Target]) -> Result<usize> {
    let opts = Options::from_config(cfg)?;
    let mut total = 0;
    for t in targets {
        opts.check(t)?;
        let size = |l: Layout| l.base().0 * l.base().1;
        total += opts.unshared * (t.in_features + t.out_features)
            + size(opts.layout(t.in_features, opts.rate_a))
            + size(opts.layout(t.out_features, opts.rate_b));
    }
    Ok(total)
}

/// Shared tensors (A0, B0, saved as `lora_{A,B}.weight`) train at `shared_lr_scale`, the
/// unshared ones (`lora_{A,B}_vec`) at `unshared_lr_scale`.
pub fn lr_scale(cfg: &AdapterConfig, key: &str) -> f64 {
    if key.ends_with(".weight") {
        cfg.shared_lr_scale.unwrap_or(1.0)
    } else {
        cfg.unshared_lr_scale.unwrap_or(1.0)
    }
}
