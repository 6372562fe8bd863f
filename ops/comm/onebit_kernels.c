/* Fused CPU kernels of block-wise 1-bit compression (see signs.py for the algorithm and layout).
 *
 * Plain C, no torch headers, so it compiles in well under a second (native.py builds it with the
 * system C compiler and loads it with ctypes; ctypes releases the GIL during the calls).
 * Bit layout: bit j of byte k is the sign bit of element 8k + j (1: negative, -0.0 included),
 * least significant bit first (numpy.packbits(bitorder="little")). Each block of `block`
 * elements (a multiple of 8) has one scale = mean |value|; decompressed values are +scale (bit 0)
 * or -scale (bit 1). A block is compressed in two passes that hit L1 (block <= a few KiB), so a
 * call is about one pass over memory.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

/* Per block b of [0, n): e <- x + e (x may be NULL), scales[b] = mean |e|, bits -> packed,
 * e <- e - decompressed (the error-feedback residual). n % block == 0, block % 8 == 0. */
void dsl_compress_blocks(const float *x, float *e, int64_t n, int64_t block, float *scales, uint8_t *packed) {
    for (int64_t lo = 0, b = 0; lo < n; lo += block, b++) {
        float *eb = e + lo;
        float acc = 0.0f;
        if (x) {
            const float *xb = x + lo;
#pragma omp simd reduction(+ : acc)
            for (int64_t i = 0; i < block; i++) {
                float v = xb[i] + eb[i];
                eb[i] = v;
                acc += v < 0 ? -v : v;
            }
        } else {
#pragma omp simd reduction(+ : acc)
            for (int64_t i = 0; i < block; i++) {
                float v = eb[i];
                acc += v < 0 ? -v : v;
            }
        }
        float scale = acc / (float)block;
        scales[b] = scale;
        uint8_t *pb = packed + lo / 8;
        int64_t k = 0;
#ifdef __AVX__
        const __m256 sign_mask = _mm256_set1_ps(-0.0f);
        const __m256 scale_v = _mm256_set1_ps(scale);
        for (; k < block / 8; k++) {
            __m256 v = _mm256_loadu_ps(eb + 8 * k);
            pb[k] = (uint8_t)_mm256_movemask_ps(v); /* the 8 sign bits, element 0 in bit 0 */
            __m256 s = _mm256_or_ps(scale_v, _mm256_and_ps(v, sign_mask)); /* copysign(scale, v) */
            _mm256_storeu_ps(eb + 8 * k, _mm256_sub_ps(v, s));
        }
#endif
        for (; k < block / 8; k++) {
            float *v = eb + 8 * k;
            uint32_t byte = 0;
            for (int j = 0; j < 8; j++) {
                uint32_t u;
                memcpy(&u, &v[j], 4);
                byte |= (u >> 31) << j;
                v[j] += (u >> 31) ? scale : -scale;
            }
            pb[k] = (uint8_t)byte;
        }
    }
}

#ifdef __AVX__
/* sign_masks[b] holds -0.0f in lane j where bit j of b is set: xor flips those lanes' signs. */
static float sign_masks[256][8] __attribute__((aligned(32)));
static int sign_masks_ready = 0;

static void init_sign_masks(void) {
    for (int b = 0; b < 256; b++)
        for (int j = 0; j < 8; j++) sign_masks[b][j] = ((b >> j) & 1) ? -0.0f : 0.0f;
    sign_masks_ready = 1;
}
#endif

/* out[i] (= or +=) weight * (+-scales[i / block]) for i in [0, n); block % 8 == 0. */
void dsl_decompress_blocks(const uint8_t *packed, const float *scales, int64_t n, int64_t block,
                           float weight, float *out, int accumulate) {
#ifdef __AVX__
    if (!sign_masks_ready) init_sign_masks(); /* idempotent: a race writes the same values */
#endif
    for (int64_t lo = 0; lo < n; lo += block) {
        float s = weight * scales[lo / block];
        int64_t hi = lo + block < n ? lo + block : n;
        int64_t i = lo;
#ifdef __AVX__
        const __m256 s_v = _mm256_set1_ps(s);
        for (; i + 8 <= hi; i += 8) {
            __m256 v = _mm256_xor_ps(s_v, _mm256_load_ps(sign_masks[packed[i / 8]]));
            if (accumulate) v = _mm256_add_ps(v, _mm256_loadu_ps(out + i));
            _mm256_storeu_ps(out + i, v);
        }
#endif
        for (; i + 8 <= hi; i += 8) {
            uint32_t byte = packed[i / 8];
            float *o = out + i;
            if (accumulate) {
                for (int j = 0; j < 8; j++) o[j] += ((byte >> j) & 1u) ? -s : s;
            } else {
                for (int j = 0; j < 8; j++) o[j] = ((byte >> j) & 1u) ? -s : s;
            }
        }
        for (; i < hi; i++) {
            float v = ((packed[i / 8] >> (i % 8)) & 1u) ? -s : s;
            out[i] = accumulate ? out[i] + v : v;
        }
    }
}

/* The server step of the compressed all-reduce, fused: for each block b of this rank's chunk,
 * e[b] += weight * sum_j (+-scales_j[b]) over the `rows` compressed copies received (row j: bits
 * at rows + j * row_stride, its scales at scales_base + j * row_stride bytes), then compress e[b]
 * exactly as dsl_compress_blocks (scales_out, packed_out) and leave the residual in e.
 * One pass over e instead of rows + 1. n % block == 0, block % 8 == 0. */
void dsl_server_blocks(const uint8_t *rows, const uint8_t *scales_base, int64_t row_stride, int64_t nrows,
                       float weight, float *e, int64_t n, int64_t block, float *scales_out, uint8_t *packed_out) {
    for (int64_t lo = 0, b = 0; lo < n; lo += block, b++) {
        for (int64_t j = 0; j < nrows; j++) {
            const float *sc = (const float *)(scales_base + j * row_stride);
            dsl_decompress_blocks(rows + j * row_stride + lo / 8, sc + b, block, block, weight, e + lo, 1);
        }
        dsl_compress_blocks(NULL, e + lo, block, block, scales_out + b, packed_out + lo / 8);
    }
}
