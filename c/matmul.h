// matmul.h: the performance machinery. The GEMM (packing, a register-tile micro-kernel sized for
// the ISA the compiler targets, the thread split) and the other parallel loops of a step (zeroing,
// column sums, the gradient norm).
#pragma once
#include "common.h"

// below this much work per parallel region, waking threads costs more than it saves
#define PAR_MIN_WORK (1L << 15)

// ----------------------------------------------------------------------------
// matmul: C (M x N) (+)= op(A) (M x K) * op(B) (K x N), both operands addressed by row and
// column strides, so one routine serves x W^T (forward), dY W (input grads) and dY^T X (weight
// grads). op(B) is packed into NR-wide column panels (once per pass for the recurrent weights);
// A is read in place, which is cache-friendly for both layouts we use: for row-major A the kernel
// streams MR rows, for transposed A (a_rs == 1) the MR values of one k are contiguous (a transposed
// tile that meets many panels of B is copied once first, see matmul_packed_team).
//
// The register tile is MR rows x NR columns, NR = NV vectors of the widest float vector the target
// has, sized so the MR * NV accumulators, NV vectors of B and one broadcast of A fit the register
// file (anything more spills to the stack in the inner loop; CI checks the assembly):
//   AVX-512 (32 zmm):       8 x 32  = 16 accumulators + 2 + 1
//   AVX2 + FMA (16 ymm):    6 x 16  = 12 accumulators + 2 + 1
//   NEON (32 q):            8 x 8   = 16 accumulators + 2 + 1
//   SSE2 and the rest (16): 6 x 8   = 12 accumulators + 2 + 1, 16-byte vectors
// Build for another target with `make ARCH=x86-64-v3` (see the README).

#if defined(__AVX512F__)
#define PYRNN_ISA "avx512"
#define VEC_FLOATS 16
#define MR 8
#elif defined(__AVX2__) && defined(__FMA__)
#define PYRNN_ISA "avx2"
#define VEC_FLOATS 8
#define MR 6
#elif defined(__ARM_NEON)
#define PYRNN_ISA "neon"
#define VEC_FLOATS 4
#define MR 8
#elif defined(__SSE2__)
#define PYRNN_ISA "sse2"
#define VEC_FLOATS 4
#define MR 6
#else
#define PYRNN_ISA "portable"
#define VEC_FLOATS 4
#define MR 6
#endif
#define NV 2
#define NR (NV * VEC_FLOATS)
#define KC 256
typedef float vecf __attribute__((vector_size(VEC_FLOATS * sizeof(float))));

// which kernel this build runs, for the benchmark and the trainer's banner
const char* pyrnn_isa(void) { return PYRNN_ISA; }

// packed op(B) for one-off products, owned by a model or layer so two never share one
typedef struct { float* b; size_t size; } MatmulScratch;

static void matmul_scratch_free(MatmulScratch* s) { free(s->b); s->b = NULL; s->size = 0; }

static size_t packed_b_size(int K, int N) { return (size_t)K * (size_t)((N + NR - 1) / NR) * NR; }

// room for packing each one-off op(B) of the given K x N shapes (pairs); grows only, so steady state
// never allocates
static int matmul_reserve(MatmulScratch* s, const size_t* shapes, int n_shapes) {
    size_t b_floats = 0;
    for (int i = 0; i < n_shapes; i++) {
        size_t n = packed_b_size((int)shapes[2 * i], (int)shapes[2 * i + 1]);
        b_floats = n > b_floats ? n : b_floats;
    }
    if (b_floats > s->size) {
        free(s->b);
        s->b = (float*)alloc_floats(b_floats);
        s->size = s->b ? b_floats : 0;
        if (!s->b) return fail("out of memory for the matmul scratch");
    }
    return 0;
}

// bp <- op(B) as [k-block][column panel][k][NR], zero-padded past N; call from inside a team or not.
// The k-blocks are independent, so the team meets once, at the end, not after each.
static void pack_b_team(float* bp, const float* b, int K, int N, long rs, long cs) {
    int n_panels = (N + NR - 1) / NR;
    for (int k0 = 0; k0 < K; k0 += KC) {
        int kc = K - k0 < KC ? K - k0 : KC;
        float* block = bp + (size_t)k0 * n_panels * NR;
        #pragma omp for schedule(static) nowait
        for (int jp = 0; jp < n_panels; jp++) {
            float* panel = block + (size_t)jp * kc * NR;
            int nr = N - jp * NR < NR ? N - jp * NR : NR;
            for (int k = 0; k < kc; k++) {
                const float* src = b + (long)(k0 + k) * rs + (long)jp * NR * cs;
                float* dst = panel + (size_t)k * NR;
                if (cs == 1) { memcpy(dst, src, nr * sizeof(float)); }
                else { for (int j = 0; j < nr; j++) dst[j] = src[(long)j * cs]; }
                for (int j = nr; j < NR; j++) dst[j] = 0.0f;
            }
        }
    }
    #pragma omp barrier
}

static void pack_b(float* bp, const float* b, int K, int N, long rs, long cs) {
    if (omp_in_parallel()) { pack_b_team(bp, b, K, N, rs, cs); return; }
    #pragma omp parallel if ((long)K * N > PAR_MIN_WORK)
    pack_b_team(bp, b, K, N, rs, cs);
}

// the register tile, `rows` (<= MR) x NR: acc = sum_k a(i, k) * bp[k][j], then C (+)= acc. Inlined
// with constant rows and strides, so the accumulators stay in registers.
static inline __attribute__((always_inline)) void matmul_tile(float* c, long ldc, const float* a, long a_rs,
                                                              long a_cs, const float* bp, int kc, int rows, int nr,
                                                              int accumulate) {
    vecf acc[MR][NV];
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = (vecf){ 0 };   // in registers, not a memset call
    for (int k = 0; k < kc; k++) {
        vecf b[NV];
        for (int v = 0; v < NV; v++) b[v] = *(const vecf*)(bp + (size_t)k * NR + v * VEC_FLOATS);
        for (int i = 0; i < rows; i++) {
            float ai = a[i * a_rs + (long)k * a_cs];
            for (int v = 0; v < NV; v++) acc[i][v] += ai * b[v];
        }
    }
    for (int i = 0; i < rows; i++) {
        float* ci = c + (long)i * ldc;
        if (nr == NR) {   // whole rows as unaligned vectors (fixed-size memcpy compiles to one load / store)
            for (int v = 0; v < NV; v++) {
                vecf out = acc[i][v];
                if (accumulate) { vecf old; memcpy(&old, ci + v * VEC_FLOATS, sizeof(old)); out += old; }
                memcpy(ci + v * VEC_FLOATS, &out, sizeof(out));
            }
        } else {
            float r[NR];
            memcpy(r, acc[i], sizeof(r));
            if (accumulate) { for (int j = 0; j < nr; j++) ci[j] += r[j]; }
            else { for (int j = 0; j < nr; j++) ci[j] = r[j]; }
        }
    }
}

// One instance per row count, so a short edge tile (16 rows per thread make 6 + 6 + 4 on AVX2) does
// no wasted multiplies. Kept out of line, so the inner loops have names to find in the assembly
// (scripts/check_spills.py). A is row-major (a_cs == 1) or transposed (a_rs == 1).
#define TILE_CASE(rows, a_rs, a_cs) case rows: matmul_tile(c, ldc, a, a_rs, a_cs, bp, kc, rows, nr, acc); break;
#if MR == 8
#define TILE_CASES_WIDE(a_rs, a_cs) TILE_CASE(4, a_rs, a_cs) TILE_CASE(5, a_rs, a_cs) TILE_CASE(6, a_rs, a_cs) TILE_CASE(7, a_rs, a_cs)
#elif MR == 6
#define TILE_CASES_WIDE(a_rs, a_cs) TILE_CASE(4, a_rs, a_cs) TILE_CASE(5, a_rs, a_cs)
#elif MR == 4
#define TILE_CASES_WIDE(a_rs, a_cs)
#else
#error "matmul.h: give the tile's edge instances for this MR"
#endif
#define TILE_ROWS(a_rs, a_cs) \
    switch (mr) { \
    TILE_CASE(1, a_rs, a_cs) TILE_CASE(2, a_rs, a_cs) TILE_CASE(3, a_rs, a_cs) TILE_CASES_WIDE(a_rs, a_cs) \
    default: matmul_tile(c, ldc, a, a_rs, a_cs, bp, kc, MR, nr, acc); break; \
    }

__attribute__((noinline)) static void matmul_tile_rowmajor(float* c, long ldc, const float* a, long a_rs, const float* bp,
                                                           int kc, int mr, int nr, int acc) {
    TILE_ROWS(a_rs, 1)
}
__attribute__((noinline)) static void matmul_tile_transposed(float* c, long ldc, const float* a, long a_cs, const float* bp,
                                                             int kc, int mr, int nr, int acc) {
    TILE_ROWS(1, a_cs)
}

// C (M x N, row stride ldc) (+)= op(A) * packed op(B); must be called by every thread of a team, and C
// is complete only once the team has met (the end of the caller's parallel region). A is row-major
// (a_cs == 1) or transposed (a_rs == 1). Every k-block deals its tiles to the threads by the same
// static schedule, so a thread only ever adds to its own tiles: no barrier between k-blocks.
static void matmul_packed_team(float* c, long ldc, const float* a, long a_rs, long a_cs,
                               const float* bp, int M, int N, int K, int accumulate) {
    int n_panels = (N + NR - 1) / NR, m_panels = (M + MR - 1) / MR;
    for (int k0 = 0; k0 < K; k0 += KC) {
        int kc = K - k0 < KC ? K - k0 : KC;
        int acc = accumulate || k0 > 0;
        const float* bblock = bp + (size_t)k0 * n_panels * NR;
        if (a_rs == 1 && a_cs != 1 && n_panels > 8) {
            // Transposed A (the weight gradients dY^T X): a tile's MR values of one k are contiguous, but
            // consecutive k are a row of dY apart, often a page. Copy the tile's kc x MR block once, then
            // meet every panel of B with it; read in place, each panel paid a TLB miss per k. The copy
            // pays for itself once a tile meets more than 8 panels (measured: AVX2 dW of 1024 x 256
            // went from 80 to 97 GFLOP/s, while 4 panels ran 10% slower copied).
            #pragma omp for schedule(static) nowait
            for (int ip = 0; ip < m_panels; ip++) {
                float at[KC * MR] __attribute__((aligned(64)));
                int mr = M - ip * MR < MR ? M - ip * MR : MR;
                const float* src = a + (long)ip * MR + (long)k0 * a_cs;
                for (int k = 0; k < kc; k++)   // a fixed-size copy compiles to one vector move, not a call
                    if (mr == MR) memcpy(at + k * MR, src + (long)k * a_cs, MR * sizeof(float));
                    else for (int i = 0; i < mr; i++) at[k * MR + i] = src[(long)k * a_cs + i];
                for (int jp = 0; jp < n_panels; jp++) {
                    int nr = N - jp * NR < NR ? N - jp * NR : NR;
                    matmul_tile_transposed(c + (long)ip * MR * ldc + jp * NR, ldc, at, MR, bblock + (size_t)jp * kc * NR,
                                           kc, mr, nr, acc);
                }
            }
            continue;
        }
        // panels of B outermost: each thread keeps its B panels in cache while A streams by
        #pragma omp for collapse(2) schedule(static) nowait
        for (int jp = 0; jp < n_panels; jp++) {
            for (int ip = 0; ip < m_panels; ip++) {
                int mr = M - ip * MR < MR ? M - ip * MR : MR;
                int nr = N - jp * NR < NR ? N - jp * NR : NR;
                float* ct = c + (long)ip * MR * ldc + jp * NR;
                const float* at = a + (long)ip * MR * a_rs + (long)k0 * a_cs;
                const float* bt = bblock + (size_t)jp * kc * NR;
                if (a_cs == 1) matmul_tile_rowmajor(ct, ldc, at, a_rs, bt, kc, mr, nr, acc);
                else matmul_tile_transposed(ct, ldc, at, a_cs, bt, kc, mr, nr, acc);
            }
        }
    }
}

// C (M x N) (+)= A (M x K, row-major) * packed op(B), on the calling thread alone
static void matmul_packed_rows(float* c, long ldc, const float* a, long a_rs, const float* bp, int M, int N, int K,
                               int accumulate) {
    int n_panels = (N + NR - 1) / NR;
    for (int k0 = 0; k0 < K; k0 += KC) {
        int kc = K - k0 < KC ? K - k0 : KC;
        const float* bblock = bp + (size_t)k0 * n_panels * NR;
        for (int jp = 0; jp < n_panels; jp++)
            for (int i0 = 0; i0 < M; i0 += MR)
                matmul_tile_rowmajor(c + (long)i0 * ldc + jp * NR, ldc, a + (long)i0 * a_rs + k0, a_rs,
                                     bblock + (size_t)jp * kc * NR, kc, M - i0 < MR ? M - i0 : MR,
                                     N - jp * NR < NR ? N - jp * NR : NR, accumulate || k0 > 0);
    }
}

// memset by the whole team: a few MB of gradients, zeroed every step
static void zero_floats(float* x, size_t n) {
    const long chunk = 1 << 14;
    #pragma omp parallel for schedule(static) if ((long)n > PAR_MIN_WORK)
    for (long i = 0; i < (long)n; i += chunk) memset(x + i, 0, ((long)n - i < chunk ? (long)n - i : chunk) * sizeof(float));
}

// the calling thread's share [lo, hi) of n rows
static void thread_rows(int* lo, int* hi, int n) {
    #ifdef _OPENMP
    int id = omp_get_thread_num(), nt = omp_get_num_threads();
    #else
    int id = 0, nt = 1;
    #endif
    *lo = (int)((long)n * id / nt);
    *hi = (int)((long)n * (id + 1) / nt);
}

// one-off product: packs op(B) into the owner's scratch first
static void matmul(MatmulScratch* s, float* c, const float* a, long a_rs, long a_cs, const float* b, long b_rs, long b_cs,
                   int M, int N, int K, int accumulate) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { if (!accumulate) for (int i = 0; i < M; i++) memset(c + (long)i * N, 0, N * sizeof(float)); return; }
    #pragma omp parallel if ((double)M * N * K > 4.0 * PAR_MIN_WORK)
    {
        pack_b_team(s->b, b, K, N, b_rs, b_cs);
        matmul_packed_team(c, N, a, a_rs, a_cs, s->b, M, N, K, accumulate);
    }
}

// out[j] += sum over rows of x (rows x cols): rows are streamed in order, each thread owns a slice of
// columns, so reads are contiguous and the summation order is fixed
static void colsum_accumulate(float* out, const float* x, long rows, int cols) {
    enum { SLICE = 64 };
    #pragma omp parallel for schedule(static) if (rows * cols > PAR_MIN_WORK)
    for (int j0 = 0; j0 < cols; j0 += SLICE) {
        int n = cols - j0 < SLICE ? cols - j0 : SLICE;
        float acc[SLICE] = { 0 };
        for (long r = 0; r < rows; r++) {
            const float* row = x + r * cols + j0;
            for (int j = 0; j < n; j++) acc[j] += row[j];
        }
        for (int j = 0; j < n; j++) out[j0 + j] += acc[j];
    }
}

// sum of squares in double with a fixed combination order, so a run is bit-reproducible for a given
// thread count (OpenMP's reduction clause adds the partial sums in whatever order threads finish)
#define MAX_THREADS 256
static double sum_squares(const float* x, size_t n) {
    double partial[MAX_THREADS] = { 0 };
    int n_threads = 1;
    #pragma omp parallel if ((long)n > PAR_MIN_WORK)
    {
        #ifdef _OPENMP
        int id = omp_get_thread_num(), nt = omp_get_num_threads();
        #else
        int id = 0, nt = 1;
        #endif
        if (id < MAX_THREADS) {
            int parts = nt < MAX_THREADS ? nt : MAX_THREADS;
            size_t lo = n * id / parts, hi = n * (id + 1) / parts;
            double s = 0.0;
            for (size_t i = lo; i < hi; i++) s += (double)x[i] * x[i];
            partial[id] = s;
            if (id == 0) n_threads = parts;
        }
    }
    double total = 0.0;
    for (int i = 0; i < n_threads; i++) total += partial[i];
    return total;
}

