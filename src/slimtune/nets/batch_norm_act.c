/* Training-mode BatchNorm followed by its activation, on a channels-last float32 tensor seen as
 * rows of C channels (M = N*H*W rows), forward and backward.
 *
 * Why it exists: on a 2-core CPU these layers are memory-bound. torch runs BatchNorm and the
 * activation as separate passes and keeps both the BN input and the BN output (or the activation's
 * output) for backward: ~5 passes over the tensor forward and ~8 backward. Here the forward reads x
 * twice and writes y once; the backward reads x and the gradient twice and writes dx once,
 * recomputing the BN output (one multiply-add per element) instead of storing it. Only x is kept
 * for backward.
 *
 * Each thread reduces a contiguous range of rows into its own double-precision per-channel sums
 * (rows are summed in float over blocks of BLOCK_ROWS, then added in double); the threads' sums are
 * combined in thread order, so the result depends only on the thread count, not on scheduling.
 *
 * Activations follow torch's definitions exactly (NaN propagates through each of them):
 *   relu(z) = z < 0 ? 0 : z,  gradient where z > 0;
 *   relu6(z) = clamp(z, 0, 6),  gradient where 0 < z < 6;
 *   hard_swish(z) = z * clamp(z + 3, 0, 6) / 6,  gradient 0 below -3, z/3 + 1/2 up to 3, 1 above.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { ACT_NONE = 0, ACT_RELU = 1, ACT_RELU6 = 2, ACT_HARD_SWISH = 3 };
#define BLOCK_ROWS 32

static inline __attribute__((always_inline)) float activate(float z, int act) {
    if (act == ACT_RELU) return z < 0.0f ? 0.0f : z;
    if (act == ACT_RELU6) return z < 0.0f ? 0.0f : (z > 6.0f ? 6.0f : z);
    if (act == ACT_HARD_SWISH) {
        float t = z + 3.0f;
        t = t < 0.0f ? 0.0f : t;
        t = t > 6.0f ? 6.0f : t;
        return z * t / 6.0f;
    }
    return z;
}

/* d activation(z) / dz times g. */
static inline __attribute__((always_inline)) float activation_grad(float z, float g, int act) {
    if (act == ACT_RELU) return z > 0.0f ? g : 0.0f;
    if (act == ACT_RELU6) return (z > 0.0f && z < 6.0f) ? g : 0.0f;
    if (act == ACT_HARD_SWISH) return z < -3.0f ? 0.0f : (z <= 3.0f ? g * (z / 3.0f + 0.5f) : g);
    return g;
}

static inline int64_t row_begin(int64_t rows, int t, int threads) { return rows * t / threads; }

/* Where the gradient's rows are: pixel (n, h, w) at n*sN + h*sH + w*sW, its C channels contiguous.
 * Autograd hands BN's backward e.g. a window of a padded map's gradient (the stride-2 depthwise
 * convolutions after a border pad); reading it in place saves a copy of the whole tensor. */
typedef struct {
    int64_t H, W, sN, sH, sW;
    int dense;                      /* rows at r * C */
} Layout;

static inline const float *row_of(const float *g, const Layout *layout, int64_t r, int64_t C) {
    if (layout->dense) return g + r * C;
    int64_t hw = layout->H * layout->W, n = r / hw, rest = r % hw;
    return g + n * layout->sN + (rest / layout->W) * layout->sH + (rest % layout->W) * layout->sW;
}

/* One row of the forward: out = act((in - mean) * scale + shift). */
static inline __attribute__((always_inline)) void forward_row(const float *in, float *out, int64_t C,
                                                              const float *mean, const float *scale,
                                                              const float *shift, const int act) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] = activate((in[c] - mean[c]) * scale[c] + shift[c], act);
}

/* One row of the backward's reduction: a += dz, b += dz * (x - mean). */
static inline __attribute__((always_inline)) void reduce_row(const float *xr, const float *gr, int64_t C,
                                                             const float *mean, const float *scale,
                                                             const float *shift, float *a, float *b,
                                                             const int act) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
        float xmu = xr[c] - mean[c];
        float dz = activation_grad(xmu * scale[c] + shift[c], gr[c], act);
        a[c] += dz;
        b[c] += dz * xmu;
    }
}

/* One row of dx. */
static inline __attribute__((always_inline)) void input_grad_row(const float *xr, const float *gr, float *out,
                                                                 int64_t C, const float *mean, const float *scale,
                                                                 const float *shift, const float *k_mean,
                                                                 const float *k_xmu, const float *k_out,
                                                                 const int act) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
        float xmu = xr[c] - mean[c];
        float dz = activation_grad(xmu * scale[c] + shift[c], gr[c], act);
        out[c] = (dz - k_mean[c] - xmu * k_xmu[c]) * k_out[c];
    }
}

/* Each call with a constant act inlines a loop specialized for that activation. */
#define DISPATCH(ACT, CALL)                                                                    \
    switch (ACT) {                                                                             \
    case ACT_RELU: CALL(ACT_RELU); break;                                                      \
    case ACT_RELU6: CALL(ACT_RELU6); break;                                                    \
    case ACT_HARD_SWISH: CALL(ACT_HARD_SWISH); break;                                          \
    default: CALL(ACT_NONE); break;                                                            \
    }

#define MOMENTS (-1)

/* One row of the forward's moments: a += x - shift, b += (x - shift)^2. */
static inline void moments_row(const float *xr, int64_t C, const float *shift, float *a, float *b) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
        float v = xr[c] - shift[c];
        a[c] += v;
        b[c] += v * v;
    }
}

/* Per-thread, per-channel sums over the thread's rows into partial [threads][2][C] (zeroed by the
 * caller): with what == MOMENTS, of x - mean and (x - mean)^2 (any per-channel shift works as
 * "mean": row 0 gives a cancellation-safe variance in one pass); else, for activation `what`, of
 * dz and dz * (x - mean). Rows are summed in float over blocks of BLOCK_ROWS, blocks in double. */
static void channel_sums(const float *x, const float *g, const Layout *g_layout, int64_t M, int64_t C,
                         int threads, int what, const float *mean, const float *scale, const float *shift,
                         double *partial) {
#define REDUCE_ROW(A) reduce_row(x + r * C, row_of(g, g_layout, r, C), C, mean, scale, shift, a, b, A)
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; ++t) {
        double *sum_a = partial + (int64_t)t * 2 * C, *sum_b = sum_a + C;
        float *block = malloc(sizeof(float) * 2 * C);
        float *a = block, *b = block + C;
        int64_t end = row_begin(M, t + 1, threads);
        for (int64_t r0 = row_begin(M, t, threads); r0 < end; r0 += BLOCK_ROWS) {
            int64_t r1 = r0 + BLOCK_ROWS < end ? r0 + BLOCK_ROWS : end;
            memset(block, 0, sizeof(float) * 2 * C);
            for (int64_t r = r0; r < r1; ++r) {
                if (what == MOMENTS)
                    moments_row(x + r * C, C, mean, a, b);
                else
                    DISPATCH(what, REDUCE_ROW)
            }
            for (int64_t c = 0; c < C; ++c) {
                sum_a[c] += a[c];
                sum_b[c] += b[c];
            }
        }
        free(block);
    }
#undef REDUCE_ROW
}

/* y = act((x - mean) * gamma * invstd + beta) with the batch's mean and biased variance; writes
 * mean and invstd (for backward) and updates the running statistics as torch does (unbiased
 * variance, running = (1 - momentum) * running + momentum * batch). gamma and beta may be NULL
 * (slim's BN without scale or center). Needs M > 1. */
void batch_norm_act_forward(const float *x, float *y, int64_t M, int64_t C, const float *gamma,
                            const float *beta, float *running_mean, float *running_var, double momentum,
                            double eps, int act, int threads, float *mean_out, float *invstd_out) {
    double *partial = calloc((size_t)threads * 2 * C, sizeof(double));
    float *coeff = malloc(sizeof(float) * 3 * C);   /* mean, scale, beta per channel */
    float *mean = coeff, *scale = coeff + C, *shift = coeff + 2 * C;
    channel_sums(x, NULL, NULL, M, C, threads, MOMENTS, x, NULL, NULL, partial);
    for (int64_t c = 0; c < C; ++c) {
        double sum = 0.0, sq = 0.0;
        for (int t = 0; t < threads; ++t) {
            sum += partial[(int64_t)t * 2 * C + c];
            sq += partial[(int64_t)t * 2 * C + C + c];
        }
        double centered = sum / (double)M;
        double var = sq / (double)M - centered * centered;
        if (var < 0.0) var = 0.0;
        double batch_mean = (double)x[c] + centered;
        double invstd = 1.0 / sqrt(var + eps);
        mean_out[c] = (float)batch_mean;
        invstd_out[c] = (float)invstd;
        running_mean[c] = (float)((1.0 - momentum) * running_mean[c] + momentum * batch_mean);
        running_var[c] = (float)((1.0 - momentum) * running_var[c] + momentum * var * M / (double)(M - 1));
        mean[c] = (float)batch_mean;
        scale[c] = (float)((gamma ? gamma[c] : 1.0) * invstd);
        shift[c] = beta ? beta[c] : 0.0f;
    }
#define FORWARD_ROW(A) forward_row(x + r * C, y + r * C, C, mean, scale, shift, A)
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < M; ++r) DISPATCH(act, FORWARD_ROW)
#undef FORWARD_ROW
    free(coeff);
    free(partial);
}

/* dx (and dgamma, dbeta when not NULL) from x, the gradient g of y, and the forward's mean and
 * invstd; the BN output z is recomputed for the activation's gradient dz. Training-mode formula:
 * dx = (dz - mean(dz) - (x - mean) * invstd^2 * mean(dz * (x - mean))) * gamma * invstd.
 * x and dx are dense rows; g's pixel (n, h, w) starts at n*g_sN + h*g_sH + w*g_sW (M = N*H*W). */
void batch_norm_act_backward(const float *x, const float *g, float *dx, int64_t M, int64_t C,
                             const float *gamma, const float *beta, const float *mean, const float *invstd,
                             int act, int threads, float *dgamma, float *dbeta, int64_t H, int64_t W,
                             int64_t g_sN, int64_t g_sH, int64_t g_sW) {
    const Layout g_layout = {H, W, g_sN, g_sH, g_sW, g_sW == C && g_sH == W * C && g_sN == H * W * C};
    double *partial = calloc((size_t)threads * 2 * C, sizeof(double));
    float *coeff = malloc(sizeof(float) * 5 * C);
    float *scale = coeff, *shift = coeff + C, *k_mean = coeff + 2 * C, *k_xmu = coeff + 3 * C,
          *k_out = coeff + 4 * C;
    for (int64_t c = 0; c < C; ++c) {
        scale[c] = (gamma ? gamma[c] : 1.0f) * invstd[c];
        shift[c] = beta ? beta[c] : 0.0f;
    }
    channel_sums(x, g, &g_layout, M, C, threads, act, mean, scale, shift, partial);
    for (int64_t c = 0; c < C; ++c) {
        double sum = 0.0, sxmu = 0.0;
        for (int t = 0; t < threads; ++t) {
            sum += partial[(int64_t)t * 2 * C + c];
            sxmu += partial[(int64_t)t * 2 * C + C + c];
        }
        double inv = invstd[c];
        if (dbeta) dbeta[c] = (float)sum;
        if (dgamma) dgamma[c] = (float)(sxmu * inv);
        k_mean[c] = (float)(sum / (double)M);
        k_xmu[c] = (float)(sxmu / (double)M * inv * inv);
        k_out[c] = (float)((gamma ? gamma[c] : 1.0) * inv);
    }
    if (dx) {
#define INPUT_GRAD_ROW(A) input_grad_row(x + r * C, row_of(g, &g_layout, r, C), dx + r * C, C, mean, scale, shift, k_mean, k_xmu, k_out, A)
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t r = 0; r < M; ++r) DISPATCH(act, INPUT_GRAD_ROW)
#undef INPUT_GRAD_ROW
    }
    free(coeff);
    free(partial);
}
