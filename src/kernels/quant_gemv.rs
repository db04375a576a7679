//! `x · Wᵀ` for the few rows of `x` a decoding step has, with `W` in 4- or 8-bit blocks (NF4,
//! ggml's Q4_0, Q4_1 and Q8_0): the codes and scales are read once and dequantized in
//! registers, never into a tile of f32 weights that a GEMM would read again.
//!
//! Each block's scale is factored out of its sum, `Σ (s·q_i)·x_i = s · Σ q_i·x_i` (Q4_1's
//! offset `m` as `m · Σ x_i`, with the block sums of `x` computed once per call), so the result
//! equals the composed form — dequantize, then the f32 product — up to the order and the
//! rounding of the sums: within [`TOLERANCE`] · Σ |w_i·x_i| (docs/methods.md, "Fused quantized
//! products").

use super::quant_dot8::{self, Q8Rows};

#[cfg(target_arch = "x86_64")]
mod ggml512;

/// How far ahead of the bytes at hand the few-row kernels prefetch each weight row: the
/// hardware prefetcher alone falls behind several interleaved rows. NF4 at the 7B shape
/// (`decode7b`, best steps of 4–6 runs): 229 ms a step without, 201 ms with 4096 (1024:
/// 201–279, 2048: 263–368); ggml blocks at SmolLM2's shapes, steps alternated in one process:
/// 3–6 % faster than 576 bytes ahead, 10–15 % on the 8-bit route with four rows together
/// (docs/performance.md).
pub(crate) const PREFETCH_BYTES: usize = 4096;

/// Rows of `x` the fused product serves (decoding: one per sequence); more rows go to the
/// tiled GEMM, which reuses each dequantized tile across them.
pub const ROWS: std::ops::RangeInclusive<usize> = 1..=16;

/// The stated bound: |fused − composed| ≤ TOLERANCE · Σ_i |w_i · x_i| for each output.
pub const TOLERANCE: f32 = 1e-5;

/// NF4 values per absmax block.
const NF4_BLOCK: usize = 64;
/// Absmax values per nested (double-quantization) block.
const NESTED_BLOCK: usize = 256;
/// Values per ggml block of Q4_0, Q4_1 and Q8_0.
const GGML_BLOCK: usize = 32;

/// Weights a task multiplies (at least one row), to balance the two cores without paying a
/// task's overhead per row.
const TASK_WEIGHTS: usize = 1 << 15;

/// NF4 block scales: plain f32, or double-quantized as `map[code] · scale[b / 256] + offset`.
#[derive(Clone, Copy)]
pub enum Nf4Scales<'a> {
    Plain(&'a [f32]),
    Double {
        codes: &'a [u8],
        scales: &'a [f32],
        offset: f32,
        /// The 256-entry dynamic map of the codes.
        map: &'a [f32; 256],
    },
}

impl Nf4Scales<'_> {
    /// The scale of block `b`, rounded as the composed dequantization rounds it.
    #[inline(always)]
    fn get(&self, b: usize) -> f32 {
        match *self {
            Self::Plain(a) => a[b],
            Self::Double {
                codes,
                scales,
                offset,
                map,
            } => map[codes[b] as usize] * scales[b / NESTED_BLOCK] + offset,
        }
    }
}

/// The ggml block types with a fused product.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GgmlBlocks {
    /// d (f16), 16 bytes of nibbles (low: values 0..16, high: 16..32): `d · (q − 8)`.
    Q4_0,
    /// d, m (f16), nibbles as Q4_0: `d · q + m`.
    Q4_1,
    /// d (f16), 32 × i8: `d · q`.
    Q8_0,
}

impl GgmlBlocks {
    /// Bytes per block of 32 values.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// A weight `(rows, cols)` the fused product reads; every row is whole blocks.
#[derive(Clone, Copy)]
pub enum QuantMatrix<'a> {
    /// NF4 codes two per byte (the first value of a pair in the high nibble), row-major,
    /// blocks of 64 along the row.
    Nf4 {
        packed: &'a [u8],
        scales: Nf4Scales<'a>,
        table: &'a [f32; 16],
        rows: usize,
        cols: usize,
    },
    Ggml {
        kind: GgmlBlocks,
        bytes: &'a [u8],
        rows: usize,
        cols: usize,
    },
}

impl QuantMatrix<'_> {
    /// (rows, cols)
    pub fn shape(&self) -> (usize, usize) {
        match *self {
            Self::Nf4 { rows, cols, .. } | Self::Ggml { rows, cols, .. } => (rows, cols),
        }
    }

    /// Values per block along a row.
    fn block(&self) -> usize {
        match self {
            Self::Nf4 { .. } => NF4_BLOCK,
            Self::Ggml { .. } => GGML_BLOCK,
        }
    }

    /// Whether the layout is one the kernels read: rows of whole blocks, bytes to match.
    fn well_formed(&self) -> bool {
        let (rows, cols) = self.shape();
        if !cols.is_multiple_of(self.block()) {
            return false;
        }
        match *self {
            Self::Nf4 { packed, scales, .. } => {
                let blocks = rows * cols / NF4_BLOCK;
                packed.len() == rows * cols / 2
                    && match scales {
                        Nf4Scales::Plain(a) => a.len() == blocks,
                        Nf4Scales::Double { codes, scales, .. } => {
                            codes.len() == blocks && scales.len() == blocks.div_ceil(NESTED_BLOCK)
                        }
                    }
            }
            Self::Ggml { kind, bytes, .. } => {
                bytes.len() == rows * cols / GGML_BLOCK * kind.block_bytes()
            }
        }
    }
}

/// Which loops compute the sums; all give them within [`TOLERANCE`].
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernel {
    /// Plain Rust, on any CPU.
    Portable,
    /// AVX2, FMA and F16C.
    Avx2,
    /// As `Avx2`, and with AVX-512F: a 16-entry table (NF4's values, Q4_0's and Q4_1's
    /// integers) fits one register, so one permute looks up 16 codes (AVX2 needs two
    /// permutes and a blend per 8, or a mask and a conversion); ggml blocks several weight
    /// rows per pass (`ggml512`).
    Avx512,
}

/// The kernels this CPU runs, the fastest last.
fn kernels() -> Vec<Kernel> {
    let mut k = vec![Kernel::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            k.push(Kernel::Avx2);
            if has!("avx512f") {
                k.push(Kernel::Avx512);
            }
        }
    }
    k
}

/// Whether the 4-bit ggml products round the activations to 8 bits (process-wide; off unless
/// asked for with `--int8-activations`).
static INT8_ACTIVATIONS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Opts Q4_0 and Q4_1 products into llama.cpp's route (`quant_dot8`: activations rounded to 8
/// bits, integer dot products), for the whole process. Off by default: it moves logits far
/// past the tolerances that hold a GGUF model to transformers' (SmolLM2: up to 1.4), and a
/// tied Q8_0 head on it changed SmolLM2's greedy chat answers, so Q8_0 never takes it.
pub fn use_int8_activations(on: bool) {
    INT8_ACTIVATIONS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether a ggml format's product takes the 8-bit route now ([`use_int8_activations`]).
pub fn int8_activations(kind: GgmlBlocks) -> bool {
    INT8_ACTIVATIONS.load(std::sync::atomic::Ordering::Relaxed)
        && matches!(kind, GgmlBlocks::Q4_0 | GgmlBlocks::Q4_1)
}

/// `x (m, cols) · Wᵀ → (m, rows)`, row-major, in parallel over the rows of `W`. `None` when
/// the weight's layout is not whole blocks per row (the caller keeps the tiled product).
pub fn xwt(w: &QuantMatrix, x: &[f32], m: usize) -> Option<Vec<f32>> {
    xwt_stacked(std::slice::from_ref(w), x, m)
}

/// [`xwt`] of weights that read the same `x`, as one: `x · [W₀; W₁; …]ᵀ → (m, Σ rows)`, each
/// weight's outputs beside the one before's, in one parallel pass over all their rows (a
/// decoding step's q, k and v wake the thread pool once, not three times). Each output has the
/// bits [`xwt`] of its own weight gives.
pub fn xwt_stacked(ws: &[QuantMatrix], x: &[f32], m: usize) -> Option<Vec<f32>> {
    let parts: Vec<_> = ws
        .iter()
        .map(|w| {
            let int8 = match *w {
                QuantMatrix::Ggml { kind, .. } => int8_activations(kind),
                QuantMatrix::Nf4 { .. } => false,
            };
            (*w, int8.then(quant_dot8::fastest))
        })
        .collect();
    xwt_parts(&parts, x, m, fastest())
}

/// [`xwt`] with the route of a ggml weight's activations chosen by the caller (`int8`: 8-bit
/// activations, integer dot products), for the benchmark that chose [`int8_activations`].
pub fn xwt_routed(w: &QuantMatrix, x: &[f32], m: usize, int8: bool) -> Option<Vec<f32>> {
    xwt_with(w, x, m, fastest(), int8.then(quant_dot8::fastest))
}

/// The fastest kernel this CPU runs.
fn fastest() -> Kernel {
    static FASTEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *FASTEST.get_or_init(|| *kernels().last().expect("the portable kernel"))
}

/// [`xwt`] with the kernels chosen by the caller (the tests compare them all): `int8`, for
/// ggml weights, the integer route's kernel.
fn xwt_with(
    w: &QuantMatrix,
    x: &[f32],
    m: usize,
    kernel: Kernel,
    int8: Option<quant_dot8::Kernel>,
) -> Option<Vec<f32>> {
    xwt_parts(&[(*w, int8)], x, m, kernel)
}

/// [`xwt_stacked`] of `parts` (each weight with its integer route, if any) by `kernel`.
fn xwt_parts(
    parts: &[(QuantMatrix, Option<quant_dot8::Kernel>)],
    x: &[f32],
    m: usize,
    kernel: Kernel,
) -> Option<Vec<f32>> {
    let cols = parts.first()?.0.shape().1;
    if m == 0
        || x.len() != m * cols
        || parts
            .iter()
            .any(|(w, _)| !w.well_formed() || w.shape().1 != cols)
    {
        return None;
    }
    let group = if kernel == Kernel::Avx512 { 32 } else { 16 };
    // Parts that read `x` alike (q, k and v of one format, say) share one preparation.
    let mut prepared: Vec<Prepared> = Vec::new();
    let mut prepared_for = Vec::with_capacity(parts.len());
    for (p, (w, int8)) in parts.iter().enumerate() {
        let alike = (0..p).find(|&q| prepared_alike(&parts[q], &parts[p]));
        prepared_for.push(match alike {
            Some(q) => prepared_for[q],
            None => {
                prepared.push(Prepared::new(w, x, m, group, *int8));
                prepared.len() - 1
            }
        });
    }
    // Whole groups of the weight rows a kernel takes together.
    let task_rows = (TASK_WEIGHTS / cols.max(1)).max(1).next_multiple_of(4);
    // Each output row of a W gives m values, stored (rows, m), the parts one after another,
    // and transposed at the end.
    let total: usize = parts.iter().map(|(w, _)| w.shape().0).sum();
    let mut yt = vec![0f32; total * m];
    let mut tasks = Vec::new();
    let mut rest = yt.as_mut_slice();
    for (p, (w, _)) in parts.iter().enumerate() {
        let (mine, after) = rest.split_at_mut(w.shape().0 * m);
        rest = after;
        for (t, out) in mine.chunks_mut(task_rows * m).enumerate() {
            tasks.push((p, t * task_rows, out));
        }
    }
    super::team::for_each_mut(&mut tasks, |_, (p, first, out)| {
        let (p, first) = (*p, *first);
        let (w, xs, n) = (&parts[p].0, &prepared[prepared_for[p]], out.len() / m);
        let mut i = 0;
        while i < n {
            i += row_dots(w, first + i, n - i, xs, &mut out[i * m..], kernel);
        }
    });
    if m == 1 {
        return Some(yt);
    }
    let mut y = vec![0f32; m * total];
    for (j, vals) in yt.chunks_exact(m).enumerate() {
        for (r, &v) in vals.iter().enumerate() {
            y[r * total + j] = v;
        }
    }
    Some(y)
}

/// Whether two parts read `x` prepared alike: both NF4, or ggml blocks of one format on the
/// same route.
fn prepared_alike(
    a: &(QuantMatrix, Option<quant_dot8::Kernel>),
    b: &(QuantMatrix, Option<quant_dot8::Kernel>),
) -> bool {
    match (a.0, b.0) {
        (QuantMatrix::Nf4 { .. }, QuantMatrix::Nf4 { .. }) => true,
        (QuantMatrix::Ggml { kind: ka, .. }, QuantMatrix::Ggml { kind: kb, .. }) => {
            ka == kb && a.1 == b.1
        }
        _ => false,
    }
}

/// The rows of `x` as the kernels read them, computed once per call: NF4 pairs its codes
/// (high nibble, low nibble) with values (even, odd), so each `group` values of `x` (the codes
/// a kernel widens at once, twice) are stored evens then odds; Q4_1 needs each block's sum of
/// `x`. On the integer route, `x` quantized to 8 bits instead, with the kernel that reads it.
struct Prepared {
    m: usize,
    cols: usize,
    group: usize,
    values: Vec<f32>,
    block_sums: Vec<f32>,
    int8: Option<(Q8Rows, quant_dot8::Kernel)>,
}

impl Prepared {
    fn new(
        w: &QuantMatrix,
        x: &[f32],
        m: usize,
        group: usize,
        int8: Option<quant_dot8::Kernel>,
    ) -> Self {
        let cols = x.len() / m;
        if let (QuantMatrix::Ggml { kind, .. }, Some(kernel)) = (w, int8) {
            return Self {
                m,
                cols,
                group,
                values: Vec::new(),
                block_sums: Vec::new(),
                int8: Some((Q8Rows::new(x, cols, *kind), kernel)),
            };
        }
        let values = match w {
            QuantMatrix::Nf4 { .. } => {
                let mut v = vec![0f32; x.len()];
                let half = group / 2;
                for (out, g) in v.chunks_exact_mut(group).zip(x.chunks_exact(group)) {
                    for i in 0..half {
                        out[i] = g[2 * i];
                        out[half + i] = g[2 * i + 1];
                    }
                }
                v
            }
            QuantMatrix::Ggml { .. } => x.to_vec(),
        };
        let block_sums = match w {
            QuantMatrix::Ggml {
                kind: GgmlBlocks::Q4_1,
                ..
            } => x.chunks_exact(GGML_BLOCK).map(|b| b.iter().sum()).collect(),
            _ => Vec::new(),
        };
        Self {
            m,
            cols,
            group,
            values,
            block_sums,
            int8: None,
        }
    }

    fn row(&self, r: usize) -> &[f32] {
        &self.values[r * self.cols..(r + 1) * self.cols]
    }

    fn sums(&self, r: usize) -> &[f32] {
        let n = self.cols / GGML_BLOCK;
        &self.block_sums[r * n..(r + 1) * n]
    }
}

/// Weight rows the AVX-512 kernels take together for `m` rows of `x` and rows of `cols`
/// values of `w`: with one or two rows of `x`, several weight rows share each load of `x` and
/// keep several chains of sums in flight (at most four accumulators a row of `x`, two
/// registers each). Rows longer than 2048 values go one at a time: at the 7B shape (4096)
/// four interleaved rows read memory slower than one stream (`cargo bench --bench
/// quant_gemv`: Q4_0 about 13 against 19 GB/s, busy machine). With one row of `x`, ggml rows
/// longer than [`GGML_TOGETHER_COLS`] go one at a time as well.
fn rows_together(w: &QuantMatrix, m: usize, cols: usize) -> usize {
    let four = match w {
        QuantMatrix::Ggml { .. } => cols <= GGML_TOGETHER_COLS,
        QuantMatrix::Nf4 { .. } => cols <= 2048,
    };
    match m {
        1 if four => 4,
        2 if cols <= 2048 => 2,
        _ => 1,
    }
}

/// The longest ggml rows (values) four go together with one row of `x`, on either route:
/// four short rows keep four chains of sums in flight, but read from memory (two threads
/// streaming 256 MiB of copies of one SmolLM2-shaped matrix, GB/s together against one at a
/// time) four interleaved rows of 576 values gain (8-bit route Q4_0
/// 3072 / 960 / 576 rows: 23 / 19 / 16 against 16 / 16 / 13; f32 route Q8_0: 25 / 20 against
/// 19–20 / 16–17) while longer ones lose (8-bit route Q4_0, 960 values 14 against 17–19, 1536
/// values 12–15 against 15–19, 2048 values 11–17 against 23; f32 route at 1536 values, Q8_0
/// 11–13 against 17–21, Q4_1 10.5–11 against 13–13.5, Q4_0 11–15 against 11–16).
const GGML_TOGETHER_COLS: usize = 768;

/// `y[k · m + r] = Σ_i x_r[i] · W[row + k, i]` for every prepared row `r` of `x` and the
/// weight rows `row..row + k` the kernel takes together (at most `left`); returns `k`.
fn row_dots(
    w: &QuantMatrix,
    row: usize,
    left: usize,
    xs: &Prepared,
    y: &mut [f32],
    kernel: Kernel,
) -> usize {
    if let (QuantMatrix::Ggml { kind, bytes, .. }, Some((q8, int8))) = (*w, &xs.int8) {
        let size = xs.cols / GGML_BLOCK * kind.block_bytes();
        let together = quant_dot8::TOGETHER;
        if xs.m == 1
            && rows_together(w, 1, xs.cols) == together
            && left >= together
            && quant_dot8::four_rows(
                kind,
                &bytes[row * size..(row + together) * size],
                q8,
                &mut y[..together],
                *int8,
            )
        {
            return together;
        }
        quant_dot8::row_dots(
            kind,
            &bytes[row * size..(row + 1) * size],
            q8,
            &mut y[..xs.m],
            *int8,
        );
        return 1;
    }
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512 {
        let group = rows_together(w, xs.m, xs.cols);
        let k = if left >= group { group } else { 1 };
        let mut r = 0;
        while r < xs.m {
            let n = if k > 1 { xs.m } else { (xs.m - r).min(4) };
            // SAFETY: `kernels()` found AVX-512F, AVX2, FMA and F16C; `w` is well formed
            // and has the rows `row..row + k` (`k ≤ left`).
            unsafe {
                match *w {
                    QuantMatrix::Ggml { kind, bytes, .. } => match (k, n) {
                        (4, _) => ggml512::rows::<4, 1>(kind, bytes, row, xs, r, y),
                        (2, _) => ggml512::rows::<2, 2>(kind, bytes, row, xs, r, y),
                        (_, 4) => ggml512::rows::<1, 4>(kind, bytes, row, xs, r, y),
                        (_, 3) => ggml512::rows::<1, 3>(kind, bytes, row, xs, r, y),
                        (_, 2) => ggml512::rows::<1, 2>(kind, bytes, row, xs, r, y),
                        _ => ggml512::rows::<1, 1>(kind, bytes, row, xs, r, y),
                    },
                    QuantMatrix::Nf4 { .. } => match (k, n) {
                        (4, _) => avx512::nf4_rows::<4, 1>(w, row, xs, r, y),
                        (2, _) => avx512::nf4_rows::<2, 2>(w, row, xs, r, y),
                        (_, 4) => avx512::nf4_rows::<1, 4>(w, row, xs, r, y),
                        (_, 3) => avx512::nf4_rows::<1, 3>(w, row, xs, r, y),
                        (_, 2) => avx512::nf4_rows::<1, 2>(w, row, xs, r, y),
                        _ => avx512::nf4_rows::<1, 1>(w, row, xs, r, y),
                    },
                }
            }
            r += n;
        }
        return k;
    }
    let y = &mut y[..xs.m];
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable {
        let mut r = 0;
        while r < xs.m {
            let n = (xs.m - r).min(4);
            // SAFETY: `kernel` is one `kernels()` found this CPU to run.
            unsafe {
                match n {
                    4 => avx2::row::<4>(w, row, xs, r, &mut y[r..r + 4]),
                    3 => avx2::row::<3>(w, row, xs, r, &mut y[r..r + 3]),
                    2 => avx2::row::<2>(w, row, xs, r, &mut y[r..r + 2]),
                    _ => avx2::row::<1>(w, row, xs, r, &mut y[r..r + 1]),
                }
            }
            r += n;
        }
        return 1;
    }
    let _ = (kernel, left);
    for (r, y) in y.iter_mut().enumerate() {
        *y = portable::row(w, row, xs, r);
    }
    1
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// The same sums in plain Rust: per block, the sum of code × value, times the block's scale.
mod portable {
    use super::*;

    pub fn row(w: &QuantMatrix, row: usize, xs: &Prepared, r: usize) -> f32 {
        let x = xs.row(r);
        match *w {
            QuantMatrix::Nf4 {
                packed,
                scales,
                table,
                cols,
                ..
            } => {
                let codes = &packed[row * cols / 2..(row + 1) * cols / 2];
                let first_block = row * cols / NF4_BLOCK;
                let mut total = 0f32;
                for (b, (bytes, xb)) in codes
                    .chunks_exact(NF4_BLOCK / 2)
                    .zip(x.chunks_exact(NF4_BLOCK))
                    .enumerate()
                {
                    let mut sum = 0f32;
                    let half = xs.group / 2;
                    for (pair, xg) in bytes.chunks_exact(half).zip(xb.chunks_exact(xs.group)) {
                        for (i, &byte) in pair.iter().enumerate() {
                            sum += table[(byte >> 4) as usize] * xg[i];
                            sum += table[(byte & 15) as usize] * xg[half + i];
                        }
                    }
                    total += scales.get(first_block + b) * sum;
                }
                total
            }
            QuantMatrix::Ggml {
                kind, bytes, cols, ..
            } => {
                let size = kind.block_bytes();
                let n = cols / GGML_BLOCK;
                let row_bytes = &bytes[row * n * size..(row + 1) * n * size];
                let mut total = 0f32;
                for (b, (blk, xb)) in row_bytes
                    .chunks_exact(size)
                    .zip(x.chunks_exact(GGML_BLOCK))
                    .enumerate()
                {
                    let d = f16_at(blk, 0);
                    total += match kind {
                        GgmlBlocks::Q4_0 => {
                            let sum: f32 = (0..16)
                                .map(|i| {
                                    let q = blk[2 + i];
                                    f32::from((q & 15) as i8 - 8) * xb[i]
                                        + f32::from((q >> 4) as i8 - 8) * xb[16 + i]
                                })
                                .sum();
                            d * sum
                        }
                        GgmlBlocks::Q4_1 => {
                            let sum: f32 = (0..16)
                                .map(|i| {
                                    let q = blk[4 + i];
                                    f32::from(q & 15) * xb[i] + f32::from(q >> 4) * xb[16 + i]
                                })
                                .sum();
                            d * sum + f16_at(blk, 2) * xs.sums(r)[b]
                        }
                        GgmlBlocks::Q8_0 => {
                            let sum: f32 = blk[2..34]
                                .iter()
                                .zip(xb)
                                .map(|(&q, &x)| f32::from(q as i8) * x)
                                .sum();
                            d * sum
                        }
                    };
                }
                total
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn f16_scale(p: *const u8) -> f32 {
        let bits = i32::from(u16::from_le_bytes([*p, *p.add(1)]));
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }

    /// Eight bytes widened to eight i32 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn bytes8(p: *const u8) -> __m256i {
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
    }

    /// The NF4 values of eight codes: codes 0..8 from the first half of the table, 8..16 from
    /// the second (bit 3 shifted into the sign bit picks the half).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn look(t_lo: __m256, t_hi: __m256, i: __m256i) -> __m256 {
        _mm256_blendv_ps(
            _mm256_permutevar8x32_ps(t_lo, i),
            _mm256_permutevar8x32_ps(t_hi, i),
            _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)),
        )
    }

    /// Block layouts the loop reads.
    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q8_0: u8 = 2;
    const NF4: u8 = 3;

    /// What one weight row's loop reads: its first byte, and for NF4 the table halves and
    /// the scales (with the row's first block).
    struct RowCodes<'a> {
        start: *const u8,
        tables: [__m256; 2],
        nf4: Option<(Nf4Scales<'a>, usize)>,
    }

    /// `R` rows of `x` from row `r0` against weight row `row`; results into `y[..R]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row<const R: usize>(
        w: &QuantMatrix,
        row: usize,
        xs: &Prepared,
        r0: usize,
        y: &mut [f32],
    ) {
        let x: [*const f32; R] = std::array::from_fn(|r| xs.row(r0 + r).as_ptr());
        let sums: [&[f32]; R] = std::array::from_fn(|r| {
            if xs.block_sums.is_empty() {
                &[][..]
            } else {
                xs.sums(r0 + r)
            }
        });
        let (kind, cols, codes) = match *w {
            QuantMatrix::Nf4 {
                packed,
                scales,
                table,
                cols,
                ..
            } => (
                NF4,
                cols,
                RowCodes {
                    start: packed.as_ptr().add(row * cols / 2),
                    tables: [
                        _mm256_loadu_ps(table.as_ptr()),
                        _mm256_loadu_ps(table.as_ptr().add(8)),
                    ],
                    nf4: Some((scales, row * cols / NF4_BLOCK)),
                },
            ),
            QuantMatrix::Ggml {
                kind, bytes, cols, ..
            } => (
                match kind {
                    GgmlBlocks::Q4_0 => Q4_0,
                    GgmlBlocks::Q4_1 => Q4_1,
                    GgmlBlocks::Q8_0 => Q8_0,
                },
                cols,
                RowCodes {
                    start: bytes
                        .as_ptr()
                        .add(row * cols / GGML_BLOCK * kind.block_bytes()),
                    tables: [_mm256_setzero_ps(); 2],
                    nf4: None,
                },
            ),
        };
        // One loop per layout, so the block's layout is known inside it.
        let totals = match kind {
            Q4_0 => sweep::<R, Q4_0>(&codes, cols, &x, &sums),
            Q4_1 => sweep::<R, Q4_1>(&codes, cols, &x, &sums),
            Q8_0 => sweep::<R, Q8_0>(&codes, cols, &x, &sums),
            _ => sweep::<R, NF4>(&codes, cols, &x, &sums),
        };
        y[..R].copy_from_slice(&totals);
    }

    /// Values per block and bytes per block of a layout.
    const fn layout(kind: u8) -> (usize, usize) {
        match kind {
            Q4_0 => (GGML_BLOCK, 18),
            Q4_1 => (GGML_BLOCK, 20),
            Q8_0 => (GGML_BLOCK, 34),
            _ => (NF4_BLOCK, NF4_BLOCK / 2),
        }
    }

    /// `Σ_b scale_b · Σ_i q_i·x_i` (plus Q4_1's `Σ_b m_b · Σ_i x_i`) over the row's blocks.
    /// The sum of each block is independent; the running totals are the loop's only carried
    /// values, so with one or two rows of `x` they alternate between two sets of registers
    /// and two blocks are in flight (one chain of FMAs waits on its latency every block).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sweep<const R: usize, const KIND: u8>(
        codes: &RowCodes,
        cols: usize,
        x: &[*const f32; R],
        sums: &[&[f32]; R],
    ) -> [f32; R] {
        let (values, _) = layout(KIND);
        let n = cols / values;
        let z = _mm256_setzero_ps();
        let (mut even, mut odd) = ([z; R], [z; R]);
        let (mut off_even, mut off_odd) = ([0f32; R], [0f32; R]);
        let mut b = 0;
        if R <= 2 {
            while b + 1 < n {
                let (s0, d0, m0) = block::<R, KIND>(codes, b, x);
                let (s1, d1, m1) = block::<R, KIND>(codes, b + 1, x);
                for r in 0..R {
                    even[r] = _mm256_fmadd_ps(s0[r], _mm256_set1_ps(d0), even[r]);
                    odd[r] = _mm256_fmadd_ps(s1[r], _mm256_set1_ps(d1), odd[r]);
                    if KIND == Q4_1 {
                        off_even[r] += m0 * sums[r][b];
                        off_odd[r] += m1 * sums[r][b + 1];
                    }
                }
                b += 2;
            }
        }
        while b < n {
            let (s, d, m) = block::<R, KIND>(codes, b, x);
            for r in 0..R {
                even[r] = _mm256_fmadd_ps(s[r], _mm256_set1_ps(d), even[r]);
                if KIND == Q4_1 {
                    off_even[r] += m * sums[r][b];
                }
            }
            b += 1;
        }
        std::array::from_fn(|r| hsum(_mm256_add_ps(even[r], odd[r])) + (off_even[r] + off_odd[r]))
    }

    /// Block `b`'s sums `Σ_i q_i·x_i` (eight lanes per row of `x`), its scale and (Q4_1) its
    /// offset `m`. Only called from [`sweep`], into which it must inline (its result stays in
    /// registers); `#[inline(always)]` cannot go with `#[target_feature]`, so it has none of
    /// its own and takes the caller's.
    #[inline(always)]
    unsafe fn block<const R: usize, const KIND: u8>(
        codes: &RowCodes,
        b: usize,
        x: &[*const f32; R],
    ) -> ([__m256; R], f32, f32) {
        let (values, size) = layout(KIND);
        let blk = codes.start.add(b * size);
        let e = b * values;
        let mut sum = [_mm256_setzero_ps(); R];
        let fifteen = _mm256_set1_epi32(15);
        match KIND {
            Q8_0 => {
                for q in 0..4 {
                    let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        blk.add(2 + 8 * q) as *const __m128i,
                    )));
                    for r in 0..R {
                        sum[r] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x[r].add(e + 8 * q)), sum[r]);
                    }
                }
                (sum, f16_scale(blk), 0.0)
            }
            NF4 => {
                let [t_lo, t_hi] = codes.tables;
                for g in 0..NF4_BLOCK / 16 {
                    let idx = bytes8(blk.add(g * 8));
                    let hi = look(t_lo, t_hi, _mm256_srli_epi32(idx, 4));
                    let lo = look(t_lo, t_hi, _mm256_and_si256(idx, fifteen));
                    let at = e + g * 16;
                    for r in 0..R {
                        sum[r] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x[r].add(at)), sum[r]);
                        sum[r] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x[r].add(at + 8)), sum[r]);
                    }
                }
                let (scales, first) = codes.nf4.expect("NF4 rows carry their scales");
                (sum, scales.get(first + b), 0.0)
            }
            _ => {
                let qs = blk.add(if KIND == Q4_0 { 2 } else { 4 });
                for h in 0..2 {
                    let idx = bytes8(qs.add(8 * h));
                    let (mut lo, mut hi) =
                        (_mm256_and_si256(idx, fifteen), _mm256_srli_epi32(idx, 4));
                    if KIND == Q4_0 {
                        let eight = _mm256_set1_epi32(8);
                        lo = _mm256_sub_epi32(lo, eight);
                        hi = _mm256_sub_epi32(hi, eight);
                    }
                    let (lo, hi) = (_mm256_cvtepi32_ps(lo), _mm256_cvtepi32_ps(hi));
                    for r in 0..R {
                        let xr = x[r].add(e + 8 * h);
                        sum[r] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xr), sum[r]);
                        sum[r] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xr.add(16)), sum[r]);
                    }
                }
                let m = if KIND == Q4_1 {
                    f16_scale(blk.add(2))
                } else {
                    0.0
                };
                (sum, f16_scale(blk), m)
            }
        }
    }
}

/// NF4 rows with AVX-512F: 32 codes per step, the table in one register.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// The NF4 weight rows `row..row + W` against the rows `r0..r0 + R` of `x` (prepared in
    /// groups of 32): `y[k · m + r0 + r]` for weight row `row + k`. Several weight rows share
    /// each load of `x` and keep several chains of sums in flight (as `ggml512`); the table
    /// lookup reads only an index's low four bits, so the low nibbles need no mask.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn nf4_rows<const W: usize, const R: usize>(
        w: &QuantMatrix,
        row: usize,
        xs: &Prepared,
        r0: usize,
        y: &mut [f32],
    ) {
        let QuantMatrix::Nf4 {
            packed,
            scales,
            table,
            cols,
            ..
        } = *w
        else {
            unreachable!("called for NF4 weights only")
        };
        let x: [*const f32; R] = std::array::from_fn(|r| xs.row(r0 + r).as_ptr());
        let codes: [*const u8; W] =
            std::array::from_fn(|k| packed.as_ptr().add((row + k) * cols / 2));
        let first: [usize; W] = std::array::from_fn(|k| (row + k) * cols / NF4_BLOCK);
        let t = _mm512_loadu_ps(table.as_ptr());
        let z = _mm512_setzero_ps();
        // Two running totals for a lone pair of rows, as `avx2::sweep`.
        let (mut even, mut odd) = ([[z; R]; W], [[z; R]; W]);
        let n = cols / NF4_BLOCK;
        for b in 0..n {
            for k in 0..W {
                // Past the matrix's end a prefetch touches nothing (it never faults).
                _mm_prefetch::<_MM_HINT_T0>(codes[k].wrapping_add(b * 32 + PREFETCH_BYTES).cast());
                let mut sum = [z; R];
                for g in 0..NF4_BLOCK / 32 {
                    let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                        codes[k].add(b * 32 + g * 16) as *const __m128i
                    ));
                    let hi = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), t);
                    let lo = _mm512_permutexvar_ps(idx, t);
                    let at = b * NF4_BLOCK + g * 32;
                    for r in 0..R {
                        sum[r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x[r].add(at)), sum[r]);
                        sum[r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x[r].add(at + 16)), sum[r]);
                    }
                }
                let s = _mm512_set1_ps(scales.get(first[k] + b));
                for r in 0..R {
                    if W * R <= 2 && b % 2 == 1 {
                        odd[k][r] = _mm512_fmadd_ps(sum[r], s, odd[k][r]);
                    } else {
                        even[k][r] = _mm512_fmadd_ps(sum[r], s, even[k][r]);
                    }
                }
            }
        }
        for k in 0..W {
            for r in 0..R {
                y[k * xs.m + r0 + r] = _mm512_reduce_add_ps(_mm512_add_ps(even[k][r], odd[k][r]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random value in [-1, 1).
    fn value(i: usize, salt: usize) -> f32 {
        let h = (i.wrapping_mul(2654435761) ^ salt.wrapping_mul(40503)) % 10007;
        h as f32 / 5003.5 - 1.0
    }

    const TABLE: [f32; 16] = crate::kernels::nf4_codes::NF4;

    /// The composed form: the weight dequantized to f32 as given, then each product summed
    /// in f64; checks both kernels against it within the stated tolerance.
    fn check(w: &QuantMatrix, dense: &[f32]) {
        let (rows, cols) = w.shape();
        assert_eq!(dense.len(), rows * cols);
        for m in [1, 2, 3, 5, 16] {
            let x: Vec<f32> = (0..m * cols).map(|i| value(i, 7)).collect();
            for kernel in kernels() {
                let y = xwt_with(w, &x, m, kernel, None).unwrap();
                assert_eq!(y.len(), m * rows);
                for r in 0..m {
                    for j in 0..rows {
                        let terms = (0..cols)
                            .map(|i| f64::from(x[r * cols + i]) * f64::from(dense[j * cols + i]));
                        let want: f64 = terms.clone().sum();
                        let scale: f64 = terms.map(f64::abs).sum();
                        let got = f64::from(y[r * rows + j]);
                        assert!(
                            (got - want).abs() <= f64::from(TOLERANCE) * scale,
                            "m {m}, {kernel:?}, [{r},{j}]: {got} vs {want} (Σ|wx| {scale})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn nf4_equals_the_dequantized_product() {
        let (rows, cols) = (37, 192);
        let packed: Vec<u8> = (0..rows * cols / 2).map(|i| (i * 73 % 256) as u8).collect();
        let plain: Vec<f32> = (0..rows * cols / 64)
            .map(|b| 0.5 + value(b, 3).abs())
            .collect();
        let map: [f32; 256] = crate::kernels::nf4_codes::dynamic_map();
        let codes: Vec<u8> = (0..plain.len()).map(|b| (b * 37 % 256) as u8).collect();
        let nested = [0.7f32];
        let double = Nf4Scales::Double {
            codes: &codes,
            scales: &nested,
            offset: 0.3,
            map: &map,
        };
        for scales in [Nf4Scales::Plain(&plain), double] {
            let dense: Vec<f32> = (0..rows * cols)
                .map(|k| {
                    let byte = packed[k / 2];
                    let code = if k % 2 == 0 { byte >> 4 } else { byte & 15 };
                    TABLE[code as usize] * scales.get(k / 64)
                })
                .collect();
            let w = QuantMatrix::Nf4 {
                packed: &packed,
                scales,
                table: &TABLE,
                rows,
                cols,
            };
            check(&w, &dense);
        }
    }

    /// Blocks of `kind` with deterministic codes and finite f16 scales (and mins).
    fn ggml_bytes(kind: GgmlBlocks, blocks: usize) -> Vec<u8> {
        let size = kind.block_bytes();
        let mut bytes: Vec<u8> = (0..blocks * size).map(|i| (i * 131 % 251) as u8).collect();
        for (b, blk) in bytes.chunks_exact_mut(size).enumerate() {
            let d = half::f16::from_f32(0.01 + 0.003 * (b % 5) as f32).to_le_bytes();
            blk[0..2].copy_from_slice(&d);
            if kind == GgmlBlocks::Q4_1 {
                let m = half::f16::from_f32(-0.05 + 0.01 * (b % 7) as f32).to_le_bytes();
                blk[2..4].copy_from_slice(&m);
            }
        }
        bytes
    }

    /// Each ggml format's blocks for a `rows` × `cols` weight, with the dense weight by
    /// llama.cpp's reference dequantization (src/gguf/quants.rs).
    fn ggml_cases(rows: usize, cols: usize) -> Vec<(GgmlBlocks, Vec<u8>, Vec<f32>)> {
        use crate::gguf::quants::dequantize;
        use crate::gguf::GgmlType;
        [
            (GgmlBlocks::Q4_0, GgmlType::Q4_0),
            (GgmlBlocks::Q4_1, GgmlType::Q4_1),
            (GgmlBlocks::Q8_0, GgmlType::Q8_0),
        ]
        .into_iter()
        .map(|(kind, ty)| {
            let bytes = ggml_bytes(kind, rows * cols / GGML_BLOCK);
            let mut dense = vec![0f32; rows * cols];
            dequantize(ty, &bytes, &mut dense).unwrap();
            (kind, bytes, dense)
        })
        .collect()
    }

    #[test]
    fn ggml_blocks_equal_the_dequantized_product() {
        // 41 rows: groups of four and a tail; 19 blocks a row: a chunk of 16 scales and a part.
        for (rows, cols) in [(41, 160), (9, 19 * GGML_BLOCK)] {
            for (kind, bytes, dense) in ggml_cases(rows, cols) {
                let w = QuantMatrix::Ggml {
                    kind,
                    bytes: &bytes,
                    rows,
                    cols,
                };
                check(&w, &dense);
            }
        }
    }

    /// Weights stacked along the output (NF4 and every ggml format, odd row counts) give each
    /// output the bits of its own weight's product, in place.
    #[test]
    fn stacked_weights_give_each_part_its_own_product() {
        let cols = 192;
        let packed: Vec<u8> = (0..37 * cols / 2).map(|i| (i * 29 % 256) as u8).collect();
        let absmax: Vec<f32> = (0..37 * cols / 64)
            .map(|b| 0.5 + value(b, 5).abs())
            .collect();
        let nf4 = QuantMatrix::Nf4 {
            packed: &packed,
            scales: Nf4Scales::Plain(&absmax),
            table: &TABLE,
            rows: 37,
            cols,
        };
        let cases = [ggml_cases(13, cols), ggml_cases(6, cols)].concat();
        let mut ws = vec![nf4];
        ws.extend(cases.iter().map(|(kind, bytes, _)| QuantMatrix::Ggml {
            kind: *kind,
            bytes,
            rows: bytes.len() / kind.block_bytes() * GGML_BLOCK / cols,
            cols,
        }));
        let total: usize = ws.iter().map(|w| w.shape().0).sum();
        for m in [1, 2, 3, 16] {
            let x: Vec<f32> = (0..m * cols).map(|i| value(i, 11)).collect();
            // The f32 route (as `xwt_stacked` takes it here), then the integer one, where
            // parts of one format share their 8-bit activations.
            for int8 in [None, Some(quant_dot8::fastest())] {
                let parts: Vec<_> = ws
                    .iter()
                    .map(|w| (*w, int8.filter(|_| matches!(w, QuantMatrix::Ggml { .. }))))
                    .collect();
                let stacked = match int8 {
                    None => xwt_stacked(&ws, &x, m),
                    Some(_) => xwt_parts(&parts, &x, m, fastest()),
                }
                .unwrap();
                let mut first = 0;
                for (w, route) in &parts {
                    let rows = w.shape().0;
                    let alone = xwt_with(w, &x, m, fastest(), *route).unwrap();
                    for r in 0..m {
                        let got = &stacked[r * total + first..r * total + first + rows];
                        let want = &alone[r * rows..(r + 1) * rows];
                        assert_eq!(got, want, "8-bit {}, m {m}, row {r}", int8.is_some());
                    }
                    first += rows;
                }
            }
        }
        // Weights of other widths do not stack.
        let (kind, bytes, _) = &ggml_cases(1, 160)[0];
        let narrow = QuantMatrix::Ggml {
            kind: *kind,
            bytes,
            rows: 1,
            cols: 160,
        };
        assert!(xwt_stacked(&[nf4, narrow], &vec![0.0; cols], 1).is_none());
    }

    /// The integer route: every kernel equals the f64 product of the dequantized weights and
    /// the dequantized 8-bit activations within the f32 tolerance, and the f32 product of `x`
    /// within that plus the activations' rounding bound.
    #[test]
    fn ggml_int8_route_equals_the_product_of_the_quantized_activations() {
        // 19 blocks a row: two groups of eight (the SIMD kernels' step) and three alone.
        let (rows, cols) = (23, 19 * GGML_BLOCK);
        for (kind, bytes, dense) in ggml_cases(rows, cols) {
            let w = QuantMatrix::Ggml {
                kind,
                bytes: &bytes,
                rows,
                cols,
            };
            for m in [1, 2, 3, 5, 16] {
                // Values over three orders of magnitude, so the blocks' scales differ.
                let x: Vec<f32> = (0..m * cols)
                    .map(|i| value(i, 11) * [1.0, 0.01, 3.0][i / GGML_BLOCK % 3])
                    .collect();
                let q8 = Q8Rows::new(&x, cols, kind);
                for int8 in quant_dot8::kernels() {
                    let y = xwt_with(&w, &x, m, Kernel::Portable, Some(int8)).unwrap();
                    for r in 0..m {
                        let xr = &x[r * cols..(r + 1) * cols];
                        let xq = q8.dequantized(r);
                        for j in 0..rows {
                            let wj = &dense[j * cols..(j + 1) * cols];
                            let dot = |v: &[f32]| -> (f64, f64) {
                                let t =
                                    wj.iter().zip(v).map(|(&a, &b)| f64::from(a) * f64::from(b));
                                (t.clone().sum(), t.map(f64::abs).sum())
                            };
                            let ((want_q, scale_q), (want, scale)) = (dot(&xq), dot(xr));
                            let got = f64::from(y[r * rows + j]);
                            let tol = f64::from(TOLERANCE);
                            assert!(
                                (got - want_q).abs() <= tol * scale_q,
                                "{kind:?} m {m} {int8:?} [{r},{j}]: {got} vs {want_q}"
                            );
                            let bound = quant_dot8::activation_bound(wj, xr) + tol * scale;
                            assert!(
                                (got - want).abs() <= bound,
                                "{kind:?} m {m} {int8:?} [{r},{j}]: {got} vs f32 {want} ± {bound}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rows_of_partial_blocks_are_refused() {
        let bytes = ggml_bytes(GgmlBlocks::Q8_0, 3);
        let w = QuantMatrix::Ggml {
            kind: GgmlBlocks::Q8_0,
            bytes: &bytes,
            rows: 2,
            cols: 48,
        };
        assert!(xwt(&w, &[0.0; 48], 1).is_none());
    }
}
