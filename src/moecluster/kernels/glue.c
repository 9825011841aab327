/* The small steps of a bf16 decoder layer between its weight streams: RMSNorm, the router's softmax and
 * the renormalization of its top-k weights, the SwiGLU activation and the combine of the experts' outputs.
 *
 * In decode each is a handful of tiny torch ops (RMSNorm alone is 8), and each op is a return to Python
 * and a trip through torch's dispatcher, whose code and data the weight streams before it keep evicting:
 * on the Qwen3-MoE decode benchmark these steps took ~3 ms of a 38 ms token. One call each here.
 *
 * Every row is computed alone, every element of a row by the same vector code (tails by masked loads), in
 * a fixed order: the same bits for any batch composition, thread count, rank count or placement. Results
 * equal torch's up to the last bit of a sum's order or of exp (the vector exp below, ~2 ulp in fp32).
 *
 * Built like moe_gemv.c (moecluster/kernels/__init__.py) with -std=c11, so no multiply-add is contracted.
 *
 * Shape legend: N rows, D model dim, E experts, K top-k, P (token, expert) pairs, F expert hidden dim.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline __m512 load_f32(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* round to nearest even as torch does (a NaN stays a quiet NaN) */
static inline void store_bf16(uint16_t *p, __m512 v, __mmask16 m) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

static inline __m512 round_bf16(__m512 v) {  /* fp32 -> bf16 -> fp32 */
    uint16_t tmp[16];
    store_bf16(tmp, v, 0xffff);
    return load_f32(tmp, 0xffff);
}

static inline __mmask16 tail(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
}

/* e^x in fp32: x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for e^r, then scaled by 2^n */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.72f)), _mm512_set1_ps(-103.9f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f / 120));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f / 24));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f / 6));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(0.5f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* HF's RMSNorm per row: out = bf16(w * bf16(x32 / sqrt(mean(x32^2) + eps))) */
void rms_norm_bf16(int64_t N, int64_t D, const uint16_t *x, const uint16_t *w, float eps, uint16_t *out) {
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *xr = x + n * D;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            const __m512 v = load_f32(xr + d, tail(D - d));
            ss = _mm512_add_ps(ss, _mm512_mul_ps(v, v));
        }
        const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)D + eps));
        for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 m = tail(D - d);
            const __m512 y = round_bf16(_mm512_mul_ps(load_f32(xr + d, m), r));
            store_bf16(out + n * D + d, _mm512_mul_ps(load_f32(w + d, m), y), m);
        }
    }
}

/* out_ND = bf16(sum over k in order of fp32(y_NKD) * w_NK), what moe.combine computes */
void combine_bf16(int64_t N, int64_t K, int64_t D, const uint16_t *y, const float *w, uint16_t *out) {
    for (int64_t n = 0; n < N; n++)
        for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 m = tail(D - d);
            __m512 acc = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k++)
                acc = _mm512_add_ps(acc, _mm512_mul_ps(load_f32(y + (n * K + k) * D + d, m), _mm512_set1_ps(w[n * K + k])));
            store_bf16(out + n * D + d, acc, m);
        }
}

/* out_PF = bf16(bf16(silu(gate)) * up) per pair, gate and up rows `stride` apart (silu(g) = g / (1 + e^-g)) */
void silu_mul_bf16(int64_t P, int64_t F, const uint16_t *gate, const uint16_t *up, int64_t stride, uint16_t *out) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t p = 0; p < P; p++)
        for (int64_t f = 0; f < F; f += 16) {
            const __mmask16 m = tail(F - f);
            const __m512 g = load_f32(gate + p * stride + f, m);
            const __m512 s = round_bf16(_mm512_div_ps(g, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
            store_bf16(out + p * F + f, _mm512_mul_ps(s, load_f32(up + p * stride + f, m)), m);
        }
}

/* the router's probabilities: p_NE = softmax(fp32(logits_NE)) per row (the top-k stays torch's, whose order
 * among equal values the reference models share) */
void softmax_bf16(int64_t N, int64_t E, const uint16_t *logits, float *p) {
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *l = logits + n * E;
        float *pr = p + n * E;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t e = 0; e < E; e += 16)
            mx = _mm512_mask_max_ps(mx, tail(E - e), mx, load_f32(l + e, tail(E - e)));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t e = 0; e < E; e += 16) {
            const __mmask16 t = tail(E - e);
            const __m512 v = _mm512_maskz_mov_ps(t, exp_ps(_mm512_sub_ps(load_f32(l + e, t), m)));
            _mm512_mask_storeu_ps(pr + e, t, v);
            sum = _mm512_add_ps(sum, v);
        }
        const __m512 s = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
        for (int64_t e = 0; e < E; e += 16)
            _mm512_mask_storeu_ps(pr + e, tail(E - e), _mm512_div_ps(_mm512_maskz_loadu_ps(tail(E - e), pr + e), s));
    }
}

/* w_NK /= its row sum (summed in order): top-k weights renormalized to sum 1, in place */
void renorm_f32(int64_t N, int64_t K, float *w) {
    for (int64_t n = 0; n < N; n++) {
        float total = 0.0f;
        for (int64_t k = 0; k < K; k++)
            total += fabsf(w[n * K + k]);
        for (int64_t k = 0; k < K; k++)
            w[n * K + k] /= total;
    }
}

/* One token's K selected experts as the per-pair path lays them out (moe_decode_bf16 / moe_decode_q): pair k is
 * expert ids[k] at local row local_of[ids[k]], one pair per expert (start[k] = k), reading x row 0 (zeros) and
 * writing row k (rows). Returns -1 when K is outside 1..64 or an expert is not held here (local_of -1). */
int decode_pairs(int64_t K, const int64_t *ids, const int64_t *local_of, int64_t E, int64_t *local, int64_t *start,
                 int64_t *zeros, int64_t *rows) {
    if (K < 1 || K > 64)
        return -1;
    for (int64_t k = 0; k < K; k++) {
        if (ids[k] < 0 || ids[k] >= E || local_of[ids[k]] < 0)
            return -1;
        local[k] = local_of[ids[k]];
        start[k] = rows[k] = k;
        zeros[k] = 0;
    }
    start[K] = K;
    return 0;
}
