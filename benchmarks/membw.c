/* Memory read bandwidth: the best of several passes over a buffer much larger than the caches,
 * read with 256-bit loads by OMP_NUM_THREADS threads. Prints JSON {"gb_per_s": ..., ...}.
 * Usage: membw MIB PASSES. Built and run by benchmarks/engine_decode.py. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    const size_t bytes = (size_t)(argc > 1 ? atol(argv[1]) : 1024) << 20;
    const int passes = argc > 2 ? atoi(argv[2]) : 8;
    uint8_t *buf = aligned_alloc(64, bytes);
    if (!buf) return 1;
    memset(buf, 1, bytes);
    double best = 0.0;
    long long sink = 0;
    for (int p = 0; p < passes; p++) {
        const double t0 = omp_get_wtime();
        long long s = 0;
        #pragma omp parallel for reduction(+ : s) schedule(static)
        for (size_t i = 0; i < bytes; i += 256) {
            __m256i a = _mm256_load_si256((const __m256i *)(buf + i));
            for (int j = 32; j < 256; j += 32) a = _mm256_xor_si256(a, _mm256_load_si256((const __m256i *)(buf + i + j)));
            s += _mm256_extract_epi64(a, 0);
        }
        const double gbs = bytes / (omp_get_wtime() - t0) / 1e9;
        if (gbs > best) best = gbs;
        sink += s;
    }
    printf("{\"gb_per_s\": %.2f, \"buffer_mib\": %zu, \"passes\": %d, \"threads\": %d, \"checksum\": %lld}\n",
           best, bytes >> 20, passes, omp_get_max_threads(), sink & 1);
    return 0;
}
