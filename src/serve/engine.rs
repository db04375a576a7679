//! The serving engine: continuous batching on one KV cache. Waiting requests are prefilled
//! together (left-padded, one pass of the base for all of them) and join the running batch at
//! the next decoding step; a row leaves the batch the moment it ends
//! (or its client is gone); rows of one batch may use different adapters ([`super::routing`]).
//! Each row chooses its tokens with its own seeded stream, as `prolora generate` does, so a
//! request's tokens do not depend on what else is in the batch.

use super::adapters::{AdapterStore, ServedAdapter};
use super::metrics::Metrics;
use super::routing::{attach_routers, Routing};
use crate::ctx::Ctx;
use crate::generate::choose;
use crate::kernels::skinny;
use crate::model::kv_cache::KvCache;
use crate::model::Llama;
use anyhow::Result;
use candle_core::{CpuStorage, DType, Storage, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rayon::prelude::*;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Prompt positions (padding included) prefilled in one pass at most: bounds the attention
/// scores held at once and how long the running rows wait for a burst of new ones.
const PREFILL_TOKENS: usize = 4096;

/// How a request's tokens are chosen and how many.
#[derive(Clone, Debug)]
pub struct Sampling {
    pub max_tokens: usize,
    /// 0: greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Go on past the end-of-sequence ids (vLLM's `ignore_eos`; benchmarks).
    pub ignore_eos: bool,
}

/// A request for the engine.
pub struct Job {
    /// Token ids, at least one, fewer than the engine's position limit.
    pub prompt: Vec<u32>,
    /// The adapter's name; None for the base model.
    pub adapter: Option<String>,
    pub sampling: Sampling,
    /// Where the tokens go; once it is dropped the row is freed.
    pub events: Sender<Event>,
    /// Also send each step's logits (tests).
    pub record_logits: bool,
    pub submitted: Instant,
}

/// What a job hears, in order: tokens (each preceded by its logits when asked), then one end.
#[derive(Debug)]
pub enum Event {
    Logits(Vec<f32>),
    Token(u32),
    Done(Finish),
    /// The adapter is not known (any more).
    UnknownAdapter(String),
    Failed(String),
}

/// Why a row ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Finish {
    Eos,
    MaxTokens,
    /// The engine's position limit.
    Positions,
}

/// What the engine thread is asked.
pub enum Command {
    Submit(Job),
    /// Make an adapter known and load it; the reply is its resident bytes.
    Load {
        name: String,
        dir: PathBuf,
        reply: Sender<Result<usize, String>>,
    },
    /// Forget an adapter; the reply says whether it was known.
    Unload {
        name: String,
        reply: Sender<bool>,
    },
}

/// One row of the running batch.
struct Row {
    job: Job,
    adapter: Option<Rc<ServedAdapter>>,
    rng: StdRng,
    generated: usize,
    /// The token it feeds at the next step.
    next: u32,
}

impl Row {
    /// Tells the client `token`, chosen from `logits`; returns whether the row goes on (false:
    /// it ended, or its client is gone).
    fn accept(&mut self, token: u32, logits: &[f32], ends: &[u32], metrics: &Metrics) -> bool {
        let events = &self.job.events;
        if self.job.record_logits && events.send(Event::Logits(logits.to_vec())).is_err() {
            return false;
        }
        if !self.job.sampling.ignore_eos && ends.contains(&token) {
            let _ = events.send(Event::Done(Finish::Eos));
            return false;
        }
        if self.generated == 0 {
            metrics.first_token(self.job.submitted.elapsed());
        }
        self.generated += 1;
        metrics.generated(1);
        if events.send(Event::Token(token)).is_err() {
            return false;
        }
        if self.generated == self.job.sampling.max_tokens {
            let _ = events.send(Event::Done(Finish::MaxTokens));
            return false;
        }
        self.next = token;
        true
    }
}

pub struct Engine {
    model: Llama,
    routing: Rc<RefCell<Routing>>,
    pub adapters: AdapterStore,
    waiting: VecDeque<Job>,
    rows: Vec<Row>,
    /// The running rows' cache (row r of it is `rows[r]`); None when no row runs.
    cache: Option<KvCache>,
    max_batch: usize,
    /// Positions a row may reach (the model's, or less).
    max_len: usize,
    metrics: Arc<Metrics>,
    /// The adapter names the connection threads check requests against.
    names: Arc<Mutex<Vec<String>>>,
    /// The ids that end an answer: the model's EOS, and the chat format's ends of turn.
    ends: Vec<u32>,
    /// The last pass's vocabulary logits, one row per batch row: kept from step to step, so
    /// that 64 rows of 49,152 are neither allocated, zeroed nor copied again each time.
    logits: Vec<f32>,
}

impl Engine {
    /// An engine on `model` (its adapters replaced by routers).
    pub fn new(
        mut model: Llama,
        max_batch: usize,
        max_len: usize,
        max_loaded: Option<usize>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let routing = attach_routers(&mut model);
        let ends = vec![model.cfg.eos_token_id];
        Engine {
            model,
            routing,
            adapters: AdapterStore::new(max_loaded),
            waiting: VecDeque::new(),
            rows: Vec::new(),
            cache: None,
            max_batch: max_batch.max(1),
            max_len,
            metrics,
            names: Arc::new(Mutex::new(Vec::new())),
            ends,
            logits: Vec::new(),
        }
    }

    /// Also ends an answer at these ids (a chat format's EOS ids and end of turn, as
    /// `ChatEncoder::stop_ids` gives them).
    pub fn with_stop_ids(mut self, ids: &[u32]) -> Self {
        for &id in ids {
            if !self.ends.contains(&id) {
                self.ends.push(id);
            }
        }
        self
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The known adapter names, kept current for other threads.
    pub fn names(&self) -> Arc<Mutex<Vec<String>>> {
        self.names.clone()
    }

    /// Makes `name` the adapter in `dir` and loads it; returns its resident bytes.
    pub fn add_adapter(&mut self, name: &str, dir: &std::path::Path) -> Result<usize> {
        let bytes = self.adapters.add(name, dir, &self.model)?.bytes;
        self.publish();
        Ok(bytes)
    }

    /// Forgets `name`; false when it was not known.
    pub fn remove_adapter(&mut self, name: &str) -> bool {
        let known = self.adapters.remove(name);
        self.publish();
        known
    }

    fn publish(&self) {
        *self.names.lock().unwrap_or_else(|p| p.into_inner()) = self.adapters.names();
        let (n, bytes) = self.adapters.resident();
        self.metrics.set_adapters(n, bytes);
    }

    pub fn submit(&mut self, job: Job) {
        self.metrics
            .queued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.waiting.push_back(job);
    }

    /// Nothing waiting and nothing running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.rows.is_empty()
    }

    /// Rows running now.
    pub fn running(&self) -> usize {
        self.rows.len()
    }

    /// Admits waiting jobs while there is room, then advances every running row one token.
    pub fn step(&mut self) -> Result<()> {
        loop {
            let admitted = self.admit();
            if admitted.is_empty() {
                break;
            }
            self.prefill(admitted)?;
        }
        if !self.rows.is_empty() {
            self.decode()?;
        }
        self.metrics.set_running(self.rows.len());
        let (n, bytes) = self.adapters.resident();
        self.metrics.set_adapters(n, bytes);
        Ok(())
    }

    /// Ends every running and waiting job with `why` (after an error the cache is lost).
    pub fn fail_all(&mut self, why: &str) {
        for row in self.rows.drain(..) {
            let _ = row.job.events.send(Event::Failed(why.to_string()));
        }
        for job in self.waiting.drain(..) {
            let _ = job.events.send(Event::Failed(why.to_string()));
        }
        self.metrics
            .queued
            .store(0, std::sync::atomic::Ordering::Relaxed);
        self.cache = None;
    }

    /// The next waiting jobs to prefill together, with their adapters: as many as the batch has
    /// room for and [`PREFILL_TOKENS`] allows (at least one). A job whose adapter is unknown or
    /// whose prompt does not fit is answered here and leaves the queue.
    fn admit(&mut self) -> Vec<(Job, Option<Rc<ServedAdapter>>)> {
        let mut admitted: Vec<(Job, Option<Rc<ServedAdapter>>)> = Vec::new();
        let mut longest = 0;
        while self.rows.len() + admitted.len() < self.max_batch {
            let Some(job) = self.waiting.front() else {
                break;
            };
            let n = job.prompt.len();
            let padded = (admitted.len() + 1) * longest.max(n);
            if !admitted.is_empty() && padded > PREFILL_TOKENS {
                break;
            }
            let job = self.waiting.pop_front().expect("a front job");
            self.metrics
                .queued
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            if n == 0 || n >= self.max_len {
                let why = format!("the prompt has {n} tokens; 1 to {} fit", self.max_len - 1);
                let _ = job.events.send(Event::Failed(why));
                continue;
            }
            let adapter = match &job.adapter {
                None => None,
                Some(name) if !self.adapters.knows(name) => {
                    let _ = job.events.send(Event::UnknownAdapter(name.clone()));
                    continue;
                }
                Some(name) => match self.adapters.get(name, &self.model) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        let _ = job.events.send(Event::Failed(format!("{e:#}")));
                        continue;
                    }
                },
            };
            self.metrics.prompt(n);
            longest = longest.max(n);
            admitted.push((job, adapter));
        }
        admitted
    }

    /// The prompts through the model together (left-padded, one pass), each row's first token
    /// chosen, and the rows that go on joined to the running batch: their caches stacked onto
    /// the running one in one copy.
    fn prefill(&mut self, jobs: Vec<(Job, Option<Rc<ServedAdapter>>)>) -> Result<()> {
        let n = jobs.len();
        let one_adapter = jobs.windows(2).all(|w| match (&w[0].1, &w[1].1) {
            (None, None) => true,
            (Some(a), Some(b)) => Rc::ptr_eq(a, b),
            _ => false,
        });
        let prompts: Vec<&[u32]> = jobs.iter().map(|(j, _)| j.prompt.as_slice()).collect();
        let passed = {
            let mut routing = self.routing.borrow_mut();
            let device = self.model.device();
            if one_adapter {
                routing.set_all(jobs[0].1.as_ref(), device);
                Ok(())
            } else {
                // The linears see each prompt's tokens alone, in order (no padding).
                let per_row: Vec<_> = jobs
                    .iter()
                    .flat_map(|(j, a)| std::iter::repeat_n(a.clone(), j.prompt.len()))
                    .collect();
                routing.set_rows(&per_row, device)
            }
        }
        .and_then(|()| self.model.prefill(&prompts, &Ctx::eval()))
        .map_err(anyhow::Error::from)
        .and_then(|(last, cache)| Ok((self.logits(&last)?, cache)));
        let (vocab, mut cache) = match passed {
            Ok(done) => done,
            Err(e) => {
                for (job, _) in jobs {
                    let _ = job
                        .events
                        .send(Event::Failed(format!("the prefill failed: {e:#}")));
                }
                return Err(e);
            }
        };
        let mut kept = Vec::new();
        let mut rows = Vec::new();
        let logits = std::mem::take(&mut self.logits);
        for (i, ((job, adapter), logits)) in jobs.into_iter().zip(logits.chunks(vocab)).enumerate()
        {
            let mut row = Row {
                rng: StdRng::seed_from_u64(job.sampling.seed),
                job,
                adapter,
                generated: 0,
                next: 0,
            };
            let s = &row.job.sampling;
            let token = choose(logits, s.temperature, s.top_p, &mut row.rng);
            if row.accept(token, logits, &self.ends, &self.metrics) {
                kept.push(i);
                rows.push(row);
            }
        }
        self.logits = logits;
        if rows.is_empty() {
            return Ok(());
        }
        if kept.len() < n {
            cache.retain(&kept)?;
        }
        self.cache = Some(match self.cache.take() {
            None => cache,
            Some(running) => KvCache::stack(vec![running, cache])?,
        });
        self.rows.extend(rows);
        Ok(())
    }

    /// One token for every running row.
    fn decode(&mut self) -> Result<()> {
        let started = Instant::now();
        let cache = self.cache.as_mut().expect("rows run on a cache");
        // A row that would pass the position limit ends there (as in `prolora generate`).
        let fits: Vec<bool> = (0..self.rows.len())
            .map(|r| cache.next_position(r) + 1 < self.max_len)
            .collect();
        if fits.contains(&false) {
            for (row, _) in self.rows.iter().zip(&fits).filter(|(_, fits)| !**fits) {
                let _ = row.job.events.send(Event::Done(Finish::Positions));
            }
            self.retain(&fits)?;
        }
        if self.rows.is_empty() {
            return Ok(());
        }
        let per_row: Vec<_> = self.rows.iter().map(|r| r.adapter.clone()).collect();
        self.routing
            .borrow_mut()
            .set_rows(&per_row, self.model.device())?;
        let next: Vec<u32> = self.rows.iter().map(|r| r.next).collect();
        let ids = Tensor::from_slice(&next, (next.len(), 1), self.model.device())?;
        let cache = self.cache.as_mut().expect("rows run on a cache");
        let hidden = self.model.hidden_cached(&ids, &Ctx::eval(), cache)?;
        let vocab = self.logits(&hidden)?;
        let logits = std::mem::take(&mut self.logits);
        // Each row draws from its own stream: the rows choose in parallel.
        let tokens: Vec<u32> = {
            let draws: Vec<(&mut StdRng, f64, f64)> = self
                .rows
                .iter_mut()
                .map(|r| (&mut r.rng, r.job.sampling.temperature, r.job.sampling.top_p))
                .collect();
            draws
                .into_par_iter()
                .zip(logits.par_chunks(vocab))
                .map(|((rng, temperature, top_p), logits)| choose(logits, temperature, top_p, rng))
                .collect()
        };
        let goes_on: Vec<bool> = self
            .rows
            .iter_mut()
            .zip(tokens.into_iter().zip(logits.chunks(vocab)))
            .map(|(row, (token, logits))| row.accept(token, logits, &self.ends, &self.metrics))
            .collect();
        self.logits = logits;
        self.metrics.step(started.elapsed(), goes_on.len());
        if goes_on.contains(&false) {
            self.retain(&goes_on)?;
        }
        Ok(())
    }

    /// Keeps the rows marked true; the others and their caches are dropped.
    fn retain(&mut self, keep: &[bool]) -> Result<()> {
        let mut kept = Vec::new();
        let mut rows = Vec::new();
        for (r, (row, &k)) in self.rows.drain(..).zip(keep).enumerate() {
            if k {
                kept.push(r);
                rows.push(row);
            }
        }
        self.rows = rows;
        if self.rows.is_empty() {
            self.cache = None;
        } else if let Some(cache) = self.cache.as_mut() {
            cache.retain(&kept)?;
        }
        Ok(())
    }

    /// Vocabulary logits of hidden states (b, 1, d) into `self.logits`, one f32 row per batch
    /// row; returns the vocabulary size. At any row count the head is the skinny product, not
    /// a GEMM: a GEMM packs all 49,152 rows of the head every step for 64 rows of use each, and
    /// a row gets the bits it gets alone (`skinny` sums each product in one order at any row
    /// count); the logits go into the buffer kept between steps.
    fn logits(&mut self, last: &Tensor) -> Result<usize> {
        let (rows, d) = (last.dim(0)?, last.dim(2)?);
        let w = self.model.head_weight();
        let vocab = w.dim(0)?;
        self.logits.resize(rows * vocab, 0.0);
        let skinny = skinny::available() && last.dtype() == DType::F32 && w.dims2()? == (vocab, d);
        if skinny {
            let x: Vec<f32> = last.flatten_all()?.to_vec1()?;
            let (storage, layout) = w.storage_and_layout();
            if let (Storage::Cpu(ws), Some((lo, hi))) = (&*storage, layout.contiguous_offsets()) {
                match ws {
                    CpuStorage::F32(ws) => {
                        skinny::xwt_into(&x, &ws[lo..hi], rows, d, vocab, &mut self.logits);
                        return Ok(vocab);
                    }
                    CpuStorage::BF16(ws) => {
                        skinny::xwt_into(&x, &ws[lo..hi], rows, d, vocab, &mut self.logits);
                        return Ok(vocab);
                    }
                    _ => {}
                }
            }
        }
        let logits = self
            .model
            .head(last)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        self.logits.copy_from_slice(&logits);
        Ok(vocab)
    }

    /// Serves `commands` until every sender is gone and no job is left.
    pub fn run(mut self, commands: Receiver<Command>) {
        let mut open = true;
        loop {
            if self.is_idle() {
                if !open {
                    return;
                }
                match commands.recv() {
                    Ok(c) => self.handle(c),
                    Err(_) => return,
                }
            }
            while open {
                match commands.try_recv() {
                    Ok(c) => self.handle(c),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            if let Err(e) = self.step() {
                crate::to_stderr!("serve: a decoding step failed: {e:#}");
                self.fail_all(&format!("the decoding step failed: {e:#}"));
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Submit(job) => self.submit(job),
            Command::Load { name, dir, reply } => {
                let _ = reply.send(self.add_adapter(&name, &dir).map_err(|e| format!("{e:#}")));
            }
            Command::Unload { name, reply } => {
                let _ = reply.send(self.remove_adapter(&name));
            }
        }
    }
}
