//! `x · wᵀ` for an `x` of a few rows, as a decoding step has (one per sequence): each row of `w`
//! is read once from memory, and multiplied with up to four rows of `x` in registers. A GEMM
//! packs all of `w` first, which at a handful of rows costs about as much as the product (the
//! 49,152 × d vocabulary head, every step), and candle's one-row product ran on one core.
//!
//! The weight may be f32 or bf16: bf16 rows are widened to f32 in registers (a shift of the
//! 16 bits into the high half, exact), so a bf16 weight reads half the bytes and computes in
//! f32, as PyTorch's CPU kernels do.

use half::bf16;

/// Rows of `x` for which the skinny product is used: a decoding step's, up to a server's batch
/// of 64 (`cargo bench --bench skinny`: at 64 rows it still beats the GEMM, which packs the
/// whole weight at every call; beyond, the GEMM reuses each packed tile enough to be faster).
pub const ROWS: std::ops::RangeInclusive<usize> = 1..=64;

/// Smallest number of `w` rows per task: enough work to outweigh a task's hand-off.
const MIN_TASK_ROWS: usize = 64;

/// Tasks per thread for a large weight, so that an unlucky thread's last task is short.
const TASKS_PER_THREAD: usize = 2;

/// Whether this CPU runs the kernel (AVX2 and FMA); elsewhere the GEMM is used.
pub fn available() -> bool {
    kernel().is_some()
}

/// The register width the products run at: every row count uses the same one, so a row's
/// sums are added in one order whatever else is in the batch.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernel {
    /// 16 lanes, 32 registers: tiles of 6 rows of x by 4 rows of w.
    Avx512,
    /// 8 lanes, 16 registers: tiles of 4 rows of x by 3 rows of w.
    Avx2,
}

fn kernel() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        static KERNEL: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            if has!("avx512f") && has!("fma") {
                Some(Kernel::Avx512)
            } else if has!("avx2") && has!("fma") {
                Some(Kernel::Avx2)
            } else {
                None
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// A weight element type the kernel reads: f32 as is, bf16 widened exactly.
pub trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// Eight elements from `p` as f32 lanes.
    ///
    /// # Safety
    /// `p` is valid for eight reads and the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Sixteen elements from `p` as f32 lanes.
    ///
    /// # Safety
    /// `p` is valid for sixteen reads and the CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let halves = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(halves)))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let halves = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(halves)))
    }
}

/// The output pointer, shared by tasks that write disjoint columns of it.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes only its own columns (its own rows of w), never read by another.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer `offset` elements on (a method, so that a task's closure takes the whole
    /// `Out`, which is Send, not its pointer field).
    unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// `x (m, k) · wᵀ` for `w (n, k)`, both row-major; returns `(m, n)` row-major. Call only when
/// [`available`].
pub fn xwt<W: WeightElem>(x: &[f32], w: &[W], m: usize, k: usize, n: usize) -> Vec<f32> {
    let kernel = kernel().expect("skinny: needs AVX2 and FMA");
    let mut y = Vec::with_capacity(m * n);
    // Not zero-filled first: on a server's decoding step that fill ran on the calling thread
    // alone, for every linear, while the pool waited.
    let out = y.spare_capacity_mut().as_mut_ptr() as *mut f32;
    // SAFETY: the product writes every one of the m·n elements.
    unsafe {
        product(kernel, x, w, m, k, n, out);
        y.set_len(m * n);
    }
    y
}

/// [`xwt`] written into `y (m, n)`, every element of it: a caller that keeps its buffer (a
/// server's vocabulary logits, every step) neither zeroes nor allocates it again.
pub fn xwt_into<W: WeightElem>(x: &[f32], w: &[W], m: usize, k: usize, n: usize, y: &mut [f32]) {
    let kernel = kernel().expect("skinny: needs AVX2 and FMA");
    xwt_with(kernel, x, w, m, k, n, y)
}

/// [`xwt_into`] with the given kernel, which the CPU must run.
fn xwt_with<W: WeightElem>(
    kernel: Kernel,
    x: &[f32],
    w: &[W],
    m: usize,
    k: usize,
    n: usize,
    y: &mut [f32],
) {
    assert_eq!(y.len(), m * n, "skinny: y is (m, n)");
    // SAFETY: y holds the m·n elements written.
    unsafe { product(kernel, x, w, m, k, n, y.as_mut_ptr()) }
}

/// `x · wᵀ` into the `m·n` elements at `y`, every one of them written.
///
/// # Safety
/// `y` is valid for `m·n` writes and the CPU runs `kernel`.
unsafe fn product<W: WeightElem>(
    kernel: Kernel,
    x: &[f32],
    w: &[W],
    m: usize,
    k: usize,
    n: usize,
    y: *mut f32,
) {
    assert_eq!(x.len(), m * k, "skinny: x is (m, k)");
    assert_eq!(w.len(), n * k, "skinny: w is (n, k)");
    if n == 0 || k == 0 {
        std::ptr::write_bytes(y, 0, m * n);
        return;
    }
    let tasks = rayon::current_num_threads() * TASKS_PER_THREAD;
    let task_rows = n.div_ceil(tasks).max(MIN_TASK_ROWS);
    let out = Out(y);
    let mut tasks: Vec<&[W]> = w.chunks(task_rows * k).collect();
    super::team::for_each_mut(&mut tasks, |t, rows| {
        let rows = *rows;
        // SAFETY: the CPU has the kernel's features; this task writes columns
        // t·task_rows.. of each row of y, which no other task writes.
        let out = unsafe { out.at(t * task_rows) };
        match kernel {
            Kernel::Avx512 => unsafe { avx512::block(x, rows, m, k, out, n) },
            Kernel::Avx2 => unsafe { avx2::block(x, rows, m, k, out, n) },
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::WeightElem;
    use std::arch::x86_64::*;

    /// Rows of w multiplied by every row of x before the next ones are read: they stay in
    /// the L2 cache while each group of x rows passes over them.
    const W_BLOCK: usize = 16;

    /// `out[r·stride + j]` = x row r · `w_rows` row j, for every row of x and of `w_rows`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block<W: WeightElem>(
        x: &[f32],
        w_rows: &[W],
        m: usize,
        k: usize,
        out: *mut f32,
        stride: usize,
    ) {
        let rows = w_rows.len() / k;
        let (x, w) = (x.as_ptr(), w_rows.as_ptr());
        if m == 1 {
            // One row of x: a single sequential stream through w, which the prefetcher keeps
            // ahead of (several rows at once, several streams, read memory slower).
            return rows_of::<1, 1, W>(x, w, k, rows, out, stride);
        }
        for j in (0..rows).step_by(W_BLOCK) {
            let (w, out, rows) = (w.add(j * k), out.add(j), W_BLOCK.min(rows - j));
            let mut r = 0;
            while r < m {
                // Four rows of x share each loaded row of w; what is left, a narrower tile.
                let (x, out) = (x.add(r * k), out.add(r * stride));
                match m - r {
                    1 => rows_of::<1, 1, W>(x, w, k, rows, out, stride),
                    2 => rows_of::<2, 4, W>(x, w, k, rows, out, stride),
                    3 => rows_of::<3, 3, W>(x, w, k, rows, out, stride),
                    _ => rows_of::<4, 3, W>(x, w, k, rows, out, stride),
                }
                r += 4;
            }
        }
    }

    /// `M` rows of x times every one of `rows` rows of w, `R` rows of w at a time.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_of<const M: usize, const R: usize, W: WeightElem>(
        x: *const f32,
        w: *const W,
        k: usize,
        rows: usize,
        out: *mut f32,
        stride: usize,
    ) {
        let mut j = 0;
        while j + R <= rows {
            let sums = tile::<M, R, W>(x, w.add(j * k), k);
            for (p, col) in sums.iter().enumerate() {
                for (q, s) in col.iter().enumerate() {
                    *out.add(q * stride + j + p) = *s;
                }
            }
            j += R;
        }
        while j < rows {
            let sums = tile::<M, 1, W>(x, w.add(j * k), k);
            for (q, s) in sums[0].iter().enumerate() {
                *out.add(q * stride + j) = *s;
            }
            j += 1;
        }
    }

    /// `[w row][x row]` dot products of `M` rows of x (stride k) and `R` rows of w (stride k):
    /// M·R accumulators in registers over the whole eights, then the tail in scalars. Each
    /// product is summed in the same order whatever M and R are, so a row of x gets the same
    /// bits alone or beside others (a sequence decodes the same tokens in any batch).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const M: usize, const R: usize, W: WeightElem>(
        x: *const f32,
        w: *const W,
        k: usize,
    ) -> [[f32; M]; R] {
        let whole = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); M]; R];
        let mut i = 0;
        while i < whole {
            let mut wv = [_mm256_setzero_ps(); R];
            for (p, v) in wv.iter_mut().enumerate() {
                *v = W::load8(w.add(p * k + i));
            }
            for q in 0..M {
                let xv = _mm256_loadu_ps(x.add(q * k + i));
                for p in 0..R {
                    acc[p][q] = _mm256_fmadd_ps(xv, wv[p], acc[p][q]);
                }
            }
            i += 8;
        }
        let mut sums = [[0f32; M]; R];
        for p in 0..R {
            for q in 0..M {
                let mut s = hsum(acc[p][q]);
                for t in whole..k {
                    s += *x.add(q * k + t) * (*w.add(p * k + t)).to_f32();
                }
                sums[p][q] = s;
            }
        }
        sums
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair)))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::WeightElem;
    use std::arch::x86_64::*;

    /// Rows of w per panel: a panel (4 × k) stays in the L1 cache while every row of x passes
    /// over it, and x (tens of rows) stays in the L2 cache; w is read from memory once.
    const PANEL: usize = 4;

    /// Rows of x per tile: 6 × 4 accumulators, 4 rows of w and one of x fill the 32 registers.
    const TILE: usize = 6;

    /// `out[r·stride + j]` = x row r · `w_rows` row j, for every row of x and of `w_rows`.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn block<W: WeightElem>(
        x: &[f32],
        w_rows: &[W],
        m: usize,
        k: usize,
        out: *mut f32,
        stride: usize,
    ) {
        let rows = w_rows.len() / k;
        let (x, w) = (x.as_ptr(), w_rows.as_ptr());
        let mut j = 0;
        while j < rows {
            // One row of x: a single sequential stream through w (several streams at once
            // read memory slower); more rows: panels that each pass meets in the L1 cache.
            let panel = if m == 1 { 1 } else { PANEL.min(rows - j) };
            let (w, out) = (w.add(j * k), out.add(j));
            let mut r = 0;
            while r < m {
                let (x, out) = (x.add(r * k), out.add(r * stride));
                match (m - r, panel) {
                    (1, PANEL) => tile::<1, PANEL, W>(x, w, k, out, stride),
                    (2, PANEL) => tile::<2, PANEL, W>(x, w, k, out, stride),
                    (3, PANEL) => tile::<3, PANEL, W>(x, w, k, out, stride),
                    (4, PANEL) => tile::<4, PANEL, W>(x, w, k, out, stride),
                    (5, PANEL) => tile::<5, PANEL, W>(x, w, k, out, stride),
                    (_, PANEL) => tile::<TILE, PANEL, W>(x, w, k, out, stride),
                    (1, _) => per_row::<1, W>(x, w, k, panel, out, stride),
                    (2, _) => per_row::<2, W>(x, w, k, panel, out, stride),
                    (3, _) => per_row::<3, W>(x, w, k, panel, out, stride),
                    (4, _) => per_row::<4, W>(x, w, k, panel, out, stride),
                    (5, _) => per_row::<5, W>(x, w, k, panel, out, stride),
                    _ => per_row::<TILE, W>(x, w, k, panel, out, stride),
                }
                r += TILE;
            }
            j += panel;
        }
    }

    /// `M` rows of x times each of `rows` rows of w, one row of w at a time (a panel's last
    /// few rows).
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn per_row<const M: usize, W: WeightElem>(
        x: *const f32,
        w: *const W,
        k: usize,
        rows: usize,
        out: *mut f32,
        stride: usize,
    ) {
        for p in 0..rows {
            tile::<M, 1, W>(x, w.add(p * k), k, out.add(p), stride);
        }
    }

    /// The `[x row][w row]` dot products of `M` rows of x and `R` rows of w (both stride k),
    /// written to `out[q·stride + p]`: M·R accumulators of 16 lanes over the whole sixteens,
    /// then the tail in scalars. Each product is summed in the same order whatever M and R
    /// are, so a row of x gets the same bits alone or beside others.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn tile<const M: usize, const R: usize, W: WeightElem>(
        x: *const f32,
        w: *const W,
        k: usize,
        out: *mut f32,
        stride: usize,
    ) {
        let whole = k / 16 * 16;
        let mut acc = [[_mm512_setzero_ps(); R]; M];
        let mut i = 0;
        while i < whole {
            let mut wv = [_mm512_setzero_ps(); R];
            for (p, v) in wv.iter_mut().enumerate() {
                *v = W::load16(w.add(p * k + i));
            }
            for (q, acc) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(x.add(q * k + i));
                for p in 0..R {
                    acc[p] = _mm512_fmadd_ps(xv, wv[p], acc[p]);
                }
            }
            i += 16;
        }
        for (q, acc) in acc.iter().enumerate() {
            for (p, acc) in acc.iter().enumerate() {
                let mut s = _mm512_reduce_add_ps(*acc);
                for t in whole..k {
                    s += *x.add(q * k + t) * (*w.add(p * k + t)).to_f32();
                }
                *out.add(q * stride + p) = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `y` equals the f64 product of `x` and `w` (given as f32 values) within f32 rounding.
    fn check(y: &[f32], x: &[f32], w: &[f32], (m, k, n): (usize, usize, usize)) {
        for r in 0..m {
            for j in 0..n {
                let terms = (0..k).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64);
                let want: f64 = terms.clone().sum();
                let scale: f64 = terms.map(f64::abs).sum();
                let got = y[r * n + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * scale.max(1.0),
                    "({m},{k},{n}) [{r},{j}]: {got} vs {want}"
                );
            }
        }
    }

    /// Row counts around the tiles (four and six rows of x, one), numbers of w rows around
    /// the panels (three and four), widths with a tail of each register width, weights large
    /// enough to be split between tasks, and a server's 64 rows.
    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 16, 3),
        (13, 35, 6),
        (64, 40, 67),
        (7, 47, 9),
        (1, 37, 301),
        (2, 24, 9),
        (3, 13, 70),
        (4, 64, 129),
        (6, 19, 67),
        (11, 37, 65),
        (16, 256, 200),
        // Past 64 rows (a server's vocabulary head at any row count): tiles of 6 rows with a
        // remainder.
        (256, 24, 17),
        (131, 40, 9),
        (5, 8, 1),
        (1, 40, 1000),
    ];

    fn inputs((m, k, n): (usize, usize, usize)) -> (Vec<f32>, Vec<f32>) {
        let x = (0..m * k)
            .map(|i| ((i * 7919) % 97) as f32 / 48.0 - 1.0)
            .collect();
        let w = (0..n * k)
            .map(|i| ((i * 104729) % 89) as f32 / 44.0 - 1.0)
            .collect();
        (x, w)
    }

    /// Every kernel this CPU runs (the AVX2 one also where AVX-512 is there).
    fn kernels() -> Vec<Kernel> {
        let mut all: Vec<Kernel> = kernel().into_iter().collect();
        if all == [Kernel::Avx512] {
            all.push(Kernel::Avx2);
        }
        all
    }

    fn product<W: WeightElem>(
        kernel: Kernel,
        x: &[f32],
        w: &[W],
        shape: (usize, usize, usize),
    ) -> Vec<f32> {
        let (m, k, n) = shape;
        let mut y = vec![f32::NAN; m * n];
        xwt_with(kernel, x, w, m, k, n, &mut y);
        y
    }

    #[test]
    fn skinny_product_equals_the_f64_product() {
        for kernel in kernels() {
            for &shape in SHAPES {
                let (x, w) = inputs(shape);
                check(&product(kernel, &x, &w, shape), &x, &w, shape);
            }
        }
    }

    /// A row's products do not depend on the rows beside it: bit for bit what it gets alone.
    #[test]
    fn a_row_gets_the_same_bits_in_any_batch() {
        for kernel in kernels() {
            for &shape in SHAPES {
                let (m, k, n) = shape;
                let (x, w) = inputs(shape);
                let together = product(kernel, &x, &w, shape);
                for r in 0..m {
                    let alone = product(kernel, &x[r * k..(r + 1) * k], &w, (1, k, n));
                    assert_eq!(
                        alone,
                        &together[r * n..(r + 1) * n],
                        "{kernel:?} {shape:?} row {r}"
                    );
                }
            }
        }
    }

    /// Into a used buffer: every element is overwritten with what [`xwt`] gives, bit for bit.
    #[test]
    fn into_a_used_buffer_every_element_is_written() {
        if !available() {
            return;
        }
        for shape in [(64, 40, 300), (37, 19, 67), (3, 0, 5)] {
            let (m, k, n) = shape;
            let (x, w) = inputs(shape);
            let mut y = vec![f32::NAN; m * n];
            xwt_into(&x, &w, m, k, n, &mut y);
            assert_eq!(y, xwt(&x, &w, m, k, n), "{shape:?}");
            check(&y, &x, &w, shape);
        }
    }

    /// A bf16 weight is widened exactly: the product equals the f64 product of its values.
    #[test]
    fn bf16_weights_give_the_product_of_their_values() {
        for kernel in kernels() {
            for &shape in SHAPES {
                let (x, w) = inputs(shape);
                let w16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v * 1.37)).collect();
                let widened: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
                check(&product(kernel, &x, &w16, shape), &x, &widened, shape);
            }
        }
    }
}
