//! The reference random streams we must replay: MT19937 as seeded by
//! `torch.Generator().manual_seed(seed)` (for `torch.randperm`, which HF's length-grouped sampler
//! calls), by Python's `random.seed(int)` (open-instruct's reformatting script; the evaluation
//! scripts' `random.sample` after `random.seed(42)`) and by numpy's legacy `RandomState(seed)`
//! (pandas' `sample`, MMLU's subset). Checked against goldens made by PyTorch and CPython in
//! `tests/fixtures/` and against CPython's outputs below.

const N: usize = 624;
const M: usize = 397;

/// The 32-bit Mersenne Twister (Matsumoto & Nishimura, 1998).
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; N],
    index: usize,
}

impl Mt19937 {
    /// `init_genrand(seed)`.
    fn init_genrand(seed: u32) -> Self {
        let mut state = [0u32; N];
        state[0] = seed;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, index: N }
    }

    /// As `torch.Generator().manual_seed(seed)`: torch keeps the low 32 bits of the seed.
    pub fn torch(seed: u64) -> Self {
        Self::init_genrand(seed as u32)
    }

    /// As numpy's legacy `RandomState(seed)` (what pandas' `sample(random_state=seed)` uses).
    pub fn numpy(seed: u32) -> Self {
        Self::init_genrand(seed)
    }

    /// As CPython's `random.seed(seed)` for a non-negative int: `init_by_array` of its 32-bit
    /// words, least significant first.
    pub fn python(seed: u64) -> Self {
        match seed >> 32 {
            0 => Self::init_by_array(&[seed as u32]),
            high => Self::init_by_array(&[seed as u32, high as u32]),
        }
    }

    fn init_by_array(key: &[u32]) -> Self {
        let mut mt = Self::init_genrand(19_650_218);
        let s = &mut mt.state;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            let prev = s[i - 1];
            s[i] = (s[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                s[0] = s[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = s[i - 1];
            s[i] =
                (s[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                s[0] = s[N - 1];
                i = 1;
            }
        }
        s[0] = 0x8000_0000;
        mt
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            for k in 0..N {
                let y = (self.state[k] & 0x8000_0000) | (self.state[(k + 1) % N] & 0x7fff_ffff);
                let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
                self.state[k] = self.state[(k + M) % N] ^ (y >> 1) ^ mag;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `torch.randperm(n, generator=g)` on CPU (the swap loop torch keeps for n < 2³²/20).
    pub fn randperm(&mut self, n: usize) -> Vec<usize> {
        assert!(n < (u32::MAX / 20) as usize, "randperm of {n} elements");
        let mut perm: Vec<usize> = (0..n).collect();
        for i in 0..n.saturating_sub(1) {
            let z = self.next_u32() as usize % (n - i);
            perm.swap(i, i + z);
        }
        perm
    }

    /// Python's `random.random()`: 53 bits from two draws.
    pub fn py_random(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67_108_864.0 + b) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// Python's `getrandbits(k)` for k ≤ 64: whole words, least significant first; the last
    /// one keeps its top bits.
    pub fn py_getrandbits(&mut self, k: u32) -> u64 {
        assert!(k <= 64, "getrandbits({k}): at most 64 bits here");
        let (mut bits, mut left, mut shift) = (0u64, k, 0);
        while left > 0 {
            let take = left.min(32);
            bits |= u64::from(self.next_u32() >> (32 - take)) << shift;
            shift += take;
            left -= take;
        }
        bits
    }

    /// Python's `_randbelow(n)` (n ≥ 1): `getrandbits(n.bit_length())`, redrawn until below n.
    fn py_randbelow(&mut self, n: usize) -> usize {
        assert!(n >= 1);
        let k = usize::BITS - n.leading_zeros();
        loop {
            let r = self.py_getrandbits(k) as usize;
            if r < n {
                return r;
            }
        }
    }

    /// Python's `random.sample(range(n), k)`: the indices picked, in selection order.
    pub fn py_sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        assert!(k <= n, "sample of {k} from {n}");
        let mut setsize = 21usize;
        if k > 5 {
            // `4 ** ceil(log(k * 3, 4))`, computed in floats as CPython does.
            let exp = (((k * 3) as f64).ln() / 4f64.ln()).ceil() as u32;
            setsize += 4usize.pow(exp);
        }
        let mut result = Vec::with_capacity(k);
        if n <= setsize {
            let mut pool: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = self.py_randbelow(n - i);
                result.push(pool[j]);
                pool[j] = pool[n - i - 1];
            }
        } else {
            let mut selected = std::collections::HashSet::with_capacity(k);
            for _ in 0..k {
                let mut j = self.py_randbelow(n);
                while selected.contains(&j) {
                    j = self.py_randbelow(n);
                }
                selected.insert(j);
                result.push(j);
            }
        }
        result
    }

    /// Python's `random.choices(range(len(weights)), weights=weights)[0]`.
    pub fn py_choice_weighted(&mut self, weights: &[f64]) -> usize {
        let cum: Vec<f64> = weights
            .iter()
            .scan(0.0, |acc, w| {
                *acc += w;
                Some(*acc)
            })
            .collect();
        let total = cum[cum.len() - 1];
        let x = self.py_random() * total;
        // bisect_right(cum, x, 0, n - 1)
        cum[..cum.len() - 1].partition_point(|&c| c <= x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_first_outputs() {
        // The MT19937 reference output for init_genrand(5489) (the C++ std::mt19937 default);
        // its 10000th output is the value the C++ standard requires.
        let mut mt = Mt19937::init_genrand(5489);
        assert_eq!(mt.next_u32(), 3_499_211_612);
        let last = (1..10_000).map(|_| mt.next_u32()).last().unwrap();
        assert_eq!(last, 4_123_659_995);
    }

    // Every expected value below is CPython 3.11.7's output for the command in the comment.

    #[test]
    fn words_equal_cpython() {
        // python3 -c 'import random; random.seed(42); print([random.getrandbits(32) for _ in range(3)])'
        let mut r = Mt19937::python(42);
        let words: Vec<u64> = (0..3).map(|_| r.py_getrandbits(32)).collect();
        assert_eq!(words, [2746317213, 478163327, 107420369]);
        // python3 -c 'import random; random.seed(0); print(random.getrandbits(32))'
        assert_eq!(Mt19937::python(0).py_getrandbits(32), 3626764237);
        // python3 -c 'import random; random.seed(2**40+5); print(random.getrandbits(32))'
        assert_eq!(
            Mt19937::python((1 << 40) + 5).py_getrandbits(32),
            2166296868
        );
    }

    #[test]
    fn getrandbits_equals_cpython() {
        // python3 -c 'import random; random.seed(42); print(random.getrandbits(1),
        //   random.getrandbits(7), random.getrandbits(33), random.getrandbits(64))'
        let mut r = Mt19937::python(42);
        let got = [
            r.py_getrandbits(1),
            r.py_getrandbits(7),
            r.py_getrandbits(33),
            r.py_getrandbits(64),
        ];
        assert_eq!(got, [1, 14, 4402387665, 4517457392071889495]);
    }

    fn sample(seed: u64, n: usize, k: usize) -> Vec<usize> {
        Mt19937::python(seed).py_sample(n, k)
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
        let mut r = Mt19937::python(42);
        assert!(r.py_sample(10, 0).is_empty());
        assert_eq!(r.py_getrandbits(32), 2746317213);
        // python3 -c 'import random; random.seed(42); print(random.sample(range(1), 1),
        //   random.getrandbits(32))'  →  [0] 107420369 (one bit, redrawn once)
        let mut r = Mt19937::python(42);
        assert_eq!(r.py_sample(1, 1), [0]);
        assert_eq!(r.py_getrandbits(32), 107420369);
        // python3 -c 'import random; random.seed(42); print([random.sample(range(3), 1)
        //   for _ in range(4)], random.sample(range(2), 1))'
        let mut r = Mt19937::python(42);
        let got: Vec<Vec<usize>> = (0..4).map(|_| r.py_sample(3, 1)).collect();
        assert_eq!(got, [[2], [0], [0], [2]]);
        assert_eq!(r.py_sample(2, 1), [1]);
    }
}
