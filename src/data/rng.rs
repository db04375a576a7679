//! The two reference random streams our data pipeline must replay: MT19937 as seeded by
//! `torch.Generator().manual_seed(seed)` (for `torch.randperm`, which HF's length-grouped sampler
//! calls) and as seeded by Python's `random.seed(int)` (for open-instruct's reformatting script).
//! Both are checked against goldens made by PyTorch and CPython in `tests/fixtures/`.

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

    /// As CPython's `random.seed(seed)` for a non-negative int: `init_by_array` of its 32-bit words.
    pub fn python(seed: u64) -> Self {
        let key: Vec<u32> = if seed >> 32 == 0 {
            vec![seed as u32]
        } else {
            vec![seed as u32, (seed >> 32) as u32]
        };
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

    /// Python's `_randbelow(n)` (rejection sampling on `getrandbits(n.bit_length())`), n ≥ 1.
    fn py_randbelow(&mut self, n: usize) -> usize {
        assert!(n >= 1 && n <= u32::MAX as usize);
        let k = usize::BITS - n.leading_zeros();
        loop {
            let r = (self.next_u32() >> (32 - k)) as usize;
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
}
