//! Row kernels the compiler can vectorise. libm's `expf` is a call per element, and a float
//! sum in one accumulator is a chain the compiler must keep in order; either one keeps a loop
//! scalar. Here the exponential is straight-line arithmetic and reductions run in `LANES`
//! independent accumulators, so softmax, cross-entropy and SiLU loops become SIMD.

use candle_core::WithDType;

/// Independent accumulators of a reduction: one AVX register of f32.
pub(crate) const LANES: usize = 8;

/// The float types the CPU kernels compute in, with their exponential.
pub(crate) trait Real: WithDType {
    fn exp(self) -> Self;

    /// The larger of two values; NaN wins, so a poisoned row stays poisoned.
    #[inline(always)]
    fn max_nan(self, other: Self) -> Self {
        if self > other || self.to_f64().is_nan() {
            self
        } else {
            other
        }
    }
}

/// f32 as PyTorch's CPU kernels compute it: a vectorised exp within 2ε relative.
impl Real for f32 {
    #[inline(always)]
    fn exp(self) -> f32 {
        exp_f32(self)
    }
}

/// f64 (gradient checks) keeps libm's correctly rounded exp.
impl Real for f64 {
    #[inline(always)]
    fn exp(self) -> f64 {
        f64::exp(self)
    }
}

/// A storage type and the precision its kernels compute in: f64 for f64, f32 for the
/// others (as PyTorch computes bf16 and f16 on the CPU).
pub(crate) trait Computed: WithDType {
    type In: Real;
    fn up(self) -> Self::In;
    fn down(v: Self::In) -> Self;
}

macro_rules! computed {
    ($t:ty, $in:ty, $up:expr, $down:expr) => {
        impl Computed for $t {
            type In = $in;
            #[inline(always)]
            fn up(self) -> $in {
                $up(self)
            }
            #[inline(always)]
            fn down(v: $in) -> $t {
                $down(v)
            }
        }
    };
}
computed!(f32, f32, |v| v, |v| v);
computed!(f64, f64, |v| v, |v| v);
computed!(half::bf16, f32, half::bf16::to_f32, half::bf16::from_f32);
computed!(half::f16, f32, half::f16::to_f32, half::f16::from_f32);

/// 1 / (1 + e⁻ᵛ).
#[inline(always)]
pub(crate) fn sigmoid<R: Real>(v: R) -> R {
    R::one() / (R::one() + (R::zero() - v).exp())
}

/// ln 2 in two parts: `n · LN2_HI` is exact for the |n| ≤ 128 used here.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2²³: adding it leaves round-to-nearest(v) in the low mantissa bits of the sum.
const ROUND: f32 = 12_582_912.0;
/// Outside [MIN, MAX] eˣ is below the smallest normal f32 (returned as 0) or overflows.
const MIN: f32 = -87.336_54;
const MAX: f32 = 88.722_84;

/// eˣ in f32: x = n·ln2 + r with |r| ≤ ln2/2, eʳ by Cephes' degree-6 minimax polynomial,
/// 2ⁿ put in the exponent bits. Selects only, no branches (or the loop stays scalar);
/// NaN in → NaN out.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let xc = x.clamp(MIN, MAX);
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // 2ⁿ in two factors: n reaches 128, whose power alone is not an f32.
    let n = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let y = er * pow2(n >> 1) * pow2(n - (n >> 1));
    let y = if x < MIN { 0.0 } else { y };
    let y = if x > MAX { f32::INFINITY } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// 2ᵏ for −126 ≤ k ≤ 127, built from its exponent bits.
#[inline(always)]
fn pow2(k: i32) -> f32 {
    f32::from_bits(((k + 127) << 23) as u32)
}

/// The largest element (NaN if any is NaN); −∞ for an empty row.
#[inline(always)]
pub(crate) fn max<T: Real>(x: &[T]) -> T {
    let mut acc = [T::from_f64(f64::NEG_INFINITY); LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max_nan(c[l]);
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        acc[l] = acc[l].max_nan(v);
    }
    acc.into_iter().fold(acc[0], T::max_nan)
}

/// Defines `fn $name` that runs the `#[inline(always)]` kernel `$portable` compiled for
/// AVX2's 8-wide registers when the CPU has them (the default x86-64 target has only
/// SSE2's 4-wide ones), and as it is otherwise.
macro_rules! with_avx2 {
    ($(#[$doc:meta])* $vis:vis fn $name:ident<$t:ident: $bound:path>($($arg:ident: $ty:ty),*) -> $ret:ty = $portable:path) => {
        $(#[$doc])*
        $vis fn $name<$t: $bound>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2<$t: $bound>($($arg: $ty),*) -> $ret {
                    $portable($($arg),*)
                }
                // SAFETY: the CPU has AVX2.
                return unsafe { avx2($($arg),*) };
            }
            $portable($($arg),*)
        }
    };
}
pub(crate) use with_avx2;

/// `x ← exp(x − shift)` element-wise; returns the new Σ x.
#[inline(always)]
pub(crate) fn exp_into_self<T: Real>(x: &mut [T], shift: T) -> T {
    x.iter_mut().for_each(|v| *v = (*v - shift).exp());
    sum(x)
}

/// `x ← softmax(scale · x)`.
#[inline(always)]
pub(crate) fn softmax_in_place<T: Real>(x: &mut [T], scale: T) {
    let max = max(x);
    x.iter_mut().for_each(|v| *v = scale * (*v - max));
    let inv = T::one() / exp_into_self(x, T::zero());
    x.iter_mut().for_each(|v| *v *= inv);
}

/// Σ x.
#[inline(always)]
pub(crate) fn sum<T: Real>(x: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        acc[l] += v;
    }
    acc.into_iter().fold(T::zero(), |a, b| a + b)
}

/// Σ exp(x − shift), nothing written.
#[inline(always)]
pub(crate) fn exp_sum<T: Real>(x: &[T], shift: T) -> T {
    let mut acc = [T::zero(); LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += (c[l] - shift).exp();
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        acc[l] += (v - shift).exp();
    }
    acc.into_iter().fold(T::zero(), |a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error within 2ε of the exact exponential over the whole normal range; the
    /// ends and NaN as libm's.
    #[test]
    fn exp_f32_is_within_two_epsilon_relative() {
        let mut worst = 0f64;
        let mut x = MIN;
        while x < MAX {
            let exact = (x as f64).exp();
            worst = worst.max((exp_f32(x) as f64 - exact).abs() / exact / f32::EPSILON as f64);
            x += 0.000_731;
        }
        assert!(worst <= 2.0, "worst relative error {worst} ε");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn lane_reductions_equal_the_plain_ones() {
        let x: Vec<f64> = (0..1003)
            .map(|i| ((i * 37 % 101) as f64 - 50.0) / 7.0)
            .collect();
        let plain_max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(max(&x), plain_max);
        let plain_sum: f64 = x.iter().map(|v| (v - plain_max).exp()).sum();
        assert!((exp_sum(&x, plain_max) - plain_sum).abs() < 1e-12 * plain_sum);
        let mut y = x.clone();
        assert!((exp_into_self(&mut y, plain_max) - plain_sum).abs() < 1e-12 * plain_sum);
        assert_eq!(y[5], (x[5] - plain_max).exp());
        let mut poisoned = x.clone();
        poisoned[1001] = f64::NAN;
        assert!(max(&poisoned).is_nan());
    }
}
