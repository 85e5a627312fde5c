// matmul.h: the GEMM as the model calls it, and the other parallel loops of a step (zeroing, column
// sums, the gradient norm). The kernels that do the work are the model's own set (isa.h: one per
// instruction set, in fp32 or bf16), so everything here is written once for all of them.
#pragma once
#include "common.h"
#include "isa.h"   // Kernels: packing, register tiles and cells per ISA; the choice of set


// ----------------------------------------------------------------------------
// matmul: C (M x N) (+)= op(A) (M x K) * op(B) (K x N), both operands addressed by row and column
// strides, so one routine serves x W^T (forward), dY W (input grads) and dY^T X (weight grads).
// op(B) is packed into the kernels' column panels (once per pass for the recurrent weights); A is
// read in place (fp32) or rounded a tile at a time (bf16).

// a model's or layer's GEMM context: its kernel set, the kernels it runs from it (fp32 or bf16), and
// the scratch it packs one-off operands into (owned, so two models never share one)
typedef struct { const KernelSet* set; const Kernels* k; float* b; size_t size; } Matmul;

// the chosen ISA's kernels, in fp32; no scratch yet
static int matmul_init(Matmul* mm) {
    mm->set = kernel_set_chosen();
    if (!mm->set) return -1;
    mm->k = mm->set->fp32;
    return 0;
}

// the same ISA's kernels in the other precision (the packed layouts differ: repack before use)
static void matmul_set_bf16(Matmul* mm, int bf16) { mm->k = bf16 ? mm->set->bf16 : mm->set->fp32; }

static void matmul_free(Matmul* mm) { free(mm->b); mm->b = NULL; mm->size = 0; }

// floats a packed op(B) of K x N takes (+ 1 row: the bf16 panels pad an odd K to pairs)
static size_t packed_b_size(const Kernels* k, int K, int N) {
    return (size_t)(K + 1) * (size_t)((N + k->nr - 1) / k->nr) * k->nr;
}

// room for packing each one-off op(B) of the given K x N shapes (pairs); grows only, so steady state
// never allocates
static int matmul_reserve(Matmul* mm, const size_t* shapes, int n_shapes) {
    size_t b_floats = 0;
    for (int i = 0; i < n_shapes; i++) {
        size_t n = packed_b_size(mm->k, (int)shapes[2 * i], (int)shapes[2 * i + 1]);
        b_floats = n > b_floats ? n : b_floats;
    }
    if (b_floats > mm->size) {
        free(mm->b);
        mm->b = (float*)alloc_floats(b_floats);
        mm->size = mm->b ? b_floats : 0;
        if (!mm->b) return fail("out of memory for the matmul scratch");
    }
    return 0;
}

// bp <- op(B) packed for k, from inside a team or not
static void pack_b(const Kernels* k, float* bp, const float* b, int K, int N, long rs, long cs) {
    if (omp_in_parallel()) { k->pack_b(bp, b, K, N, rs, cs); return; }
    #pragma omp parallel if ((long)K * N > PAR_MIN_WORK)
    k->pack_b(bp, b, K, N, rs, cs);
}

// one-off product: packs op(B) into the owner's scratch first
static void matmul(Matmul* mm, float* c, const float* a, long a_rs, long a_cs, const float* b, long b_rs,
                   long b_cs, int M, int N, int K, int accumulate) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate) for (int i = 0; i < M; i++) memset(c + (long)i * N, 0, N * sizeof(float));
        return;
    }
    #pragma omp parallel if ((double)M * N * K > 4.0 * PAR_MIN_WORK)
    {
        mm->k->pack_b(mm->b, b, K, N, b_rs, b_cs);
        mm->k->gemm_team(c, N, a, a_rs, a_cs, mm->b, M, N, K, accumulate);
    }
}

// memset by the whole team: a few MB of gradients, zeroed every step
static void zero_floats(float* x, size_t n) {
    const long chunk = 1 << 14;
    #pragma omp parallel for schedule(static) if ((long)n > PAR_MIN_WORK)
    for (long i = 0; i < (long)n; i += chunk)
        memset(x + i, 0, ((long)n - i < chunk ? (long)n - i : chunk) * sizeof(float));
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

