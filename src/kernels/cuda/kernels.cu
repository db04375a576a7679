// prolora's own CUDA kernels: the forward of every custom op on the training path.
// Compiled at run time by NVRTC (src/cuda/mod.rs), which prepends the NF4 and dynamic-map
// tables; no CUDA header is included, so NVRTC needs no include path. Each kernel mirrors the
// CPU op of the same name: same formula, f32 (f64 for double) accumulation.

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

// bfloat16 kept as its bits; arithmetic happens in float.
struct bf16 {
    unsigned short bits;
};

template <typename T> struct Num;
template <> struct Num<float> {
    typedef float Acc;
    static __device__ __forceinline__ float get(float v) { return v; }
    static __device__ __forceinline__ float put(float v) { return v; }
};
template <> struct Num<double> {
    typedef double Acc;
    static __device__ __forceinline__ double get(double v) { return v; }
    static __device__ __forceinline__ double put(double v) { return v; }
};
template <> struct Num<bf16> {
    typedef float Acc;
    static __device__ __forceinline__ float get(bf16 v) {
        return __uint_as_float(((unsigned)v.bits) << 16);
    }
    // Round to nearest even, as half::bf16::from_f32; NaN stays a quiet NaN.
    static __device__ __forceinline__ bf16 put(float v) {
        unsigned b = __float_as_uint(v);
        bf16 r;
        if ((b & 0x7fffffffu) > 0x7f800000u) {
            r.bits = (unsigned short)((b >> 16) | 0x40u);
        } else {
            r.bits = (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
        }
        return r;
    }
};

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
template <typename A> __device__ A block_sum(A v) {
    __shared__ double partial[32];
    A* shared = reinterpret_cast<A*>(partial);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    __syncthreads();  // `shared` may still be read by a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : A(0);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename A> __device__ A block_max(A v) {
    __shared__ double partial[32];
    A* shared = reinterpret_cast<A*>(partial);
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : shared[0];
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// RMSNorm, one block per row of d: y = x · w / √(mean(x²) + ε).
template <typename T>
__device__ void rms_norm(const T* x, const T* w, T* y, int d, double eps) {
    typedef typename Num<T>::Acc A;
    const T* xr = x + (u64)blockIdx.x * d;
    T* yr = y + (u64)blockIdx.x * d;
    A ss = 0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        A v = Num<T>::get(xr[i]);
        ss += v * v;
    }
    ss = block_sum(ss);
    A r = (A)(1.0 / sqrt((double)ss / d + eps));
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        yr[i] = Num<T>::put(Num<T>::get(xr[i]) * r * Num<T>::get(w[i]));
}

// ∂x of RMSNorm: r·w·dy − x · r³/d · Σ(w·dy·x).
template <typename T>
__device__ void rms_norm_grad(const T* x, const T* w, const T* dy, T* dx, int d, double eps) {
    typedef typename Num<T>::Acc A;
    u64 row = (u64)blockIdx.x * d;
    A ss = 0, dot = 0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        A v = Num<T>::get(x[row + i]);
        ss += v * v;
        dot += v * Num<T>::get(dy[row + i]) * Num<T>::get(w[i]);
    }
    ss = block_sum(ss);
    dot = block_sum(dot);
    double rd = 1.0 / sqrt((double)ss / d + eps);
    A r = (A)rd, c = (A)(rd * rd * rd * (double)dot / d);
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        dx[row + i] = Num<T>::put(r * Num<T>::get(w[i]) * Num<T>::get(dy[row + i]) -
                                  c * Num<T>::get(x[row + i]));
}

// Softmax of scale · attention scores over the last axis (t), row r keeping columns 0..=r mod t.
template <typename T> __device__ void causal_softmax(const T* x, T* y, int t, double scale) {
    typedef typename Num<T>::Acc A;
    u64 row = (u64)blockIdx.x * t;
    int keep = blockIdx.x % t + 1;
    A m = -(A)__int_as_float(0x7f800000);  // −∞
    for (int i = threadIdx.x; i < keep; i += blockDim.x) m = max(m, Num<T>::get(x[row + i]));
    m = block_max(m);
    A s = 0;
    A c = (A)scale;
    for (int i = threadIdx.x; i < keep; i += blockDim.x) s += exp(c * (Num<T>::get(x[row + i]) - m));
    s = block_sum(s);
    for (int i = threadIdx.x; i < t; i += blockDim.x)
        y[row + i] = Num<T>::put(i < keep ? exp(c * (Num<T>::get(x[row + i]) - m)) / s : A(0));
}

// ∂x of a scaled softmax from its output: scale · y · (dy − Σ dy·y).
template <typename T>
__device__ void softmax_grad(const T* y, const T* dy, T* dx, int t, double scale) {
    typedef typename Num<T>::Acc A;
    u64 row = (u64)blockIdx.x * t;
    A dot = 0;
    for (int i = threadIdx.x; i < t; i += blockDim.x)
        dot += Num<T>::get(y[row + i]) * Num<T>::get(dy[row + i]);
    dot = block_sum(dot);
    for (int i = threadIdx.x; i < t; i += blockDim.x)
        dx[row + i] =
            Num<T>::put((A)scale * Num<T>::get(y[row + i]) * (Num<T>::get(dy[row + i]) - dot));
}

// The same functions as adapters::dropout's lowbias32 and element_hash.
__device__ __forceinline__ u32 lowbias32(u32 x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

__device__ __forceinline__ u32 element_hash(u64 seed, u64 i) {
    u32 h = lowbias32((u32)i ^ (u32)seed);
    return lowbias32(h ^ (u32)(i >> 32) ^ (u32)(seed >> 32));
}

// Inverted dropout: element i is multiplied by 0 when element_hash(seed, i) < threshold, else
// by scale (a product, so a dropped NaN stays NaN, as on the CPU).
template <typename T>
__device__ void dropout(const T* x, T* y, u64 n, u64 seed, u32 threshold, T scale) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        typedef typename Num<T>::Acc A;
        A keep = element_hash(seed, i) < threshold ? A(0) : Num<T>::get(scale);
        y[i] = Num<T>::put(Num<T>::get(x[i]) * keep);
    }
}

// NF4 dequantization, one thread per byte (two values). Block scales are plain f32
// (`absmax_codes` null) or double-quantized: DYNAMIC_MAP[code] · scales[b / 256] + offset,
// two f32 roundings as bitsandbytes (no fused multiply-add).
template <typename T>
__device__ void nf4_dequantize(const u8* packed, const u8* absmax_codes, const float* scales,
                               float offset, T* out, u64 n) {
    __shared__ float nf4[16], dmap[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        dmap[i] = DYNAMIC_MAP[i];
        if (i < 16) nf4[i] = NF4[i];
    }
    __syncthreads();
    u64 pairs = (n + 1) / 2;
    for (u64 k = blockIdx.x * (u64)blockDim.x + threadIdx.x; k < pairs;
         k += (u64)gridDim.x * blockDim.x) {
        u64 i = 2 * k, b = i / NF4_BLOCK;
        float a = absmax_codes == 0
                      ? scales[b]
                      : __fadd_rn(__fmul_rn(dmap[absmax_codes[b]], scales[b / NESTED_BLOCK]),
                                  offset);
        u8 byte = packed[k];
        out[i] = Num<T>::put(__fmul_rn(nf4[byte >> 4], a));
        if (i + 1 < n) out[i + 1] = Num<T>::put(__fmul_rn(nf4[byte & 15], a));
    }
}

#define PER_DTYPE(NAME, T)                                                                        \
    extern "C" __global__ void rms_norm_##NAME(const T* x, const T* w, T* y, int d, double eps) { \
        rms_norm(x, w, y, d, eps);                                                                 \
    }                                                                                              \
    extern "C" __global__ void rms_norm_grad_##NAME(const T* x, const T* w, const T* dy, T* dx,   \
                                                    int d, double eps) {                           \
        rms_norm_grad(x, w, dy, dx, d, eps);                                                       \
    }                                                                                              \
    extern "C" __global__ void causal_softmax_##NAME(const T* x, T* y, int t, double scale) {     \
        causal_softmax(x, y, t, scale);                                                            \
    }                                                                                              \
    extern "C" __global__ void softmax_grad_##NAME(const T* y, const T* dy, T* dx, int t,         \
                                                   double scale) {                                 \
        softmax_grad(y, dy, dx, t, scale);                                                         \
    }                                                                                              \
    extern "C" __global__ void dropout_##NAME(const T* x, T* y, u64 n, u64 seed,              \
                                              u32 threshold, T scale) {                            \
        dropout(x, y, n, seed, threshold, scale);                                                  \
    }                                                                                              \
    extern "C" __global__ void nf4_dequantize_##NAME(const u8* packed, const u8* absmax_codes,    \
                                                     const float* scales, float offset, T* out,    \
                                                     u64 n) {                                   \
        nf4_dequantize(packed, absmax_codes, scales, offset, out, n);                              \
    }

PER_DTYPE(f32, float)
PER_DTYPE(f64, double)
PER_DTYPE(bf16, bf16)
