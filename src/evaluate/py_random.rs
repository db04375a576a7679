//! CPython's `random` module, as far as the reference's evaluation scripts use it:
//! `random.seed(int)`, `getrandbits`, and `random.sample` (Python 3.8–3.12), so that the
//! subsets and exemplars they draw after `random.seed(42)` are drawn here too, draw for draw.

/// MT19937 (Matsumoto & Nishimura), the generator behind CPython's `random.Random`.
pub struct Mt19937 {
    state: [u32; N],
    next: usize,
}

const N: usize = 624;
const M: usize = 397;

impl Mt19937 {
    /// `init_genrand(seed)`: numpy's legacy `RandomState(seed)`.
    pub fn from_u32(seed: u32) -> Self {
        let mut state = [0u32; N];
        state[0] = seed;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, next: N }
    }

    /// `init_by_array(key)`: what `random.seed(n)` does with the 32-bit words of |n|.
    pub fn from_key(key: &[u32]) -> Self {
        let mut g = Self::from_u32(19_650_218);
        let mt = &mut g.state;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            let prev = mt[i - 1] ^ (mt[i - 1] >> 30);
            mt[i] = (mt[i] ^ prev.wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = mt[i - 1] ^ (mt[i - 1] >> 30);
            mt[i] = (mt[i] ^ prev.wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        g
    }

    /// The next 32-bit output (`genrand_uint32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.next >= N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn twist(&mut self) {
        let mt = &mut self.state;
        for k in 0..N {
            let y = (mt[k] & 0x8000_0000) | (mt[(k + 1) % N] & 0x7fff_ffff);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            mt[k] = mt[(k + M) % N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }
}

/// `random.Random` after `random.seed(seed)`.
pub struct PyRandom(Mt19937);

impl PyRandom {
    /// `random.seed(seed)` for an int: the key is |seed|'s 32-bit words, least significant
    /// first ([0] for 0).
    pub fn seeded(seed: i64) -> Self {
        let n = seed.unsigned_abs();
        let key: Vec<u32> = match n >> 32 {
            0 => vec![n as u32],
            high => vec![n as u32, high as u32],
        };
        PyRandom(Mt19937::from_key(&key))
    }

    /// `getrandbits(k)` for k ≤ 64: whole words, least significant first; the last one keeps
    /// its top bits.
    pub fn getrandbits(&mut self, k: u32) -> u64 {
        assert!(k <= 64, "getrandbits({k}): at most 64 bits here");
        let (mut bits, mut left, mut shift) = (0u64, k, 0);
        while left > 0 {
            let word = self.0.next_u32();
            let take = left.min(32);
            bits |= u64::from(word >> (32 - take)) << shift;
            shift += take;
            left -= take;
        }
        bits
    }

    /// `_randbelow(n)` (n ≥ 1): k = n.bit_length() bits, redrawn until below n.
    pub fn randbelow(&mut self, n: u64) -> u64 {
        let k = 64 - n.leading_zeros();
        loop {
            let r = self.getrandbits(k);
            if r < n {
                return r;
            }
        }
    }

    /// The indices `random.sample(range(n), k)` returns (k ≤ n): a partial shuffle of a pool
    /// when a list of n is smaller than a set of k, else rejection of repeats.
    pub fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        assert!(k <= n, "sample of {k} from {n}");
        let mut setsize = 21;
        if k > 5 {
            // 4 ** ceil(log(3k, 4)), in floating point as CPython computes it.
            let exponent = ((k * 3) as f64).ln() / 4f64.ln();
            setsize += 4usize.pow(exponent.ceil() as u32);
        }
        if n <= setsize {
            let mut pool: Vec<usize> = (0..n).collect();
            (0..k)
                .map(|i| {
                    let j = self.randbelow((n - i) as u64) as usize;
                    let picked = pool[j];
                    pool[j] = pool[n - i - 1];
                    picked
                })
                .collect()
        } else {
            let mut selected = std::collections::HashSet::new();
            (0..k)
                .map(|_| loop {
                    let j = self.randbelow(n as u64) as usize;
                    if selected.insert(j) {
                        return j;
                    }
                })
                .collect()
        }
    }

    /// `random.sample(items, k)`.
    pub fn sample_of<T: Clone>(&mut self, items: &[T], k: usize) -> Vec<T> {
        self.sample(items.len(), k)
            .into_iter()
            .map(|i| items[i].clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::PyRandom;

    // Every expected value below is CPython 3.11.7's output for the command in the comment.

    #[test]
    fn words_equal_cpython() {
        // python3 -c 'import random; random.seed(42); print([random.getrandbits(32) for _ in range(3)])'
        let mut r = PyRandom::seeded(42);
        let words: Vec<u64> = (0..3).map(|_| r.getrandbits(32)).collect();
        assert_eq!(words, [2746317213, 478163327, 107420369]);
        // python3 -c 'import random; random.seed(0); print(random.getrandbits(32))'
        assert_eq!(PyRandom::seeded(0).getrandbits(32), 3626764237);
        // python3 -c 'import random; random.seed(-7); print(random.getrandbits(32))'
        assert_eq!(PyRandom::seeded(-7).getrandbits(32), 1390851128);
        // python3 -c 'import random; random.seed(2**40+5); print(random.getrandbits(32))'
        assert_eq!(PyRandom::seeded((1 << 40) + 5).getrandbits(32), 2166296868);
    }

    #[test]
    fn getrandbits_equals_cpython() {
        // python3 -c 'import random; random.seed(42); print(random.getrandbits(1),
        //   random.getrandbits(7), random.getrandbits(33), random.getrandbits(64))'
        let mut r = PyRandom::seeded(42);
        let got = [
            r.getrandbits(1),
            r.getrandbits(7),
            r.getrandbits(33),
            r.getrandbits(64),
        ];
        assert_eq!(got, [1, 14, 4402387665, 4517457392071889495]);
    }

    fn sample(seed: i64, n: usize, k: usize) -> Vec<usize> {
        PyRandom::seeded(seed).sample(n, k)
    }

    #[test]
    fn sample_from_a_pool_equals_cpython() {
        // python3 -c 'import random; random.seed(42); print(random.sample(range(10), 10))'
        assert_eq!(sample(42, 10, 10), [1, 0, 4, 9, 6, 5, 8, 2, 3, 7]);
        // python3 -c 'import random; random.seed(42); print(random.sample(range(50), 10))'
        assert_eq!(sample(42, 50, 10), [40, 7, 1, 17, 15, 14, 8, 6, 34, 5]);
        // python3 -c 'import random; random.seed(0); print(random.sample(range(21), 6))'
        assert_eq!(sample(0, 21, 6), [12, 13, 1, 8, 16, 15]);
    }

    #[test]
    fn sample_by_rejection_equals_cpython() {
        // python3 -c 'import random; random.seed(42); print(random.sample(range(100), 5))'
        assert_eq!(sample(42, 100, 5), [81, 14, 3, 94, 35]);
        // python3 -c 'import random; random.seed(0); print(random.sample(range(22), 3))'
        assert_eq!(sample(0, 22, 3), [12, 13, 1]);
        // python3 -c 'import random; random.seed(42); print(random.sample(range(10**6), 7))'
        assert_eq!(
            sample(42, 1_000_000, 7),
            [670487, 116739, 26225, 777572, 288389, 256787, 234053]
        );
        // python3 -c 'import random; random.seed(42); print(random.sample(range(5000), 40))'
        assert_eq!(
            sample(42, 5000, 40),
            [
                912, 204, 2253, 2006, 1828, 1143, 839, 4467, 712, 4837, 3456, 260, 244, 767, 1791,
                1905, 4139, 4931, 217, 4597, 1628, 4464, 3436, 1805, 3679, 4827, 2278, 53, 1307,
                3462, 2787, 2276, 1273, 1763, 2757, 837, 759, 3112, 792, 2940
            ]
        );
    }

    #[test]
    fn sample_of_a_population_past_32_bits_equals_cpython() {
        // python3 -c 'import random; random.seed(42); print(random.sample(range(2**40), 3))'
        assert_eq!(
            sample(42, 1 << 40, 3),
            [247559453085, 538052153943, 305901360862]
        );
    }

    #[test]
    fn edge_sizes_draw_as_cpython() {
        // python3 -c 'import random; random.seed(42); print(random.sample(range(10), 0),
        //   random.getrandbits(32))'  →  [] 2746317213 (k = 0 draws nothing)
        let mut r = PyRandom::seeded(42);
        assert!(r.sample(10, 0).is_empty());
        assert_eq!(r.getrandbits(32), 2746317213);
        // python3 -c 'import random; random.seed(42); print(random.sample(range(1), 1),
        //   random.getrandbits(32))'  →  [0] 107420369 (one bit, redrawn once)
        let mut r = PyRandom::seeded(42);
        assert_eq!(r.sample(1, 1), [0]);
        assert_eq!(r.getrandbits(32), 107420369);
        // python3 -c 'import random; random.seed(42); print([random.sample(range(3), 1)
        //   for _ in range(4)], random.sample(range(2), 1))'
        let mut r = PyRandom::seeded(42);
        let got: Vec<Vec<usize>> = (0..4).map(|_| r.sample(3, 1)).collect();
        assert_eq!(got, [[2], [0], [0], [2]]);
        assert_eq!(r.sample(2, 1), [1]);
    }
}
