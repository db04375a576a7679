//! Rows of one batch using different adapters: the frozen base runs once for the whole batch,
//! and every block linear carries a [`Router`] that adds each adapter's delta to its own rows
//! only: the adapters in the per-row kernel's form all in one pass over the rows
//! ([`super::bgmv`]), the others each on its own rows as a group (as Punica's SGMV groups them).
//! A row without an adapter gets exactly the base's output. Every decoding step takes the same
//! path whatever else is in the batch, so a row's delta does not depend on its neighbours.

use super::adapters::{ServedAdapter, ServedLinear};
use super::bgmv;
use crate::ctx::Ctx;
use crate::model::config::BLOCK_LINEARS;
use crate::model::llama::Delta;
use crate::model::Llama;
use candle_core::{Device, Tensor};
use std::cell::RefCell;
use std::rc::Rc;

/// Which rows of the next forward use which adapter.
#[derive(Default)]
pub struct Routing {
    groups: Vec<Group>,
    /// Rows of the forward's input (the flattened (batch · positions) rows of every linear).
    rows: usize,
}

struct Group {
    adapter: Rc<ServedAdapter>,
    /// Its rows, ascending.
    rows: Vec<u32>,
    /// The same as a u32 tensor for gathering and scattering.
    index: Tensor,
    /// Whether it is every row of the forward (prompts on one adapter: no gather or scatter).
    whole: bool,
}

impl Routing {
    /// Every one of the forward's rows uses `adapter` (prompts prefilled on one adapter), or none
    /// does.
    pub fn set_all(&mut self, adapter: Option<&Rc<ServedAdapter>>, device: &Device) {
        self.groups.clear();
        self.rows = 0;
        if let Some(adapter) = adapter {
            self.groups.push(Group {
                adapter: adapter.clone(),
                rows: Vec::new(),
                index: Tensor::zeros(0, candle_core::DType::U32, device).expect("empty"),
                whole: true,
            });
        }
    }

    /// Row r (of `per_row.len()`, one position each) uses `per_row[r]`.
    pub fn set_rows(
        &mut self,
        per_row: &[Option<Rc<ServedAdapter>>],
        device: &Device,
    ) -> candle_core::Result<()> {
        self.groups.clear();
        self.rows = per_row.len();
        let mut seen: Vec<(Rc<ServedAdapter>, Vec<u32>)> = Vec::new();
        for (r, adapter) in per_row.iter().enumerate() {
            let Some(adapter) = adapter else { continue };
            match seen.iter_mut().find(|(a, _)| Rc::ptr_eq(a, adapter)) {
                Some((_, rows)) => rows.push(r as u32),
                None => seen.push((adapter.clone(), vec![r as u32])),
            }
        }
        for (adapter, rows) in seen {
            self.groups.push(Group {
                adapter,
                index: Tensor::from_slice(&rows, rows.len(), device)?,
                rows,
                whole: false,
            });
        }
        Ok(())
    }

    /// Distinct adapters in the next forward.
    pub fn adapters(&self) -> usize {
        self.groups.len()
    }
}

/// The delta of one block linear under the current [`Routing`].
pub struct Router {
    layer: usize,
    module: usize,
    routing: Rc<RefCell<Routing>>,
}

impl Delta for Router {
    fn delta(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        match self.delta_if_any(x, ctx)? {
            Some(d) => Ok(d),
            None => candle_core::bail!("the router's delta is zero: the linear adds nothing"),
        }
    }

    fn delta_if_any(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Option<Tensor>> {
        self.routed(x, None, ctx)
    }

    fn added_to(&self, x: &Tensor, y: Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        match self.routed(x, Some(y), ctx)? {
            Some(sum) => Ok(sum),
            None => candle_core::bail!("the router lost the linear's output"),
        }
    }
}

impl Router {
    /// Every row's delta under the current routing, added to `base` (the linear's frozen
    /// output) where given; None only where no base is given and no row has a delta here.
    fn routed(
        &self,
        x: &Tensor,
        base: Option<Tensor>,
        ctx: &Ctx,
    ) -> candle_core::Result<Option<Tensor>> {
        let routing = self.routing.borrow();
        if routing.groups.is_empty() {
            return Ok(base);
        }
        if let [group] = &routing.groups[..] {
            if group.whole {
                let delta = group
                    .adapter
                    .linear(self.layer, self.module)
                    .map(|delta| delta.delta(x, ctx))
                    .transpose()?;
                return Ok(match (base, delta) {
                    (Some(base), Some(delta)) => Some((base + delta)?),
                    (base, delta) => base.or(delta),
                });
            }
        }
        let n = x.dim(0)?;
        if n != routing.rows {
            candle_core::bail!("routing for {} rows, the forward has {n}", routing.rows);
        }
        let mut per_row = vec![None; n];
        let mut composed = Vec::new();
        for group in &routing.groups {
            match group.adapter.linear(self.layer, self.module) {
                Some(ServedLinear::Rows(f)) => {
                    for &r in &group.rows {
                        per_row[r as usize] = Some(f);
                    }
                }
                Some(ServedLinear::Composed(delta)) => composed.push((group, delta)),
                None => {}
            }
        }
        let mut sum = match (per_row.iter().any(Option::is_some), base) {
            (true, Some(base)) => Some(bgmv::added_to(x, &base, &per_row)?),
            (true, None) => Some(bgmv::deltas_of(x, &per_row)?),
            (false, base) => base,
        };
        for (group, delta) in composed {
            let rows = delta.delta(&x.index_select(&group.index, 0)?, ctx)?;
            let base = match sum.take() {
                Some(s) => s,
                None => Tensor::zeros((n, rows.dim(1)?), rows.dtype(), x.device())?,
            };
            sum = Some(base.index_add(&group.index, &rows, 0)?);
        }
        Ok(sum)
    }
}

/// Puts a router on every block linear of `model`; the returned routing steers them all.
pub fn attach_routers(model: &mut Llama) -> Rc<RefCell<Routing>> {
    let routing = Rc::new(RefCell::new(Routing::default()));
    model.attach(|layer, module| {
        let module = BLOCK_LINEARS.iter().position(|m| *m == module)?;
        Some(Rc::new(Router {
            layer,
            module,
            routing: routing.clone(),
        }) as Rc<dyn Delta>)
    });
    routing
}
