/* This CPU's float32 FMA peak: the ceiling every convolution figure in results/ is compared with.
 *
 *   gcc -O2 -march=native -fopenmp benchmarks/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak 2
 *
 * Each thread runs 12 independent chains of AVX-512 fused multiply-adds (enough to cover the FMA
 * latency on every x86 core of this decade); distinct starting values keep the compiler from
 * merging the chains. Prints the best of three runs in GFLOP/s (2 flops per lane per FMA).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    const long rounds = 20000000L;
    double best = 0;
    for (int rep = 0; rep < 3; ++rep) {
        float sink = 0;
        double start = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
        {
            float b = (float)omp_get_thread_num();
            /* twelve named accumulators: an array of them is kept in memory by some compilers */
            __m512 a0 = _mm512_set1_ps(b + 1), a1 = _mm512_set1_ps(b + 2), a2 = _mm512_set1_ps(b + 3),
                   a3 = _mm512_set1_ps(b + 4), a4 = _mm512_set1_ps(b + 5), a5 = _mm512_set1_ps(b + 6),
                   a6 = _mm512_set1_ps(b + 7), a7 = _mm512_set1_ps(b + 8), a8 = _mm512_set1_ps(b + 9),
                   a9 = _mm512_set1_ps(b + 10), a10 = _mm512_set1_ps(b + 11), a11 = _mm512_set1_ps(b + 12);
            const __m512 m = _mm512_set1_ps(0.9999999f), c = _mm512_set1_ps(1e-7f);
            for (long i = 0; i < rounds; ++i) {
                a0 = _mm512_fmadd_ps(a0, m, c); a1 = _mm512_fmadd_ps(a1, m, c); a2 = _mm512_fmadd_ps(a2, m, c);
                a3 = _mm512_fmadd_ps(a3, m, c); a4 = _mm512_fmadd_ps(a4, m, c); a5 = _mm512_fmadd_ps(a5, m, c);
                a6 = _mm512_fmadd_ps(a6, m, c); a7 = _mm512_fmadd_ps(a7, m, c); a8 = _mm512_fmadd_ps(a8, m, c);
                a9 = _mm512_fmadd_ps(a9, m, c); a10 = _mm512_fmadd_ps(a10, m, c); a11 = _mm512_fmadd_ps(a11, m, c);
            }
            __m512 total = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                         _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
            total = _mm512_add_ps(total, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
            sink += _mm512_reduce_add_ps(total);
        }
        double seconds = omp_get_wtime() - start;
        double gflops = 2.0 * 16 * 12 * (double)rounds * threads / seconds / 1e9;
        if (gflops > best) best = gflops;
        if (sink == 0.5f) printf("unlikely\n");  /* keeps the chains live */
    }
    printf("%d threads: %.1f GFLOP/s float32 FMA peak\n", threads, best);
    return 0;
}
