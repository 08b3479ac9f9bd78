/* The weight gradient of a depthwise convolution on a channels-last float32 input.
 *
 * dW[i][j][c] = sum over n, ho, wo of g[n][ho][wo][c] * x[n][ho*sh - ph + i*rh][wo*sw - pw + j*rw][c]
 *
 * Why it exists: on x86 CPUs torch 2.14 (oneDNN 3.12) computes this for 5x5 and 7x7 depthwise
 * kernels at ~10 GFLOP/s, 7-10x slower than the same layer's forward, and NASNet / MobileNet v3
 * spend a large share of a training step there (see depthwise_grad.py). The loop order keeps one
 * input row and one gradient row hot in L1 while all kh*kw taps read them, and vectorizes over
 * channels, which are contiguous in the channels-last layout.
 *
 * Each thread sums a contiguous range of images into its own kh*kw*C buffer; the caller adds the
 * buffers in thread order, so the result depends only on the thread count, not on scheduling.
 */
#include <stdint.h>

typedef float vec16 __attribute__((vector_size(64), aligned(4)));
typedef float vec8 __attribute__((vector_size(32), aligned(4)));
typedef float vec4 __attribute__((vector_size(16), aligned(4)));

typedef struct {
    const float *x, *g;
    float *acc;                     /* [kh][kw][C], zeroed by the caller */
    int64_t n_begin, n_end;
    int64_t H, W, C, Ho, Wo, kh, kw, sh, sw, ph, pw, rh, rw;
} Job;

/* First and one-past-last output column whose input column wo*sw - pw + j*rw lies in [0, W). */
static void valid_columns(const Job *job, int64_t j, int64_t *lo, int64_t *hi) {
    int64_t offset = j * job->rw - job->pw;      /* input column = wo*sw + offset */
    int64_t first = offset >= 0 ? 0 : (-offset + job->sw - 1) / job->sw;
    int64_t last = (job->W - 1 - offset) >= 0 ? (job->W - 1 - offset) / job->sw + 1 : 0;
    if (last > job->Wo) last = job->Wo;
    *lo = first;
    *hi = last > first ? last : first;
}

/* One (n, ho, i, j) row: acc[c] += sum over wo of grow[wo][c] * xrow[wo*sw + offset][c].
 * Four partial sums over wo keep four independent FMA chains in flight. */
#define ROW_BLOCK(VEC, WIDTH)                                                                   \
    for (; c + WIDTH <= C; c += WIDTH) {                                                        \
        VEC s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};                                             \
        int64_t wo = lo;                                                                        \
        for (; wo + 4 <= hi; wo += 4) {                                                         \
            const float *gp = grow + wo * C + c, *xp = xrow + (wo * sw + offset) * C + c;        \
            s0 += *(const VEC *)gp * *(const VEC *)xp;                                           \
            s1 += *(const VEC *)(gp + C) * *(const VEC *)(xp + sw * C);                          \
            s2 += *(const VEC *)(gp + 2 * C) * *(const VEC *)(xp + 2 * sw * C);                  \
            s3 += *(const VEC *)(gp + 3 * C) * *(const VEC *)(xp + 3 * sw * C);                  \
        }                                                                                       \
        for (; wo < hi; ++wo)                                                                   \
            s0 += *(const VEC *)(grow + wo * C + c) * *(const VEC *)(xrow + (wo * sw + offset) * C + c); \
        *(VEC *)(a + c) += (s0 + s1) + (s2 + s3);                                               \
    }

static void accumulate(const Job *job) {
    const int64_t C = job->C, sw = job->sw;
    for (int64_t n = job->n_begin; n < job->n_end; ++n) {
        for (int64_t ho = 0; ho < job->Ho; ++ho) {
            const float *grow = job->g + (n * job->Ho + ho) * job->Wo * C;
            for (int64_t i = 0; i < job->kh; ++i) {
                int64_t hi_row = ho * job->sh - job->ph + i * job->rh;
                if (hi_row < 0 || hi_row >= job->H) continue;
                const float *xrow = job->x + (n * job->H + hi_row) * job->W * C;
                for (int64_t j = 0; j < job->kw; ++j) {
                    int64_t lo, hi;
                    valid_columns(job, j, &lo, &hi);
                    if (lo >= hi) continue;
                    const int64_t offset = j * job->rw - job->pw;
                    float *a = job->acc + (i * job->kw + j) * C;
                    int64_t c = 0;
                    ROW_BLOCK(vec16, 16)
                    ROW_BLOCK(vec8, 8)
                    ROW_BLOCK(vec4, 4)
                    for (; c < C; ++c) {
                        float s = 0.0f;
                        for (int64_t wo = lo; wo < hi; ++wo) s += grow[wo * C + c] * xrow[(wo * sw + offset) * C + c];
                        a[c] += s;
                    }
                }
            }
        }
    }
}

/* Splits the batch into `threads` contiguous ranges; acc holds `threads` zeroed kh*kw*C buffers.
 * The threads are OpenMP's: loaded into a torch process, this library shares torch's libgomp (the
 * same soname), so it runs on torch's own worker threads instead of competing with them while
 * they spin-wait between torch's parallel regions (measured: separate pthreads gave no gain at all
 * in a NASNet training step, though the kernel alone was 3-4x faster). */
void depthwise_weight_grad(const float *x, const float *g, float *acc, int64_t threads, int64_t N,
                           int64_t H, int64_t W, int64_t C, int64_t Ho, int64_t Wo, int64_t kh, int64_t kw,
                           int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t rh, int64_t rw) {
    if (threads < 1) threads = 1;
    if (threads > N) threads = N;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t t = 0; t < threads; ++t) {
        Job job = {x, g, acc + t * kh * kw * C, N * t / threads, N * (t + 1) / threads,
                   H, W, C, Ho, Wo, kh, kw, sh, sw, ph, pw, rh, rw};
        accumulate(&job);
    }
}

