/* Decode-step kernels for edge-rt (edge_rt/models/native_kernels.py builds and calls them):
 * attention (with rope and the KV write) and the residual add + RMSNorm. Each works row by row,
 * so a T-token speculative verify chunk gives every row the bits of a one-token step.
 *
 * Attention: one call runs causal attention for T queries against a KV cache, query t seeing the keys
 * 0 .. S - T + t. Every query is computed by the same code in the same order whatever T is and
 * whichever other queries share the call: its scores, softmax and weighted sum depend only on its
 * own q row and its keys. So a T-token speculative verify chunk gives each row the same bits as
 * T one-token decode steps, with one call per layer instead of one attention call per query.
 *
 * Layout: fp32 everywhere. q rows and the output are [B, T, H, hd] with the strides given;
 * k and v are the cache's [B, Hkv, cap, hd] (row stride hd). Query head h reads KV head
 * h / (H / Hkv) (grouped-query attention).
 *
 * Summation orders are fixed: dot products and the weighted sum run over 8-lane vectors with a
 * fixed horizontal reduction; the softmax denominator accumulates key s in lane s % 8. exp is a
 * polynomial (Cephes expf's, about 1 ulp) so the result does not depend on the C library.
 *
 * Threads: OpenMP splits queries (attention), rows (add + RMSNorm) or 8-element blocks (SwiGLU
 * gate) between threads; each item is computed alone, so the split does not change any bits. Built
 * with -fopenmp and loaded after torch, the library uses torch's libgomp and its thread pool.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }

static inline float hsum(v8 a) {
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

static inline v8 load8(const float *p) { v8 r; memcpy(&r, p, sizeof r); return r; }
static inline void store8(float *p, v8 a) { memcpy(p, &a, sizeof a); }

/* exp(x) for x <= 0 (scores minus their maximum); inputs below -87 give about 1e-38. */
static inline v8 exp8(v8 x) {
    const v8 lo = splat(-87.0f);
    v8i below = x < lo; /* lanes: -1 where true (vector casts keep the bits) */
    x = (v8)(((v8i)lo & below) | ((v8i)x & ~below));
    const v8 magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    v8 n = (x * splat(1.44269504088896341f) + magic) - magic;
    v8 r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    v8 p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * (r * r) + r + splat(1.0f);
    v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    v8 scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

#ifdef __clang__
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

/* {a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7} */
static inline v8 hadd(v8 a, v8 b) {
    return SHUF(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + SHUF(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

/* r[j] = sum of the lanes of a[j]: eight horizontal sums at once, lane j's order fixed. */
static inline v8 hsum8(const v8 *a) {
    v8 g0 = hadd(hadd(a[0], a[1]), hadd(a[2], a[3]));
    v8 g1 = hadd(hadd(a[4], a[5]), hadd(a[6], a[7]));
    return SHUF(g0, g1, 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(g0, g1, 4, 5, 6, 7, 12, 13, 14, 15);
}

/* Scores of keys k[0..cnt) (cnt <= 8) against q: lane j = q . k[j]; lanes past cnt are 0.
 * hd is a multiple of 8. A key's score does not depend on cnt or on its neighbours. */
static inline __attribute__((always_inline)) v8 scores8(const float *q, const float *k, int64_t cnt, int64_t hd) {
    v8 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = splat(0.0f);
    for (int64_t d = 0; d < hd; d += 8) {
        v8 qd = load8(q + d);
        for (int j = 0; j < 8; j++)
            if (j < cnt) acc[j] += qd * load8(k + j * hd + d);
    }
    return hsum8(acc);
}

#define KEY_TILE 64 /* keys per tile of the weighted sum: 16 KB of v at head size 64 stays in L1 */

/* A group of nq queries on one KV head: out_i[hd] = softmax(scale * q_i . k[0..n_i)) @ v[0..n_i).
 * Every query goes through the same operations in the same order as it would alone (nq = 1): its
 * scores block by block, its softmax, its weighted sum key by key (accumulators kept in acc
 * between key tiles, stored and reloaded exactly). The queries only share the loops, so keys and
 * values are read from L1 once per tile instead of from L2 once per query.
 * buf: nq rows of bstride floats (bstride >= n_i rounded up to 8); acc: nq x hd floats;
 * vmax: 8 floats a query. hd is a multiple of 8 and at most 512. */
static inline __attribute__((always_inline)) void attend_group(const float *const *qs, float *const *outs,
                                                               const int64_t *ns, int64_t nq, const float *k,
                                                               const float *v, int64_t hd, float scale, float *buf,
                                                               int64_t bstride, float *acc, float *vmax) {
    const v8 vs = splat(scale);
    int64_t nmax = 0;
    for (int64_t i = 0; i < nq; i++) {
        store8(vmax + 8 * i, splat(-3.4e38f));
        nmax = ns[i] > nmax ? ns[i] : nmax;
    }
    /* scores, block of 8 keys by block, every query that sees the block */
    for (int64_t s = 0; s < nmax; s += 8)
        for (int64_t i = 0; i < nq; i++) {
            const int64_t n = ns[i];
            if (s >= n) continue;
            const int64_t cnt = n - s < 8 ? n - s : 8;
            v8 x = (cnt == 8 ? scores8(qs[i], k + s * hd, 8, hd) : scores8(qs[i], k + s * hd, cnt, hd)) * vs;
            if (cnt < 8)
                for (int64_t j = cnt; j < 8; j++) x[j] = -3.4e38f;
            store8(buf + i * bstride + s, x);
            const v8 vm = load8(vmax + 8 * i);
            v8i gt = x > vm;
            store8(vmax + 8 * i, (v8)(((v8i)x & gt) | ((v8i)vm & ~gt)));
        }
    /* softmax weights per query (unnormalized; the sum's inverse scales the output) */
    for (int64_t i = 0; i < nq; i++) {
        const int64_t n = ns[i], n8 = (n + 7) & ~(int64_t)7;
        float *b = buf + i * bstride;
        const float *vm = vmax + 8 * i;
        float m = vm[0];
        for (int j = 1; j < 8; j++) m = vm[j] > m ? vm[j] : m;
        v8 mm = splat(m), lsum = splat(0.0f);
        for (int64_t s = 0; s < n8; s += 8) {
            v8 p = exp8(load8(b + s) - mm);
            if (s + 8 > n) /* lanes past the last key count for nothing */
                for (int64_t j = n - s; j < 8; j++) p[j] = 0.0f;
            store8(b + s, p);
            lsum += p;
        }
        store8(vmax + 8 * i, splat(1.0f / hsum(lsum))); /* now the inverse of the weights' sum */
        memset(acc + i * hd, 0, sizeof(float) * (size_t)hd);
    }
    /* weighted sum of values, tile of keys by tile; each query's accumulators run over its keys in order */
    const int64_t c8 = hd / 8;
    for (int64_t s0 = 0; s0 < nmax; s0 += KEY_TILE)
        for (int64_t i = 0; i < nq; i++) {
            const int64_t end = s0 + KEY_TILE < ns[i] ? s0 + KEY_TILE : ns[i];
            if (s0 >= end) continue;
            const float *b = buf + i * bstride;
            float *ai = acc + i * hd;
            v8 a[64];
            for (int64_t c = 0; c < c8; c++) a[c] = load8(ai + 8 * c);
            for (int64_t s = s0; s < end; s++) {
                v8 ps = splat(b[s]);
                const float *vr = v + s * hd;
                for (int64_t c = 0; c < c8; c++) a[c] += ps * load8(vr + 8 * c);
            }
            for (int64_t c = 0; c < c8; c++) store8(ai + 8 * c, a[c]);
        }
    for (int64_t i = 0; i < nq; i++)
        for (int64_t c = 0; c < c8; c++) store8(outs[i] + 8 * c, load8(acc + i * hd + 8 * c) * load8(vmax + 8 * i));
}

static void attend_group_any(const float *const *qs, float *const *outs, const int64_t *ns, int64_t nq,
                             const float *k, const float *v, int64_t hd, float scale, float *buf, int64_t bstride,
                             float *acc, float *vmax) {
    attend_group(qs, outs, ns, nq, k, v, hd, scale, buf, bstride, acc, vmax);
}

static void attend_group_64(const float *const *qs, float *const *outs, const int64_t *ns, int64_t nq,
                            const float *k, const float *v, float scale, float *buf, int64_t bstride, float *acc,
                            float *vmax) {
    attend_group(qs, outs, ns, nq, k, v, 64, scale, buf, bstride, acc, vmax);
}

/* Returns 0, -1 when the scratch buffer cannot be allocated, -2 for a head size it does not take. */
static int64_t attention(const float *q, int64_t q_sb, int64_t q_st, int64_t q_sh,
                          const float *k, const float *v, int64_t kv_sb, int64_t kv_sh,
                          float *out, int64_t o_sb, int64_t o_st, int64_t o_sh,
                          int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t hd, int64_t S, float scale) {
    if (hd % 8 || hd > 512) return -2;
    const int64_t group = H / Hkv;
    /* work items: one query each for a decode step (T = 1: the heads spread over the threads);
     * for a verify chunk, the group's heads for a chunk of rows (at least two chunks, at most 8
     * rows each), so they share their KV head's tiles. Which queries share an item never changes
     * a query's bits (attend_group). */
    const int64_t chunks = T == 1 ? 1 : (T + 7) / 8 > 2 ? (T + 7) / 8 : 2;
    const int64_t rows = (T + chunks - 1) / chunks, per_item = T == 1 ? 1 : group * rows;
    const int64_t items = T == 1 ? B * H : B * Hkv * chunks;
    const int64_t bstride = (S + 7) & ~(int64_t)7;
    int64_t failed = 0;
#pragma omp parallel if (B * H * T * S * hd >= 65536)
    {
        float *buf = malloc(sizeof(float) * (size_t)(per_item * (bstride + hd)));
        float *vmax = malloc(sizeof(float) * 8 * (size_t)per_item);
        const float **qs = malloc(sizeof(float *) * (size_t)per_item);
        float **outs = malloc(sizeof(float *) * (size_t)per_item);
        int64_t *ns = malloc(sizeof(int64_t) * (size_t)per_item);
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            if (!buf || !vmax || !qs || !outs || !ns) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            int64_t b, kvh, nq = 0;
            if (T == 1) {
                b = it / H;
                const int64_t h = it % H;
                kvh = h / group;
                qs[0] = q + b * q_sb + h * q_sh;
                outs[0] = out + b * o_sb + h * o_sh;
                ns[0] = S;
                nq = 1;
            } else {
                b = it / (Hkv * chunks);
                kvh = (it / chunks) % Hkv;
                const int64_t t0 = (it % chunks) * rows, t1 = t0 + rows < T ? t0 + rows : T;
                for (int64_t h = kvh * group; h < (kvh + 1) * group; h++)
                    for (int64_t t = t0; t < t1; t++, nq++) {
                        qs[nq] = q + b * q_sb + t * q_st + h * q_sh;
                        outs[nq] = out + b * o_sb + t * o_st + h * o_sh;
                        ns[nq] = S - T + t + 1;
                    }
            }
            if (nq == 0) continue;
            const float *kh = k + b * kv_sb + kvh * kv_sh, *vh = v + b * kv_sb + kvh * kv_sh;
            if (hd == 64)
                attend_group_64(qs, outs, ns, nq, kh, vh, scale, buf, bstride, buf + per_item * bstride, vmax);
            else
                attend_group_any(qs, outs, ns, nq, kh, vh, hd, scale, buf, bstride, buf + per_item * bstride,
                                 vmax);
        }
        free(buf);
        free(vmax);
        free(qs);
        free(outs);
        free(ns);
    }
    return failed ? -1 : 0;
}

int64_t edge_rt_attention(const float *q, int64_t q_sb, int64_t q_st, int64_t q_sh,
                          const float *k, const float *v, int64_t kv_sb, int64_t kv_sh,
                          float *out, int64_t o_sb, int64_t o_st, int64_t o_sh,
                          int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t hd, int64_t S, float scale) {
    return attention(q, q_sb, q_st, q_sh, k, v, kv_sb, kv_sh, out, o_sb, o_st, o_sh, B, T, H, Hkv, hd, S, scale);
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);               /* round to nearest even */
}

static inline float bf16_to_float(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* A decode step's attention from the fused q/k/v projection, in one call:
 * rotate q and k (half-split rope: y = x * cos + swap_halves(x) * sin, sin's first half negated),
 * write k and v at cache positions start..start+T-1, then attend as edge_rt_attention over
 * S = start + T keys. qkv rows are [q heads | k heads | v heads], bf16 (qkv_bf16 = 1) or fp32;
 * cos/sin rows (stride rope_st) belong to the T positions; out is [B, T, H * hd] contiguous, fp32
 * or (out_bf16 = 1) bf16 rounded to nearest even. */
int64_t edge_rt_rope_attention(const void *qkv, int64_t qkv_bf16, int64_t qkv_sb, int64_t qkv_st,
                               const float *cos, const float *sin, int64_t rope_st,
                               float *kc, float *vc, int64_t kv_sb, int64_t kv_sh, int64_t start,
                               void *out, int64_t out_bf16, int64_t B, int64_t T, int64_t H, int64_t Hkv,
                               int64_t hd, float scale) {
    if (hd % 8 || hd > 512) return -2;
    float *qbuf = malloc(sizeof(float) * (size_t)(2 * B * T * H * hd)); /* q, then the fp32 output */
    if (!qbuf) return -1;
    float *o32 = out_bf16 ? qbuf + B * T * H * hd : (float *)out;
    float x[512];
    int64_t half = hd / 2;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            const float *c = cos + t * rope_st, *sn = sin + t * rope_st;
            for (int64_t j = 0; j < H + 2 * Hkv; j++) {
                int64_t off = b * qkv_sb + t * qkv_st + j * hd;
                if (qkv_bf16)
                    for (int64_t d = 0; d < hd; d++) x[d] = bf16_to_float(((const uint16_t *)qkv)[off + d]);
                else
                    memcpy(x, (const float *)qkv + off, sizeof(float) * (size_t)hd);
                float *dst;
                if (j < H)
                    dst = qbuf + ((b * T + t) * H + j) * hd;
                else if (j < H + Hkv)
                    dst = kc + b * kv_sb + (j - H) * kv_sh + (start + t) * hd;
                else {
                    memcpy(vc + b * kv_sb + (j - H - Hkv) * kv_sh + (start + t) * hd, x, sizeof(float) * (size_t)hd);
                    continue;
                }
                for (int64_t d = 0; d < hd; d++) {
                    float xc = x[d] * c[d], xs = x[d < half ? d + half : d - half] * sn[d];
                    dst[d] = xc + xs;
                }
            }
        }
    int64_t rc = attention(qbuf, T * H * hd, H * hd, hd, kc, vc, kv_sb, kv_sh, o32, T * H * hd, H * hd, hd,
                           B, T, H, Hkv, hd, start + T, scale);
    if (out_bf16)
        for (int64_t i = 0; i < B * T * H * hd; i++) ((uint16_t *)out)[i] = float_to_bf16(o32[i]);
    free(qbuf);
    return rc;
}

/* The residual add and the RMSNorm after it, row by row: h = x + y (y bf16 or fp32; fp32 h; y NULL:
 * h is x and is not written), out = h / sqrt(mean(h^2) + eps) * w in bf16 (out_bf16 = 1) or fp32.
 * d is a multiple of 8. h = x + y rounds once, as PyTorch's fp32 add of the same operands does.
 * Each row's result depends only on that row (the sum of squares runs in 8 lanes, fixed order). */
int64_t edge_rt_add_rms_norm(const float *x, const void *y, int64_t y_bf16, const float *w, float eps,
                             float *h, void *out, int64_t out_bf16, int64_t rows, int64_t d) {
    if (d % 8) return -2;
#pragma omp parallel for schedule(static) if (rows > 1 && rows * d >= 2048)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        const float *hr = y ? h + r * d : xr;
        float *hw = h + r * d;
        v8 ss = splat(0.0f);
        for (int64_t i = 0; i < d; i += 8) {
            v8 yv;
            if (!y) {
                yv = splat(0.0f);
            } else if (y_bf16) {
                const uint16_t *yr = (const uint16_t *)y + r * d + i;
                for (int j = 0; j < 8; j++) yv[j] = bf16_to_float(yr[j]);
            } else {
                yv = load8((const float *)y + r * d + i);
            }
            v8 hv = y ? load8(xr + i) + yv : load8(xr + i);
            if (y) store8(hw + i, hv);
            ss += hv * hv;
        }
        float scale = 1.0f / sqrtf(hsum(ss) / (float)d + eps);
        v8 sv = splat(scale);
        for (int64_t i = 0; i < d; i += 8) {
            v8 o = load8(hr + i) * sv * load8(w + i);
            if (out_bf16) {
                uint16_t *orow = (uint16_t *)out + r * d + i;
                for (int j = 0; j < 8; j++) orow[j] = float_to_bf16(o[j]);
            } else {
                store8((float *)out + r * d + i, o);
            }
        }
    }
    return 0;
}

/* SwiGLU's gate, row by row: out[r, i] = silu(g[r, i]) * u[r, i] with gu = [g | u] (n each), bf16
 * in and out, rounded as PyTorch's bf16 ops round: silu to bf16, then the product to bf16. Staying
 * this close to the PyTorch path keeps a prompt prefilled in one chunk (PyTorch's ops) and one whose
 * last token is re-run alone (these kernels, prefix reuse) within float rounding of each other. */
int64_t edge_rt_silu_mul_bf16(const uint16_t *gu, int64_t rows, int64_t n, uint16_t *out) {
    if (n % 8) return -2;
    const int64_t per_row = n / 8;
    /* blocks of 8 split between threads; each element's arithmetic is the same wherever it runs */
#pragma omp parallel for schedule(static) if (rows * n >= 4096)
    for (int64_t blk = 0; blk < rows * per_row; blk++) {
        const int64_t r = blk / per_row, i = (blk % per_row) * 8;
        const uint16_t *g = gu + r * 2 * n, *u = g + n;
        uint16_t *o = out + r * n;
        {
            v8 gv, uv;
            for (int j = 0; j < 8; j++) {
                gv[j] = bf16_to_float(g[i + j]);
                uv[j] = bf16_to_float(u[i + j]);
            }
            /* silu(x) = x / (1 + exp(-x)); exp8 takes x <= 0, so use exp(-|x|) and fold the sign */
            v8i neg = gv < splat(0.0f);
            v8 ax = (v8)((v8i)gv & ~(v8i)splat(-0.0f));
            v8 e = exp8(-ax);                                     /* exp(-|g|) in (0, 1] */
            v8 sig_pos = splat(1.0f) / (splat(1.0f) + e);         /* sigmoid(|g|) */
            v8 sig_neg = e / (splat(1.0f) + e);                   /* sigmoid(-|g|) */
            v8 sig = (v8)(((v8i)sig_neg & neg) | ((v8i)sig_pos & ~neg));
            v8 sg = gv * sig;
            for (int j = 0; j < 8; j++) sg[j] = bf16_to_float(float_to_bf16(sg[j])); /* as F.silu in bf16 */
            v8 y = sg * uv;
            for (int j = 0; j < 8; j++) o[i + j] = float_to_bf16(y[j]);
        }
    }
    return 0;
}
