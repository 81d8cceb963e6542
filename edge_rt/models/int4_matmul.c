/* Int4 group-quantized matrix products for edge-rt's CPU decode steps and verify chunks
 * (edge_rt/models/native_kernels.py builds and calls it; Int4Linear holds the weights).
 *
 * y[t, n] = sum_k x[t, k] * w[n, k], with w[n, k] = (q[n, k] - 8) * s[n, g] + z[n, g] for the
 * 32-wide group g = k / 32, computed as
 *     y[t, n] = sum_g ( s[n, g] * a[t, n, g] + (z[n, g] - 8 s[n, g]) * X[t, g] ),
 *     a[t, n, g] = sum_{k in g} q[n, k] * x[t, k],   X[t, g] = sum_{k in g} x[t, k]
 * (fp32 throughout; z - 8 s is one fused multiply-add).
 * Weights are read once per call whatever the number of rows T, so a T-token verify chunk costs
 * little more than a one-token step while the CPU keeps up with memory (PyTorch's int4 CPU kernel
 * reads them once per 4 rows), and the scales are applied once per group, not once per weight.
 *
 * Row invariance: y[t, n] is computed by the same operations in the same order whatever T is and
 * whichever rows or outputs share the call: a[t, n, g] is one chain of fused multiply-adds over
 * k in order, X[t, g] a sequential sum, and y accumulates group by group in order. The tile shapes
 * below only choose which accumulators share registers.
 *
 * Layout (linear.pack_native writes it): outputs in units of 16 (N padded with zero weights);
 * codes [N / 16, K, 8] bytes, byte j of unit u at input k holding q[16 u + j, k] (low nibble) and
 * q[16 u + 8 + j, k] (high nibble); sz [N / 16, K / 32, 2, 16] bf16 (16 scales, then 16 zeros).
 * x [T, Kx] bf16 or fp32 (row stride ldx), read `repeat` times along k (K = Kx * repeat: int8
 * weights split into two 4-bit halves); y [T, N] bf16 (rounded to nearest even) or fp32, row
 * stride ldy. Needs AVX2 and FMA (native_kernels.py builds it only where the CPU has them).
 * Further down, with their own layouts: an AVX-512 BF16 variant, an AVX-512 VNNI variant (int8
 * activations), and int8 weights (GGUF Q8_0) on AVX-512 BF16.
 * Threads: OpenMP, the units split evenly between threads; in a process that has imported torch
 * the library binds to torch's own libgomp (same soname), so both share one thread pool.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline float bf16_to_float(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);               /* round to nearest even */
}

static inline __m256 load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* Rows 0..tb of a tile's fp32 results buf [tb, w] into y at outputs n0.., bf16 or fp32, skipping padding. */
static void store_rows(const float *buf, int64_t tb, int64_t w, int64_t n0, void *y, int64_t y_bf16, int64_t ldy,
                       int64_t N) {
    const int64_t nn = n0 + w <= N ? w : N - n0;
    for (int64_t t = 0; t < tb; t++)
        for (int64_t j = 0; j < nn; j++) {
            if (y_bf16)
                ((uint16_t *)y)[t * ldy + n0 + j] = float_to_bf16(buf[t * w + j]);
            else
                ((float *)y)[t * ldy + n0 + j] = buf[t * w + j];
        }
}

/* Every kernel's tiles share one signature: codes/sz point at the tile's first 16-output unit, x at
 * its first row (the kernel's own element type), xs at the rows' group sums (NULL where unused);
 * y gets [TB, 16 units] fp32 results. */
typedef void (*tile_fn)(const void *codes, const uint16_t *sz, int64_t K, int64_t G, const void *x, const float *xs,
                        float *y);

/* A kernel: tiles[tb][lg] covers tb rows of 2^lg units (NULL where registers do not allow it), for
 * tb = 1 .. max_rows; a unit holds code_unit bytes per input and sz_unit scales per group. */
typedef struct {
    const tile_fn (*tiles)[4];
    int64_t max_rows, code_unit, sz_unit, xs_group; /* xs_group: floats of xs per row and group */
} kernel_t;

/* tb rows of units u0 .. u1 into y: the widest tile first, then halves for the remaining units. */
static void run_tiles(const kernel_t *kn, int64_t tb, const uint8_t *codes, const uint16_t *sz, int64_t K, int64_t G,
                      const void *x, const float *xs, int64_t u0, int64_t u1, void *y, int64_t y_bf16, int64_t ldy,
                      int64_t N) {
    float buf[8 * 128];
    int lg = 3;
    while (!kn->tiles[tb][lg]) lg--;
    for (int64_t u = u0; u < u1;) {
        while (lg > 0 && u + (1 << lg) > u1) lg--;
        const int64_t nu = (int64_t)1 << lg;
        kn->tiles[tb][lg](codes + u * K * kn->code_unit, sz + u * G * kn->sz_unit, K, G, x, xs, buf);
        store_rows(buf, tb, 16 * nu, 16 * u, y, y_bf16, ldy, N);
        u += nu;
    }
}

/* All T rows: the units split evenly between OpenMP threads, each running its units for the rows
 * in chunks of up to kn->max_rows. x rows are x_row bytes apart; xs (or NULL) holds K / 32 sums a row. */
static void run_rows(const kernel_t *kn, const uint8_t *codes, const uint16_t *sz, int64_t K, const void *x,
                     int64_t x_row, const float *xs, int64_t T, int64_t N, void *y, int64_t y_bf16, int64_t ldy) {
    const int64_t G = K / 32, units = (N + 15) / 16;
#pragma omp parallel if (units * K * (T < 4 ? T : 4) >= 32768)
    {
#ifdef _OPENMP
        const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
#else
        const int64_t nt = 1, id = 0;
#endif
        const int64_t u0 = units * id / nt, u1 = units * (id + 1) / nt;
        for (int64_t t = 0; t < T;) {
            const int64_t tb = T - t >= kn->max_rows ? kn->max_rows : T - t;
            void *yt = y_bf16 ? (void *)((uint16_t *)y + t * ldy) : (void *)((float *)y + t * ldy);
            run_tiles(kn, tb, codes, sz, K, G, (const char *)x + t * x_row, xs ? xs + t * G * kn->xs_group : NULL, u0, u1, yt,
                      y_bf16, ldy, N);
            t += tb;
        }
    }
}

/* A tile of U units (2 U output vectors of 8) by TB rows. codes/sz point at the first unit;
 * x [TB, K] fp32, xs [TB, G] group sums; y gets [TB, 16 U] results (fp32, row stride 16 U). */
#define TILE(U, TB)                                                                                       \
    static void tile_##U##_##TB(const void *codes_, const uint16_t *sz, int64_t K, int64_t G,              \
                                const void *x_, const float *xs, float *y) {                              \
        const uint8_t *codes = codes_;                                                                    \
        const float *x = x_;                                                                              \
        __m256 tot[TB][2 * U];                                                                            \
        _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++)                                             \
            _Pragma("GCC unroll 16") for (int v = 0; v < 2 * U; v++) tot[t][v] = _mm256_setzero_ps();     \
        const __m256i nib = _mm256_set1_epi32(15);                                                        \
        for (int64_t g = 0; g < G; g++) {                                                                 \
            __m256 a[TB][2 * U];                                                                          \
            _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++)                                         \
                _Pragma("GCC unroll 16") for (int v = 0; v < 2 * U; v++) a[t][v] = _mm256_setzero_ps();   \
            for (int64_t k = g * 32; k < g * 32 + 32; k++) {                                              \
                __m256 b[TB];                                                                             \
                _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) b[t] = _mm256_broadcast_ss(x + t * K + k); \
                _Pragma("GCC unroll 16") for (int u = 0; u < U; u++) {                                    \
                    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + (u * K + k) * 8))); \
                    const __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(c, nib));                       \
                    const __m256 w1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4));                        \
                    _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) {                               \
                        a[t][2 * u] = _mm256_fmadd_ps(w0, b[t], a[t][2 * u]);                             \
                        a[t][2 * u + 1] = _mm256_fmadd_ps(w1, b[t], a[t][2 * u + 1]);                     \
                    }                                                                                     \
                }                                                                                         \
            }                                                                                             \
            _Pragma("GCC unroll 16") for (int u = 0; u < U; u++)                                          \
                _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {                                     \
                    const uint16_t *p = sz + (u * G + g) * 32 + 8 * h;                                    \
                    const __m256 s = load_bf16x8(p);                                                      \
                    const __m256 z = _mm256_fmadd_ps(s, _mm256_set1_ps(-8.0f), load_bf16x8(p + 16));      \
                    _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) {                               \
                        __m256 r = _mm256_fmadd_ps(s, a[t][2 * u + h], tot[t][2 * u + h]);                \
                        tot[t][2 * u + h] = _mm256_fmadd_ps(z, _mm256_broadcast_ss(xs + t * G + g), r);   \
                    }                                                                                     \
                }                                                                                         \
        }                                                                                                 \
        _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++)                                             \
            _Pragma("GCC unroll 16") for (int v = 0; v < 2 * U; v++) _mm256_storeu_ps(y + t * 16 * U + 8 * v, tot[t][v]); \
    }

TILE(4, 1)
TILE(2, 1)
TILE(1, 1)
TILE(2, 2)
TILE(1, 2)
TILE(1, 3)
TILE(1, 4)

static const tile_fn tiles_avx2[5][4] = {
    {NULL, NULL, NULL, NULL},
    {tile_1_1, tile_2_1, tile_4_1, NULL},
    {tile_1_2, tile_2_2, NULL, NULL},
    {tile_1_3, NULL, NULL, NULL},
    {tile_1_4, NULL, NULL, NULL},
};
static const kernel_t kernel_avx2 = {tiles_avx2, 4, 8, 32, 1};

/* Returns 0, -1 (scratch allocation failed) or -2 (K not a multiple of 32, or no rows). */
int64_t edge_rt_int4_matmul(const uint8_t *codes, const uint16_t *sz, const void *x, int64_t x_bf16, int64_t ldx,
                            int64_t T, int64_t Kx, int64_t repeat, int64_t N, void *y, int64_t y_bf16, int64_t ldy) {
    const int64_t K = Kx * repeat;
    if (K % 32 || T <= 0 || N <= 0) return -2;
    const int64_t G = K / 32;
    /* x as fp32 rows [T, K] and its group sums [T, G] */
    float *xf = malloc(sizeof(float) * (size_t)(T * (K + G)));
    if (!xf) return -1;
    float *xs = xf + T * K;
    for (int64_t t = 0; t < T; t++) {
        for (int64_t r = 0; r < repeat; r++) {
            float *dst = xf + t * K + r * Kx;
            if (x_bf16) {
                const uint16_t *src = (const uint16_t *)x + t * ldx;
                for (int64_t k = 0; k < Kx; k++) dst[k] = bf16_to_float(src[k]);
            } else {
                memcpy(dst, (const float *)x + t * ldx, sizeof(float) * (size_t)Kx);
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float s = 0.0f;
            for (int64_t k = 0; k < 32; k++) s += xf[t * K + g * 32 + k];
            xs[t * G + g] = s;
        }
    }
    run_rows(&kernel_avx2, codes, sz, K, xf, K * (int64_t)sizeof(float), xs, T, N, y, y_bf16, ldy);
    free(xf);
    return 0;
}

/* 16 bf16 values at p as fp32 (exact). Built for AVX-512F alone, so every AVX-512 kernel below inlines it. */
#pragma GCC push_options
#pragma GCC target("avx512f")
static inline __attribute__((always_inline)) __m512 load_bf16x16(const void *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* A 16-output unit's group scales s and offsets z0 - c s from sz's [16 scales, 16 zeros] at p. */
static inline __attribute__((always_inline)) void load_scales(const uint16_t *p, float c, __m512 *s, __m512 *z) {
    *s = load_bf16x16(p);
    *z = _mm512_fmadd_ps(*s, _mm512_set1_ps(-c), load_bf16x16(p + 16));
}
#pragma GCC pop_options

/* ---- AVX-512 BF16 variant (edge_rt_int4_matmul_bf16) -------------------------------------------
 * For CPUs with AVX-512 BF16 (vdpbf16ps: 16 lanes, each adding two bf16 products to an fp32
 * accumulator). x must be bf16; a weight enters as the bf16 number 128 + q (bits 0x4300 | q, exact),
 * so per group
 *     y[t, n] += s[n, g] * a[t, n, g] + (z[n, g] - 136 s[n, g]) * X[t, g],
 *     a[t, n, g] = sum over the 16 k-pairs of the group of vdpbf16ps((128 + q) pairs, x pairs),
 * one chain per (t, n) in k order, so rows stay invariant as above.
 * Layout: codes [N / 16, K / 2, 16] bytes, byte j of unit u at pair p holding q[16 u + j, 2 p]
 * (low nibble) and q[16 u + j, 2 p + 1] (high nibble); sz as above.
 */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")

#define TILE16(UB, TB)                                                                                    \
    static void t16_##UB##_##TB(const void *codes_, const uint16_t *sz, int64_t K, int64_t G,             \
                                const void *x_, const float *xs, float *y) {                              \
        const uint8_t *codes = codes_;                                                                    \
        const uint16_t *x = x_;                                                                           \
        __m512 tot[TB][UB];                                                                               \
        _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++)                                             \
            _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) tot[t][u] = _mm512_setzero_ps();        \
        const __m512i lowmask = _mm512_set1_epi32(0x000F000F), bias = _mm512_set1_epi32(0x43004300);     \
        for (int64_t g = 0; g < G; g++) {                                                                 \
            __m512 a[TB][UB];                                                                             \
            _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++)                                         \
                _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) a[t][u] = _mm512_setzero_ps();      \
            for (int64_t p = g * 16; p < g * 16 + 16; p++) {                                              \
                __m512i b[TB];                                                                            \
                _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) {                                   \
                    uint32_t pair;                                                                        \
                    memcpy(&pair, x + t * K + 2 * p, 4);                                                  \
                    b[t] = _mm512_set1_epi32((int)pair);                                                  \
                }                                                                                         \
                _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) {                                   \
                    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + (u * (K / 2) + p) * 16))); \
                    /* (d | d << 12) & 0x000F000F | 0x43004300: both nibbles as bf16 128 + q */           \
                    const __m512i w = _mm512_or_si512(_mm512_and_si512(_mm512_or_si512(d, _mm512_slli_epi32(d, 12)), lowmask), bias); \
                    _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++)                                 \
                        a[t][u] = _mm512_dpbf16_ps(a[t][u], (__m512bh)w, (__m512bh)b[t]);                 \
                }                                                                                         \
            }                                                                                             \
            _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) {                                       \
                __m512 s, z;                                                                              \
                load_scales(sz + (u * G + g) * 32, 136.0f, &s, &z);                                       \
                _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) {                                   \
                    __m512 r = _mm512_fmadd_ps(s, a[t][u], tot[t][u]);                                    \
                    tot[t][u] = _mm512_fmadd_ps(z, _mm512_set1_ps(xs[t * G + g]), r);                     \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++)                                             \
            _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) _mm512_storeu_ps(y + t * 16 * UB + 16 * u, tot[t][u]); \
    }

TILE16(8, 1) TILE16(4, 1) TILE16(2, 1) TILE16(1, 1)
TILE16(4, 2) TILE16(2, 2) TILE16(1, 2)
TILE16(2, 3) TILE16(1, 3)
TILE16(2, 4) TILE16(1, 4)
TILE16(2, 5) TILE16(1, 5)
TILE16(2, 6) TILE16(1, 6)
TILE16(1, 7)
TILE16(1, 8)

static const tile_fn tiles16[9][4] = {
    {NULL, NULL, NULL, NULL},
    {t16_1_1, t16_2_1, t16_4_1, t16_8_1},
    {t16_1_2, t16_2_2, t16_4_2, NULL},
    {t16_1_3, t16_2_3, NULL, NULL},
    {t16_1_4, t16_2_4, NULL, NULL},
    {t16_1_5, t16_2_5, NULL, NULL},
    {t16_1_6, t16_2_6, NULL, NULL},
    {t16_1_7, NULL, NULL, NULL},
    {t16_1_8, NULL, NULL, NULL},
};
static const kernel_t kernel_bf16 = {tiles16, 8, 8, 32, 1};

/* As edge_rt_int4_matmul with bf16 x (x_bf16 must be 1) and the bf16x2 codes layout. */
int64_t edge_rt_int4_matmul_bf16(const uint8_t *codes, const uint16_t *sz, const void *x, int64_t x_bf16, int64_t ldx,
                                 int64_t T, int64_t Kx, int64_t repeat, int64_t N, void *y, int64_t y_bf16,
                                 int64_t ldy) {
    const int64_t K = Kx * repeat;
    if (K % 32 || T <= 0 || N <= 0 || !x_bf16) return -2;
    const int64_t G = K / 32;
    /* x rows repeated [T, K] bf16, and the group sums [T, G] in fp32 */
    uint16_t *xb = malloc(sizeof(uint16_t) * (size_t)(T * K) + sizeof(float) * (size_t)(T * G));
    if (!xb) return -1;
    float *xs = (float *)(xb + T * K);
    for (int64_t t = 0; t < T; t++) {
        for (int64_t r = 0; r < repeat; r++)
            memcpy(xb + t * K + r * Kx, (const uint16_t *)x + t * ldx, sizeof(uint16_t) * (size_t)Kx);
        for (int64_t g = 0; g < G; g++) {
            float s = 0.0f;
            for (int64_t k = 0; k < 32; k++) s += bf16_to_float(xb[t * K + g * 32 + k]);
            xs[t * G + g] = s;
        }
    }
    run_rows(&kernel_bf16, codes, sz, K, xb, K * (int64_t)sizeof(uint16_t), xs, T, N, y, y_bf16, ldy);
    free(xb);
    return 0;
}

/* ---- AVX-512 VNNI variant (edge_rt_int4_matmul_vnni) ---------------------------------------------
 * For CPUs with AVX-512 VNNI (vpdpbusd: 16 lanes, each adding four u8 x s8 products to an int32).
 * Each row of x is quantized per 32-wide group as llama.cpp quantizes activations for its Q4/Q8
 * dot products (Q8_1): dx = max|x| / 127, xq = x * (127 / max|x|) rounded half to even (as
 * llama.cpp's AVX quantizer rounds), in -127..127, Q = sum of xq. Then
 *     y[t, n] += dx[t, g] * ( s[n, g] * A[t, n, g] + (z[n, g] - 8 s[n, g]) * Q[t, g] ),
 *     A[t, n, g] = sum_{k in g} q[n, k] * xq[t, k]   (an exact integer),
 * so a row's result depends only on its own x: rows stay invariant as above, and the integer
 * part is exact whatever the order. A quarter of the instructions of the bf16 variant per weight.
 * Layout: codes [N / 16, K / 8, 64] bytes: for unit u and octet o, byte 4 j + i holds
 * q[16 u + j, 8 o + i] (low nibble) and q[16 u + j, 8 o + 4 + i] (high nibble), i = 0..3;
 * sz as above. The rows' group scales and sums travel in xs: [T, G, 2] (dx, Q).
 */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")

/* acc + the u8 x s8 products of w with the four int8 at p in every lane: vpdpbusd with its memory
 * operand broadcast (GCC does not fold the broadcast itself, and a separate one costs a uop). */
static inline __attribute__((always_inline)) __m512i dpbusd_bcast(__m512i acc, __m512i w, const int32_t *p) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*p));
    return acc;
}

#define TILEV(UB, TB)                                                                                     \
    static void v4_##UB##_##TB(const void *codes_, const uint16_t *sz, int64_t K, int64_t G,              \
                               const void *x_, const float *xs, float *y) {                               \
        const uint8_t *codes = codes_;                                                                    \
        const int32_t *x4 = x_; /* int8 x, four at a time (K is a multiple of 32: aligned) */          \
        __m512 tot[TB][UB];                                                                               \
        _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++)                                             \
            _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) tot[t][u] = _mm512_setzero_ps();        \
        const __m512i nib = _mm512_set1_epi8(15);                                                         \
        for (int64_t g = 0; g < G; g++) {                                                                 \
            __m512i a[TB][UB];                                                                            \
            _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++)                                         \
                _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) a[t][u] = _mm512_setzero_si512();   \
            _Pragma("GCC unroll 4") for (int64_t o = g * 4; o < g * 4 + 4; o++) {                        \
                _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) {                                   \
                    const __m512i c = _mm512_loadu_si512((const void *)(codes + (u * (K / 8) + o) * 64)); \
                    const __m512i w0 = _mm512_and_si512(c, nib);                                          \
                    const __m512i w1 = _mm512_and_si512(_mm512_srli_epi16(c, 4), nib);                    \
                    _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) {                               \
                        a[t][u] = dpbusd_bcast(a[t][u], w0, x4 + (t * K + 8 * o) / 4);                   \
                        a[t][u] = dpbusd_bcast(a[t][u], w1, x4 + (t * K + 8 * o) / 4 + 1);               \
                    }                                                                                     \
                }                                                                                         \
            }                                                                                             \
            _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) {                                       \
                __m512 s, z;                                                                              \
                load_scales(sz + (u * G + g) * 32, 8.0f, &s, &z);                                         \
                _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) {                                   \
                    __m512 r = _mm512_mul_ps(s, _mm512_cvtepi32_ps(a[t][u]));                             \
                    r = _mm512_fmadd_ps(z, _mm512_set1_ps(xs[(t * G + g) * 2 + 1]), r);                   \
                    tot[t][u] = _mm512_fmadd_ps(r, _mm512_set1_ps(xs[(t * G + g) * 2]), tot[t][u]);        \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++)                                             \
            _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) _mm512_storeu_ps(y + t * 16 * UB + 16 * u, tot[t][u]); \
    }

/* The VNNI kernels' tiles: up to 12 rows in one pass over the weights (2 x 12 accumulators and the
 * weight registers fit AVX-512's 32), so verify chunks of up to 12 tokens read the weights once. */
#define TILES12(MAKE)                                                                                     \
    MAKE(4, 1) MAKE(2, 1) MAKE(1, 1) MAKE(4, 2) MAKE(2, 2) MAKE(1, 2) MAKE(2, 3) MAKE(1, 3) MAKE(2, 4)     \
    MAKE(1, 4) MAKE(2, 5) MAKE(1, 5) MAKE(2, 6) MAKE(1, 6) MAKE(1, 7) MAKE(1, 8) MAKE(1, 9) MAKE(1, 10)   \
    MAKE(1, 11) MAKE(1, 12)
#define TABLE12(P)                                                                                        \
    {                                                                                                     \
        {NULL, NULL, NULL, NULL}, {P##_1_1, P##_2_1, P##_4_1, NULL}, {P##_1_2, P##_2_2, P##_4_2, NULL},   \
        {P##_1_3, P##_2_3, NULL, NULL}, {P##_1_4, P##_2_4, NULL, NULL}, {P##_1_5, P##_2_5, NULL, NULL},   \
        {P##_1_6, P##_2_6, NULL, NULL}, {P##_1_7, NULL, NULL, NULL}, {P##_1_8, NULL, NULL, NULL},         \
        {P##_1_9, NULL, NULL, NULL}, {P##_1_10, NULL, NULL, NULL}, {P##_1_11, NULL, NULL, NULL},          \
        {P##_1_12, NULL, NULL, NULL},                                                                     \
    }

TILES12(TILEV)
static const tile_fn tilesv[13][4] = TABLE12(v4);
static const kernel_t kernel_vnni = {tilesv, 12, 8, 32, 2};

/* x [T, Kx] bf16 (row stride ldx), repeated `repeat` times along k (Kx a multiple of 32), quantized
 * per 32-wide group into xq [T, K] int8 and xs [T, G, 2] (dx, Q), as described above. Returns the
 * buffer holding both (free it), or NULL when it cannot be allocated. */
static float *quantize_rows_q8(const uint16_t *x, int64_t ldx, int64_t T, int64_t Kx, int64_t repeat, int8_t **xq_out) {
    const int64_t K = Kx * repeat, G = K / 32;
    float *xs = malloc(sizeof(float) * (size_t)(T * G * 2) + (size_t)(T * K));
    if (!xs) return NULL;
    int8_t *xq = (int8_t *)(xs + T * G * 2);
    for (int64_t t = 0; t < T; t++)
        for (int64_t g = 0; g < G; g++) {
            const uint16_t *src = x + t * ldx + (g * 32) % Kx;
            const __m512 v0 = load_bf16x16(src);
            const __m512 v1 = load_bf16x16(src + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            const __m512 id = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            /* round to nearest even (the MXCSR default), as llama.cpp's AVX quantizer rounds */
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
            _mm_storeu_si128((__m128i *)(xq + t * K + g * 32), _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)(xq + t * K + g * 32 + 16), _mm512_cvtsepi32_epi8(q1));
            xs[(t * G + g) * 2] = amax / 127.0f;
            xs[(t * G + g) * 2 + 1] = (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        }
    *xq_out = xq;
    return xs;
}

/* As edge_rt_int4_matmul_bf16 (bf16 x, x_bf16 must be 1) with the VNNI codes layout. */
int64_t edge_rt_int4_matmul_vnni(const uint8_t *codes, const uint16_t *sz, const void *x, int64_t x_bf16, int64_t ldx,
                                 int64_t T, int64_t Kx, int64_t repeat, int64_t N, void *y, int64_t y_bf16,
                                 int64_t ldy) {
    if (Kx % 32 || T <= 0 || N <= 0 || !x_bf16) return -2;
    int8_t *xq;
    float *xs = quantize_rows_q8(x, ldx, T, Kx, repeat, &xq);
    if (!xs) return -1;
    run_rows(&kernel_vnni, codes, sz, Kx * repeat, xq, Kx * repeat, xs, T, N, y, y_bf16, ldy);
    free(xs);
    return 0;
}

/* ---- int8 weights, AVX-512 VNNI (edge_rt_int8_matmul_vnni) ---------------------------------------
 * GGUF Q8_0 weights with x quantized as above (llama.cpp's Q8_0 x Q8_0 dot product):
 *     y[t, n] = sum_g d[n, g] * dx[t, g] * sum_{k in g} q[n, k] * xq[t, k].
 * vpdpbusd multiplies unsigned by signed bytes, so the weights are stored as q + 128 (0..255) and
 * each group's integer sum starts at -128 Q[t, g]: sum (q + 128) xq - 128 sum xq = sum q xq,
 * exact. Layout: codes [N / 16, K / 4, 64] bytes, for unit u and quad o the byte 4 j + i holding
 * q[16 u + j, 4 o + i] + 128; d [N / 16, K / 32, 16] bf16 (Int8Linear's scales).
 */
#define TILEV8(UB, TB)                                                                                    \
    static void v8_##UB##_##TB(const void *codes_, const uint16_t *dq, int64_t K, int64_t G,              \
                               const void *x_, const float *xs, float *y) {                               \
        const uint8_t *codes = codes_;                                                                    \
        const int32_t *x4 = x_;                                                                           \
        __m512 tot[TB][UB];                                                                               \
        _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++)                                             \
            _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) tot[t][u] = _mm512_setzero_ps();        \
        for (int64_t g = 0; g < G; g++) {                                                                 \
            __m512i a[TB][UB];                                                                            \
            _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) {                                       \
                const __m512i start = _mm512_set1_epi32(-128 * (int32_t)xs[(t * G + g) * 2 + 1]);         \
                _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) a[t][u] = start;                    \
            }                                                                                             \
            _Pragma("GCC unroll 8") for (int64_t o = g * 8; o < g * 8 + 8; o++)                          \
                _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) {                                   \
                    const __m512i w = _mm512_loadu_si512((const void *)(codes + (u * (K / 4) + o) * 64)); \
                    _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++)                                 \
                        a[t][u] = dpbusd_bcast(a[t][u], w, x4 + (t * K + 4 * o) / 4);                     \
                }                                                                                         \
            _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) {                                       \
                const __m512 d = load_bf16x16(dq + (u * G + g) * 16);                                     \
                _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) {                                   \
                    const __m512 r = _mm512_mul_ps(d, _mm512_set1_ps(xs[(t * G + g) * 2]));               \
                    tot[t][u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[t][u]), r, tot[t][u]);               \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++)                                             \
            _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) _mm512_storeu_ps(y + t * 16 * UB + 16 * u, tot[t][u]); \
    }

TILES12(TILEV8)
static const tile_fn tilesv8[13][4] = TABLE12(v8);
static const kernel_t kernel_int8_vnni = {tilesv8, 12, 16, 16, 2};

/* y = x @ w.T for int8 weights in the layout above: x [T, K] bf16 (row stride ldx), y [T, N] bf16
 * or fp32. Returns 0, -1 (allocation failed) or -2 (K not a multiple of 32, or no rows). */
int64_t edge_rt_int8_matmul_vnni(const uint8_t *codes, const uint16_t *dq, const uint16_t *x, int64_t ldx, int64_t T,
                                 int64_t K, int64_t N, void *y, int64_t y_bf16, int64_t ldy) {
    if (K % 32 || T <= 0 || N <= 0) return -2;
    int8_t *xq;
    float *xs = quantize_rows_q8(x, ldx, T, K, 1, &xq);
    if (!xs) return -1;
    run_rows(&kernel_int8_vnni, codes, dq, K, xq, K, xs, T, N, y, y_bf16, ldy);
    free(xs);
    return 0;
}
#pragma GCC pop_options

/* ---- int8 weights, AVX-512 BF16 (edge_rt_int8_matmul_bf16) -------------------------------------
 * y[t, n] = sum_g d[n, g] * sum_{k in g} q[n, k] * x[t, k] for int8 q (GGUF Q8_0): q is exact in
 * bf16, so each group is one chain of 16 vdpbf16ps in k order and one fused multiply-add by d;
 * rows stay invariant as above. Half the products of the same weights as two 4-bit halves.
 * Layout: codes [N / 16, K / 2, 32] int8, for unit u and pair p the bytes q[16 u + j, 2 p],
 * q[16 u + j, 2 p + 1] for j = 0..15; d [N / 16, K / 32, 16] bf16.
 */
#define TILE8(UB, TB)                                                                                     \
    static void q8_##UB##_##TB(const void *codes_, const uint16_t *dq, int64_t K, int64_t G,              \
                               const void *x_, const float *xs, float *y) {                               \
        const int8_t *codes = codes_;                                                                     \
        const uint16_t *x = x_;                                                                           \
        (void)xs;                                                                                         \
        __m512 tot[TB][UB];                                                                               \
        _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++)                                             \
            _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) tot[t][u] = _mm512_setzero_ps();        \
        for (int64_t g = 0; g < G; g++) {                                                                 \
            __m512 a[TB][UB];                                                                             \
            _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++)                                         \
                _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) a[t][u] = _mm512_setzero_ps();      \
            for (int64_t p = g * 16; p < g * 16 + 16; p++) {                                              \
                __m512i b[TB];                                                                            \
                _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) {                                   \
                    uint32_t pair;                                                                        \
                    memcpy(&pair, x + t * K + 2 * p, 4);                                                  \
                    b[t] = _mm512_set1_epi32((int)pair);                                                  \
                }                                                                                         \
                _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) {                                   \
                    const int8_t *c = codes + (u * (K / 2) + p) * 32;                                     \
                    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)c))); \
                    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + 16)))); \
                    const __m512bh w = _mm512_cvtne2ps_pbh(hi, lo); /* exact: |q| <= 128 */             \
                    _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++)                                 \
                        a[t][u] = _mm512_dpbf16_ps(a[t][u], w, (__m512bh)b[t]);                           \
                }                                                                                         \
            }                                                                                             \
            _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) {                                       \
                const __m512 d = load_bf16x16(dq + (u * G + g) * 16);                                     \
                _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) tot[t][u] = _mm512_fmadd_ps(d, a[t][u], tot[t][u]); \
            }                                                                                             \
        }                                                                                                 \
        _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++)                                             \
            _Pragma("GCC unroll 16") for (int u = 0; u < UB; u++) _mm512_storeu_ps(y + t * 16 * UB + 16 * u, tot[t][u]); \
    }

TILE8(8, 1) TILE8(4, 1) TILE8(2, 1) TILE8(1, 1)
TILE8(4, 2) TILE8(2, 2) TILE8(1, 2)
TILE8(2, 3) TILE8(1, 3)
TILE8(2, 4) TILE8(1, 4)
TILE8(2, 5) TILE8(1, 5)
TILE8(2, 6) TILE8(1, 6)
TILE8(1, 7)
TILE8(1, 8)

static const tile_fn tiles8[9][4] = {
    {NULL, NULL, NULL, NULL},
    {q8_1_1, q8_2_1, q8_4_1, q8_8_1},
    {q8_1_2, q8_2_2, q8_4_2, NULL},
    {q8_1_3, q8_2_3, NULL, NULL},
    {q8_1_4, q8_2_4, NULL, NULL},
    {q8_1_5, q8_2_5, NULL, NULL},
    {q8_1_6, q8_2_6, NULL, NULL},
    {q8_1_7, NULL, NULL, NULL},
    {q8_1_8, NULL, NULL, NULL},
};
static const kernel_t kernel_int8 = {tiles8, 8, 16, 16, 1};

/* y = x @ w.T for int8 weights: x [T, K] bf16 (row stride ldx), y [T, N] bf16 or fp32. Returns 0 or
 * -2 (K not a multiple of 32, or no rows). */
int64_t edge_rt_int8_matmul_bf16(const int8_t *codes, const uint16_t *dq, const uint16_t *x, int64_t ldx, int64_t T,
                                 int64_t K, int64_t N, void *y, int64_t y_bf16, int64_t ldy) {
    if (K % 32 || T <= 0 || N <= 0) return -2;
    run_rows(&kernel_int8, (const uint8_t *)codes, dq, K, x, ldx * (int64_t)sizeof(uint16_t), NULL, T, N, y, y_bf16,
             ldy);
    return 0;
}
#pragma GCC pop_options
