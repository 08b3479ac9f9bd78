/* Max and average pooling of a channels-last float32 map with TF's windows, for inference.
 *
 * Why it exists: torch 2.14's channels-last pooling vectorizes over channels only when their number
 * is a multiple of the vector width; NASNet's and PNASNet's cells pool 11, 22, 44 or 88 channels
 * and ran 3-14x slower there. With stride 1 a tap's input columns are contiguous with the output's,
 * so each tap is one vector loop over a whole output row (pixels x channels).
 *
 * Window of output (ho, wo): input rows ho*sh - top .. ho*sh - top + kh - 1 and columns likewise,
 * clipped to the input: padded positions never win a max and are left out of an average's count
 * (TF's 'SAME' and 'VALID' pooling). A NaN in a window gives NaN, as in torch and TF.
 * Rows of output (n, ho) are split between threads.
 */
#include <math.h>
#include <stdint.h>

/* acc[i] = max(acc[i], src[i]) or acc[i] += src[i] for i < n. */
static inline void accumulate(float *acc, const float *src, int64_t n, int is_max) {
    if (is_max) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            float v = src[i];
            acc[i] = (v > acc[i] || v != v) ? v : acc[i];
        }
    } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) acc[i] += src[i];
    }
}

void pool2d_nhwc(const float *x, float *y, int64_t N, int64_t H, int64_t W, int64_t C, int64_t Ho, int64_t Wo,
                 int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t top, int64_t left, int is_max,
                 int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < N * Ho; ++row) {
        int64_t n = row / Ho, ho = row % Ho;
        int64_t h0 = ho * sh - top, h1 = h0 + kh;
        if (h0 < 0) h0 = 0;
        if (h1 > H) h1 = H;
        float *out = y + (n * Ho + ho) * Wo * C;
        const float init = is_max ? -INFINITY : 0.0f;
#pragma omp simd
        for (int64_t i = 0; i < Wo * C; ++i) out[i] = init;
        for (int64_t h = h0; h < h1; ++h) {
            const float *in = x + (n * H + h) * W * C;
            for (int64_t j = 0; j < kw; ++j) {
                /* output columns whose tap j reads an input column wo*sw - left + j inside [0, W) */
                int64_t offset = j - left;
                int64_t lo = offset >= 0 ? 0 : (-offset + sw - 1) / sw;
                int64_t hi = W - 1 - offset >= 0 ? (W - 1 - offset) / sw + 1 : 0;
                if (hi > Wo) hi = Wo;
                if (hi <= lo) continue;
                if (sw == 1) {  /* the tap's columns are contiguous: one long vector loop */
                    accumulate(out + lo * C, in + (lo + offset) * C, (hi - lo) * C, is_max);
                } else {
                    for (int64_t wo = lo; wo < hi; ++wo)
                        accumulate(out + wo * C, in + (wo * sw + offset) * C, C, is_max);
                }
            }
        }
        if (!is_max) {
            float rows = (float)(h1 - h0);
            for (int64_t wo = 0; wo < Wo; ++wo) {
                int64_t w0 = wo * sw - left, w1 = w0 + kw;
                if (w0 < 0) w0 = 0;
                if (w1 > W) w1 = W;
                float count = rows * (float)(w1 - w0);
                float *pixel = out + wo * C;
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) pixel[c] /= count;
            }
        }
    }
}
