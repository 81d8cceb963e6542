/* Endor bitmap decode (offload/endor.py, compiled on first use by offload/native.py).
 *
 * Writes 16-bit values (bf16/fp16 bit patterns) at the set bits of a row-major bitmap and zeros
 * at the clear ones, row by row (or bf16 bits into the upper halves of fp32 words). On x86-64
 * with SSSE3 each bitmap byte is one 16-byte load of the next values, one byte shuffle (a
 * 256-entry table: lane i takes value popcount(b & ((1 << i) - 1)) or zero) and one 16-byte
 * store (two, unpacked against zeros, for fp32); elsewhere a scalar loop. Never reads past
 * values[n - 1].
 */
#include <stdint.h>
#if defined(__x86_64__) && defined(__SSSE3__)
#include <tmmintrin.h>
#define EDGE_RT_SSSE3 1
#endif

static uint8_t SHUF[256][16];
static uint8_t POP[256];

/* Build the tables; called once, before any decode. */
void edge_rt_endor_init(void) {
    for (int b = 0; b < 256; b++) {
        int r = 0;
        for (int i = 0; i < 8; i++) {
            if ((b >> i) & 1) {
                SHUF[b][2 * i] = (uint8_t)(2 * r);
                SHUF[b][2 * i + 1] = (uint8_t)(2 * r + 1);
                r++;
            } else {
                SHUF[b][2 * i] = 0x80;
                SHUF[b][2 * i + 1] = 0x80;
            }
        }
        POP[b] = (uint8_t)r;
    }
}

/* Decode R rows of K columns.
 *   bitmap   R rows of ceil(K / 8) bytes; bit i of byte j is column 8 j + i (bits past K ignored)
 *   vals     the n nonzeros in row-major order
 *   out      R * K elements, every one written: 16-bit (wide = 0), or 32-bit with the value in the
 *            upper half and zeros below (wide = 1: bf16 bits widened to the fp32 of the same value)
 *   counted  n_counted entries: counted[t] = values before row min(t * tile_rows, R)
 * Returns the number of values used, or -1 when the bitmap has more set bits than n. */
static inline int64_t decode(const uint8_t *bitmap, int64_t R, int64_t K, const uint16_t *vals, int64_t n,
                             void *out, const int wide, int64_t tile_rows, int64_t *counted, int64_t n_counted) {
    const int64_t B = (K + 7) / 8, full = K / 8;
    const int rem = (int)(K % 8);
    int64_t k = 0, t = 0;
    for (int64_t r = 0; r < R; r++) {
        if (t < n_counted && t * tile_rows == r)
            counted[t++] = k;
        const uint8_t *bm = bitmap + r * B;
        uint16_t *o16 = (uint16_t *)out + r * K;
        uint32_t *o32 = (uint32_t *)out + r * K;
        int64_t j = 0;
#ifdef EDGE_RT_SSSE3
        const __m128i zero = _mm_setzero_si128();
        for (; j < full && k + 8 <= n; j++) {
            const uint8_t b = bm[j];
            const __m128i v = _mm_loadu_si128((const __m128i *)(vals + k));
            const __m128i x = _mm_shuffle_epi8(v, _mm_loadu_si128((const __m128i *)SHUF[b]));
            if (wide) {
                _mm_storeu_si128((__m128i *)(o32 + 8 * j), _mm_unpacklo_epi16(zero, x));
                _mm_storeu_si128((__m128i *)(o32 + 8 * j + 4), _mm_unpackhi_epi16(zero, x));
            } else {
                _mm_storeu_si128((__m128i *)(o16 + 8 * j), x);
            }
            k += POP[b];
        }
#endif
        for (; j < B; j++) {
            const uint8_t b = bm[j];
            const int w = j < full ? 8 : rem;
            for (int i = 0; i < w; i++) {
                uint16_t x = 0;
                if ((b >> i) & 1) {
                    if (k >= n)
                        return -1;
                    x = vals[k++];
                }
                if (wide)
                    o32[8 * j + i] = (uint32_t)x << 16;
                else
                    o16[8 * j + i] = x;
            }
        }
    }
    while (t < n_counted)
        counted[t++] = k;
    return k;
}

int64_t edge_rt_endor_decode16(const uint8_t *bitmap, int64_t R, int64_t K, const uint16_t *vals, int64_t n,
                               uint16_t *out, int64_t tile_rows, int64_t *counted, int64_t n_counted) {
    return decode(bitmap, R, K, vals, n, out, 0, tile_rows, counted, n_counted);
}

int64_t edge_rt_endor_decode16to32(const uint8_t *bitmap, int64_t R, int64_t K, const uint16_t *vals, int64_t n,
                                   uint32_t *out, int64_t tile_rows, int64_t *counted, int64_t n_counted) {
    return decode(bitmap, R, K, vals, n, out, 1, tile_rows, counted, n_counted);
}
