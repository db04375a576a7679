//! The adapters a server holds: each one's per-linear deltas as a server keeps them (PRoLoRA,
//! VeRA and Tied-LoRA from their compact tensors), its resident bytes, and the least recently
//! used order that `--max-loaded` evicts in.

use super::bgmv::{self, Factors};
use crate::adapters::{adapter_dtype, peft, AdapterSet};
use crate::ctx::Ctx;
use crate::model::config::BLOCK_LINEARS;
use crate::model::llama::Delta;
use crate::model::Llama;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// One loaded adapter.
pub struct ServedAdapter {
    pub name: String,
    /// `lora`, `prolora`, `vera` or `tied-lora`.
    pub kind: &'static str,
    /// Per block linear (layer · 7 + module, BLOCK_LINEARS order), its delta if adapted.
    linears: Vec<Option<ServedLinear>>,
    /// What it keeps in memory: its tensors (each shared one once) and the buffers its served
    /// deltas hold beyond them.
    pub bytes: usize,
}

/// One adapted linear as served.
pub enum ServedLinear {
    /// Read by the per-row kernel (LoRA, PRoLoRA's chunk-wise layouts, in f32 on the CPU):
    /// rows of a batch with different adapters in one pass.
    Rows(Factors),
    /// Its own delta (the other methods and layouts), applied to its rows as a group.
    Composed(Rc<dyn Delta>),
}

impl ServedLinear {
    /// Δ(x) for rows `x` (n, in) that all use this adapter.
    pub fn delta(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        match self {
            ServedLinear::Rows(f) => bgmv::deltas_of(x, &vec![Some(f); x.dim(0)?]),
            ServedLinear::Composed(d) => d.delta(x, ctx),
        }
    }
}

impl ServedAdapter {
    /// Reads the adapter in `dir` for `model` and keeps only what serving needs.
    pub fn load(name: &str, dir: &Path, model: &Llama) -> Result<Self> {
        let set = peft::load(
            dir,
            &model.cfg,
            adapter_dtype(model.dtype()),
            model.device(),
        )
        .with_context(|| format!("adapter {name:?} ({})", dir.display()))?;
        Self::from_set(name, &set, model.num_layers())
    }

    /// The served form of `set` (which may then be dropped): every linear in the per-row
    /// kernel's form where each has one, otherwise each its own delta.
    pub fn from_set(name: &str, set: &AdapterSet, layers: usize) -> Result<Self> {
        let mut slots = Vec::new();
        for (target, _) in set.linears() {
            let Some(m) = BLOCK_LINEARS.iter().position(|m| *m == target.module) else {
                bail!("adapter {name:?}: {} is not a block linear", target.module);
            };
            slots.push(target.layer * BLOCK_LINEARS.len() + m);
        }
        let mut linears: Vec<Option<ServedLinear>> = Vec::new();
        linears.resize_with(layers * BLOCK_LINEARS.len(), || None);
        let rows = Self::rows_of(set)?;
        let bytes = match rows {
            Some(rows) => {
                let bytes = rows.iter().map(Factors::bytes).sum();
                for (slot, f) in slots.iter().zip(rows) {
                    linears[*slot] = Some(ServedLinear::Rows(f));
                }
                bytes
            }
            None => {
                let mut bytes: usize = set
                    .tensors()
                    .iter()
                    .map(|p| p.var.elem_count() * p.var.dtype().size_in_bytes())
                    .sum();
                for (slot, (target, adapter)) in slots.iter().zip(set.linears()) {
                    let delta: Rc<dyn Delta> = match adapter.served()? {
                        Some(served) => {
                            bytes += served.extra_bytes;
                            served.delta
                        }
                        None => set.delta_of(target.layer, target.module).expect("listed"),
                    };
                    linears[*slot] = Some(ServedLinear::Composed(delta));
                }
                bytes
            }
        };
        Ok(ServedAdapter {
            name: name.to_string(),
            kind: set.cfg.kind(),
            linears,
            bytes,
        })
    }

    /// Every linear of `set` in the per-row kernel's form, or None where one has none.
    fn rows_of(set: &AdapterSet) -> Result<Option<Vec<Factors>>> {
        let mut rows = Vec::new();
        for (target, adapter) in set.linears() {
            let Some(f) = adapter.row_factors() else {
                return Ok(None);
            };
            match Factors::new(&f, target.in_features, target.out_features)? {
                Some(f) => rows.push(f),
                None => return Ok(None),
            }
        }
        Ok(Some(rows))
    }

    /// The delta of block `layer`'s linear number `module` (BLOCK_LINEARS order), if adapted.
    pub fn linear(&self, layer: usize, module: usize) -> Option<&ServedLinear> {
        self.linears
            .get(layer * BLOCK_LINEARS.len() + module)
            .and_then(Option::as_ref)
    }
}

/// The adapters a server knows by name (where to read each), and those resident now.
pub struct AdapterStore {
    known: HashMap<String, PathBuf>,
    resident: HashMap<String, (Rc<ServedAdapter>, u64)>,
    /// At most this many resident (None: no bound); the least recently used go first.
    max_loaded: Option<usize>,
    clock: u64,
}

impl AdapterStore {
    pub fn new(max_loaded: Option<usize>) -> Self {
        AdapterStore {
            known: HashMap::new(),
            resident: HashMap::new(),
            max_loaded,
            clock: 0,
        }
    }

    /// Names every known adapter (resident or not), sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.known.keys().cloned().collect();
        names.sort();
        names
    }

    pub fn knows(&self, name: &str) -> bool {
        self.known.contains_key(name)
    }

    /// Makes `name` known as the adapter in `dir` and loads it now (so a bad adapter is refused
    /// at once, not at its first request).
    pub fn add(&mut self, name: &str, dir: &Path, model: &Llama) -> Result<Rc<ServedAdapter>> {
        let adapter = Rc::new(ServedAdapter::load(name, dir, model)?);
        self.known.insert(name.to_string(), dir.to_path_buf());
        self.insert(adapter.clone());
        Ok(adapter)
    }

    /// Forgets `name`; rows already using it finish with it. False when it was not known.
    pub fn remove(&mut self, name: &str) -> bool {
        self.resident.remove(name);
        self.known.remove(name).is_some()
    }

    /// The adapter `name`, read again from its directory if it was evicted.
    pub fn get(&mut self, name: &str, model: &Llama) -> Result<Rc<ServedAdapter>> {
        self.clock += 1;
        if let Some((adapter, used)) = self.resident.get_mut(name) {
            *used = self.clock;
            return Ok(adapter.clone());
        }
        let Some(dir) = self.known.get(name) else {
            bail!("the adapter {name:?} is not loaded");
        };
        let adapter = Rc::new(ServedAdapter::load(name, dir, model)?);
        self.insert(adapter.clone());
        Ok(adapter)
    }

    fn insert(&mut self, adapter: Rc<ServedAdapter>) {
        self.clock += 1;
        self.resident
            .insert(adapter.name.clone(), (adapter, self.clock));
        while self.max_loaded.is_some_and(|n| self.resident.len() > n) {
            let oldest = self
                .resident
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(name, _)| name.clone())
                .expect("not empty");
            self.resident.remove(&oldest);
        }
    }

    /// Resident adapters and their bytes.
    pub fn resident(&self) -> (usize, usize) {
        let bytes = self.resident.values().map(|(a, _)| a.bytes).sum();
        (self.resident.len(), bytes)
    }

    /// Whether `name` is resident now.
    pub fn is_resident(&self, name: &str) -> bool {
        self.resident.contains_key(name)
    }
}
