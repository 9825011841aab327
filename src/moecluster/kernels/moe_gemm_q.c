/* Quantized mat-vecs over the selected experts of one MoE layer, in one parallel region: moe_gemm_bf16
 * (moe_gemv.c) for int8, int4, fp8 (e4m3, 128x128 block scales) and mxfp4 weights (layouts: moecluster/quant).
 *
 * As there, the rows of all selected experts form one dynamic partition of 4-row blocks; a block is
 * applied to every (token, expert) pair of its expert (its weights are read from memory once per call),
 * the next blocks are prefetched while the current one is summed, and each output element is computed by
 * one thread in one fixed order: the same bits whatever the thread count or the other pairs in the call.
 *
 * int8 / int4 rows are stored in interleaved blocks (moecluster/quant/stack.py): a block of RB = 4 rows holds
 * their first 64 bytes, then their next 64 bytes, ..., so a thread working through consecutive blocks reads one
 * sequential stream (4 separate row streams trained the hardware prefetcher worse: -12% to -27% GB/s), and
 * consecutive blocks are grabbed in guided-schedule runs that start long and shrink for the tail.
 *
 * int8 / int4: the activation row is quantized per group (the weights' group) to int8, s_x = amax / 127,
 * once per call, and the dot products run on VNNI (vpdpbusd: u8 x s8 -> s32). vpdpbusd wants one unsigned
 * operand: int8 weights are offset to u8 by xor 0x80 (w + 128), int4 nibbles are stored as q + 8, and the
 * offset times the activation sum, computed once per group, is subtracted exactly in int32. A group's int32
 * lanes become fp32 once, times s_w * s_x. int4 rows are read 64 bytes (128 inputs) at a time when the group
 * size allows (g % 128 == 0; else 32 bytes): low nibbles against the chunk's even inputs, high nibbles against
 * its odd ones, which the prepared activation row stores [evens | odds] per chunk. Error against the
 * unquantized activation: at most
 * sum_i |w_i| * s_x / 2 per group (plus fp32 rounding).
 * fp8 / mxfp4: weights are converted exactly to bf16 in registers and multiplied by the bf16 activation
 * (vdpbf16ps, fp32 accumulation), then scaled per block (fp8) or per 32-group (mxfp4): exact up to fp32
 * rounding for bf16 activations (fp32 activations are rounded to bf16 first). A block with more pairs than one
 * pass takes (prefill) is converted once into a per-thread bf16 buffer (mxfp4: with its scale vectors) and every
 * pass reads that: the same values in the same order, so the same bits (w13 of a DBRX-bench layer, 1024 pairs:
 * fp8 145 -> 65 ms, mxfp4 137 -> 92 ms; bf16 through torch 62 ms).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { FMT_INT8 = 0, FMT_INT4 = 1, FMT_FP8 = 2, FMT_MXFP4 = 3 };
#define RB 4          /* weight rows per block */
#define NXMAX 2       /* pairs per pass over a block: 2 x 4 int32 + 2 x 4 fp32 accumulators fit the registers */
#ifndef PF_BYTES
#define PF_BYTES 8192 /* prefetch distance, in whole blocks of at least this many bytes (measured: 8 KiB ahead */
#endif                /* beat 4 and 16 for int8 and int4 rows of 0.4-6 KB) */
#ifndef PF_HINT
#define PF_HINT _MM_HINT_NTA  /* weights are read once (as in moe_gemv.c): +3-9% GB/s over T0 in a same-process A/B */
#endif
#ifndef CHUNK
#define CHUNK 4       /* least blocks per guided-schedule grab */
#endif

static float e8m0_value[256];
static uint16_t fp4_bf16[32], fp8_sub_bf16[32];

static inline uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu))
        return (uint16_t)((bits >> 16) | 0x0040u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

__attribute__((constructor)) static void init_tables(void) {
    static const float fp4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                  -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
    for (int s = 0; s < 256; s++)
        e8m0_value[s] = s == 255 ? NAN : ldexpf(1.0f, s - 127);
    for (int i = 0; i < 16; i++)
        fp4_bf16[i] = to_bf16(fp4[i]);
    for (int m = 0; m < 8; m++)  /* e4m3 subnormals m * 2^-9 are bf16 normals */
        fp8_sub_bf16[m] = to_bf16(ldexpf((float)m, -9));
}

static inline int64_t pad64(int64_t n) { return (n + 63) & ~(int64_t)63; }

/* position of input i in a row whose `cw`-chunks (64 or 128 inputs) are stored [even inputs | odd inputs],
 * the order in which low / high nibbles come out of cw / 2 packed bytes */
static inline int64_t nibble_pos(int64_t i, int64_t cw) {
    const int64_t c = i & ~(cw - 1), k = i & (cw - 1);
    return c + ((k & 1) ? cw / 2 + (k >> 1) : (k >> 1));
}

/* int4 inputs per packed-row read: 128 (one 64-byte load) when a group holds whole 128-chunks */
static inline int64_t int4_chunk(int64_t g) { return g % 128 == 0 ? 128 : 64; }

typedef struct {
    int fmt;
    int64_t rows, cols, g, ng;  /* ng: groups per row (int: cols / g; fp8: 128-blocks; mxfp4: 32-groups) */
    int64_t row_bytes, s_row_bytes, w_expert, s_expert, scr_row;
    int64_t blk_bytes;  /* int8/int4: bytes of one interleaved block of RB rows (row bytes padded to 64) */
} Shape;

/* int8/int4: address of byte j of row i of an interleaved block, from w_i = block + i * 64 */
static inline const char *il_at(const char *w_i, int64_t j) { return w_i + ((j >> 6) << 8) + (j & 63); }

int64_t moe_gemm_q_scratch_row_bytes(int fmt, int64_t cols, int64_t g) {
    if (fmt == FMT_INT8 || fmt == FMT_INT4)
        return pad64(cols) + pad64(cols / g * 4) + cols / g * 64;  /* x_q | s_x per group | offset sums */
    return pad64(pad64(cols) * 2);  /* bf16, zero-padded to 64 inputs */
}

static Shape make_shape(int fmt, int64_t rows, int64_t cols, int64_t g) {
    Shape s = {fmt, rows, cols, g, 0, 0, 0, 0, 0, moe_gemm_q_scratch_row_bytes(fmt, cols, g), 0};
    if (fmt == FMT_INT8 || fmt == FMT_INT4) {
        s.ng = cols / g;
        s.row_bytes = fmt == FMT_INT8 ? cols : cols / 2;
        s.s_row_bytes = s.ng * 4;
        s.s_expert = rows * s.s_row_bytes;
        s.blk_bytes = pad64(s.row_bytes) * RB;
        s.w_expert = (rows + RB - 1) / RB * s.blk_bytes;
        return s;
    } else if (fmt == FMT_FP8) {
        s.ng = (cols + 127) / 128;
        s.row_bytes = cols;
        s.s_row_bytes = s.ng * 4;  /* one row of scale blocks, shared by 128 weight rows */
        s.s_expert = (rows + 127) / 128 * s.s_row_bytes;
    } else {
        s.ng = cols / 32;
        s.row_bytes = cols / 2;
        s.s_row_bytes = s.ng;
        s.s_expert = rows * s.s_row_bytes;
    }
    s.w_expert = rows * s.row_bytes;
    return s;
}

static inline __m512 load16_ps(const void *x, int x_f32, int64_t i) {
    if (x_f32)
        return _mm512_loadu_ps((const float *)x + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* int8/int4: x row -> int8 per group (scale amax / 127; cvtps rounds half to even under the default MXCSR,
 * like nearbyintf), offset sums per lane. int4 rows are stored in nibble order. */
static void prep_int(const Shape *s, const void *x, int x_f32, char *scr) {
    int8_t *xq = (int8_t *)scr;
    float *sx = (float *)(scr + pad64(s->cols));
    int32_t *off = (int32_t *)(scr + pad64(s->cols) + pad64(s->ng * 4));
    const int perm = s->fmt == FMT_INT4;
    const int64_t cw = int4_chunk(s->g);
    const __m512i offset = _mm512_set1_epi8(perm ? 8 : (char)0x80);
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t grp = 0; grp < s->ng; grp++) {
        const int64_t c0 = grp * s->g;
        __m512 m = _mm512_setzero_ps();
        for (int64_t i = c0; i < c0 + s->g; i += 16)
            m = _mm512_max_ps(m, _mm512_and_ps(load16_ps(x, x_f32, i), sign));
        const float amax = _mm512_reduce_max_ps(m);
        const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        sx[grp] = amax / 127.0f;
        for (int64_t c = c0; c < c0 + s->g; c += 64) {
            int8_t q[64];
            for (int k = 0; k < 64; k += 16) {
                const __m512 v = _mm512_mul_ps(load16_ps(x, x_f32, c + k), inv);
                _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
            }
            if (perm)
                for (int k = 0; k < 64; k++)
                    xq[nibble_pos(c + k, cw)] = q[k];
            else
                memcpy(xq + c, q, 64);
        }
        __m512i acc = _mm512_setzero_si512();
        for (int64_t c = c0; c < c0 + s->g; c += 64)
            acc = _mm512_dpbusd_epi32(acc, offset, _mm512_loadu_si512(xq + c));
        _mm512_storeu_si512(off + grp * 16, acc);
    }
}

/* fp8/mxfp4: x row -> bf16 (mxfp4: nibble order), zero-padded to a multiple of 64 */
static void prep_bf16(const Shape *s, const void *x, int x_f32, char *scr) {
    uint16_t *xb = (uint16_t *)scr;
    const int perm = s->fmt == FMT_MXFP4;
    for (int64_t i = s->cols & ~(int64_t)63; i < pad64(s->cols); i++)
        xb[i] = 0;
    for (int64_t i = 0; i < s->cols; i++)
        xb[perm ? nibble_pos(i, 64) : i] = x_f32 ? to_bf16(((const float *)x)[i]) : ((const uint16_t *)x)[i];
}

#define PREFETCH_ROWS(next, row_bytes, off)                                  \
    if (next)                                                                \
        for (int i_ = 0; i_ < RB; i_++)                                      \
            _mm_prefetch((next) + i_ * (row_bytes) + (off), PF_HINT);

/* The dot kernels: RB weight rows (w[i], their scales sc[i]) times NX prepared activations xs[j]. */
static inline __attribute__((always_inline)) void dot_int(const Shape *s, const char *const *w,
                                                          const char *const *sc, const char *const *xs,
                                                          const int NX, const char *next, float out[][RB]) {
    __m512 acc[NXMAX][RB];
    for (int j = 0; j < NX; j++)
        for (int i = 0; i < RB; i++)
            acc[j][i] = _mm512_setzero_ps();
    const int int4 = s->fmt == FMT_INT4, wide = int4 && int4_chunk(s->g) == 128;
    const __m512i flip = _mm512_set1_epi8((char)0x80), low = _mm512_set1_epi8(0x0f);
    const int64_t sx_at = pad64(s->cols), off_at = sx_at + pad64(s->ng * 4);
    for (int64_t grp = 0; grp < s->ng; grp++) {
        __m512i ai[NXMAX][RB];
        for (int j = 0; j < NX; j++)
            for (int i = 0; i < RB; i++)
                ai[j][i] = _mm512_setzero_si512();
        if (wide) {
            for (int64_t c = grp * s->g; c < (grp + 1) * s->g; c += 128) {
                PREFETCH_ROWS(next, 64, c / 2 * RB);
                __m512i lo[RB], hi[RB];
                for (int i = 0; i < RB; i++) {
                    const __m512i b = _mm512_loadu_si512(il_at(w[i], c / 2));
                    lo[i] = _mm512_and_si512(b, low);
                    hi[i] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
                }
                for (int j = 0; j < NX; j++) {
                    const __m512i xe = _mm512_loadu_si512(xs[j] + c), xo = _mm512_loadu_si512(xs[j] + c + 64);
                    for (int i = 0; i < RB; i++)
                        ai[j][i] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(ai[j][i], lo[i], xe), hi[i], xo);
                }
            }
        }
        for (int64_t c = grp * s->g; !wide && c < (grp + 1) * s->g; c += 64) {
            __m512i wv[RB];
            if (int4) {
                if ((c & 127) == 0)
                    PREFETCH_ROWS(next, 64, c / 2 * RB);
                for (int i = 0; i < RB; i++) {
                    const __m256i b = _mm256_loadu_si256((const __m256i *)il_at(w[i], c / 2));
                    wv[i] = _mm512_and_si512(
                        _mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1), low);
                }
            } else {
                PREFETCH_ROWS(next, 64, c * RB);
                for (int i = 0; i < RB; i++)
                    wv[i] = _mm512_xor_si512(_mm512_loadu_si512(il_at(w[i], c)), flip);
            }
            for (int j = 0; j < NX; j++) {
                const __m512i xv = _mm512_loadu_si512(xs[j] + c);
                for (int i = 0; i < RB; i++)
                    ai[j][i] = _mm512_dpbusd_epi32(ai[j][i], wv[i], xv);
            }
        }
        for (int j = 0; j < NX; j++) {
            const __m512i off = _mm512_loadu_si512(xs[j] + off_at + grp * 64);
            const float sx = ((const float *)(xs[j] + sx_at))[grp];
            for (int i = 0; i < RB; i++) {
                const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(ai[j][i], off));
                const float scale = ((const float *)sc[i])[grp] * sx;
                acc[j][i] = _mm512_fmadd_ps(dot, _mm512_set1_ps(scale), acc[j][i]);
            }
        }
    }
    for (int j = 0; j < NX; j++)
        for (int i = 0; i < RB; i++)
            out[j][i] = _mm512_reduce_add_ps(acc[j][i]);
}

/* 32 e4m3 bytes -> 32 bf16, exact: normals by shifting the exponent bias (7 -> 127), subnormals by table */
static inline __m512bh fp8_to_bf16(const char *p, __m512i sub_lut) {
    const __m512i z = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
    const __m512i mag = _mm512_and_si512(z, _mm512_set1_epi16(0x7f));
    __m512i v = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), _mm512_set1_epi16(120 << 7));
    v = _mm512_mask_permutexvar_epi16(v, _mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8)), mag, sub_lut);
    const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(z, _mm512_set1_epi16(0x80)), 8);
    return (__m512bh)_mm512_or_si512(v, sign);
}

static inline __attribute__((always_inline)) void dot_fp8(const Shape *s, const char *const *w, const float *sc,
                                                          const char *const *xs, const int NX, const char *next,
                                                          const uint16_t *wb, int64_t ld, float out[][RB]) {
    __m512 acc[NXMAX][RB];
    for (int j = 0; j < NX; j++)
        for (int i = 0; i < RB; i++)
            acc[j][i] = _mm512_setzero_ps();
    const __m512i sub_lut = _mm512_loadu_si512(fp8_sub_bf16);
    for (int64_t kb = 0; kb < s->ng; kb++) {
        __m512 t[NXMAX][RB];
        for (int j = 0; j < NX; j++)
            for (int i = 0; i < RB; i++)
                t[j][i] = _mm512_setzero_ps();
        const int64_t end = (kb + 1) * 128 < s->cols ? (kb + 1) * 128 : s->cols;
        for (int64_t c = kb * 128; c < end; c += 32) {
            __m512bh wv[RB];
            if (wb) {  /* the block's rows converted once for all its pairs (same values: the conversion is exact) */
                for (int i = 0; i < RB; i++)
                    wv[i] = (__m512bh)_mm512_loadu_si512(wb + i * ld + c);
            } else {
                if ((c & 63) == 0)
                    PREFETCH_ROWS(next, s->row_bytes, c);
                for (int i = 0; i < RB; i++)
                    wv[i] = fp8_to_bf16(w[i] + c, sub_lut);
            }
            for (int j = 0; j < NX; j++) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(xs[j] + 2 * c);
                for (int i = 0; i < RB; i++)
                    t[j][i] = _mm512_dpbf16_ps(t[j][i], wv[i], xv);
            }
        }
        const __m512 scale = _mm512_set1_ps(sc[kb]);  /* the 4 rows share one 128-row scale block */
        for (int j = 0; j < NX; j++)
            for (int i = 0; i < RB; i++)
                acc[j][i] = _mm512_fmadd_ps(t[j][i], scale, acc[j][i]);
    }
    for (int j = 0; j < NX; j++)
        for (int i = 0; i < RB; i++)
            out[j][i] = _mm512_reduce_add_ps(acc[j][i]);
}

/* 32 packed e2m1 bytes (64 inputs; `whole` = 0: only the first 16 bytes exist) -> lo / hi nibbles as bf16, exact */
static inline void mxfp4_to_bf16(const char *p, int whole, __m512i lut, __m512bh *lo, __m512bh *hi) {
    const __m256i b = whole ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi8(0xffff, p);
    const __m512i z = _mm512_cvtepu8_epi16(b);
    *lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(z, _mm512_set1_epi16(0x0f)), lut);
    *hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(z, 4), lut);
}

/* fp32 lanes 0-7 sum group A's products (inputs c .. c+31 of a 64-chunk), lanes 8-15 group B's: their scales */
static inline __m512 mxfp4_scales(const char *row_scales, int64_t ga, int whole) {
    const uint8_t *si = (const uint8_t *)row_scales;
    return _mm512_insertf32x8(_mm512_set1_ps(e8m0_value[si[ga]]),
                              _mm256_set1_ps(whole ? e8m0_value[si[ga + 1]] : 0.0f), 1);
}

#define MX_CHUNK 96  /* uint16 per converted 64-input chunk: lo 32 + hi 32 bf16, 16 fp32 scales */

static inline __attribute__((always_inline)) void dot_mxfp4(const Shape *s, const char *const *w,
                                                            const char *const *sc, const char *const *xs,
                                                            const int NX, const char *next, const uint16_t *wb,
                                                            int64_t ld, float out[][RB]) {
    __m512 acc[NXMAX][RB];
    for (int j = 0; j < NX; j++)
        for (int i = 0; i < RB; i++)
            acc[j][i] = _mm512_setzero_ps();
    const __m512i lut = _mm512_loadu_si512(fp4_bf16);
    for (int64_t c = 0; c < s->cols; c += 64) {  /* 32 bytes: two 32-groups, A = bytes 0-15, B = 16-31 */
        const int64_t ga = c / 32;
        const int whole = ga + 1 < s->ng;
        if ((c & 127) == 0)
            PREFETCH_ROWS(next, s->row_bytes, c / 2);
        for (int i = 0; i < RB; i++) {
            __m512bh lo, hi;
            __m512 scale;
            if (wb) {  /* converted once for all the block's pairs: [lo 32 | hi 32 | scales 16 fp32] per 64 inputs */
                const uint16_t *at = wb + i * ld + c / 64 * MX_CHUNK;
                lo = (__m512bh)_mm512_loadu_si512(at);
                hi = (__m512bh)_mm512_loadu_si512(at + 32);
                scale = _mm512_loadu_ps(at + 64);
            } else {
                mxfp4_to_bf16(w[i] + c / 2, whole, lut, &lo, &hi);
                scale = mxfp4_scales(sc[i], ga, whole);
            }
            for (int j = 0; j < NX; j++) {
                __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), lo, (__m512bh)_mm512_loadu_si512(xs[j] + 2 * c));
                t = _mm512_dpbf16_ps(t, hi, (__m512bh)_mm512_loadu_si512(xs[j] + 2 * c + 64));
                acc[j][i] = _mm512_fmadd_ps(t, scale, acc[j][i]);
            }
        }
    }
    for (int j = 0; j < NX; j++)
        for (int i = 0; i < RB; i++)
            out[j][i] = _mm512_reduce_add_ps(acc[j][i]);
}

static void block_pairs(const Shape *s, const char *const *w, const char *const *sc, const char *const *xs,
                        int nx, const char *next, const uint16_t *wb, int64_t ld, float out[][RB]) {
    switch (s->fmt * 2 + (nx == 1 ? 0 : 1)) {
    case 0: case 2: dot_int(s, w, sc, xs, 1, next, out); return;
    case 1: case 3: dot_int(s, w, sc, xs, 2, next, out); return;
    case 4: dot_fp8(s, w, (const float *)sc[0], xs, 1, next, wb, ld, out); return;
    case 5: dot_fp8(s, w, (const float *)sc[0], xs, 2, next, wb, ld, out); return;
    case 6: dot_mxfp4(s, w, sc, xs, 1, next, wb, ld, out); return;
    default: dot_mxfp4(s, w, sc, xs, 2, next, wb, ld, out); return;
    }
}

/* fp8 / mxfp4 blocks with more pairs than one pass takes (prefill): the RB rows converted to bf16 once into wb
 * (row i at wb + i * ld), in the order the dot kernels read them, instead of once per pass of NXMAX pairs
 * (prefill of 256 tokens ran at 0.42-0.51x of bf16, bound by the conversions). */
static void convert_block(const Shape *s, const char *const *w, const char *const *sc, const char *next,
                          uint16_t *wb, int64_t ld) {
    if (s->fmt == FMT_FP8) {
        const __m512i sub_lut = _mm512_loadu_si512(fp8_sub_bf16);
        for (int64_t c = 0; c < s->cols; c += 32) {
            if ((c & 63) == 0)
                PREFETCH_ROWS(next, s->row_bytes, c);
            for (int i = 0; i < RB; i++)
                _mm512_storeu_si512(wb + i * ld + c, (__m512i)fp8_to_bf16(w[i] + c, sub_lut));
        }
    } else {
        const __m512i lut = _mm512_loadu_si512(fp4_bf16);
        for (int64_t c = 0; c < s->cols; c += 64) {
            if ((c & 127) == 0)
                PREFETCH_ROWS(next, s->row_bytes, c / 2);
            const int whole = c / 32 + 1 < s->ng;
            for (int i = 0; i < RB; i++) {
                __m512bh lo, hi;
                uint16_t *at = wb + i * ld + c / 64 * MX_CHUNK;
                mxfp4_to_bf16(w[i] + c / 2, whole, lut, &lo, &hi);
                _mm512_storeu_si512(at, (__m512i)lo);
                _mm512_storeu_si512(at + 32, (__m512i)hi);
                _mm512_storeu_ps(at + 64, mxfp4_scales(sc[i], c / 32, whole));
            }
        }
    }
}

/* Pair p of expert k (p in pair_start[k] .. pair_start[k+1]-1):
 *   Y[y_rows[p]][r] = sum_d W[experts[k]][r][d] * X[x_rows[p]][d]
 * X: n_x rows of bf16 (x_f32 = 0) or fp32, x_stride elements apart; Y likewise (y_f32). x_rows / y_rows
 * NULL: row p for pair p. scratch holds
 * n_x * moe_gemm_q_scratch_row_bytes(...) bytes, 64-byte aligned. Returns 0, or -1 for a bad format. */
int moe_gemm_q(int fmt, const char *W, const char *S, int64_t rows, int64_t cols, int64_t g,
               const int64_t *experts, int64_t K, const int64_t *pair_start,
               const void *X, int x_f32, int64_t x_stride, int64_t n_x, const int64_t *x_rows,
               void *Y, int y_f32, int64_t y_stride, const int64_t *y_rows, char *scratch) {
    if (fmt < FMT_INT8 || fmt > FMT_MXFP4)
        return -1;
    if (K <= 0 || rows <= 0 || cols <= 0)
        return 0;
    const Shape s = make_shape(fmt, rows, cols, g);
    const int64_t bpe = (rows + RB - 1) / RB, total = K * bpe;
    const int64_t xsize = x_f32 ? 4 : 2;
    const int interleaved = fmt <= FMT_INT4;
    const int64_t blk = interleaved ? s.blk_bytes : RB * s.row_bytes;  /* bytes from one block to the next */
    const int64_t pf_blocks = (PF_BYTES + blk - 1) / blk;
    /* little work: one thread (a parallel region on a busy machine waits for a descheduled thread) */
    const int parallel = K * s.w_expert >= ((int64_t)1 << 20);
#pragma omp parallel if(parallel)
    {
        /* this thread's bf16 copy of a block (fp8 / mxfp4 blocks with many pairs) */
        const int64_t ld = fmt == FMT_MXFP4 ? pad64(cols) / 64 * MX_CHUNK : pad64(cols) + 64;  /* uint16 per row */
        uint16_t *wb = NULL;  /* allocated at this thread's first such block: decode never needs it */
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n_x; r++) {
            const char *x = (const char *)X + r * x_stride * xsize;
            if (fmt <= FMT_INT4)
                prep_int(&s, x, x_f32, scratch + r * s.scr_row);
            else
                prep_bf16(&s, x, x_f32, scratch + r * s.scr_row);
        }
#pragma omp for schedule(guided, CHUNK)
        for (int64_t b = 0; b < total; b++) {
            const int64_t k = b / bpe, r0 = (b % bpe) * RB;
            const int n = (int)(rows - r0 < RB ? rows - r0 : RB);
            const char *wbase = W + experts[k] * s.w_expert, *sbase = S + experts[k] * s.s_expert;
            const char *w[RB], *sc[RB];
            for (int i = 0; i < RB; i++) {  /* a last short block repeats its last row: same per-row sums */
                const int64_t r = r0 + (i < n ? i : n - 1);
                w[i] = interleaved ? wbase + (r0 / RB) * blk + (r - r0) * 64 : wbase + r * s.row_bytes;
                sc[i] = fmt == FMT_FP8 ? sbase + (r0 / 128) * s.s_row_bytes : sbase + r * s.s_row_bytes;
            }
            const char *next = n == RB ? wbase + (r0 / RB + pf_blocks) * blk : NULL;
            const int convert = fmt >= FMT_FP8 && pair_start[k + 1] - pair_start[k] > NXMAX;
            if (convert && !wb)
                wb = (uint16_t *)aligned_alloc(64, (size_t)(RB * ld * 2));
            if (convert)
                convert_block(&s, w, sc, next, wb, ld);
            for (int64_t p0 = pair_start[k]; p0 < pair_start[k + 1]; p0 += NXMAX) {
                const int nx = (int)(pair_start[k + 1] - p0 < NXMAX ? pair_start[k + 1] - p0 : NXMAX);
                const char *xs[NXMAX];
                float out[NXMAX][RB];
                for (int j = 0; j < nx; j++)
                    xs[j] = scratch + (x_rows ? x_rows[p0 + j] : p0 + j) * s.scr_row;
                block_pairs(&s, w, sc, xs, nx, p0 == pair_start[k] ? next : NULL, convert ? wb : NULL, ld, out);
                for (int j = 0; j < nx; j++) {
                    char *y = (char *)Y + (y_rows ? y_rows[p0 + j] : p0 + j) * y_stride * (y_f32 ? 4 : 2);
                    for (int i = 0; i < n; i++) {
                        if (y_f32)
                            ((float *)y)[r0 + i] = out[j][i];
                        else
                            ((uint16_t *)y)[r0 + i] = to_bf16(out[j][i]);
                    }
                }
            }
        }
        free(wb);
    }
    return 0;
}

/* ---- one token's routed experts in one call (moe_gemv.c's moe_decode_bf16 for quantized stacks) ---- */

/* glue.c, built into the same library */
void silu_mul_bf16(int64_t P, int64_t F, const uint16_t *gate, const uint16_t *up, int64_t stride, uint16_t *out);
void combine_bf16(int64_t N, int64_t K, int64_t D, const uint16_t *y, const float *w, uint16_t *out);
int decode_pairs(int64_t K, const int64_t *ids, const int64_t *local_of, int64_t E, int64_t *local, int64_t *start,
                 int64_t *zeros, int64_t *rows);

/* QuantizedRoutedExperts.forward for one bf16 token: w13 (stack of [2F, D]) and w2 ([D, F]) in format fmt,
 * the calls and arguments of the per-pair path (moe_gemm_q twice, silu_mul_bf16, combine_bf16): the same
 * bits. h: K * (3F + D) bf16; scratch: max(row bytes of D, K * row bytes of F), 64-byte aligned. Returns -1
 * (nothing written) when an expert is not held here or K > 64. */
int moe_decode_q(int fmt, const char *W13, const char *S13, const char *W2, const char *S2, int64_t D, int64_t F,
                 int64_t g, const int64_t *local_of, int64_t E, const int64_t *ids, const float *weights, int64_t K,
                 const uint16_t *x, uint16_t *h, char *scratch, uint16_t *out) {
    int64_t local[64], start[65], zeros[64], rows[64];
    if (decode_pairs(K, ids, local_of, E, local, start, zeros, rows))
        return -1;
    uint16_t *h13 = h, *hf = h + K * 2 * F, *y = hf + K * F;
    int rc = moe_gemm_q(fmt, W13, S13, 2 * F, D, g, local, K, start, x, 0, D, 1, zeros, h13, 0, 2 * F, rows, scratch);
    if (rc)
        return rc;
    silu_mul_bf16(K, F, h13, h13 + F, 2 * F, hf);
    rc = moe_gemm_q(fmt, W2, S2, D, F, g, local, K, start, hf, 0, F, K, rows, y, 0, D, rows, scratch);
    if (rc)
        return rc;
    combine_bf16(1, K, D, y, weights, out);
    return 0;
}
