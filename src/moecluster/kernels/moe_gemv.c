/* bf16 mat-vecs over the selected experts of one MoE layer, in one parallel region.
 *
 * Decode with one token evaluates top_k experts per layer; doing that as top_k separate mat-vecs
 * (and again for the down projection) pays a thread fork/join and a cold start of the memory
 * streams per call: on 16-32 MB expert matrices torch's bf16 mat-vec reaches ~85% of what a 1 GiB
 * one does here. moe_gemm_bf16 walks the rows of all selected experts as one partition (dynamic,
 * in runs of 32 blocks of 4 rows), so each thread streams long runs of contiguous rows, and
 * prefetches the next block while it sums the current one. With several tokens (batched decode)
 * each expert's weights are read once for all the (token, expert) pairs that selected it.
 *
 * Each output element is computed by one thread in the same order (one 16-lane fp32 accumulator
 * over the columns in steps of 32, a fixed reduction, one rounding to bf16) whatever the thread
 * count, the other pairs in the call or their number: results are reproducible across ranks,
 * placements and batch compositions.
 *
 * Built at run time with the system gcc (moecluster/kernels/__init__.py), linked against the
 * OpenMP runtime torch already loaded, so it shares torch's threads.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define ROWS_PER_BLOCK 4

#define PARALLEL_MIN_BYTES ((int64_t)1 << 20)  /* weights per call below which one thread runs it */

static inline uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu))  /* NaN: keep it quiet */
        return (uint16_t)((bits >> 16) | 0x0040u);
    bits += 0x7fffu + ((bits >> 16) & 1u);  /* round to nearest even, as torch does */
    return (uint16_t)(bits >> 16);
}

static inline __m512bh load_bh(const uint16_t *p) {
    return (__m512bh)_mm512_loadu_si512((const void *)p);
}

static inline __m512bh load_bh_tail(const uint16_t *p, __mmask32 m) {
    return (__m512bh)_mm512_maskz_loadu_epi16(m, (const void *)p);
}

/* the last n < 4 rows of a matrix whose rows are not a multiple of 4, times x. */
static void block_dot(const uint16_t *w, int64_t cols, const uint16_t *x, int n, float *out) {
    int64_t d;
    for (int i = 0; i < n; i++) {
        const uint16_t *wi = w + i * cols;
        __m512 a = _mm512_setzero_ps();
        for (d = 0; d + 32 <= cols; d += 32)
            a = _mm512_dpbf16_ps(a, load_bh(wi + d), load_bh(x + d));
        if (d < cols) {
            __mmask32 m = (__mmask32)((1ull << (cols - d)) - 1);
            a = _mm512_dpbf16_ps(a, load_bh_tail(wi + d, m), load_bh_tail(x + d, m));
        }
        out[i] = _mm512_reduce_add_ps(a);
    }
}

/* Pair p of expert k (p in pair_start[k] .. pair_start[k+1]-1) computes
 *
 *   Y[y_rows[p]][r] = bf16( sum_d W[experts[k]][r][d] * X[x_rows[p]][d] )
 *
 * W: [E, rows, cols] bf16, expert_stride elements apart; X and Y rows x_stride / y_stride apart; x_rows or
 * y_rows NULL: pair p uses row p (a dense linear layer: one expert, its rows the pairs).
 * A block of 4 weight rows (in L1 after the first group) is applied to the pairs 4 at a time.
 */
/* 4 weight rows (n == 4) times NX inputs, NX a compile-time constant so that the 4 x NX accumulators
 * stay in registers; `next` (or NULL) is prefetched line by line, as in block_dot. */
static inline __attribute__((always_inline)) void dot4_multi(const uint16_t *w, int64_t cols,
                                                             const uint16_t *const *xs, const int NX,
                                                             const char *next, float out[][ROWS_PER_BLOCK]) {
    __m512 acc[4][ROWS_PER_BLOCK];
    for (int j = 0; j < NX; j++)
        for (int i = 0; i < ROWS_PER_BLOCK; i++)
            acc[j][i] = _mm512_setzero_ps();
    const int64_t row_bytes = cols * 2;
    int64_t d = 0;
    for (; d + 32 <= cols; d += 32) {
        if (next) {
            for (int i = 0; i < ROWS_PER_BLOCK; i++)
                _mm_prefetch(next + i * row_bytes + 2 * d, _MM_HINT_NTA);  /* weights are read once: keep
                   them from evicting what the rest of the step uses (token-interleaved A/B: -2.5% ms/token) */
        }
        __m512bh wv[ROWS_PER_BLOCK];
        for (int i = 0; i < ROWS_PER_BLOCK; i++)
            wv[i] = load_bh(w + i * cols + d);
        for (int j = 0; j < NX; j++) {
            __m512bh xv = load_bh(xs[j] + d);
            for (int i = 0; i < ROWS_PER_BLOCK; i++)
                acc[j][i] = _mm512_dpbf16_ps(acc[j][i], wv[i], xv);
        }
    }
    if (d < cols) {
        __mmask32 m = (__mmask32)((1ull << (cols - d)) - 1);
        __m512bh wv[ROWS_PER_BLOCK];
        for (int i = 0; i < ROWS_PER_BLOCK; i++)
            wv[i] = load_bh_tail(w + i * cols + d, m);
        for (int j = 0; j < NX; j++) {
            __m512bh xv = load_bh_tail(xs[j] + d, m);
            for (int i = 0; i < ROWS_PER_BLOCK; i++)
                acc[j][i] = _mm512_dpbf16_ps(acc[j][i], wv[i], xv);
        }
    }
    for (int j = 0; j < NX; j++)
        for (int i = 0; i < ROWS_PER_BLOCK; i++)
            out[j][i] = _mm512_reduce_add_ps(acc[j][i]);
}

/* One pair, rows of at most SEQ_MAX_COLS: the 4 rows one after the other, so the thread reads one sequential
 * stream (4 interleaved short row streams train the hardware prefetcher worse), prefetching 2 KiB ahead. The
 * same accumulation order as dot4_multi, so the same bits. Same-process A/B on Qwen3-MoE- and DBRX-bench-shaped
 * models (rows of 1.5-8 KB): -13% and -12% ms/token; on rows of 12-21 KB (DBRX's real shape) 1-2% slower than
 * dot4_multi, which keeps them. */
#define SEQ_MAX_COLS 4096
#define SEQ_PREFETCH_BYTES 2048
static inline void dot4_seq(const uint16_t *w, int64_t cols, const uint16_t *x, float out[ROWS_PER_BLOCK]) {
    for (int i = 0; i < ROWS_PER_BLOCK; i++) {
        const uint16_t *wi = w + i * cols;
        __m512 a = _mm512_setzero_ps();
        int64_t d = 0;
        for (; d + 32 <= cols; d += 32) {
            _mm_prefetch((const char *)(wi + d) + SEQ_PREFETCH_BYTES, _MM_HINT_NTA);
            a = _mm512_dpbf16_ps(a, load_bh(wi + d), load_bh(x + d));
        }
        if (d < cols) {
            __mmask32 m = (__mmask32)((1ull << (cols - d)) - 1);
            a = _mm512_dpbf16_ps(a, load_bh_tail(wi + d, m), load_bh_tail(x + d, m));
        }
        out[i] = _mm512_reduce_add_ps(a);
    }
}

static void block_dot_multi(const uint16_t *w, int64_t cols, const uint16_t *const *xs, int nx, int n,
                            const char *next, float out[][ROWS_PER_BLOCK]) {
    if (n == ROWS_PER_BLOCK) {
        switch (nx) {
        case 1:
            if (cols <= SEQ_MAX_COLS)
                dot4_seq(w, cols, xs[0], out[0]);
            else
                dot4_multi(w, cols, xs, 1, next, out);
            return;
        case 2: dot4_multi(w, cols, xs, 2, next, out); return;
        case 3: dot4_multi(w, cols, xs, 3, next, out); return;
        default: dot4_multi(w, cols, xs, 4, next, out); return;
        }
    }
    for (int j = 0; j < nx; j++) {  /* a matrix's last rows (rows not a multiple of 4) */
        float one[ROWS_PER_BLOCK];
        block_dot(w, cols, xs[j], n, one);
        for (int i = 0; i < n; i++)
            out[j][i] = one[i];
    }
}

int moe_gemm_bf16(const uint16_t *W, int64_t expert_stride, const int64_t *experts, int64_t K,
                  const int64_t *pair_start, int64_t rows, int64_t cols,
                  const uint16_t *X, int64_t x_stride, const int64_t *x_rows,
                  uint16_t *Y, int64_t y_stride, const int64_t *y_rows) {
    if (K <= 0 || rows <= 0 || cols <= 0)
        return 0;
    const int64_t blocks_per_expert = (rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
    const int64_t total = K * blocks_per_expert;
    /* Below PARALLEL_MIN_BYTES of weights one thread streams them faster than a parallel region costs,
       and on a busy machine a region waits for a descheduled thread (ms per call): stay serial. */
    const int parallel = K * rows * cols * 2 >= PARALLEL_MIN_BYTES;
#pragma omp parallel for schedule(dynamic, 32) if(parallel)  /* 32 blocks = 256 KiB+ runs; a thread slowed by
                                                               a noisy neighbour takes fewer (+4% over static) */
    for (int64_t b = 0; b < total; b++) {
        const int64_t k = b / blocks_per_expert;
        const int64_t r0 = (b % blocks_per_expert) * ROWS_PER_BLOCK;
        const int n = (int)(rows - r0 < ROWS_PER_BLOCK ? rows - r0 : ROWS_PER_BLOCK);
        const uint16_t *w = W + experts[k] * expert_stride + r0 * cols;
        for (int64_t p0 = pair_start[k]; p0 < pair_start[k + 1]; p0 += 4) {
            /* the first group of pairs streams the block from memory and prefetches the next one;
               later groups find it in L1 */
            const char *next = p0 == pair_start[k] ? (const char *)(w + ROWS_PER_BLOCK * cols) : NULL;
            const int nx = (int)(pair_start[k + 1] - p0 < 4 ? pair_start[k + 1] - p0 : 4);
            const uint16_t *xs[4];
            float out[4][ROWS_PER_BLOCK];
            for (int j = 0; j < nx; j++)
                xs[j] = X + (x_rows ? x_rows[p0 + j] : p0 + j) * x_stride;
            block_dot_multi(w, cols, xs, nx, n, next, out);
            for (int j = 0; j < nx; j++) {
                uint16_t *yr = Y + (y_rows ? y_rows[p0 + j] : p0 + j) * y_stride + r0;
                for (int i = 0; i < n; i++)
                    yr[i] = to_bf16(out[j][i]);
            }
        }
    }
    return 0;
}

/* ---- one token's routed experts in one call ---- */

/* glue.c, built into the same library */
void silu_mul_bf16(int64_t P, int64_t F, const uint16_t *gate, const uint16_t *up, int64_t stride, uint16_t *out);
void combine_bf16(int64_t N, int64_t K, int64_t D, const uint16_t *y, const float *w, uint16_t *out);
int decode_pairs(int64_t K, const int64_t *ids, const int64_t *local_of, int64_t E, int64_t *local, int64_t *start,
                 int64_t *zeros, int64_t *rows);

/* RoutedExperts.forward for one token in one call: its K selected experts (global ids, local_of_E maps them
 * to rows of the stacks, -1 where not held) through w13, SwiGLU, w2 and the combine: the calls of the
 * per-pair path (moe_gemm_bf16 twice, silu_mul_bf16, combine_bf16) with its arguments, so the same bits.
 * scratch: K * (2F + F + D) bf16. Returns -1 (nothing written) when an expert is not held or K > 64. */
int moe_decode_bf16(const uint16_t *w13, const uint16_t *w2, int64_t D, int64_t F, const int64_t *local_of,
                    int64_t E, const int64_t *ids, const float *weights, int64_t K, const uint16_t *x,
                    uint16_t *scratch, uint16_t *out) {
    int64_t local[64], start[65], zeros[64], rows[64];
    if (decode_pairs(K, ids, local_of, E, local, start, zeros, rows))
        return -1;
    uint16_t *h13 = scratch, *h = scratch + K * 2 * F, *y = h + K * F;
    moe_gemm_bf16(w13, 2 * F * D, local, K, start, 2 * F, D, x, D, zeros, h13, 2 * F, NULL);
    silu_mul_bf16(K, F, h13, h13 + F, 2 * F, h);
    moe_gemm_bf16(w2, D * F, local, K, start, D, F, h, F, NULL, y, D, NULL);
    combine_bf16(1, K, D, y, weights, out);
    return 0;
}

/* ---- decode attention: one new token per row, after the fused qkv projection ----
 *
 * For row b (its own cache slot and position pos, attending to positions 0..pos, T = 1), from qkv[b] = q | k | v
 * (H, Hk, Hk heads of Hd), in the order and roundings of the torch path (Attention.forward, decode_attention):
 *   clip > 0 (and no q/k norm): q, k, v clamped to +-clip;
 *   qn/kn (per-head RMSNorm weights, Hd; or NULL): x = bf16(w * bf16(x32 * 1/sqrt(mean(x32^2) + eps)));
 *   RoPE on the first R dims of every q and k head (rotate-half): bf16(bf16(x * cos) + bf16(rot(x) * sin));
 *   k, v written to the cache at [slot, hk, pos];
 *   per query head (kv head h / (H / Hk)): s = fl(q . k) * scale in fp32, e = exp(s - max), out = sum_s
 *   bf16(e_s) * v_s / sum_s e_s (the unnormalised weights cast to bf16 as SDPA's flash kernel does), to bf16.
 * Products accumulate in fp32 in a fixed order; every row is computed alone: the same bits in any batch.
 * One call replaces ~40 small torch ops of the decode path (each a return to Python, whose working set the
 * weight streams keep evicting). */
static inline float f32_of(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void head_norm(uint16_t *x, int64_t Hd, const uint16_t *w, float eps) {
    float ss = 0.0f;
    for (int64_t i = 0; i < Hd; i++) {
        const float v = f32_of(x[i]);
        ss += v * v;
    }
    const float r = 1.0f / sqrtf(ss / (float)Hd + eps);
    for (int64_t i = 0; i < Hd; i++)
        x[i] = to_bf16(f32_of(w[i]) * f32_of(to_bf16(f32_of(x[i]) * r)));
}

static void rope(uint16_t *x, int64_t R, const uint16_t *cos, const uint16_t *sin) {
    const int64_t half = R / 2;
    uint16_t tmp[1024];
    memcpy(tmp, x, (size_t)R * 2);
    for (int64_t i = 0; i < R; i++) {
        const float rot = i < half ? -f32_of(tmp[i + half]) : f32_of(tmp[i - half]);
        const float a = f32_of(to_bf16(f32_of(tmp[i]) * f32_of(cos[i])));
        const float b = f32_of(to_bf16(rot * f32_of(sin[i])));
        x[i] = to_bf16(a + b);
    }
}

static inline float dot_bf16_f32(const uint16_t *a, const uint16_t *b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(a + i))), 16));
        const __m512 y = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(b + i))), 16));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(x, y));
    }
    float s = _mm512_reduce_add_ps(acc);
    for (; i < n; i++)
        s += f32_of(a[i]) * f32_of(b[i]);
    return s;
}

int attn_decode_bf16(int64_t B, int64_t H, int64_t Hk, int64_t Hd, int64_t R,
                     const uint16_t *qkv, int64_t qkv_stride, float clip,
                     const uint16_t *qn, const uint16_t *kn, float eps,
                     const uint16_t *cos, const uint16_t *sin, int64_t cs_stride,
                     uint16_t *kc, uint16_t *vc, int64_t S, const int64_t *slots, const int64_t *pos,
                     float scale, uint16_t *out, int64_t out_stride, float *scratch) {
    if (Hd > 1024 || R > Hd || (R & 1) || H % Hk)
        return -1;
    const int64_t G = H / Hk, qw = H * Hd, kw = Hk * Hd;
    /* 1. q, k, v of every row: clip, norms, RoPE; k and v into the cache (q kept in `out`, rewritten below) */
    for (int64_t b = 0; b < B; b++) {
        uint16_t *q = out + b * out_stride;
        memcpy(q, qkv + b * qkv_stride, (size_t)qw * 2);
        uint16_t *k = kc + ((slots[b] * Hk) * S + pos[b]) * Hd, *v = vc + ((slots[b] * Hk) * S + pos[b]) * Hd;
        for (int64_t h = 0; h < Hk; h++) {
            memcpy(k + h * S * Hd, qkv + b * qkv_stride + qw + h * Hd, (size_t)Hd * 2);
            memcpy(v + h * S * Hd, qkv + b * qkv_stride + qw + kw + h * Hd, (size_t)Hd * 2);
        }
        if (clip > 0.0f) {
            for (int64_t i = 0; i < qw; i++)
                q[i] = to_bf16(fminf(fmaxf(f32_of(q[i]), -clip), clip));
            for (int64_t h = 0; h < Hk; h++)
                for (int64_t i = 0; i < Hd; i++) {
                    k[h * S * Hd + i] = to_bf16(fminf(fmaxf(f32_of(k[h * S * Hd + i]), -clip), clip));
                    v[h * S * Hd + i] = to_bf16(fminf(fmaxf(f32_of(v[h * S * Hd + i]), -clip), clip));
                }
        }
        for (int64_t h = 0; h < H; h++) {
            if (qn)
                head_norm(q + h * Hd, Hd, qn, eps);
            rope(q + h * Hd, R, cos + b * cs_stride, sin + b * cs_stride);
        }
        for (int64_t h = 0; h < Hk; h++) {
            if (kn)
                head_norm(k + h * S * Hd, Hd, kn, eps);
            rope(k + h * S * Hd, R, cos + b * cs_stride, sin + b * cs_stride);
        }
    }
    /* 2. attention, one (row, kv head) per task: its G query heads over positions 0..pos */
    const int64_t work = B * Hk * (pos[0] + 1) * Hd * 2;
#pragma omp parallel for schedule(static) if(work >= ((int64_t)1 << 18))
    for (int64_t t = 0; t < B * Hk; t++) {
        const int64_t b = t / Hk, hk = t % Hk, n = pos[b] + 1;
        const uint16_t *K = kc + (slots[b] * Hk + hk) * S * Hd, *V = vc + (slots[b] * Hk + hk) * S * Hd;
        float *sc = scratch + t * (S + Hd);
        float *acc = sc + S;
        for (int64_t g = 0; g < G; g++) {
            uint16_t *q = out + b * out_stride + (hk * G + g) * Hd;
            float m = -INFINITY, total = 0.0f;
            for (int64_t s = 0; s < n; s++) {
                sc[s] = dot_bf16_f32(q, K + s * Hd, Hd) * scale;
                m = fmaxf(m, sc[s]);
            }
            for (int64_t i = 0; i < Hd; i++)
                acc[i] = 0.0f;
            for (int64_t s = 0; s < n; s++) {
                const float e = expf(sc[s] - m);
                total += e;
                const float p = f32_of(to_bf16(e));
                const uint16_t *vs = V + s * Hd;
                for (int64_t i = 0; i < Hd; i++)
                    acc[i] += p * f32_of(vs[i]);
            }
            for (int64_t i = 0; i < Hd; i++)  /* q is consumed: the output overwrites it */
                q[i] = to_bf16(acc[i] / total);
        }
    }
    return 0;
}
