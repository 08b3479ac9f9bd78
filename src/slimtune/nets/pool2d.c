/* Max and average pooling of a channels-last float32 map with TF's windows, for inference.
 *
 * Why it exists: torch 2.14's channels-last pooling vectorizes over channels only when their number
 * is a multiple of the vector width; NASNet's and PNASNet's cells pool 11, 22, 44 or 88 channels
 * and ran 3-14x slower there. Here every tap is one vector loop over a whole output row (pixels x
 * channels): with stride 1 a tap's input columns are contiguous with the output's; with a column
 * stride s the input row is first split into its s column phases (pixels p, p+s, p+2s, ... side by
 * side), and a tap then reads one phase contiguously. The taps are applied in torch's order (rows,
 * then columns), so even an average's rounding is torch's.
 *
 * Window of output (ho, wo): input rows ho*sh - top .. ho*sh - top + kh - 1 and columns likewise,
 * clipped to the input: padded positions never win a max and are left out of an average's count
 * (TF's 'SAME' and 'VALID' pooling). A NaN in a window gives NaN, as in torch and TF.
 * Rows of output (n, ho) are split between threads.
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>
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

/* Copy row `in` (W pixels of C channels) into `phases` as its sw column phases: phase p holds
 * pixels p, p + sw, p + 2 sw, ... contiguously, and starts at pixel index p * phase_width. */
static void split_phases(const float *in, float *phases, int64_t W, int64_t C, int64_t sw, int64_t phase_width) {
    for (int64_t w = 0; w < W; ++w) {
        const float *src = in + w * C;
        float *dst = phases + ((w % sw) * phase_width + w / sw) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dst[c] = src[c];
    }
}

/* `scratch`: with a column stride sw > 1, threads x sw x ceil(W / sw) x C floats (one split row
 * per thread); unused with stride 1. */
void pool2d_nhwc(const float *x, float *y, float *scratch, int64_t N, int64_t H, int64_t W, int64_t C, int64_t Ho,
                 int64_t Wo, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t top, int64_t left, int is_max,
                 int threads) {
    const int64_t phase_width = (W + sw - 1) / sw;
#pragma omp parallel num_threads(threads)
    {
        float *phases = sw > 1 ? scratch + omp_get_thread_num() * sw * phase_width * C : NULL;
#pragma omp for schedule(static)
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
                if (sw > 1) split_phases(in, phases, W, C, sw, phase_width);
                for (int64_t j = 0; j < kw; ++j) {
                    /* output columns whose tap j reads an input column wo*sw - left + j inside [0, W) */
                    int64_t offset = j - left;
                    int64_t lo = offset >= 0 ? 0 : (-offset + sw - 1) / sw;
                    int64_t hi = W - 1 - offset >= 0 ? (W - 1 - offset) / sw + 1 : 0;
                    if (hi > Wo) hi = Wo;
                    if (hi <= lo) continue;
                    if (sw == 1) {  /* the tap's columns are contiguous: one long vector loop */
                        accumulate(out + lo * C, in + (lo + offset) * C, (hi - lo) * C, is_max);
                    } else {  /* input column wo*sw + offset is pixel wo + shift of phase p */
                        int64_t p = ((offset % sw) + sw) % sw, shift = (offset - p) / sw;
                        accumulate(out + lo * C, phases + (p * phase_width + lo + shift) * C, (hi - lo) * C, is_max);
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
}
