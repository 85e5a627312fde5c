/*
pyrnn: train a character-level RNN, LSTM or GRU language model on the CPU, in one C file.

Semantics are PyTorch's nn.RNN / nn.LSTM / nn.GRU: the same parameter names and shapes, the same
gate order (LSTM i,f,g,o; GRU r,z,n with r applied to W_hn h + b_hn) and both biases, so weights
move to and from torch unchanged. Every layer has an explicit forward and backward pass (BPTT).

Layout: time-major activations (row t*B + b), parameters / gradients / activations each in one
contiguous buffer addressed through pointer tables. Backward passes accumulate into gradients
that the caller zeroed first.

The file also compiles as C++ (cuda/train_rnn.cu includes it for the host side), hence the casts.
*/
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_max_threads(void) { return 1; }
static int omp_in_parallel(void) { return 0; }
static void omp_set_num_threads(int n) { (void)n; }
#endif

// ----------------------------------------------------------------------------
// errors: library calls never exit; they return -1 and leave a one-line message here

static char pyrnn_error_msg[1024];

const char* pyrnn_last_error(void) { return pyrnn_error_msg; }

static int fail(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(pyrnn_error_msg, sizeof(pyrnn_error_msg), fmt, ap);
    va_end(ap);
    return -1;
}

static void* alloc_floats(size_t n) {
    // 64-byte aligned so packed GEMM panels can be loaded as whole vectors
    size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
    void* p = NULL;
    if (bytes == 0) bytes = 64;
    if (posix_memalign(&p, 64, bytes) != 0) return NULL;
    memset(p, 0, bytes);
    return p;
}

// below this much work per parallel region, waking threads costs more than it saves
#define PAR_MIN_WORK (1L << 15)

void pyrnn_set_num_threads(int n) { if (n > 0) omp_set_num_threads(n); }
int pyrnn_get_num_threads(void) { return omp_get_max_threads(); }

// ----------------------------------------------------------------------------
// matmul: C (M x N) (+)= op(A) (M x K) * op(B) (K x N), both operands addressed by row and
// column strides, so one routine serves x W^T (forward), dY W (input grads) and dY^T X (weight
// grads). op(B) is packed into NR-wide column panels (once per pass for the recurrent weights);
// A is read in place, which is cache-friendly for both layouts we use: for row-major A the kernel
// streams MR rows, for transposed A (a_rs == 1) the MR values of one k are contiguous.

#define MR 8
#define NR 32
#define KC 256
typedef float vec16 __attribute__((vector_size(64)));

static float* matmul_scratch_b = NULL;   // packed B for one-off products
static size_t matmul_scratch_b_size = 0;

static size_t packed_b_size(int K, int N) { return (size_t)K * (size_t)((N + NR - 1) / NR) * NR; }

// room for packing each one-off op(B) of the given K x N shapes (pairs); grows only, so steady state
// never allocates
static int matmul_reserve(const size_t* shapes, int n_shapes) {
    size_t b_floats = 0;
    for (int i = 0; i < n_shapes; i++) {
        size_t n = packed_b_size((int)shapes[2 * i], (int)shapes[2 * i + 1]);
        b_floats = n > b_floats ? n : b_floats;
    }
    if (b_floats > matmul_scratch_b_size) {
        free(matmul_scratch_b);
        matmul_scratch_b = (float*)alloc_floats(b_floats);
        matmul_scratch_b_size = matmul_scratch_b ? b_floats : 0;
        if (!matmul_scratch_b) return fail("out of memory for the matmul scratch");
    }
    return 0;
}

// bp <- op(B) as [k-block][column panel][k][NR], zero-padded past N; call from inside a team or not
static void pack_b_team(float* bp, const float* b, int K, int N, long rs, long cs) {
    int n_panels = (N + NR - 1) / NR;
    for (int k0 = 0; k0 < K; k0 += KC) {
        int kc = K - k0 < KC ? K - k0 : KC;
        float* block = bp + (size_t)k0 * n_panels * NR;
        #pragma omp for schedule(static)
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
}

static void pack_b(float* bp, const float* b, int K, int N, long rs, long cs) {
    if (omp_in_parallel()) { pack_b_team(bp, b, K, N, rs, cs); return; }
    #pragma omp parallel if ((long)K * N > PAR_MIN_WORK)
    pack_b_team(bp, b, K, N, rs, cs);
}

// the MR x NR register tile: acc = sum_k a(i, k) * bp[k][j], then C (+)= acc. Rows past mr read
// row 0 again (never out of bounds) and are not stored. Inlined with constant strides per layout.
static inline __attribute__((always_inline)) void matmul_tile(float* c, long ldc, const float* a, long a_rs,
                                                              long a_cs, const float* bp, int kc, int mr, int nr,
                                                              int accumulate) {
    vec16 acc[MR][2];
    for (int i = 0; i < MR; i++) { acc[i][0] = (vec16){ 0 }; acc[i][1] = acc[i][0]; }   // in registers, not a memset call
    const float* rows[MR];
    for (int i = 0; i < MR; i++) rows[i] = a + (i < mr ? i : 0) * a_rs;
    for (int k = 0; k < kc; k++) {
        vec16 b0 = *(const vec16*)(bp + (size_t)k * NR);
        vec16 b1 = *(const vec16*)(bp + (size_t)k * NR + 16);
        for (int i = 0; i < MR; i++) {
            float ai = rows[i][(long)k * a_cs];
            acc[i][0] += ai * b0;
            acc[i][1] += ai * b1;
        }
    }
    for (int i = 0; i < mr; i++) {
        float* ci = c + (long)i * ldc;
        if (nr == NR) {   // whole rows as unaligned vectors (fixed-size memcpy compiles to vmovups)
            vec16 c0 = acc[i][0], c1 = acc[i][1];
            if (accumulate) {
                vec16 o0, o1;
                memcpy(&o0, ci, sizeof(o0)); memcpy(&o1, ci + 16, sizeof(o1));
                c0 += o0; c1 += o1;
            }
            memcpy(ci, &c0, sizeof(c0)); memcpy(ci + 16, &c1, sizeof(c1));
        } else {
            float r[NR];
            memcpy(r, &acc[i][0], sizeof(acc[i][0])); memcpy(r + 16, &acc[i][1], sizeof(acc[i][1]));
            if (accumulate) { for (int j = 0; j < nr; j++) ci[j] += r[j]; }
            else { for (int j = 0; j < nr; j++) ci[j] = r[j]; }
        }
    }
}

static void matmul_tile_rowmajor(float* c, long ldc, const float* a, long a_rs, const float* bp, int kc, int mr, int nr, int acc) {
    matmul_tile(c, ldc, a, a_rs, 1, bp, kc, mr, nr, acc);
}
static void matmul_tile_transposed(float* c, long ldc, const float* a, long a_cs, const float* bp, int kc, int mr, int nr, int acc) {
    matmul_tile(c, ldc, a, 1, a_cs, bp, kc, mr, nr, acc);
}

// C (M x N, row stride ldc) (+)= op(A) * packed op(B); must be called by every thread of a team.
// A is row-major (a_cs == 1) or transposed (a_rs == 1).
static void matmul_packed_team(float* c, long ldc, const float* a, long a_rs, long a_cs,
                               const float* bp, int M, int N, int K, int accumulate) {
    int n_panels = (N + NR - 1) / NR, m_panels = (M + MR - 1) / MR;
    for (int k0 = 0; k0 < K; k0 += KC) {
        int kc = K - k0 < KC ? K - k0 : KC;
        int acc = accumulate || k0 > 0;
        const float* bblock = bp + (size_t)k0 * n_panels * NR;
        // panels of B outermost: each thread keeps its B panels in cache while A streams by
        #pragma omp for collapse(2) schedule(static)
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

// one-off product: packs op(B) into the shared scratch first
static void matmul(float* c, const float* a, long a_rs, long a_cs, const float* b, long b_rs, long b_cs,
                   int M, int N, int K, int accumulate) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { if (!accumulate) for (int i = 0; i < M; i++) memset(c + (long)i * N, 0, N * sizeof(float)); return; }
    #pragma omp parallel if ((double)M * N * K > 4.0 * PAR_MIN_WORK)
    {
        pack_b_team(matmul_scratch_b, b, K, N, b_rs, b_cs);
        matmul_packed_team(c, N, a, a_rs, a_cs, matmul_scratch_b, M, N, K, accumulate);
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

// ----------------------------------------------------------------------------
// random numbers: splitmix64, one 64-bit state, cheap to checkpoint

static uint64_t rng_next(uint64_t* state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static float rng_uniform(uint64_t* state) { return (float)((rng_next(state) >> 40) * (1.0 / 16777216.0)); }
static float rng_normal(uint64_t* state) {
    double u1 = ((rng_next(state) >> 11) + 1.0) * (1.0 / 9007199254740993.0);   // (0, 1]
    double u2 = (rng_next(state) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

// ----------------------------------------------------------------------------
// embedding: x[r] = table[tokens[r]] for n rows (time-major, as the stack runs)

static void embedding_forward(float* x, const float* table, const int* tokens, long n, int E) {
    #pragma omp parallel for schedule(static) if (n * E > PAR_MIN_WORK)
    for (long r = 0; r < n; r++) memcpy(x + r * E, table + (size_t)tokens[r] * E, E * sizeof(float));
}

static void embedding_backward(float* dtable, const float* dx, const int* tokens, long n, int E) {
    // serial over rows: two rows may share a token
    for (long r = 0; r < n; r++) {
        float* row = dtable + (size_t)tokens[r] * E;
        for (int e = 0; e < E; e++) row[e] += dx[r * E + e];
    }
}

// ----------------------------------------------------------------------------
// recurrent cells, one time step, fused over the gates, for batch rows [b0, b1). On entry gx holds
// W_ih x_t (no bias) and gh holds W_hh h_{t-1} (no bias). Forward writes h_t (and c_t) and keeps
// what backward needs.

enum { CELL_RNN = 0, CELL_RNN_RELU = 1, CELL_LSTM = 2, CELL_GRU = 3 };
static const char* cell_names[] = { "rnn", "rnn_relu", "lstm", "gru" };
static int cell_gates(int cell) { return cell == CELL_LSTM ? 4 : cell == CELL_GRU ? 3 : 1; }

// exp, sigmoid and tanh without libm calls, so the gate loops vectorize (each is marked omp simd:
// iterations touch distinct elements of the four gate blocks): libm's expf and tanhf are scalar
// calls and took 40% of a step. The gate functions clamp with integer operations on the bits: a
// clamp written as a float select made the compiler split every gate loop into masked copies,
// twice as slow. Error is a few ulp, relative even near 0, far inside the 1e-5 we test; NaN
// propagates.

// e^r - 1 for |r| <= ln(2) / 2: Taylor to r^7, whose next term is below float rounding
static inline float expm1_reduced(float r) {
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f; p = p * r + 1.0f / 120.0f; p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f; p = p * r + 0.5f;
    return (p * r) * r + r;
}

// e^x = 2^n e^r with x = n ln 2 + r, for x in [-87, 88]: returns 2^n and sets *em1 = e^r - 1
static inline float exp_split(float* em1, float x) {
    float t = x * 1.44269504f + 12582912.0f;   // + 1.5 * 2^23 rounds x / ln 2 into t's low mantissa bits
    float n = t - 12582912.0f;
    *em1 = expm1_reduced(x - n * 0.693145751953125f - n * 1.428606765330187e-06f);   // Cody-Waite
    uint32_t bits;   // 2^n from those bits, in unsigned arithmetic: no undefined conversion for a NaN x
    memcpy(&bits, &t, sizeof(bits));
    bits = (bits - 0x4B400000u + 127u) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return scale;
}

static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    float em1, s = exp_split(&em1, x);
    return s * em1 + s;
}

// min(|x|, 87) by the bits (an integer min, which the compiler keeps as one instruction); NaN gives 87
static inline float abs_clamped(float x) {
    uint32_t b;
    memcpy(&b, &x, sizeof(b));
    b &= 0x7FFFFFFFu;
    b = b < 0x42AE0000u ? b : 0x42AE0000u;
    memcpy(&x, &b, sizeof(x));
    return x;
}

// y, or a NaN where x is one
static inline float nan_from(float y, float x) {
    uint32_t xb, yb;
    memcpy(&xb, &x, sizeof(xb)); memcpy(&yb, &y, sizeof(yb));
    uint32_t is_nan = (0x7F800000u - (xb & 0x7FFFFFFFu)) >> 31;
    yb |= (0u - is_nan) & 0x7FC00000u;
    memcpy(&y, &yb, sizeof(y));
    return y;
}

// from e = e^-|x| in (0, 1], which never overflows
static inline float sigmoidf(float x) {
    float em1, s = exp_split(&em1, -abs_clamped(x));
    float e = s * em1 + s;
    float q = 1.0f / (1.0f + e);
    return nan_from(x >= 0.0f ? q : e * q, x);
}

// tanh |x| = -m / (m + 2) with m = e^-2|x| - 1 in (-1, 0], relative-exact near 0 through expm1
static inline float tanh_approx(float x) {
    float em1, s = exp_split(&em1, -abs_clamped(2.0f * x));
    float m = s * em1 + (s - 1.0f);
    return nan_from(copysignf(-m / (m + 2.0f), x), x);
}

static void rnn_cell_forward(float* h, const float* gx, const float* gh, const float* b_ih,
                             const float* b_hh, int relu, int b0, int b1, int H) {
    for (int b = b0; b < b1; b++)
        #pragma omp simd
        for (int j = 0; j < H; j++) {
            size_t k = (size_t)b * H + j;
            float pre = gx[k] + b_ih[j] + gh[k] + b_hh[j];
            h[k] = relu ? (pre > 0.0f ? pre : 0.0f) : tanh_approx(pre);
        }
}

// Backward cells take dL/dh_t as dh (what came back through W_hh) plus dy (what the layer above
// sent), and leave in dh the part of dL/dh_{t-1} that bypasses W_hh.
static void rnn_cell_backward(float* dgates, float* dh, const float* dy, const float* h, int relu, int b0, int b1, int H) {
    for (int b = b0; b < b1; b++)
        #pragma omp simd
        for (int j = 0; j < H; j++) {
            size_t k = (size_t)b * H + j;
            float d = dh[k] + dy[k];
            dgates[k] = relu ? (h[k] > 0.0f ? d : 0.0f) : d * (1.0f - h[k] * h[k]);
            dh[k] = 0.0f;
        }
}

// gates: in, W_ih x_t; out, activated i, f, g, o
static void lstm_cell_forward(float* h, float* c, float* gates, const float* gh, const float* c_prev,
                              const float* b_ih, const float* b_hh, int b0, int b1, int H) {
    for (int b = b0; b < b1; b++) {
        float* g = gates + (size_t)b * 4 * H;
        const float* r = gh + (size_t)b * 4 * H;
        #pragma omp simd
        for (int j = 0; j < H; j++) {
            float i_ = sigmoidf(g[j] + b_ih[j] + r[j] + b_hh[j]);
            float f_ = sigmoidf(g[H + j] + b_ih[H + j] + r[H + j] + b_hh[H + j]);
            float g_ = tanh_approx(g[2 * H + j] + b_ih[2 * H + j] + r[2 * H + j] + b_hh[2 * H + j]);
            float o_ = sigmoidf(g[3 * H + j] + b_ih[3 * H + j] + r[3 * H + j] + b_hh[3 * H + j]);
            size_t k = (size_t)b * H + j;
            float ct = f_ * c_prev[k] + i_ * g_;
            c[k] = ct;
            h[k] = o_ * tanh_approx(ct);
            g[j] = i_; g[H + j] = f_; g[2 * H + j] = g_; g[3 * H + j] = o_;
        }
    }
}

static void lstm_cell_backward(float* dgates, float* dh, float* dc, const float* dy, const float* gates, const float* c,
                               const float* c_prev, int b0, int b1, int H) {
    // dc: in, dL/dc_t from step t+1; out, dL/dc_{t-1}
    for (int b = b0; b < b1; b++) {
        const float* g = gates + (size_t)b * 4 * H;
        float* dg = dgates + (size_t)b * 4 * H;
        #pragma omp simd
        for (int j = 0; j < H; j++) {
            size_t k = (size_t)b * H + j;
            float i_ = g[j], f_ = g[H + j], g_ = g[2 * H + j], o_ = g[3 * H + j];
            float tc = tanh_approx(c[k]);
            float d = dh[k] + dy[k];
            float dct = dc[k] + d * o_ * (1.0f - tc * tc);
            dg[j] = dct * g_ * i_ * (1.0f - i_);
            dg[H + j] = dct * c_prev[k] * f_ * (1.0f - f_);
            dg[2 * H + j] = dct * i_ * (1.0f - g_ * g_);
            dg[3 * H + j] = d * tc * o_ * (1.0f - o_);
            dc[k] = dct * f_;
            dh[k] = 0.0f;
        }
    }
}

// gates: in, W_ih x_t; out, activated r, z, n. hn keeps W_hn h_{t-1} + b_hn, which r multiplies.
static void gru_cell_forward(float* h, float* gates, float* hn, const float* gh, const float* h_prev,
                             const float* b_ih, const float* b_hh, int b0, int b1, int H) {
    for (int b = b0; b < b1; b++) {
        float* g = gates + (size_t)b * 3 * H;
        const float* r = gh + (size_t)b * 3 * H;
        #pragma omp simd
        for (int j = 0; j < H; j++) {
            size_t k = (size_t)b * H + j;
            float r_ = sigmoidf(g[j] + b_ih[j] + r[j] + b_hh[j]);
            float z_ = sigmoidf(g[H + j] + b_ih[H + j] + r[H + j] + b_hh[H + j]);
            float hn_ = r[2 * H + j] + b_hh[2 * H + j];
            float n_ = tanh_approx(g[2 * H + j] + b_ih[2 * H + j] + r_ * hn_);
            h[k] = (1.0f - z_) * n_ + z_ * h_prev[k];
            g[j] = r_; g[H + j] = z_; g[2 * H + j] = n_;
            hn[k] = hn_;
        }
    }
}

static void gru_cell_backward(float* dgates, float* dgates_h, float* dh, const float* dy, const float* gates,
                              const float* hn, const float* h_prev, int b0, int b1, int H) {
    // dgates_h differs from dgates only in the n block: r scales W_hn h + b_hn
    for (int b = b0; b < b1; b++) {
        const float* g = gates + (size_t)b * 3 * H;
        float* dg = dgates + (size_t)b * 3 * H;
        float* dgh = dgates_h + (size_t)b * 3 * H;
        #pragma omp simd
        for (int j = 0; j < H; j++) {
            size_t k = (size_t)b * H + j;
            float r_ = g[j], z_ = g[H + j], n_ = g[2 * H + j];
            float d = dh[k] + dy[k];
            float dn = d * (1.0f - z_) * (1.0f - n_ * n_);
            float dr = dn * hn[k] * r_ * (1.0f - r_);
            float dz = d * (h_prev[k] - n_) * z_ * (1.0f - z_);
            dg[j] = dr; dg[H + j] = dz; dg[2 * H + j] = dn;
            dgh[j] = dr; dgh[H + j] = dz; dgh[2 * H + j] = dn * r_;
            dh[k] = d * z_;
        }
    }
}

// ----------------------------------------------------------------------------
// dropout: mask holds 0 or 1/(1-p), so the backward pass is the same multiply

static void dropout_forward(float* y, float* mask, const float* x, size_t n, float p, uint64_t* rng) {
    float scale = 1.0f / (1.0f - p);
    for (size_t i = 0; i < n; i++) mask[i] = rng_uniform(rng) < p ? 0.0f : scale;
    for (size_t i = 0; i < n; i++) y[i] = x[i] * mask[i];
}

static void dropout_backward(float* dx, const float* mask, size_t n) {
    for (size_t i = 0; i < n; i++) dx[i] *= mask[i];
}

// ----------------------------------------------------------------------------
// the recurrent stack: L layers of one cell type. Parameters and gradients live in the caller's
// flat buffers (torch order per layer: weight_ih, weight_hh, bias_ih, bias_hh); activations here.

typedef struct {
    int cell, input_size, hidden_size, n_layers, has_bias;
    float dropout;       // between layers, applied while training
    int training;
    int dropped;         // whether the last forward applied dropout (backward must match it)
    uint64_t* rng;       // the owner's generator, for dropout masks
    // per-layer pointer tables into the parameter and gradient buffers
    float **w_ih, **w_hh, **b_ih, **b_hh;
    float **dw_ih, **dw_hh, **db_ih, **db_hh;
    float* zero_bias;    // stands in for the biases when has_bias == 0
    float* zero_bias_grad;
    // activations of the last forward, capacity for max_bt rows of B*T
    int B, T;
    size_t max_bt, max_b;
    float* acts_memory;
    float **h;           // (T+1, B, H): row block 0 is h0
    float **c;           // (T+1, B, H), LSTM
    float **gates;       // (T, B, G*H)
    float **hn;          // (T, B, H), GRU
    float **xin;         // the input each layer sees (T, B, in): for l > 0, h of l-1 or its dropout
    float **mask;        // (T, B, H) dropout mask applied to the output of layer l (l < L-1)
    // layer 0 may read token ids instead of xin[0]: its input is then a row of table (V, input_size),
    // so x W_ih^T is a row of proj = table W_ih^T, a V-row GEMM and a gather instead of a B*T-row GEMM
    // (for a character model 30x fewer FLOPs in that projection, and again in both its gradients)
    const int* tokens;   // (T, B), or NULL
    const float* table;
    float* dtable;
    int table_rows;      // V, fixed at creation; 0 when the stack never reads tokens
    float *proj;         // (V, G*H)
    float *dproj;        // (V, G*H), rows by slot: the batch's distinct tokens in order
    float *table_seen;   // (V, input_size): table rows of those tokens, then their gradients
    int *token_slot;     // (V): each token's slot, -1 if the batch did not see it
    int *seen;           // (V): the token in each slot
    int n_seen;
    float *bias_sums;    // (G*H) column sums of one layer's gate gradients
    float *gh;           // (B, G*H) recurrent projection of one step
    float *dgates, *dgates_h, *dy, *dh, *dc;
    float *w_packed;     // W_hh laid out once per pass for the per-step GEMMs
} Stack;

static size_t stack_layer_params(int cell, int in, int H, int has_bias) {
    size_t GH = (size_t)cell_gates(cell) * H;
    return GH * in + GH * H + (has_bias ? 2 * GH : 0);
}

size_t stack_num_params(int cell, int input_size, int hidden_size, int n_layers, int has_bias) {
    size_t n = 0;
    for (int l = 0; l < n_layers; l++)
        n += stack_layer_params(cell, l == 0 ? input_size : hidden_size, hidden_size, has_bias);
    return n;
}

static int stack_check_config(int cell, int input_size, int hidden_size, int n_layers) {
    if (cell < 0 || cell > 3) return fail("unknown cell %d (expected 0..3: rnn, rnn_relu, lstm, gru)", cell);
    if (input_size <= 0) return fail("input size must be positive, got %d", input_size);
    if (hidden_size <= 0) return fail("hidden size must be positive, got %d", hidden_size);
    if (n_layers <= 0) return fail("number of layers must be positive, got %d", n_layers);
    return 0;
}

// points the stack's tables into params / grads; returns the number of floats used, or 0 on error
static size_t stack_init(Stack* s, int cell, int input_size, int hidden_size, int n_layers, int has_bias,
                         float* params, float* grads) {
    memset(s, 0, sizeof(*s));
    if (stack_check_config(cell, input_size, hidden_size, n_layers)) return 0;
    s->cell = cell; s->input_size = input_size; s->hidden_size = hidden_size;
    s->n_layers = n_layers; s->has_bias = has_bias;
    int L = n_layers, H = hidden_size, GH = cell_gates(cell) * H;
    float*** tables[] = { &s->w_ih, &s->w_hh, &s->b_ih, &s->b_hh, &s->dw_ih, &s->dw_hh, &s->db_ih, &s->db_hh,
                          &s->h, &s->c, &s->gates, &s->hn, &s->xin, &s->mask };
    for (size_t i = 0; i < sizeof(tables) / sizeof(tables[0]); i++) {
        *tables[i] = (float**)calloc(L, sizeof(float*));
        if (!*tables[i]) { fail("out of memory"); return 0; }
    }
    s->zero_bias = (float*)alloc_floats(GH);
    s->zero_bias_grad = (float*)alloc_floats(GH);
    if (!s->zero_bias || !s->zero_bias_grad) { fail("out of memory"); return 0; }
    size_t off = 0;
    for (int l = 0; l < L; l++) {
        int in = l == 0 ? input_size : H;
        s->w_ih[l] = params + off; s->dw_ih[l] = grads + off; off += (size_t)GH * in;
        s->w_hh[l] = params + off; s->dw_hh[l] = grads + off; off += (size_t)GH * H;
        if (has_bias) {
            s->b_ih[l] = params + off; s->db_ih[l] = grads + off; off += GH;
            s->b_hh[l] = params + off; s->db_hh[l] = grads + off; off += GH;
        } else {
            s->b_ih[l] = s->b_hh[l] = s->zero_bias;
            s->db_ih[l] = s->db_hh[l] = s->zero_bias_grad;
        }
    }
    return off;
}

// A batch of at least V rows looks layer 0's projection up by token (a V-row GEMM); fewer rows, as
// when sampling one token at a time, embed and multiply. The caller sets s->tokens by this rule.
static int lookup_pays(size_t rows, size_t V) { return V > 0 && rows >= V; }

// Layers project their input step by step inside the recurrence, unless they look it up by token or
// a thread's rows would not fill a register tile (then the per-step product would be mostly padding,
// and one GEMM over all T steps goes first). Forward and backward each decide for themselves.
static int looks_up(const Stack* s, int l) { return l == 0 && s->tokens; }
static int projects_per_step(const Stack* s, int l) { return !looks_up(s, l) && s->B >= MR * omp_get_max_threads(); }

static void stack_free(Stack* s) {
    float*** tables[] = { &s->w_ih, &s->w_hh, &s->b_ih, &s->b_hh, &s->dw_ih, &s->dw_hh, &s->db_ih, &s->db_hh,
                          &s->h, &s->c, &s->gates, &s->hn, &s->xin, &s->mask };
    for (size_t i = 0; i < sizeof(tables) / sizeof(tables[0]); i++) { free(*tables[i]); *tables[i] = NULL; }
    free(s->zero_bias); free(s->zero_bias_grad); free(s->acts_memory); free(s->w_packed); free(s->token_slot);
    s->token_slot = s->seen = NULL;
    s->zero_bias = s->zero_bias_grad = s->acts_memory = s->w_packed = NULL;
}

static int check_batch_shape(int B, int T) {
    if (B <= 0 || T <= 0) return fail("batch size and sequence length must be positive, got B=%d T=%d", B, T);
    if ((long long)B * T > (1LL << 30)) return fail("batch of B=%d x T=%d is too large", B, T);
    return 0;
}

// (re)lays out the activation buffer for B x T; allocates only when the shape grows
static int stack_reserve(Stack* s, int B, int T) {
    if (check_batch_shape(B, T)) return -1;
    int L = s->n_layers, H = s->hidden_size, In = s->input_size, G = cell_gates(s->cell);
    size_t GH = (size_t)G * H, bt = (size_t)B * T, bh = (size_t)B * H;
    int lstm = s->cell == CELL_LSTM, gru = s->cell == CELL_GRU;
    size_t lookup_rows = lookup_pays(bt, (size_t)s->table_rows) ? (size_t)s->table_rows : 0;
    size_t sizes[] = {
        (size_t)L * (bt + B) * H,                 // h
        lstm ? (size_t)L * (bt + B) * H : 0,      // c
        (size_t)L * bt * GH,                      // gates
        gru ? (size_t)L * bt * H : 0,             // hn
        (size_t)(L - 1) * bt * H,                 // dropped inputs of layers 1..L-1
        (size_t)(L - 1) * bt * H,                 // masks
        (size_t)B * GH,                           // gh
        bt * GH,                                  // dgates
        gru ? bt * GH : 0,                        // dgates_h
        bt * H,                                   // dy: layer l's output grad, then l-1's (layer 0's goes to dx)
        bh, bh,                                   // dh, dc
        lookup_rows * GH,                         // proj
        lookup_rows * GH,                         // dproj
        lookup_rows * In,                         // table_seen
        GH,                                       // bias_sums
    };
    enum { N_PARTS = sizeof(sizes) / sizeof(sizes[0]) };
    size_t total = 0;
    for (int i = 0; i < N_PARTS; i++) total += (sizes[i] + 15) / 16 * 16;
    if (bt > s->max_bt || (size_t)B > s->max_b || !s->acts_memory) {
        free(s->acts_memory);
        s->acts_memory = (float*)alloc_floats(total);
        s->max_bt = s->max_b = 0;   // recorded only once everything below succeeded
        if (!s->acts_memory) return fail("out of memory for activations (B=%d T=%d)", B, T);
        free(s->w_packed);
        size_t fwd = packed_b_size(H, (int)GH), bwd = packed_b_size((int)GH, H);   // W_hh^T, then W_hh
        s->w_packed = (float*)alloc_floats(fwd > bwd ? fwd : bwd);
        if (!s->w_packed) return fail("out of memory for packed weights");
        free(s->token_slot);
        s->token_slot = (int*)malloc((2 * (size_t)s->table_rows + 1) * sizeof(int));   // + 1: never malloc(0)
        if (!s->token_slot) return fail("out of memory");
        s->seen = s->token_slot + s->table_rows;
        // op(B) of x W_ih^T, dY^T h, dY^T x, dY W_ih (whole T, or packed once for the per-step products)
        // and dproj^T table, for layer inputs of width In (layer 0) and H
        size_t in_max = (size_t)(In > H ? In : H);
        size_t shapes[] = { in_max, GH, bt, (size_t)H, bt, in_max, GH, in_max, lookup_rows, in_max };
        if (matmul_reserve(shapes, 5)) return -1;
        s->max_bt = bt; s->max_b = B;
    }
    s->B = B; s->T = T;
    float* parts[N_PARTS];
    float* p = s->acts_memory;
    for (int i = 0; i < N_PARTS; i++) { parts[i] = p; p += (sizes[i] + 15) / 16 * 16; }
    float *h = parts[0], *c = parts[1], *gates = parts[2], *hn = parts[3], *xin = parts[4], *mask = parts[5];
    s->gh = parts[6]; s->dgates = parts[7]; s->dgates_h = parts[8]; s->dy = parts[9]; s->dh = parts[10]; s->dc = parts[11];
    s->proj = parts[12]; s->dproj = parts[13]; s->table_seen = parts[14]; s->bias_sums = parts[15];
    for (int l = 0; l < L; l++) {
        s->h[l] = h + (size_t)l * (bt + B) * H;
        s->c[l] = lstm ? c + (size_t)l * (bt + B) * H : NULL;
        s->gates[l] = gates + (size_t)l * bt * GH;
        s->hn[l] = gru ? hn + (size_t)l * bt * H : NULL;
        s->mask[l] = l < L - 1 ? mask + (size_t)l * bt * H : NULL;
        if (l > 0) {
            int drop = s->training && s->dropout > 0.0f;
            s->xin[l] = drop ? xin + (size_t)(l - 1) * bt * H : s->h[l - 1] + bh;
        }
    }
    if (!gru) s->dgates_h = s->dgates;
    return 0;
}

// dproj gathers layer 0's gate gradients by token, one row per distinct token of the batch; then
// dW_ih += dproj^T table[seen] and dtable[seen] += dproj W_ih. Only the tokens seen take part, so a
// table row the batch never used (even a non-finite one) touches no gradient, as in torch.
static void input_projection_lookup_backward(Stack* s) {
    int V = s->table_rows, E = s->input_size, GH = cell_gates(s->cell) * s->hidden_size;
    long bt = (long)s->B * s->T;
    memset(s->token_slot, 0, V * sizeof(int));
    for (long r = 0; r < bt; r++) s->token_slot[s->tokens[r]] = 1;
    int n = 0;
    for (int v = 0; v < V; v++) {
        if (s->token_slot[v]) { s->seen[n] = v; s->token_slot[v] = n++; }
        else s->token_slot[v] = -1;
    }
    s->n_seen = n;
    enum { SLICE = 64 };   // each thread owns a slice of columns, so the sums run in a fixed order
    #pragma omp parallel for schedule(static) if (bt * GH > PAR_MIN_WORK)
    for (int j0 = 0; j0 < GH; j0 += SLICE) {
        int w = GH - j0 < SLICE ? GH - j0 : SLICE;
        for (int i = 0; i < n; i++) memset(s->dproj + (size_t)i * GH + j0, 0, w * sizeof(float));
        for (long r = 0; r < bt; r++) {
            float* dst = s->dproj + (size_t)s->token_slot[s->tokens[r]] * GH + j0;
            const float* src = s->dgates + r * GH + j0;
            for (int j = 0; j < w; j++) dst[j] += src[j];
        }
    }
    for (int i = 0; i < n; i++) memcpy(s->table_seen + (size_t)i * E, s->table + (size_t)s->seen[i] * E, E * sizeof(float));
    matmul(s->dw_ih[0], s->dproj, 1, GH, s->table_seen, E, 1, GH, E, n, 1);
    matmul(s->table_seen, s->dproj, GH, 1, s->w_ih[0], E, 1, n, E, GH, 0);
    for (int i = 0; i < n; i++) {
        float* row = s->dtable + (size_t)s->seen[i] * E;
        for (int e = 0; e < E; e++) row[e] += s->table_seen[(size_t)i * E + e];
    }
}

static void layer_forward(Stack* s, int l) {
    int B = s->B, T = s->T, H = s->hidden_size, GH = cell_gates(s->cell) * H;
    int in = l == 0 ? s->input_size : H;
    size_t bh = (size_t)B * H;
    float* h = s->h[l];
    float* gates = s->gates[l];
    // Each step projects its own input inside the recurrence, so its gate rows are still in cache for
    // the cell (6% of a medium LSTM step against one GEMM over all T, whose 8 MB of output went to
    // memory and back): a token-lookup layer copies rows of proj, other layers multiply by W_ih^T,
    // packed into the matmul scratch, which nothing else uses until the recurrence ends.
    int lookup = looks_up(s, l), per_step = projects_per_step(s, l);
    if (lookup) matmul(s->proj, s->table, in, 1, s->w_ih[0], 1, in, s->table_rows, GH, in, 0);
    else if (per_step) pack_b(matmul_scratch_b, s->w_ih[l], in, GH, 1, in);
    else matmul(gates, s->xin[l], in, 1, s->w_ih[l], 1, in, B * T, GH, in, 0);
    pack_b(s->w_packed, s->w_hh[l], H, GH, 1, H);
    // batch rows never interact in the recurrence: each thread runs all T steps for its own rows,
    // with no barrier inside the loop (a barrier per step dominated small models)
    #pragma omp parallel if ((long)B * GH * H > PAR_MIN_WORK)
    {
        int b0, b1;
        thread_rows(&b0, &b1, B);
        for (int t = 0; t < T && b1 > b0; t++) {
            float* gx = gates + (size_t)t * B * GH;
            if (lookup)
                for (int b = b0; b < b1; b++)
                    memcpy(gx + (size_t)b * GH, s->proj + (size_t)s->tokens[(size_t)t * B + b] * GH, GH * sizeof(float));
            else if (per_step)
                matmul_packed_rows(gx + (size_t)b0 * GH, GH, s->xin[l] + ((size_t)t * B + b0) * in, in, matmul_scratch_b,
                                   b1 - b0, GH, in, 0);
            matmul_packed_rows(s->gh + (size_t)b0 * GH, GH, h + t * bh + (size_t)b0 * H, H, s->w_packed, b1 - b0, GH, H, 0);
            switch (s->cell) {
            case CELL_RNN: case CELL_RNN_RELU:
                rnn_cell_forward(h + (t + 1) * bh, gx, s->gh, s->b_ih[l], s->b_hh[l], s->cell == CELL_RNN_RELU, b0, b1, H); break;
            case CELL_LSTM:
                lstm_cell_forward(h + (t + 1) * bh, s->c[l] + (t + 1) * bh, gx, s->gh, s->c[l] + t * bh,
                                  s->b_ih[l], s->b_hh[l], b0, b1, H); break;
            case CELL_GRU:
                gru_cell_forward(h + (t + 1) * bh, gx, s->hn[l] + t * bh, s->gh, h + t * bh,
                                 s->b_ih[l], s->b_hh[l], b0, b1, H); break;
            }
        }
    }
}

// db_ih and db_hh: column sums of the gate gradients. Both biases see the same sums unless the cell
// is a GRU; in a token-lookup layer dproj already holds them summed by token, V rows instead of B*T.
static void bias_backward(Stack* s, int l) {
    int GH = cell_gates(s->cell) * s->hidden_size;
    long bt = (long)s->B * s->T;
    memset(s->bias_sums, 0, GH * sizeof(float));
    if (looks_up(s, l)) colsum_accumulate(s->bias_sums, s->dproj, s->n_seen, GH);
    else colsum_accumulate(s->bias_sums, s->dgates, bt, GH);
    for (int j = 0; j < GH; j++) s->db_ih[l][j] += s->bias_sums[j];
    if (s->dgates_h == s->dgates) { for (int j = 0; j < GH; j++) s->db_hh[l][j] += s->bias_sums[j]; }
    else colsum_accumulate(s->db_hh[l], s->dgates_h, bt, GH);
}

// dy holds dL/d(output of layer l); writes dL/d(input of layer l) to dxin
static void layer_backward(Stack* s, int l, float* dxin, float* dh0, float* dc0, const float* dh_n, const float* dc_n) {
    int B = s->B, T = s->T, H = s->hidden_size, GH = cell_gates(s->cell) * H;
    int in = l == 0 ? s->input_size : H;
    size_t bh = (size_t)B * H, bt = (size_t)B * T;
    const float* h = s->h[l];
    float* dh = s->dh;
    float* dc = s->dc;
    if (dh_n) memcpy(dh, dh_n, bh * sizeof(float)); else memset(dh, 0, bh * sizeof(float));
    if (s->cell == CELL_LSTM) { if (dc_n) memcpy(dc, dc_n, bh * sizeof(float)); else memset(dc, 0, bh * sizeof(float)); }
    pack_b(s->w_packed, s->w_hh[l], GH, H, H, 1);
    // as in forward, dL/dx_t comes out step by step, while the step's gate gradients are in cache
    // (into dy's rows of step t, already read, when dxin is dy); W_ih goes in the matmul scratch
    int lookup = looks_up(s, l), per_step = projects_per_step(s, l);
    if (per_step) pack_b(matmul_scratch_b, s->w_ih[l], GH, in, in, 1);
    #pragma omp parallel if ((long)B * GH * H > PAR_MIN_WORK)
    {
        int b0, b1;   // as in forward: each thread owns its batch rows through all T steps
        thread_rows(&b0, &b1, B);
        for (int t = T - 1; t >= 0 && b1 > b0; t--) {
            const float* dy_t = s->dy + t * bh;
            float* dg = s->dgates + (size_t)t * B * GH;
            float* dgh = s->dgates_h + (size_t)t * B * GH;
            const float* g = s->gates[l] + (size_t)t * B * GH;
            switch (s->cell) {
            case CELL_RNN: case CELL_RNN_RELU:
                rnn_cell_backward(dg, dh, dy_t, h + (t + 1) * bh, s->cell == CELL_RNN_RELU, b0, b1, H); break;
            case CELL_LSTM:
                lstm_cell_backward(dg, dh, dc, dy_t, g, s->c[l] + (t + 1) * bh, s->c[l] + t * bh, b0, b1, H); break;
            case CELL_GRU:
                gru_cell_backward(dg, dgh, dh, dy_t, g, s->hn[l] + t * bh, h + t * bh, b0, b1, H); break;
            }
            matmul_packed_rows(dh + (size_t)b0 * H, H, dgh + (size_t)b0 * GH, GH, s->w_packed, b1 - b0, H, GH, 1);
            if (per_step)
                matmul_packed_rows(dxin + ((size_t)t * B + b0) * in, in, dg + (size_t)b0 * GH, GH, matmul_scratch_b,
                                   b1 - b0, in, GH, 0);
        }
    }
    // weight gradients for all T steps at once
    matmul(s->dw_hh[l], s->dgates_h, 1, GH, h, H, 1, GH, H, (int)bt, 1);
    if (lookup) {
        input_projection_lookup_backward(s);
    } else {
        matmul(s->dw_ih[l], s->dgates, 1, GH, s->xin[l], in, 1, GH, in, (int)bt, 1);
        if (!per_step) matmul(dxin, s->dgates, GH, 1, s->w_ih[l], in, 1, (int)bt, in, GH, 0);
    }
    if (s->has_bias) bias_backward(s, l);
    if (dh0) memcpy(dh0, dh, bh * sizeof(float));
    if (dc0 && s->cell == CELL_LSTM) memcpy(dc0, dc, bh * sizeof(float));
}

// x: (T, B, input_size), taken as layer 0's input by pointer (must stay alive until backward);
// NULL when layer 0 looks its input up by s->tokens
static int stack_forward_acts(Stack* s, const float* x, const float* h0, const float* c0, int B, int T) {
    if (stack_reserve(s, B, T)) return -1;
    int L = s->n_layers, H = s->hidden_size;
    size_t bh = (size_t)B * H, bt = (size_t)B * T;
    s->dropped = s->training && s->dropout > 0.0f;
    s->xin[0] = (float*)x;
    for (int l = 0; l < L; l++) {
        if (h0) memcpy(s->h[l], h0 + l * bh, bh * sizeof(float)); else memset(s->h[l], 0, bh * sizeof(float));
        if (s->cell == CELL_LSTM) {
            if (c0) memcpy(s->c[l], c0 + l * bh, bh * sizeof(float)); else memset(s->c[l], 0, bh * sizeof(float));
        }
        if (l > 0 && s->dropped)
            dropout_forward(s->xin[l], s->mask[l - 1], s->h[l - 1] + bh, bt * H, s->dropout, s->rng);
        layer_forward(s, l);
    }
    return 0;
}

// dy must hold dL/d(top output); dx receives dL/dx (T, B, input_size), unless layer 0 looked its
// input up by token: then the gradient goes to s->dtable and dx is not used
static void stack_backward_acts(Stack* s, float* dx, float* dh0, float* dc0, const float* dh_n, const float* dc_n) {
    int L = s->n_layers, H = s->hidden_size;
    size_t bh = (size_t)s->B * H, bt = (size_t)s->B * s->T;
    for (int l = L - 1; l >= 0; l--) {
        float* dxin = l > 0 ? s->dy : dx;   // dy is dead once layer l has used it
        layer_backward(s, l, dxin, dh0 ? dh0 + l * bh : NULL, dc0 ? dc0 + l * bh : NULL,
                       dh_n ? dh_n + l * bh : NULL, dc_n ? dc_n + l * bh : NULL);
        if (l > 0 && s->dropped) dropout_backward(s->dy, s->mask[l - 1], bt * H);
    }
}

// final states (L, B, H) of the last forward
static void stack_final_states(float* h_n, float* c_n, const Stack* s) {
    size_t bh = (size_t)s->B * s->hidden_size;
    for (int l = 0; l < s->n_layers; l++) {
        if (h_n) memcpy(h_n + l * bh, s->h[l] + (size_t)s->T * bh, bh * sizeof(float));
        if (c_n && s->cell == CELL_LSTM) memcpy(c_n + l * bh, s->c[l] + (size_t)s->T * bh, bh * sizeof(float));
    }
}

// ----------------------------------------------------------------------------
// the layer API behind pyrnn.RNN / LSTM / GRU: a stack that owns its parameters

typedef struct {
    Stack s;
    size_t num_params;
    float* params;
    float* grads;
    float* x;            // copy of the last input, which backward reads
    size_t x_cap;
} Layer;

void layer_free(Layer* m) {
    if (!m) return;
    stack_free(&m->s);
    free(m->params); free(m->grads); free(m->x);
    free(m);
}

Layer* layer_new(int cell, int input_size, int hidden_size, int n_layers, int has_bias) {
    if (stack_check_config(cell, input_size, hidden_size, n_layers)) return NULL;
    Layer* m = (Layer*)calloc(1, sizeof(Layer));
    if (!m) { fail("out of memory"); return NULL; }
    m->num_params = stack_num_params(cell, input_size, hidden_size, n_layers, has_bias);
    m->params = (float*)alloc_floats(m->num_params);
    m->grads = (float*)alloc_floats(m->num_params);
    if (!m->params || !m->grads || !stack_init(&m->s, cell, input_size, hidden_size, n_layers, has_bias, m->params, m->grads)) {
        if (m->params && m->grads) fail("out of memory");
        layer_free(m);
        return NULL;
    }
    return m;
}

// x (T, B, input_size) -> out (T, B, H), h_n / c_n (L, B, H); h0 / c0 may be NULL (zeros)
int layer_forward_api(Layer* m, float* out, float* h_n, float* c_n, const float* x, const float* h0,
                      const float* c0, int B, int T) {
    if (check_batch_shape(B, T)) return -1;
    size_t n = (size_t)T * B * m->s.input_size;
    if (n > m->x_cap) {
        free(m->x);
        m->x = (float*)alloc_floats(n);
        m->x_cap = m->x ? n : 0;
        if (!m->x) return fail("out of memory for the input copy");
    }
    memcpy(m->x, x, n * sizeof(float));
    if (stack_forward_acts(&m->s, m->x, h0, c0, B, T)) return -1;
    size_t bh = (size_t)B * m->s.hidden_size;
    memcpy(out, m->s.h[m->s.n_layers - 1] + bh, (size_t)T * bh * sizeof(float));
    stack_final_states(h_n, c_n, &m->s);
    return 0;
}

// dout (T, B, H), dh_n / dc_n may be NULL -> dx (T, B, in), dh0 / dc0 (L, B, H); grads accumulate
int layer_backward_api(Layer* m, float* dx, float* dh0, float* dc0, const float* dout, const float* dh_n,
                       const float* dc_n) {
    if (!m->s.B) return fail("backward called before forward");
    memcpy(m->s.dy, dout, (size_t)m->s.T * m->s.B * m->s.hidden_size * sizeof(float));
    stack_backward_acts(&m->s, dx, dh0, dc0, dh_n, dc_n);
    return 0;
}

void layer_zero_grad(Layer* m) { zero_floats(m->grads, m->num_params); }

// ----------------------------------------------------------------------------
// the character language model: Embedding(V, E) -> stack -> Linear(H, V) -> mean cross-entropy

typedef struct {
    int cell, vocab_size, embed_size, hidden_size, n_layers;
} Config;

typedef struct {
    Config config;
    size_t num_params;
    float* params;       // embedding.weight, rnn.*, head.weight, head.bias
    float* grads;
    float* m;            // AdamW moments, allocated on the first step
    float* v;
    int adam_t;
    float *emb, *head_w, *head_b, *demb, *dhead_w, *dhead_b;
    Stack rnn;
    float dropout;       // between layers and before the head, while training
    uint64_t rng;
    // activations of the last forward
    int B, T;
    size_t max_bt, max_b;
    float* acts_memory;
    int* inputs;         // (T, B) time-major copy of the last batch
    int* targets;        // (T, B) time-major copy, or NULL when no targets were given
    float *x, *dx, *head_in, *head_mask, *logits, *lse, *h_n, *c_n, *dh0, *dc0;
    const float* head_x; // what the head read: the top layer's output, or head_in after dropout
    int has_targets;
    float loss;
} Model;

static int config_check(const Config* c) {
    if (c->cell < 0 || c->cell > 3) return fail("unknown cell %d (expected rnn, rnn_relu, lstm or gru)", c->cell);
    if (c->vocab_size <= 0) return fail("vocabulary size must be positive, got %d", c->vocab_size);
    if (c->embed_size <= 0) return fail("embedding size must be positive, got %d", c->embed_size);
    if (c->hidden_size <= 0) return fail("hidden size must be positive, got %d", c->hidden_size);
    if (c->n_layers <= 0) return fail("number of layers must be positive, got %d", c->n_layers);
    return 0;
}

size_t model_num_params(Config c) {
    return (size_t)c.vocab_size * c.embed_size + stack_num_params(c.cell, c.embed_size, c.hidden_size, c.n_layers, 1)
         + (size_t)c.vocab_size * c.hidden_size + c.vocab_size;
}

void model_free(Model* m) {
    if (!m) return;
    stack_free(&m->rnn);
    free(m->params); free(m->grads); free(m->m); free(m->v);
    free(m->acts_memory); free(m->inputs); free(m->targets);
    free(m);
}

Model* model_new(Config c) {
    if (config_check(&c)) return NULL;
    Model* m = (Model*)calloc(1, sizeof(Model));
    if (!m) { fail("out of memory"); return NULL; }
    m->config = c;
    m->num_params = model_num_params(c);
    m->params = (float*)alloc_floats(m->num_params);
    m->grads = (float*)alloc_floats(m->num_params);
    if (!m->params || !m->grads) { fail("out of memory for %zu parameters", m->num_params); model_free(m); return NULL; }
    size_t V = c.vocab_size, E = c.embed_size, H = c.hidden_size;
    m->emb = m->params; m->demb = m->grads;
    size_t off = V * E;
    size_t n = stack_init(&m->rnn, c.cell, c.embed_size, c.hidden_size, c.n_layers, 1, m->params + off, m->grads + off);
    if (!n) { model_free(m); return NULL; }
    off += n;
    m->head_w = m->params + off; m->dhead_w = m->grads + off; off += V * H;
    m->head_b = m->params + off; m->dhead_b = m->grads + off;
    m->rnn.rng = &m->rng;
    m->rnn.table = m->emb; m->rnn.dtable = m->demb; m->rnn.table_rows = c.vocab_size;
    m->rng = 1;
    return m;
}

// torch's default init, from our own generator: embedding N(0, 1), everything else U(+-1/sqrt(H))
void model_init(Model* m, uint64_t seed) {
    uint64_t rng = seed;
    size_t n_emb = (size_t)m->config.vocab_size * m->config.embed_size;
    float bound = 1.0f / sqrtf((float)m->config.hidden_size);
    for (size_t i = 0; i < n_emb; i++) m->params[i] = rng_normal(&rng);
    for (size_t i = n_emb; i < m->num_params; i++) m->params[i] = (2.0f * rng_uniform(&rng) - 1.0f) * bound;
    m->rng = seed ^ 0x5DEECE66Dull;
    m->adam_t = 0;
    if (m->m) memset(m->m, 0, m->num_params * sizeof(float));
    if (m->v) memset(m->v, 0, m->num_params * sizeof(float));
}

void model_set_training(Model* m, int training, float dropout) {
    m->rnn.training = training;
    m->rnn.dropout = dropout;
    m->dropout = dropout;
}

// the stack reads embedded rows only for batches of fewer than V rows (see model_forward)
static size_t embedded_rows(size_t bt, size_t V) { return bt < V ? bt : V; }

static int model_reserve(Model* m, int B, int T) {
    if (check_batch_shape(B, T)) return -1;
    size_t bt = (size_t)B * T, V = m->config.vocab_size, E = m->config.embed_size, H = m->config.hidden_size;
    size_t lbh = (size_t)m->config.n_layers * B * H;
    if (bt > m->max_bt || (size_t)B > m->max_b || !m->acts_memory) {
        free(m->acts_memory); free(m->inputs); free(m->targets);
        size_t total = 2 * embedded_rows(bt, V) * E + 2 * bt * H + bt * V + bt + 4 * lbh;
        m->acts_memory = (float*)alloc_floats(total);
        m->inputs = (int*)malloc(bt * sizeof(int));
        m->targets = (int*)malloc(bt * sizeof(int));
        m->max_bt = m->max_b = 0;
        if (!m->acts_memory || !m->inputs || !m->targets) return fail("out of memory for activations (B=%d T=%d)", B, T);
        m->max_bt = bt; m->max_b = B;
    }
    size_t shapes[] = { H, V, bt, H, V, H };   // op(B) of h W^T, dlogits^T h, dlogits W
    if (matmul_reserve(shapes, 3)) return -1;
    float* p = m->acts_memory;
    m->x = p; p += embedded_rows(bt, V) * E;
    m->dx = p; p += embedded_rows(bt, V) * E;
    m->head_in = p; p += bt * H;
    m->head_mask = p; p += bt * H;
    m->logits = p; p += bt * V;
    m->lse = p; p += bt;
    m->h_n = p; p += lbh;
    m->c_n = p; p += lbh;
    m->dh0 = p; p += lbh;
    m->dc0 = p;
    m->B = B; m->T = T;
    return 0;
}

// inputs / targets (B, T) token ids; targets may be NULL (no loss). h0 / c0 (L, B, H) or NULL.
int model_forward(Model* m, const int* inputs, const int* targets, const float* h0, const float* c0, int B, int T) {
    int V = m->config.vocab_size, H = m->config.hidden_size;
    if (model_reserve(m, B, T)) return -1;
    size_t bt = (size_t)B * T;
    for (size_t i = 0; i < bt; i++) {
        if (inputs[i] < 0 || inputs[i] >= V)
            return fail("input token %d at position %zu is outside the vocabulary [0, %d)", inputs[i], i, V);
        if (targets && (targets[i] < 0 || targets[i] >= V))
            return fail("target token %d at position %zu is outside the vocabulary [0, %d)", targets[i], i, V);
    }
    m->has_targets = targets != NULL;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            m->inputs[(size_t)t * B + b] = inputs[(size_t)b * T + t];
            if (targets) m->targets[(size_t)t * B + b] = targets[(size_t)b * T + t];
        }
    int lookup = lookup_pays(bt, (size_t)V);
    m->rnn.tokens = lookup ? m->inputs : NULL;
    if (!lookup) embedding_forward(m->x, m->emb, m->inputs, (long)bt, m->config.embed_size);
    if (stack_forward_acts(&m->rnn, lookup ? NULL : m->x, h0, c0, B, T)) return -1;
    const float* top = m->rnn.h[m->config.n_layers - 1] + (size_t)B * H;
    if (m->rnn.dropped) dropout_forward(m->head_in, m->head_mask, top, bt * H, m->dropout, &m->rng);
    m->head_x = m->rnn.dropped ? m->head_in : top;
    matmul(m->logits, m->head_x, H, 1, m->head_w, 1, H, (int)bt, V, H, 0);
    // bias, then log-sum-exp per row and the mean cross-entropy
    #pragma omp parallel for schedule(static) if ((long)bt * V > PAR_MIN_WORK)
    for (long r = 0; r < (long)bt; r++) {
        float* z = m->logits + (size_t)r * V;
        float mx = -FLT_MAX;
        for (int v = 0; v < V; v++) { z[v] += m->head_b[v]; mx = z[v] > mx ? z[v] : mx; }
        float sum = 0.0f;
        for (int v = 0; v < V; v++) sum += exp_approx(z[v] - mx);
        m->lse[r] = mx + logf(sum);
    }
    double loss = 0.0;   // serial and in double: fixed order, and cheap next to the GEMMs
    if (targets) for (size_t r = 0; r < bt; r++) loss += m->lse[r] - m->logits[r * V + m->targets[r]];
    m->loss = targets ? (float)(loss / (double)bt) : 0.0f;
    stack_final_states(m->h_n, m->c_n, &m->rnn);
    return 0;
}

void model_zero_grad(Model* m) { zero_floats(m->grads, m->num_params); }

// d(mean loss) = 1; overwrites the logits with their gradient
int model_backward(Model* m) {
    if (!m->B || !m->has_targets) return fail("backward needs a forward pass with targets first");
    int B = m->B, T = m->T, V = m->config.vocab_size, H = m->config.hidden_size;
    size_t bt = (size_t)B * T;
    float scale = 1.0f / (float)bt;
    #pragma omp parallel for schedule(static) if ((long)bt * V > PAR_MIN_WORK)
    for (long r = 0; r < (long)bt; r++) {
        float* z = m->logits + (size_t)r * V;
        for (int v = 0; v < V; v++) z[v] = exp_approx(z[v] - m->lse[r]) * scale;
        z[m->targets[r]] -= scale;
    }
    matmul(m->dhead_w, m->logits, 1, V, m->head_x, H, 1, V, H, (int)bt, 1);
    colsum_accumulate(m->dhead_b, m->logits, bt, V);
    matmul(m->rnn.dy, m->logits, V, 1, m->head_w, H, 1, (int)bt, H, V, 0);
    if (m->rnn.dropped) dropout_backward(m->rnn.dy, m->head_mask, bt * H);
    stack_backward_acts(&m->rnn, m->dx, m->dh0, m->dc0, NULL, NULL);
    if (!m->rnn.tokens) embedding_backward(m->demb, m->dx, m->inputs, (long)bt, m->config.embed_size);
    m->has_targets = 0;   // the logits now hold gradients
    return 0;
}

// ----------------------------------------------------------------------------
// optimizer: global-norm clipping (torch clip_grad_norm_) and AdamW (torch.optim.AdamW)

float model_grad_norm(const Model* m) {
    return (float)sqrt(sum_squares(m->grads, m->num_params));
}

// clips, then takes one AdamW step; weight decay applies to every parameter. Reports the norm before
// clipping, and skips the update entirely when that norm is not finite.
int model_step(Model* m, float lr, float beta1, float beta2, float eps, float weight_decay, float max_grad_norm,
               float* grad_norm) {
    if (!m->m) {
        m->m = (float*)alloc_floats(m->num_params);
        m->v = (float*)alloc_floats(m->num_params);
        if (!m->m || !m->v) return fail("out of memory for AdamW state");
    }
    float norm = model_grad_norm(m);
    if (grad_norm) *grad_norm = norm;
    if (!isfinite(norm)) return 0;   // a NaN or Inf gradient must never reach the parameters; the caller decides what next
    float clip = 1.0f;
    if (max_grad_norm > 0.0f) { clip = max_grad_norm / (norm + 1e-6f); if (clip > 1.0f) clip = 1.0f; }
    m->adam_t++;
    float bc1 = 1.0f - powf(beta1, (float)m->adam_t);
    float bc2_sqrt = sqrtf(1.0f - powf(beta2, (float)m->adam_t));
    float step_size = lr / bc1;
    float decay = 1.0f - lr * weight_decay;
    #pragma omp parallel for schedule(static) if ((long)m->num_params > PAR_MIN_WORK)
    for (long i = 0; i < (long)m->num_params; i++) {
        float g = m->grads[i] * clip;
        float mi = beta1 * m->m[i] + (1.0f - beta1) * g;
        float vi = beta2 * m->v[i] + (1.0f - beta2) * g * g;
        m->m[i] = mi; m->v[i] = vi;
        m->params[i] = m->params[i] * decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
    return 0;
}

// ----------------------------------------------------------------------------
// reading files we did not write: load whole, then take bounded pieces, so a short or hostile file
// can only ever produce an error message

typedef struct {
    unsigned char* data;
    size_t size, pos;
    const char* path;
} Blob;

void blob_free(Blob* b) { free(b->data); b->data = NULL; b->size = b->pos = 0; }

int blob_load(Blob* b, const char* path) {
    memset(b, 0, sizeof(*b));
    b->path = path;
    FILE* f = fopen(path, "rb");
    if (!f) return fail("%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) { fclose(f); return fail("%s: not a regular file", path); }
    b->size = (size_t)st.st_size;
    b->data = (unsigned char*)malloc(b->size ? b->size : 1);
    if (!b->data) { fclose(f); return fail("%s: out of memory reading %zu bytes", path, b->size); }
    size_t got = fread(b->data, 1, b->size, f);
    int err = ferror(f);
    fclose(f);
    if (err || got != b->size) { blob_free(b); return fail("%s: read error", path); }
    return 0;
}

// the next n bytes, or an error naming what was missing
static const void* blob_take(Blob* b, size_t n, const char* what) {
    if (n > b->size - b->pos) {
        fail("%s: truncated: %s needs %zu bytes, %zu left", b->path, what, n, b->size - b->pos);
        return NULL;
    }
    const void* p = b->data + b->pos;
    b->pos += n;
    return p;
}

static int blob_done(const Blob* b) {
    if (b->pos != b->size) return fail("%s: %zu unexpected trailing bytes", b->path, b->size - b->pos);
    return 0;
}

// n = a * b * c ... with overflow and sanity checks, for sizes read from a file header
static int checked_count(size_t* n, const int* dims, int n_dims, const char* path) {
    size_t total = 1;
    for (int i = 0; i < n_dims; i++) {
        if (dims[i] < 0 || (dims[i] > 0 && total > ((size_t)1 << 40) / (size_t)dims[i]))
            return fail("%s: header sizes are out of range", path);
        total *= (size_t)dims[i];
    }
    *n = total;
    return 0;
}

// config read from a file header: the same rules as on the command line, plus a sane upper bound
static int config_from_header(Config* c, const int* h, const char* path) {
    c->cell = h[0]; c->vocab_size = h[1]; c->embed_size = h[2]; c->hidden_size = h[3]; c->n_layers = h[4];
    if (config_check(c)) {
        char why[sizeof(pyrnn_error_msg)];   // fail() writes pyrnn_error_msg: never pass it as its own argument
        snprintf(why, sizeof(why), "%s", pyrnn_error_msg);
        return fail("%s: bad model config: %s", path, why);
    }
    if (c->vocab_size > 256 || c->embed_size > 65536 || c->hidden_size > 65536 || c->n_layers > 64)
        return fail("%s: model config out of range (V=%d E=%d H=%d L=%d)", path, c->vocab_size, c->embed_size,
                    c->hidden_size, c->n_layers);
    return 0;
}

// the LM's parameter tensors in state_dict order: name, offset into the flat buffer, element count
int model_tensor_count(const Config* c) { return 2 + 4 * c->n_layers + 1; }

void model_tensor_info(const Config* c, int i, char* name, size_t name_size, size_t* offset, size_t* numel) {
    size_t V = c->vocab_size, E = c->embed_size, H = c->hidden_size, GH = (size_t)cell_gates(c->cell) * H;
    size_t off = V * E;
    if (i == 0) { snprintf(name, name_size, "embedding.weight"); *offset = 0; *numel = V * E; return; }
    for (int l = 0; l < c->n_layers; l++) {
        size_t in = l == 0 ? E : H;
        size_t sizes[4] = { GH * in, GH * H, GH, GH };
        const char* kinds[4] = { "weight_ih", "weight_hh", "bias_ih", "bias_hh" };
        for (int k = 0; k < 4; k++) {
            if (i == 1 + 4 * l + k) { snprintf(name, name_size, "rnn.%s_l%d", kinds[k], l); *offset = off; *numel = sizes[k]; return; }
            off += sizes[k];
        }
    }
    if (i == 1 + 4 * c->n_layers) { snprintf(name, name_size, "head.weight"); *offset = off; *numel = V * H; return; }
    snprintf(name, name_size, "head.bias"); *offset = off + V * H; *numel = V;
}

// ----------------------------------------------------------------------------
// token files (docs/formats.md): a 1024-byte header with the vocabulary, then one byte per token

#define TOKENS_MAGIC 20261101
#define TOKENS_VERSION 1
#define TOKENS_HEADER 1024

typedef struct {
    Blob blob;
    int vocab_size;
    unsigned char vocab[256];
    const unsigned char* tokens;
    size_t n_tokens;
} TokenFile;

void tokens_free(TokenFile* f) { blob_free(&f->blob); }

static int tokens_parse(TokenFile* f, const char* path) {
    const unsigned char* h = (const unsigned char*)blob_take(&f->blob, TOKENS_HEADER, "header");
    if (!h) return -1;
    int32_t magic, version, vocab_size;
    int64_t n;
    memcpy(&magic, h, 4); memcpy(&version, h + 4, 4); memcpy(&vocab_size, h + 8, 4); memcpy(&n, h + 16, 8);
    if (magic != TOKENS_MAGIC) return fail("%s: not a pyrnn token file (bad magic; make one with `python -m pyrnn prepare`)", path);
    if (version != TOKENS_VERSION) return fail("%s: token file version %d, this build reads version %d", path, version, TOKENS_VERSION);
    if (vocab_size < 1 || vocab_size > 256) return fail("%s: vocabulary size %d is outside 1..256", path, vocab_size);
    if (n < 0 || (uint64_t)n != f->blob.size - TOKENS_HEADER)
        return fail("%s: header says %lld tokens but the file holds %zu (truncated or corrupted)", path, (long long)n,
                    f->blob.size - TOKENS_HEADER);
    f->vocab_size = vocab_size;
    memcpy(f->vocab, h + 24, 256);
    f->tokens = (const unsigned char*)blob_take(&f->blob, (size_t)n, "tokens");
    f->n_tokens = (size_t)n;
    for (size_t i = 0; i < f->n_tokens; i++)
        if (f->tokens[i] >= vocab_size)
            return fail("%s: token %d at position %zu is outside the vocabulary [0, %d)", path, f->tokens[i], i, vocab_size);
    return 0;
}

int tokens_load(TokenFile* f, const char* path) {
    memset(f, 0, sizeof(*f));
    if (blob_load(&f->blob, path)) return -1;
    if (tokens_parse(f, path)) { tokens_free(f); return -1; }
    return 0;
}

// ----------------------------------------------------------------------------
// data loader, char-rnn layout: the text is cut into B contiguous streams, and batch k takes tokens
// [k*T, (k+1)*T] of every stream, so row b of batch k+1 continues row b of batch k and the final
// hidden state of one batch is the right initial state of the next

typedef struct {
    const unsigned char* tokens;
    size_t stream_len;   // tokens per stream, a multiple of T
    int B, T;
    long n_batches, pos;
} DataLoader;

int loader_init(DataLoader* d, const TokenFile* f, int B, int T, const char* what) {
    memset(d, 0, sizeof(*d));
    if (B <= 0 || T <= 0) return fail("batch size and sequence length must be positive, got B=%d T=%d", B, T);
    d->tokens = f->tokens; d->B = B; d->T = T;
    d->n_batches = f->n_tokens > 0 ? (long)((f->n_tokens - 1) / ((size_t)B * T)) : 0;
    if (d->n_batches < 1)
        return fail("%s split has %zu tokens, too few for one batch of B=%d x T=%d (needs %zu)", what, f->n_tokens, B, T,
                    (size_t)B * T + 1);
    d->stream_len = (size_t)d->n_batches * T;
    return 0;
}

// next batch into inputs / targets (B, T); returns 1 when this batch starts a new pass over the data
int loader_next(DataLoader* d, int* inputs, int* targets) {
    int wrapped = d->pos == 0;
    for (int b = 0; b < d->B; b++) {
        const unsigned char* src = d->tokens + (size_t)b * d->stream_len + (size_t)d->pos * d->T;
        for (int t = 0; t < d->T; t++) {
            inputs[(size_t)b * d->T + t] = src[t];
            targets[(size_t)b * d->T + t] = src[t + 1];
        }
    }
    d->pos = (d->pos + 1) % d->n_batches;
    return wrapped;
}

// ----------------------------------------------------------------------------
// sampling: feed the prime through the model, then draw one token at a time with the state carried

static int compare_floats_descending(const void* a, const void* b) {
    float x = *(const float*)a, y = *(const float*)b;
    return (x < y) - (x > y);
}

// scratch: V floats and V doubles
static int sample_from_logits(const float* logits, int V, float temperature, int top_k, uint64_t* rng,
                              float* sorted, double* probs) {
    if (temperature <= 0.0f) {   // argmax
        int best = 0;
        for (int v = 1; v < V; v++) if (logits[v] > logits[best]) best = v;
        return best;
    }
    float threshold = -FLT_MAX;   // logits below the k-th largest are dropped
    if (top_k > 0 && top_k < V) {
        memcpy(sorted, logits, V * sizeof(float));
        qsort(sorted, V, sizeof(float), compare_floats_descending);
        threshold = sorted[top_k - 1];
    }
    float mx = -FLT_MAX;
    for (int v = 0; v < V; v++) if (logits[v] >= threshold && logits[v] > mx) mx = logits[v];
    double total = 0.0;
    for (int v = 0; v < V; v++) {
        probs[v] = logits[v] >= threshold ? exp((double)(logits[v] - mx) / temperature) : 0.0;
        total += probs[v];
    }
    double u = rng_uniform(rng) * total, cdf = 0.0;
    for (int v = 0; v < V; v++) { cdf += probs[v]; if (u < cdf) return v; }
    for (int v = V - 1; v >= 0; v--) if (probs[v] > 0.0) return v;
    return 0;
}

// out receives n tokens drawn after the prime (n_prime >= 1); temperature <= 0 means argmax
int model_sample(Model* m, int* out, const int* prime, int n_prime, int n, float temperature, int top_k, uint64_t seed) {
    if (n_prime < 1) return fail("sampling needs a prime of at least one token");
    int training = m->rnn.training;
    model_set_training(m, 0, m->dropout);
    size_t lh = (size_t)m->config.n_layers * m->config.hidden_size;
    int V = m->config.vocab_size;
    float* state = (float*)alloc_floats(2 * lh + V);
    double* probs = (double*)malloc(V * sizeof(double));
    if (!state || !probs) { free(state); free(probs); return fail("out of memory"); }
    uint64_t rng = seed;
    int lstm = m->config.cell == CELL_LSTM, status = 0;
    if (model_forward(m, prime, NULL, NULL, NULL, 1, n_prime)) status = -1;
    const float* last = m->logits + (size_t)(n_prime - 1) * m->config.vocab_size;
    for (int i = 0; i < n && status == 0; i++) {
        int tok = sample_from_logits(last, V, temperature, top_k, &rng, state + 2 * lh, probs);
        out[i] = tok;
        memcpy(state, m->h_n, lh * sizeof(float));
        if (lstm) memcpy(state + lh, m->c_n, lh * sizeof(float));
        if (i + 1 < n && model_forward(m, &tok, NULL, state, lstm ? state + lh : NULL, 1, 1)) status = -1;
        last = m->logits;
    }
    free(state);
    free(probs);
    model_set_training(m, training, m->dropout);
    return status;
}

// ----------------------------------------------------------------------------
// checkpoints (docs/formats.md): written to NAME.tmp, fsynced, renamed, so a reader only ever sees
// a complete file; the CRC-32 at the end catches everything else

#define CKPT_MAGIC 20261102
#define CKPT_VERSION 1

static uint32_t crc32_update(uint32_t crc, const unsigned char* p, size_t n) {
    static uint32_t table[256];
    if (!table[1])
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
    crc = ~crc;
    for (size_t i = 0; i < n; i++) crc = table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

typedef struct {
    Config config;
    int B, T, step, carry, adam_t;
    unsigned char vocab[256];
    float *params, *m, *v;   // model_num_params(config) each
    int64_t data_pos;
    float *h, *c;            // (L, B, H); c only for LSTM
    uint64_t rng;
    Blob blob;               // what the pointers point into, after checkpoint_load
} Checkpoint;

// writes all of a piece or fails; the stream remembers the running CRC
typedef struct { FILE* f; uint32_t crc; int failed; } Writer;
static void writer_put(Writer* w, const void* p, size_t n) {
    if (w->failed || n == 0) return;
    if (fwrite(p, 1, n, w->f) != n) { w->failed = 1; return; }
    w->crc = crc32_update(w->crc, (const unsigned char*)p, n);
}

static int fsync_dir_of(const char* path) {
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s", path);
    char* slash = strrchr(dir, '/');
    if (slash) *slash = 0; else snprintf(dir, sizeof(dir), ".");
    int fd = open(dir, O_RDONLY);
    if (fd < 0) return 0;   // best effort: some file systems do not allow opening a directory
    fsync(fd);
    close(fd);
    return 0;
}

// the generic atomic write: fill NAME.tmp through fn, fsync, rename over NAME
static int write_atomically(const char* path, void (*fn)(Writer*, const void*), const void* arg) {
    char tmp[4096];
    if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp)) return fail("%s: path too long", path);
    Writer w = { fopen(tmp, "wb"), 0, 0 };
    if (!w.f) return fail("%s: cannot write: %s", tmp, strerror(errno));
    fn(&w, arg);
    int ok = !w.failed && fflush(w.f) == 0 && fsync(fileno(w.f)) == 0;
    int err = errno;
    ok = (fclose(w.f) == 0) && ok;
    if (!ok) { unlink(tmp); return fail("%s: write failed: %s", tmp, strerror(err ? err : EIO)); }
    if (rename(tmp, path) != 0) { err = errno; unlink(tmp); return fail("%s: rename failed: %s", path, strerror(err)); }
    return fsync_dir_of(path);
}

static void checkpoint_write_fn(Writer* w, const void* arg) {
    const Checkpoint* k = (const Checkpoint*)arg;
    int32_t header[64] = { 0 };
    header[0] = CKPT_MAGIC; header[1] = CKPT_VERSION;
    header[2] = k->config.cell; header[3] = k->config.vocab_size; header[4] = k->config.embed_size;
    header[5] = k->config.hidden_size; header[6] = k->config.n_layers;
    header[7] = k->B; header[8] = k->T; header[9] = k->step; header[10] = k->carry; header[11] = k->adam_t;
    size_t P = model_num_params(k->config), lbh = (size_t)k->config.n_layers * k->B * k->config.hidden_size;
    writer_put(w, header, sizeof(header));
    writer_put(w, k->vocab, 256);
    writer_put(w, k->params, P * 4);
    writer_put(w, k->m, P * 4);
    writer_put(w, k->v, P * 4);
    writer_put(w, &k->data_pos, 8);
    writer_put(w, k->h, lbh * 4);
    if (k->config.cell == CELL_LSTM) writer_put(w, k->c, lbh * 4);
    writer_put(w, &k->rng, 8);
    uint32_t crc = w->crc;
    writer_put(w, &crc, 4);
}

int checkpoint_save(const Checkpoint* k, const char* path) { return write_atomically(path, checkpoint_write_fn, k); }

static int checkpoint_parse(Checkpoint* k, const char* path) {
    Blob* b = &k->blob;
    if (b->size < 4) return fail("%s: truncated checkpoint (%zu bytes)", path, b->size);
    uint32_t stored;
    memcpy(&stored, b->data + b->size - 4, 4);
    const int32_t* h = (const int32_t*)blob_take(b, 64 * 4, "header");
    if (!h) return -1;
    if (h[0] != CKPT_MAGIC) return fail("%s: not a pyrnn checkpoint (bad magic)", path);
    if (h[1] != CKPT_VERSION) return fail("%s: checkpoint version %d, this build reads version %d", path, h[1], CKPT_VERSION);
    if (crc32_update(0, b->data, b->size - 4) != stored) return fail("%s: checksum mismatch (corrupted or truncated checkpoint)", path);
    if (config_from_header(&k->config, h + 2, path)) return -1;
    k->B = h[7]; k->T = h[8]; k->step = h[9]; k->carry = h[10]; k->adam_t = h[11];
    if (k->B < 0 || k->T < 0 || k->step < 0 || k->adam_t < 0) return fail("%s: bad B, T or step in header", path);
    size_t P = model_num_params(k->config), lbh = 0;
    int dims[] = { k->config.n_layers, k->B, k->config.hidden_size };
    if (checked_count(&lbh, dims, 3, path)) return -1;
    const void* p;
    if (!(p = blob_take(b, 256, "vocabulary"))) return -1;
    memcpy(k->vocab, p, 256);
    if (!(k->params = (float*)blob_take(b, P * 4, "params"))) return -1;
    if (!(k->m = (float*)blob_take(b, P * 4, "AdamW m"))) return -1;
    if (!(k->v = (float*)blob_take(b, P * 4, "AdamW v"))) return -1;
    if (!(p = blob_take(b, 8, "data position"))) return -1;
    memcpy(&k->data_pos, p, 8);
    if (!(k->h = (float*)blob_take(b, lbh * 4, "hidden state"))) return -1;
    k->c = NULL;
    if (k->config.cell == CELL_LSTM && !(k->c = (float*)blob_take(b, lbh * 4, "cell state"))) return -1;
    if (!(p = blob_take(b, 8, "rng state"))) return -1;
    memcpy(&k->rng, p, 8);
    if (!blob_take(b, 4, "checksum")) return -1;
    if (blob_done(b)) return -1;
    if (k->data_pos < 0) return fail("%s: negative data position", path);
    return 0;
}

int checkpoint_load(Checkpoint* k, const char* path) {
    memset(k, 0, sizeof(*k));
    if (blob_load(&k->blob, path)) return -1;
    if (checkpoint_parse(k, path)) { blob_free(&k->blob); return -1; }
    return 0;
}

void checkpoint_free(Checkpoint* k) { blob_free(&k->blob); }

// `latest` is a one-line text file naming the newest complete checkpoint, replaced atomically
static void latest_write_fn(Writer* w, const void* arg) {
    const char* name = (const char*)arg;
    writer_put(w, name, strlen(name));
    writer_put(w, "\n", 1);
}

static int resolve_latest(char* out, size_t out_size, const char* out_dir) {
    char path[4096], name[1024];
    snprintf(path, sizeof(path), "%s/latest", out_dir);
    FILE* f = fopen(path, "r");
    if (!f) return fail("%s: no checkpoint to resume from: %s", path, strerror(errno));
    name[0] = 0;   // an empty file leaves name untouched
    int ok = fgets(name, sizeof(name), f) != NULL;
    fclose(f);
    name[strcspn(name, "\r\n")] = 0;
    if (!ok || !name[0] || strchr(name, '/')) return fail("%s: does not name a checkpoint", path);
    snprintf(out, out_size, "%s/%s", out_dir, name);
    return 0;
}

// ----------------------------------------------------------------------------
// backends: the training driver below runs any model that fills this table (the CPU model here,
// the cuDNN one in cuda/train_rnn.cu)

typedef struct { float lr, beta1, beta2, eps, weight_decay, max_grad_norm; } StepParams;

typedef struct {
    const char* name;
    void* (*create)(Config c, int B, int T, float dropout);
    void (*destroy)(void* self);
    // flat parameters (torch order) and AdamW state to / from host buffers; m, v may be NULL
    int (*set_params)(void* self, const float* params, const float* m, const float* v, int adam_t, uint64_t rng);
    int (*get_params)(void* self, float* params, float* m, float* v, int* adam_t, uint64_t* rng);
    // the carried hidden state (L, B, H) lives in the backend; NULL means zeros
    int (*set_state)(void* self, const float* h, const float* c);
    int (*get_state)(void* self, float* h, float* c);
    // forward from the carried state, backward, clip, AdamW (skipped when the gradient is not
    // finite); the final state becomes the carried state
    int (*train_step)(void* self, float* loss, float* grad_norm, const int* inputs, const int* targets, const StepParams* sp);
    // forward only, no dropout, from host state h, c, which it overwrites with the final state
    int (*eval_step)(void* self, float* loss, const int* inputs, const int* targets, float* h, float* c);
} Backend;

// test hook: PYRNN_FAULT_NAN_GRAD_STEP=N (read once, in cpu_create) sets one gradient element to NaN
// after the backward pass of optimizer step N (1-based; the training step when none was skipped),
// once per process, so tests can reach the non-finite-gradient path (-N stop / skip). Unset: no effect.
typedef struct { Model* m; float *h, *c; int B, T; int fault_nan_step; } CpuRun;

static void cpu_destroy(void* self) {
    CpuRun* r = (CpuRun*)self;
    if (!r) return;
    model_free(r->m); free(r->h); free(r->c); free(r);
}

static void* cpu_create(Config c, int B, int T, float dropout) {
    CpuRun* r = (CpuRun*)calloc(1, sizeof(CpuRun));
    if (!r) { fail("out of memory"); return NULL; }
    size_t lbh = (size_t)c.n_layers * B * c.hidden_size;
    r->m = model_new(c);
    r->h = (float*)alloc_floats(lbh);
    r->c = (float*)alloc_floats(lbh);
    r->B = B; r->T = T;
    if (!r->m || !r->h || !r->c) { if (r->m) fail("out of memory"); cpu_destroy(r); return NULL; }
    model_set_training(r->m, 1, dropout);   // the dropout generator's state arrives with set_params
    const char* fault = getenv("PYRNN_FAULT_NAN_GRAD_STEP");
    r->fault_nan_step = fault ? atoi(fault) : 0;
    return r;
}

static int cpu_set_params(void* self, const float* params, const float* m, const float* v, int adam_t, uint64_t rng) {
    Model* md = ((CpuRun*)self)->m;
    size_t n = md->num_params * sizeof(float);
    memcpy(md->params, params, n);
    if (!md->m) {
        md->m = (float*)alloc_floats(md->num_params);
        md->v = (float*)alloc_floats(md->num_params);
        if (!md->m || !md->v) return fail("out of memory for AdamW state");
    }
    if (m) memcpy(md->m, m, n); else memset(md->m, 0, n);
    if (v) memcpy(md->v, v, n); else memset(md->v, 0, n);
    md->adam_t = adam_t;
    md->rng = rng;
    return 0;
}

static int cpu_get_params(void* self, float* params, float* m, float* v, int* adam_t, uint64_t* rng) {
    Model* md = ((CpuRun*)self)->m;
    size_t n = md->num_params * sizeof(float);
    if (params) memcpy(params, md->params, n);
    if (m) { if (md->m) memcpy(m, md->m, n); else memset(m, 0, n); }
    if (v) { if (md->v) memcpy(v, md->v, n); else memset(v, 0, n); }
    if (adam_t) *adam_t = md->adam_t;
    if (rng) *rng = md->rng;
    return 0;
}

static int cpu_set_state(void* self, const float* h, const float* c) {
    CpuRun* r = (CpuRun*)self;
    size_t n = (size_t)r->m->config.n_layers * r->B * r->m->config.hidden_size * sizeof(float);
    if (h) memcpy(r->h, h, n); else memset(r->h, 0, n);
    if (c) memcpy(r->c, c, n); else memset(r->c, 0, n);
    return 0;
}

static int cpu_get_state(void* self, float* h, float* c) {
    CpuRun* r = (CpuRun*)self;
    size_t n = (size_t)r->m->config.n_layers * r->B * r->m->config.hidden_size * sizeof(float);
    if (h) memcpy(h, r->h, n);
    if (c) memcpy(c, r->c, n);
    return 0;
}

static int cpu_train_step(void* self, float* loss, float* grad_norm, const int* inputs, const int* targets, const StepParams* sp) {
    CpuRun* r = (CpuRun*)self;
    Model* m = r->m;
    if (model_forward(m, inputs, targets, r->h, r->c, r->B, r->T)) return -1;
    *loss = m->loss;
    model_zero_grad(m);
    if (model_backward(m)) return -1;
    if (r->fault_nan_step > 0 && m->adam_t + 1 == r->fault_nan_step) { m->grads[0] = NAN; r->fault_nan_step = 0; }
    if (model_step(m, sp->lr, sp->beta1, sp->beta2, sp->eps, sp->weight_decay, sp->max_grad_norm, grad_norm)) return -1;
    return cpu_set_state(self, m->h_n, m->c_n);
}

static int cpu_eval_step(void* self, float* loss, const int* inputs, const int* targets, float* h, float* c) {
    CpuRun* r = (CpuRun*)self;
    Model* m = r->m;
    model_set_training(m, 0, m->dropout);
    int status = model_forward(m, inputs, targets, h, c, r->B, r->T);
    model_set_training(m, 1, m->dropout);
    if (status) return -1;
    *loss = m->loss;
    size_t n = (size_t)m->config.n_layers * r->B * m->config.hidden_size * sizeof(float);
    memcpy(h, m->h_n, n);
    if (c && m->config.cell == CELL_LSTM) memcpy(c, m->c_n, n);
    return 0;
}

static const Backend cpu_backend __attribute__((unused)) = {   // the library build has no main to use it
    "cpu", cpu_create, cpu_destroy, cpu_set_params, cpu_get_params, cpu_set_state, cpu_get_state,
    cpu_train_step, cpu_eval_step,
};

// ----------------------------------------------------------------------------
// the training driver: flags, data, carried state, logging, eval, sampling, checkpoints

typedef struct {
    const char *train_path, *val_path, *out_dir, *resume, *cell_name, *nonfinite;
    int n_layers, embed_size, hidden_size, B, T, max_steps, eval_every, sample_every, ckpt_every;
    int warmup, threads, carry, sample_len, top_k;
    float lr, weight_decay, grad_clip, final_lr_frac, dropout, temperature;
    long long seed;
} TrainArgs;

typedef struct { char flag; char kind; void* dst; const char* help; int given; } Flag;

static void print_usage(const char* prog, const Flag* flags, int n) {
    printf("usage: %s [flags]   (every flag takes a value)\n", prog);
    for (int i = 0; i < n; i++) {
        const Flag* f = &flags[i];
        char def[256];
        switch (f->kind) {
        case 'i': snprintf(def, sizeof(def), "%d", *(int*)f->dst); break;
        case 'f': snprintf(def, sizeof(def), "%g", *(float*)f->dst); break;
        case 'l': snprintf(def, sizeof(def), "%lld", *(long long*)f->dst); break;
        default: snprintf(def, sizeof(def), "%s", *(const char**)f->dst ? *(const char**)f->dst : ""); break;
        }
        printf("  -%c  %-52s (default: %s)\n", f->flag, f->help, def);
    }
}

// fills flags from argv; returns 0, 1 after -h, or -1 with a one-line message
static int parse_flags(Flag* flags, int n, int argc, char** argv) {
    for (int i = 1; i < argc; i++) {
        const char* a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) { print_usage(argv[0], flags, n); return 1; }
        if (a[0] != '-' || !a[1] || a[2]) return fail("unexpected argument '%s' (flags are a dash and one letter; -h lists them)", a);
        Flag* f = NULL;
        for (int k = 0; k < n; k++) if (flags[k].flag == a[1]) f = &flags[k];
        if (!f) return fail("unknown flag %s (-h lists them)", a);
        if (i + 1 >= argc) return fail("flag %s needs a value", a);
        const char* v = argv[++i];
        char* end = NULL;
        errno = 0;
        if (f->kind == 'i') {
            long x = strtol(v, &end, 10);
            if (!*v || *end || errno || x < -2147483647L || x > 2147483647L) return fail("flag %s needs an integer, got '%s'", a, v);
            *(int*)f->dst = (int)x;
        } else if (f->kind == 'l') {
            long long x = strtoll(v, &end, 10);
            if (!*v || *end || errno) return fail("flag %s needs an integer, got '%s'", a, v);
            *(long long*)f->dst = x;
        } else if (f->kind == 'f') {
            float x = strtof(v, &end);
            if (!*v || *end || errno || !isfinite(x)) return fail("flag %s needs a number, got '%s'", a, v);
            *(float*)f->dst = x;
        } else {
            *(const char**)f->dst = v;
        }
        f->given = 1;
    }
    return 0;
}

static int given(const Flag* flags, int n, char flag) {
    for (int i = 0; i < n; i++) if (flags[i].flag == flag) return flags[i].given;
    return 0;
}

static int cell_from_name(const char* name) {
    for (int i = 0; i < 4; i++) if (strcmp(name, cell_names[i]) == 0) return i;
    return -1;
}

static int check_args(const TrainArgs* a) {
    if (cell_from_name(a->cell_name) < 0) return fail("-c: unknown cell '%s' (expected rnn, rnn_relu, lstm or gru)", a->cell_name);
    struct { int v; const char* what; } positive[] = {
        { a->n_layers, "-L layers" }, { a->embed_size, "-E embedding size" }, { a->hidden_size, "-H hidden size" },
        { a->B, "-b batch size" }, { a->T, "-t sequence length" },
    };
    for (size_t i = 0; i < sizeof(positive) / sizeof(positive[0]); i++)
        if (positive[i].v <= 0) return fail("%s must be positive, got %d", positive[i].what, positive[i].v);
    if (a->n_layers > 64 || a->embed_size > 65536 || a->hidden_size > 65536) return fail("-L, -E or -H is too large");
    if ((long long)a->B * a->T > (1LL << 30)) return fail("-b x -t is too large");
    if (a->max_steps < 0) return fail("-n max steps must be >= 0, got %d", a->max_steps);
    if (!(a->lr > 0.0f)) return fail("-l learning rate must be positive, got %g", a->lr);
    if (a->weight_decay < 0.0f) return fail("-w weight decay must be >= 0, got %g", a->weight_decay);
    if (a->grad_clip < 0.0f) return fail("-g grad clip must be >= 0 (0 = off), got %g", a->grad_clip);
    if (a->dropout < 0.0f || a->dropout >= 1.0f) return fail("-p dropout must be in [0, 1), got %g", a->dropout);
    if (a->final_lr_frac < 0.0f || a->final_lr_frac > 1.0f) return fail("-q final lr fraction must be in [0, 1], got %g", a->final_lr_frac);
    if (a->eval_every < 0 || a->sample_every < 0 || a->ckpt_every < 0 || a->warmup < 0 || a->threads < 0 ||
        a->sample_len < 0 || a->top_k < 0)
        return fail("-v, -s, -k, -u, -P, -m and -K must be >= 0");
    if (a->carry != 0 && a->carry != 1) return fail("-C must be 0 or 1, got %d", a->carry);
    if (strcmp(a->nonfinite, "stop") != 0 && strcmp(a->nonfinite, "skip") != 0)
        return fail("-N must be stop or skip, got '%s'", a->nonfinite);
    return 0;
}

// linear warmup, then cosine decay to final_lr_frac * lr (constant when the fraction is 1)
static float lr_at(const TrainArgs* a, int step) {
    if (step < a->warmup) return a->lr * (float)(step + 1) / (float)a->warmup;
    if (a->final_lr_frac >= 1.0f || a->max_steps <= a->warmup) return a->lr;
    float progress = (float)(step - a->warmup) / (float)(a->max_steps - a->warmup);
    float min_lr = a->lr * a->final_lr_frac;
    return min_lr + 0.5f * (a->lr - min_lr) * (1.0f + cosf(3.14159265f * progress));
}

// mkdir -p: the output directory and any missing parents
static int make_dirs(const char* path) {
    char p[4096];
    if (snprintf(p, sizeof(p), "%s", path) >= (int)sizeof(p)) return fail("-o %s: path too long", path);
    for (char* q = p + 1;; q++) {
        int end = *q == 0;
        if (*q == '/' || end) {
            *q = 0;
            if (mkdir(p, 0755) != 0 && errno != EEXIST) return fail("-o %s: cannot create %s: %s", path, p, strerror(errno));
            if (end) break;
            *q = '/';
        }
    }
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) return fail("-o %s: not a directory", path);
    return 0;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

// mean loss over every batch of the val split, in the char-rnn stream layout, the state starting at
// zeros and carried across batches
static int evaluate(float* val_loss, const Backend* be, void* run, const TokenFile* val, int B, int T, int* inputs,
                    int* targets, float* h, float* c, size_t lbh) {
    DataLoader d;
    if (loader_init(&d, val, B, T, "val")) return -1;
    memset(h, 0, lbh * sizeof(float));
    memset(c, 0, lbh * sizeof(float));
    double total = 0.0;
    for (long k = 0; k < d.n_batches; k++) {
        float loss;
        loader_next(&d, inputs, targets);
        if (be->eval_step(run, &loss, inputs, targets, h, c)) return -1;
        total += loss;
    }
    *val_loss = (float)(total / (double)d.n_batches);
    return 0;
}

static void print_sample(Model* sampler, const float* params, const unsigned char* vocab, int n, float temperature,
                         int top_k, uint64_t seed) {
    if (n <= 0) return;
    memcpy(sampler->params, params, sampler->num_params * sizeof(float));
    int prime = 0;   // a newline when the vocabulary has one, so samples start at a line
    for (int v = 0; v < sampler->config.vocab_size; v++) if (vocab[v] == '\n') prime = v;
    int* out = (int*)malloc(n * sizeof(int));
    if (!out) return;
    if (model_sample(sampler, out, &prime, 1, n, temperature, top_k, seed) == 0) {
        printf("---- sample ----\n");
        for (int i = 0; i < n; i++) putchar(vocab[out[i]]);
        printf("\n----------------\n");
    }
    free(out);
}

typedef struct {
    const char* out_dir;
    char previous[2][64];   // the two newest checkpoint names this run wrote; older ones are removed
} CkptKeeper;

static int save_checkpoint(CkptKeeper* keeper, Checkpoint* k) {
    char name[64], path[4096], latest[4096];
    snprintf(name, sizeof(name), "ckpt_%08d.bin", k->step);
    snprintf(path, sizeof(path), "%s/%s", keeper->out_dir, name);
    snprintf(latest, sizeof(latest), "%s/latest", keeper->out_dir);
    if (checkpoint_save(k, path)) return -1;
    if (write_atomically(latest, latest_write_fn, name)) return -1;
    if (keeper->previous[1][0] && strcmp(keeper->previous[1], name) != 0) {
        snprintf(path, sizeof(path), "%s/%s", keeper->out_dir, keeper->previous[1]);
        unlink(path);
    }
    memcpy(keeper->previous[1], keeper->previous[0], sizeof(keeper->previous[0]));
    snprintf(keeper->previous[0], sizeof(keeper->previous[0]), "%s", name);
    return 0;
}

#define TRY(x) do { if ((x) != 0) goto error; } while (0)

int train_main(int argc, char** argv, const Backend* be) {
    TrainArgs a = {
        "data/tinyshakespeare/train.bin", "data/tinyshakespeare/val.bin", "out", "", "lstm", "stop",
        2, 128, 256, 32, 64, 2000, 200, 500, 0,
        0, 0, 1, 200, 0,
        2e-3f, 0.01f, 1.0f, 1.0f, 0.0f, 1.0f,
        1337,
    };
    Flag flags[] = {
        { 'i', 's', &a.train_path, "train token file", 0 },
        { 'j', 's', &a.val_path, "val token file ('' = none)", 0 },
        { 'o', 's', &a.out_dir, "output directory (log.jsonl, checkpoints)", 0 },
        { 'c', 's', &a.cell_name, "cell: rnn, rnn_relu, lstm, gru", 0 },
        { 'L', 'i', &a.n_layers, "layers", 0 },
        { 'E', 'i', &a.embed_size, "embedding size", 0 },
        { 'H', 'i', &a.hidden_size, "hidden size", 0 },
        { 'b', 'i', &a.B, "batch size (number of streams)", 0 },
        { 't', 'i', &a.T, "BPTT length", 0 },
        { 'n', 'i', &a.max_steps, "max steps (total, counting resumed ones)", 0 },
        { 'l', 'f', &a.lr, "learning rate (AdamW, betas 0.9 0.999, eps 1e-8)", 0 },
        { 'w', 'f', &a.weight_decay, "weight decay (all parameters)", 0 },
        { 'g', 'f', &a.grad_clip, "global grad-norm clip (0 = off)", 0 },
        { 'u', 'i', &a.warmup, "linear warmup steps", 0 },
        { 'q', 'f', &a.final_lr_frac, "cosine decay to this fraction of -l (1 = constant)", 0 },
        { 'p', 'f', &a.dropout, "dropout between layers and before the head", 0 },
        { 'C', 'i', &a.carry, "carry hidden state across batches (0 = independent windows)", 0 },
        { 'v', 'i', &a.eval_every, "eval every N steps over the whole val split (0 = end only)", 0 },
        { 's', 'i', &a.sample_every, "sample every N steps (0 = end only)", 0 },
        { 'm', 'i', &a.sample_len, "sample length in characters", 0 },
        { 'e', 'f', &a.temperature, "sample temperature", 0 },
        { 'K', 'i', &a.top_k, "sample top-k (0 = all)", 0 },
        { 'k', 'i', &a.ckpt_every, "checkpoint every N steps (0 = end only)", 0 },
        { 'r', 's', &a.resume, "resume from a checkpoint file, or 'latest' in -o", 0 },
        { 'N', 's', &a.nonfinite, "on a NaN/Inf loss or gradient: stop or skip the step", 0 },
        { 'S', 'l', &a.seed, "seed", 0 },
        { 'P', 'i', &a.threads, "threads (0 = all cores)", 0 },
    };
    int n_flags = sizeof(flags) / sizeof(flags[0]);
    int status = parse_flags(flags, n_flags, argc, argv);
    if (status) { if (status < 0) fprintf(stderr, "error: %s\n", pyrnn_last_error()); return status < 0 ? 2 : 0; }
    if (check_args(&a)) { fprintf(stderr, "error: %s\n", pyrnn_last_error()); return 2; }

    TokenFile train = { 0 }, val = { 0 };
    Checkpoint ck = { 0 };
    void* run = NULL;
    Model* sampler = NULL;
    FILE* log = NULL;
    float *params = NULL, *m = NULL, *v = NULL, *h = NULL, *c = NULL;
    int *inputs = NULL, *targets = NULL;
    int exit_code = 1, have_val = a.val_path[0] != 0;
    char path[4096];
    if (a.threads > 0) omp_set_num_threads(a.threads);

    // one block for the run: every `goto error` leaves the scope of what it declares (C++ compiles
    // this file too, and forbids jumping over an initialisation)
    {
        TRY(tokens_load(&train, a.train_path));
        if (have_val) {
            TRY(tokens_load(&val, a.val_path));
            if (val.vocab_size != train.vocab_size || memcmp(val.vocab, train.vocab, 256) != 0)
                { fail("%s and %s have different vocabularies", a.train_path, a.val_path); goto error; }
        }
        Config cfg = { cell_from_name(a.cell_name), train.vocab_size, a.embed_size, a.hidden_size, a.n_layers };
        int start_step = 0;
        if (a.resume[0]) {
            const char* ck_path = a.resume;
            if (strcmp(a.resume, "latest") == 0) { TRY(resolve_latest(path, sizeof(path), a.out_dir)); ck_path = path; }
            TRY(checkpoint_load(&ck, ck_path));
            Config k = ck.config;
            // flags given explicitly must agree with the checkpoint; the rest come from it
            if ((given(flags, n_flags, 'c') && k.cell != cfg.cell) || (given(flags, n_flags, 'L') && k.n_layers != cfg.n_layers) ||
                (given(flags, n_flags, 'E') && k.embed_size != cfg.embed_size) || (given(flags, n_flags, 'H') && k.hidden_size != cfg.hidden_size)) {
                fail("%s holds a %s model with L=%d E=%d H=%d, which does not match the flags given", ck_path,
                     cell_names[k.cell], k.n_layers, k.embed_size, k.hidden_size);
                goto error;
            }
            if (k.vocab_size != train.vocab_size || memcmp(ck.vocab, train.vocab, 256) != 0) {
                fail("%s was trained on a vocabulary of %d symbols that differs from %s (%d)", ck_path, k.vocab_size,
                     a.train_path, train.vocab_size);
                goto error;
            }
            if (ck.B > 0 && (ck.B != a.B || ck.T != a.T)) {
                if (given(flags, n_flags, 'b') || given(flags, n_flags, 't')) {
                    fail("%s was trained with -b %d -t %d; resuming needs the same stream layout", ck_path, ck.B, ck.T);
                    goto error;
                }
                a.B = ck.B; a.T = ck.T;
            }
            // so does the carried-state mode, which decides what the data position means
            if (ck.B > 0 && ck.carry != a.carry) {
                if (given(flags, n_flags, 'C')) {
                    fail("%s was trained with -C %d; resuming needs the same -C", ck_path, ck.carry);
                    goto error;
                }
                a.carry = ck.carry;
            }
            TRY(check_args(&a));   // what came from the file obeys the same limits as flags
            cfg = k;
            start_step = ck.step;
            printf("resuming from %s at step %d\n", ck_path, ck.step);
        }

        DataLoader loader;
        TRY(loader_init(&loader, &train, a.B, a.T, "train"));
        if (have_val) { DataLoader probe; TRY(loader_init(&probe, &val, a.B, a.T, "val")); }
        TRY(make_dirs(a.out_dir));
        snprintf(path, sizeof(path), "%s/log.jsonl", a.out_dir);
        log = fopen(path, a.resume[0] ? "a" : "w");
        if (!log) { fail("-o %s: cannot write %s: %s", a.out_dir, path, strerror(errno)); goto error; }

        size_t P = model_num_params(cfg), lbh = (size_t)cfg.n_layers * a.B * cfg.hidden_size, bt = (size_t)a.B * a.T;
        params = (float*)alloc_floats(P); m = (float*)alloc_floats(P); v = (float*)alloc_floats(P);
        h = (float*)alloc_floats(lbh); c = (float*)alloc_floats(lbh);
        inputs = (int*)malloc(bt * sizeof(int)); targets = (int*)malloc(bt * sizeof(int));
        sampler = model_new(cfg);
        if (!params || !m || !v || !h || !c || !inputs || !targets || !sampler) { fail("out of memory"); goto error; }
        run = be->create(cfg, a.B, a.T, a.dropout);
        if (!run) goto error;
        if (a.resume[0]) {
            TRY(be->set_params(run, ck.params, ck.m, ck.v, ck.adam_t, ck.rng));
            if (ck.B == a.B && ck.T == a.T) {   // same stream layout: continue where it stopped
                TRY(be->set_state(run, a.carry ? ck.h : NULL, a.carry ? ck.c : NULL));
                loader.pos = (long)(ck.data_pos % loader.n_batches);
            } else {                            // saved without a layout (B = 0): start of the data
                TRY(be->set_state(run, NULL, NULL));
            }
        } else {
            // one init for every backend: the host model draws the weights from the seed
            model_init(sampler, (uint64_t)a.seed);
            TRY(be->set_params(run, sampler->params, NULL, NULL, 0, sampler->rng));
            TRY(be->set_state(run, NULL, NULL));
        }

        printf("pyrnn %s | %s L=%d E=%d H=%d V=%d | %.2fM params | B=%d T=%d | lr %g wd %g clip %g | threads %d\n",
               be->name, cell_names[cfg.cell], cfg.n_layers, cfg.embed_size, cfg.hidden_size, cfg.vocab_size, P / 1e6,
               a.B, a.T, a.lr, a.weight_decay, a.grad_clip, omp_get_max_threads());
        printf("train %zu tokens (%ld batches per pass), val %zu tokens\n", train.n_tokens, loader.n_batches, val.n_tokens);

        CkptKeeper keeper;
        memset(&keeper, 0, sizeof(keeper));
        keeper.out_dir = a.out_dir;
        StepParams sp = { a.lr, 0.9f, 0.999f, 1e-8f, a.weight_decay, a.grad_clip };
        int skip = strcmp(a.nonfinite, "skip") == 0;
        float val_loss = NAN;
        for (int step = start_step; step < a.max_steps; step++) {
            sp.lr = lr_at(&a, step);
            int wrapped = loader_next(&loader, inputs, targets);
            if (!a.carry || wrapped) TRY(be->set_state(run, NULL, NULL));   // a new pass does not continue the last one
            float loss = 0.0f, norm = 0.0f;
            double t0 = now_ms();
            TRY(be->train_step(run, &loss, &norm, inputs, targets, &sp));
            double ms = now_ms() - t0;
            if (!isfinite(loss) || !isfinite(norm)) {
                if (!skip) {
                    fail("step %d: the %s is %s; stopping (the last checkpoint in %s is intact; -N skip skips such steps)",
                         step + 1, isfinite(loss) ? "gradient norm" : "loss", isnan(isfinite(loss) ? norm : loss) ? "NaN" : "Inf",
                         a.out_dir);
                    goto error;
                }
                // the end-of-step work below (eval, sample, checkpoint) still happens on schedule
                printf("step %d: non-finite %s, update skipped and state reset\n", step + 1, isfinite(loss) ? "gradient" : "loss");
                TRY(be->set_state(run, NULL, NULL));
            } else {
                printf("step %5d/%d | loss %.4f | norm %.3f | lr %.2e | %.1f ms | %.0f tok/s\n", step + 1, a.max_steps,
                       loss, norm, sp.lr, ms, bt / (ms / 1e3));
                fprintf(log, "{\"step\": %d, \"train_loss\": %.6f, \"grad_norm\": %.6f, \"lr\": %.6g, \"ms\": %.3f, "
                        "\"tok_s\": %.1f}\n", step + 1, loss, norm, sp.lr, ms, bt / (ms / 1e3));
            }
            int last = step + 1 == a.max_steps;
            if (have_val && ((a.eval_every && (step + 1) % a.eval_every == 0) || last)) {
                TRY(evaluate(&val_loss, be, run, &val, a.B, a.T, inputs, targets, h, c, lbh));
                printf("step %5d | val loss %.4f\n", step + 1, val_loss);
                fprintf(log, "{\"step\": %d, \"val_loss\": %.6f}\n", step + 1, val_loss);
            }
            fflush(log);
            if ((a.sample_every && (step + 1) % a.sample_every == 0) || last) {
                TRY(be->get_params(run, params, NULL, NULL, NULL, NULL));
                print_sample(sampler, params, train.vocab, a.sample_len, a.temperature, a.top_k, (uint64_t)a.seed + step);
            }
            if ((a.ckpt_every && (step + 1) % a.ckpt_every == 0) || last) {
                Checkpoint k;
                memset(&k, 0, sizeof(k));
                TRY(be->get_params(run, params, m, v, &k.adam_t, &k.rng));
                if (!isfinite(sum_squares(params, P) + sum_squares(m, P) + sum_squares(v, P))) {
                    // a finite loss and gradient can still overflow the update (e.g. a huge -l): never save that
                    fail("step %d: the parameters or AdamW state overflowed in the update; stopping without saving "
                         "(the last checkpoint in %s is intact; try a smaller -l)", step + 1, a.out_dir);
                    goto error;
                }
                TRY(be->get_state(run, h, c));
                k.config = cfg; k.B = a.B; k.T = a.T; k.step = step + 1; k.carry = a.carry;
                memcpy(k.vocab, train.vocab, 256);
                k.params = params; k.m = m; k.v = v; k.h = h; k.c = c;
                k.data_pos = loader.pos;
                TRY(save_checkpoint(&keeper, &k));
                printf("saved %s/%s\n", a.out_dir, keeper.previous[0]);
            }
        }
        if (start_step >= a.max_steps) printf("checkpoint is at step %d, -n is %d: nothing to train\n", start_step, a.max_steps);
        if (isfinite(val_loss)) printf("final val loss %.4f\n", val_loss);
        exit_code = 0;
    }
    goto done;
error:
    fprintf(stderr, "error: %s\n", pyrnn_last_error());
done:
    if (run) be->destroy(run);
    if (log) fclose(log);
    model_free(sampler);
    free(params); free(m); free(v); free(h); free(c); free(inputs); free(targets);
    tokens_free(&train); tokens_free(&val); checkpoint_free(&ck);
    return exit_code;
}

#ifndef PYRNN_NO_MAIN
int main(int argc, char** argv) { return train_main(argc, argv, &cpu_backend); }
#endif
