//! pandas' `DataFrame.sample(k, random_state=seed)` (what MMLU's `--n_instances` calls): numpy's
//! legacy `RandomState(seed).permutation(n)[:k]`, the rows in the order it returns them.

use crate::data::rng::Mt19937;

/// The row positions `df.sample(k, random_state=seed)` takes from `n` rows (k ≤ n).
pub fn pandas_sample(seed: u32, n: usize, k: usize) -> Vec<usize> {
    assert!(k <= n, "sample of {k} from {n}");
    let mut mt = Mt19937::numpy(seed);
    let mut rows: Vec<usize> = (0..n).collect();
    // numpy's legacy shuffle: Fisher–Yates from the end, j by masked rejection.
    for i in (1..n).rev() {
        let j = interval(&mut mt, i as u32) as usize;
        rows.swap(i, j);
    }
    rows.truncate(k);
    rows
}

/// numpy's `random_interval(max)`: a value in [0, max], drawn under the smallest all-ones mask
/// covering max until it is at most max (one 32-bit word a draw: tables have fewer rows).
fn interval(mt: &mut Mt19937, max: u32) -> u32 {
    let mask = u32::MAX >> max.leading_zeros();
    loop {
        let value = mt.next_u32() & mask;
        if value <= max {
            return value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pandas_sample;

    // Expected values: pandas 2.1.3 with numpy 1.26.4, e.g.
    // python3 -c 'import pandas as pd; print(list(pd.DataFrame({"a": range(100)}).sample(5, random_state=42).index))'
    #[test]
    fn rows_equal_pandas() {
        assert_eq!(pandas_sample(42, 10, 10), [8, 1, 5, 0, 7, 2, 9, 4, 3, 6]);
        assert_eq!(pandas_sample(42, 10, 4), [8, 1, 5, 0]);
        assert_eq!(pandas_sample(42, 100, 5), [83, 53, 70, 45, 44]);
        assert_eq!(pandas_sample(42, 300, 7), [203, 266, 152, 9, 233, 226, 196]);
        assert_eq!(pandas_sample(42, 70000, 3), [46730, 48393, 41416]);
        assert!(pandas_sample(42, 5, 0).is_empty());
    }
}
