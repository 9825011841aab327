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
