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

void pyrnn_set_num_threads(int n) { if (n > 0) omp_set_num_threads(n); }
int pyrnn_get_num_threads(void) { return omp_get_max_threads(); }

// ----------------------------------------------------------------------------
// matmul: C (M x N) (+)= op(A) (M x K) * op(B) (K x N), both operands addressed by row and
// column strides, so one routine serves x W^T (forward), dY W (input grads) and dY^T X (weight
// grads). op(B) is first packed into NR-wide column panels; A is packed per KC x MC block into
// MR-row panels; an MR x NR register-tile kernel does the arithmetic.

#define MR 8
#define NR 32
#define KC 256
#define MC 128
typedef float vec16 __attribute__((vector_size(64)));

static float* matmul_scratch_a = NULL;   // MC x KC packed A block
static float* matmul_scratch_b = NULL;   // packed B for one-off products
static size_t matmul_scratch_b_size = 0;

static size_t packed_b_size(int K, int N) { return (size_t)K * (size_t)((N + NR - 1) / NR) * NR; }

// room for packing any one-off op(B) of at most max_k x max_n; grows only, so steady state never allocates
static int matmul_reserve(size_t max_k, size_t max_n) {
    size_t b_floats = packed_b_size((int)max_k, (int)max_n);
    if (!matmul_scratch_a) {
        matmul_scratch_a = (float*)alloc_floats((size_t)MC * KC);
        if (!matmul_scratch_a) return fail("out of memory for the matmul scratch");
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
    #pragma omp parallel
    pack_b_team(bp, b, K, N, rs, cs);
}

// the MR x NR register tile: acc += ap (kc x MR) * bp (kc x NR), then C (+)= acc
static void matmul_kernel(float* c, long ldc, const float* ap, const float* bp, int kc,
                          int mr, int nr, int accumulate) {
    vec16 acc[MR][2];
    memset(acc, 0, sizeof(acc));
    for (int k = 0; k < kc; k++) {
        vec16 b0 = *(const vec16*)(bp + (size_t)k * NR);
        vec16 b1 = *(const vec16*)(bp + (size_t)k * NR + 16);
        const float* a = ap + (size_t)k * MR;
        for (int i = 0; i < MR; i++) { acc[i][0] += a[i] * b0; acc[i][1] += a[i] * b1; }
    }
    for (int i = 0; i < mr; i++) {
        float* ci = c + (long)i * ldc;
        const float* ai = (const float*)acc[i];
        if (accumulate) { for (int j = 0; j < nr; j++) ci[j] += ai[j]; }
        else { for (int j = 0; j < nr; j++) ci[j] = ai[j]; }
    }
}

// C (M x N, row stride ldc) (+)= op(A) * packed op(B); must be called by every thread of a team
static void matmul_packed_team(float* c, long ldc, const float* a, long a_rs, long a_cs,
                               const float* bp, int M, int N, int K, int accumulate) {
    int n_panels = (N + NR - 1) / NR;
    for (int k0 = 0; k0 < K; k0 += KC) {
        int kc = K - k0 < KC ? K - k0 : KC;
        int acc = accumulate || k0 > 0;
        const float* bblock = bp + (size_t)k0 * n_panels * NR;
        for (int m0 = 0; m0 < M; m0 += MC) {
            int mc = M - m0 < MC ? M - m0 : MC;
            int m_panels = (mc + MR - 1) / MR;
            #pragma omp for schedule(static)
            for (int ip = 0; ip < m_panels; ip++) {
                float* dst = matmul_scratch_a + (size_t)ip * MR * kc;
                int mr = mc - ip * MR < MR ? mc - ip * MR : MR;
                const float* src = a + (long)(m0 + ip * MR) * a_rs + (long)k0 * a_cs;
                for (int k = 0; k < kc; k++) {
                    for (int i = 0; i < mr; i++) dst[k * MR + i] = src[(long)i * a_rs + (long)k * a_cs];
                    for (int i = mr; i < MR; i++) dst[k * MR + i] = 0.0f;
                }
            }
            #pragma omp for collapse(2) schedule(static)
            for (int jp = 0; jp < n_panels; jp++) {
                for (int ip = 0; ip < m_panels; ip++) {
                    int mr = mc - ip * MR < MR ? mc - ip * MR : MR;
                    int nr = N - jp * NR < NR ? N - jp * NR : NR;
                    matmul_kernel(c + (long)(m0 + ip * MR) * ldc + jp * NR, ldc,
                                  matmul_scratch_a + (size_t)ip * MR * kc,
                                  bblock + (size_t)jp * kc * NR, kc, mr, nr, acc);
                }
            }
        }
    }
}

// one-off product: packs op(B) into the shared scratch first
static void matmul(float* c, const float* a, long a_rs, long a_cs, const float* b, long b_rs, long b_cs,
                   int M, int N, int K, int accumulate) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { if (!accumulate) for (int i = 0; i < M; i++) memset(c + (long)i * N, 0, N * sizeof(float)); return; }
    #pragma omp parallel
    {
        pack_b_team(matmul_scratch_b, b, K, N, b_rs, b_cs);
        matmul_packed_team(c, N, a, a_rs, a_cs, matmul_scratch_b, M, N, K, accumulate);
    }
}

// out[j] += sum over rows of x (rows x cols)
static void colsum_accumulate(float* out, const float* x, long rows, int cols) {
    #pragma omp parallel for schedule(static)
    for (int j = 0; j < cols; j++) {
        float s = 0.0f;
        for (long r = 0; r < rows; r++) s += x[r * cols + j];
        out[j] += s;
    }
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
// embedding: x[t*B + b] = table[inputs[b*T + t]] (tokens arrive batch-major, the stack runs time-major)

static void embedding_forward(float* x, const float* table, const int* inputs, int B, int T, int E) {
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++)
        for (int b = 0; b < B; b++)
            memcpy(x + ((size_t)t * B + b) * E, table + (size_t)inputs[(size_t)b * T + t] * E, E * sizeof(float));
}

static void embedding_backward(float* dtable, const float* dx, const int* inputs, int B, int T, int E) {
    // serial over tokens: two rows may share a token
    for (int t = 0; t < T; t++)
        for (int b = 0; b < B; b++) {
            float* row = dtable + (size_t)inputs[(size_t)b * T + t] * E;
            const float* d = dx + ((size_t)t * B + b) * E;
            for (int e = 0; e < E; e++) row[e] += d[e];
        }
}

// ----------------------------------------------------------------------------
// recurrent cells, one time step, fused over the gates. On entry gx holds W_ih x_t (no bias) and
// gh holds W_hh h_{t-1} (no bias). Forward writes h_t (and c_t) and keeps what backward needs.

enum { CELL_RNN = 0, CELL_RNN_RELU = 1, CELL_LSTM = 2, CELL_GRU = 3 };
static const char* cell_names[] = { "rnn", "rnn_relu", "lstm", "gru" };
static int cell_gates(int cell) { return cell == CELL_LSTM ? 4 : cell == CELL_GRU ? 3 : 1; }

static inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

static void rnn_cell_forward(float* h, const float* gx, const float* gh, const float* b_ih,
                             const float* b_hh, int relu, int B, int H) {
    #pragma omp for schedule(static)
    for (int b = 0; b < B; b++)
        for (int j = 0; j < H; j++) {
            size_t k = (size_t)b * H + j;
            float pre = gx[k] + b_ih[j] + gh[k] + b_hh[j];
            h[k] = relu ? (pre > 0.0f ? pre : 0.0f) : tanhf(pre);
        }
}

static void rnn_cell_backward(float* dgates, float* dh, const float* h, int relu, int B, int H) {
    // dh: in, dL/dh_t; out, the part of dL/dh_{t-1} that bypasses W_hh (none for this cell)
    #pragma omp for schedule(static)
    for (int b = 0; b < B; b++)
        for (int j = 0; j < H; j++) {
            size_t k = (size_t)b * H + j;
            dgates[k] = relu ? (h[k] > 0.0f ? dh[k] : 0.0f) : dh[k] * (1.0f - h[k] * h[k]);
            dh[k] = 0.0f;
        }
}

// gates: in, W_ih x_t; out, activated i, f, g, o
static void lstm_cell_forward(float* h, float* c, float* gates, const float* gh, const float* c_prev,
                              const float* b_ih, const float* b_hh, int B, int H) {
    #pragma omp for schedule(static)
    for (int b = 0; b < B; b++) {
        float* g = gates + (size_t)b * 4 * H;
        const float* r = gh + (size_t)b * 4 * H;
        for (int j = 0; j < H; j++) {
            float i_ = sigmoidf(g[j] + b_ih[j] + r[j] + b_hh[j]);
            float f_ = sigmoidf(g[H + j] + b_ih[H + j] + r[H + j] + b_hh[H + j]);
            float g_ = tanhf(g[2 * H + j] + b_ih[2 * H + j] + r[2 * H + j] + b_hh[2 * H + j]);
            float o_ = sigmoidf(g[3 * H + j] + b_ih[3 * H + j] + r[3 * H + j] + b_hh[3 * H + j]);
            size_t k = (size_t)b * H + j;
            float ct = f_ * c_prev[k] + i_ * g_;
            c[k] = ct;
            h[k] = o_ * tanhf(ct);
            g[j] = i_; g[H + j] = f_; g[2 * H + j] = g_; g[3 * H + j] = o_;
        }
    }
}

static void lstm_cell_backward(float* dgates, float* dh, float* dc, const float* gates, const float* c,
                               const float* c_prev, int B, int H) {
    // dc: in, dL/dc_t from step t+1; out, dL/dc_{t-1}
    #pragma omp for schedule(static)
    for (int b = 0; b < B; b++) {
        const float* g = gates + (size_t)b * 4 * H;
        float* dg = dgates + (size_t)b * 4 * H;
        for (int j = 0; j < H; j++) {
            size_t k = (size_t)b * H + j;
            float i_ = g[j], f_ = g[H + j], g_ = g[2 * H + j], o_ = g[3 * H + j];
            float tc = tanhf(c[k]);
            float dct = dc[k] + dh[k] * o_ * (1.0f - tc * tc);
            dg[j] = dct * g_ * i_ * (1.0f - i_);
            dg[H + j] = dct * c_prev[k] * f_ * (1.0f - f_);
            dg[2 * H + j] = dct * i_ * (1.0f - g_ * g_);
            dg[3 * H + j] = dh[k] * tc * o_ * (1.0f - o_);
            dc[k] = dct * f_;
            dh[k] = 0.0f;
        }
    }
}

// gates: in, W_ih x_t; out, activated r, z, n. hn keeps W_hn h_{t-1} + b_hn, which r multiplies.
static void gru_cell_forward(float* h, float* gates, float* hn, const float* gh, const float* h_prev,
                             const float* b_ih, const float* b_hh, int B, int H) {
    #pragma omp for schedule(static)
    for (int b = 0; b < B; b++) {
        float* g = gates + (size_t)b * 3 * H;
        const float* r = gh + (size_t)b * 3 * H;
        for (int j = 0; j < H; j++) {
            size_t k = (size_t)b * H + j;
            float r_ = sigmoidf(g[j] + b_ih[j] + r[j] + b_hh[j]);
            float z_ = sigmoidf(g[H + j] + b_ih[H + j] + r[H + j] + b_hh[H + j]);
            float hn_ = r[2 * H + j] + b_hh[2 * H + j];
            float n_ = tanhf(g[2 * H + j] + b_ih[2 * H + j] + r_ * hn_);
            h[k] = (1.0f - z_) * n_ + z_ * h_prev[k];
            g[j] = r_; g[H + j] = z_; g[2 * H + j] = n_;
            hn[k] = hn_;
        }
    }
}

static void gru_cell_backward(float* dgates, float* dgates_h, float* dh, const float* gates,
                              const float* hn, const float* h_prev, int B, int H) {
    // dgates_h differs from dgates only in the n block: r scales W_hn h + b_hn
    #pragma omp for schedule(static)
    for (int b = 0; b < B; b++) {
        const float* g = gates + (size_t)b * 3 * H;
        float* dg = dgates + (size_t)b * 3 * H;
        float* dgh = dgates_h + (size_t)b * 3 * H;
        for (int j = 0; j < H; j++) {
            size_t k = (size_t)b * H + j;
            float r_ = g[j], z_ = g[H + j], n_ = g[2 * H + j];
            float d = dh[k];
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

static void stack_free(Stack* s) {
    float*** tables[] = { &s->w_ih, &s->w_hh, &s->b_ih, &s->b_hh, &s->dw_ih, &s->dw_hh, &s->db_ih, &s->db_hh,
                          &s->h, &s->c, &s->gates, &s->hn, &s->xin, &s->mask };
    for (size_t i = 0; i < sizeof(tables) / sizeof(tables[0]); i++) { free(*tables[i]); *tables[i] = NULL; }
    free(s->zero_bias); free(s->zero_bias_grad); free(s->acts_memory); free(s->w_packed);
    s->zero_bias = s->zero_bias_grad = s->acts_memory = s->w_packed = NULL;
}

// (re)lays out the activation buffer for B x T; allocates only when the shape grows
static int stack_reserve(Stack* s, int B, int T) {
    if (B <= 0 || T <= 0) return fail("batch size and sequence length must be positive, got B=%d T=%d", B, T);
    int L = s->n_layers, H = s->hidden_size, In = s->input_size, G = cell_gates(s->cell);
    size_t GH = (size_t)G * H, bt = (size_t)B * T, bh = (size_t)B * H;
    int lstm = s->cell == CELL_LSTM, gru = s->cell == CELL_GRU;
    size_t widest = GH > (size_t)In ? GH : (size_t)In;   // G*H >= H
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
        bt * (In > H ? In : H),                   // dy
        bh, bh,                                   // dh, dc
    };
    enum { N_PARTS = sizeof(sizes) / sizeof(sizes[0]) };
    size_t total = 0;
    for (int i = 0; i < N_PARTS; i++) total += (sizes[i] + 15) / 16 * 16;
    if (bt > s->max_bt || (size_t)B > s->max_b || !s->acts_memory) {
        free(s->acts_memory);
        s->acts_memory = (float*)alloc_floats(total);
        if (!s->acts_memory) return fail("out of memory for activations (B=%d T=%d)", B, T);
        s->max_bt = bt; s->max_b = B;
        free(s->w_packed);
        s->w_packed = (float*)alloc_floats(packed_b_size((int)GH, (int)GH));
        if (!s->w_packed) return fail("out of memory for packed weights");
        if (matmul_reserve(bt > widest ? bt : widest, widest)) return -1;
    }
    s->B = B; s->T = T;
    float* parts[N_PARTS];
    float* p = s->acts_memory;
    for (int i = 0; i < N_PARTS; i++) { parts[i] = p; p += (sizes[i] + 15) / 16 * 16; }
    float *h = parts[0], *c = parts[1], *gates = parts[2], *hn = parts[3], *xin = parts[4], *mask = parts[5];
    s->gh = parts[6]; s->dgates = parts[7]; s->dgates_h = parts[8]; s->dy = parts[9]; s->dh = parts[10]; s->dc = parts[11];
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

static void layer_forward(Stack* s, int l) {
    int B = s->B, T = s->T, H = s->hidden_size, GH = cell_gates(s->cell) * H;
    int in = l == 0 ? s->input_size : H;
    size_t bh = (size_t)B * H;
    float* h = s->h[l];
    float* gates = s->gates[l];
    // all T input projections in one GEMM; only the recurrent one is sequential
    matmul(gates, s->xin[l], in, 1, s->w_ih[l], 1, in, B * T, GH, in, 0);
    pack_b(s->w_packed, s->w_hh[l], H, GH, 1, H);
    #pragma omp parallel
    for (int t = 0; t < T; t++) {
        float* gx = gates + (size_t)t * B * GH;
        matmul_packed_team(s->gh, GH, h + t * bh, H, 1, s->w_packed, B, GH, H, 0);
        switch (s->cell) {
        case CELL_RNN: case CELL_RNN_RELU:
            rnn_cell_forward(h + (t + 1) * bh, gx, s->gh, s->b_ih[l], s->b_hh[l], s->cell == CELL_RNN_RELU, B, H); break;
        case CELL_LSTM:
            lstm_cell_forward(h + (t + 1) * bh, s->c[l] + (t + 1) * bh, gx, s->gh, s->c[l] + t * bh,
                              s->b_ih[l], s->b_hh[l], B, H); break;
        case CELL_GRU:
            gru_cell_forward(h + (t + 1) * bh, gx, s->hn[l] + t * bh, s->gh, h + t * bh,
                             s->b_ih[l], s->b_hh[l], B, H); break;
        }
    }
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
    #pragma omp parallel
    for (int t = T - 1; t >= 0; t--) {
        // dh <- dL/dh_t: what came through the recurrence plus what the layer above sent
        const float* dy_t = s->dy + t * bh;
        #pragma omp for schedule(static)
        for (size_t k = 0; k < bh; k++) dh[k] += dy_t[k];
        float* dg = s->dgates + (size_t)t * B * GH;
        float* dgh = s->dgates_h + (size_t)t * B * GH;
        const float* g = s->gates[l] + (size_t)t * B * GH;
        switch (s->cell) {
        case CELL_RNN: case CELL_RNN_RELU:
            rnn_cell_backward(dg, dh, h + (t + 1) * bh, s->cell == CELL_RNN_RELU, B, H); break;
        case CELL_LSTM:
            lstm_cell_backward(dg, dh, dc, g, s->c[l] + (t + 1) * bh, s->c[l] + t * bh, B, H); break;
        case CELL_GRU:
            gru_cell_backward(dg, dgh, dh, g, s->hn[l] + t * bh, h + t * bh, B, H); break;
        }
        matmul_packed_team(dh, H, dgh, GH, 1, s->w_packed, B, H, GH, 1);
    }
    // weight gradients for all T steps at once
    matmul(s->dw_hh[l], s->dgates_h, 1, GH, h, H, 1, GH, H, (int)bt, 1);
    matmul(s->dw_ih[l], s->dgates, 1, GH, s->xin[l], in, 1, GH, in, (int)bt, 1);
    if (s->has_bias) {
        colsum_accumulate(s->db_ih[l], s->dgates, bt, GH);
        colsum_accumulate(s->db_hh[l], s->dgates_h, bt, GH);
    }
    matmul(dxin, s->dgates, GH, 1, s->w_ih[l], in, 1, (int)bt, in, GH, 0);
    if (dh0) memcpy(dh0, dh, bh * sizeof(float));
    if (dc0 && s->cell == CELL_LSTM) memcpy(dc0, dc, bh * sizeof(float));
}

// x: (T, B, input_size), taken as layer 0's input by pointer (must stay alive until backward)
static int stack_forward_acts(Stack* s, const float* x, const float* h0, const float* c0, int B, int T) {
    if (stack_reserve(s, B, T)) return -1;
    int L = s->n_layers, H = s->hidden_size;
    size_t bh = (size_t)B * H, bt = (size_t)B * T;
    s->xin[0] = (float*)x;
    for (int l = 0; l < L; l++) {
        if (h0) memcpy(s->h[l], h0 + l * bh, bh * sizeof(float)); else memset(s->h[l], 0, bh * sizeof(float));
        if (s->cell == CELL_LSTM) {
            if (c0) memcpy(s->c[l], c0 + l * bh, bh * sizeof(float)); else memset(s->c[l], 0, bh * sizeof(float));
        }
        if (l > 0 && s->training && s->dropout > 0.0f)
            dropout_forward(s->xin[l], s->mask[l - 1], s->h[l - 1] + bh, bt * H, s->dropout, s->rng);
        layer_forward(s, l);
    }
    return 0;
}

// dy must hold dL/d(top output); dx may be NULL only when the caller does not need it
static void stack_backward_acts(Stack* s, float* dx, float* dh0, float* dc0, const float* dh_n, const float* dc_n) {
    int L = s->n_layers, H = s->hidden_size;
    size_t bh = (size_t)s->B * H, bt = (size_t)s->B * s->T;
    for (int l = L - 1; l >= 0; l--) {
        float* dxin = l > 0 ? s->dy : dx;   // dy is dead once layer l has used it
        layer_backward(s, l, dxin, dh0 ? dh0 + l * bh : NULL, dc0 ? dc0 + l * bh : NULL,
                       dh_n ? dh_n + l * bh : NULL, dc_n ? dc_n + l * bh : NULL);
        if (l > 0 && s->training && s->dropout > 0.0f) dropout_backward(s->dy, s->mask[l - 1], bt * H);
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
    if (B <= 0 || T <= 0) return fail("batch size and sequence length must be positive, got B=%d T=%d", B, T);
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

void layer_zero_grad(Layer* m) { memset(m->grads, 0, m->num_params * sizeof(float)); }

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
    int B, T, max_bt, max_b;
    float* acts_memory;
    int* inputs;         // (B, T) copy of the last batch
    int* targets;        // (T, B) time-major copy, or NULL when no targets were given
    float *x, *dx, *head_in, *head_mask, *logits, *lse, *h_n, *c_n, *dh0, *dc0;
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

static int model_reserve(Model* m, int B, int T) {
    if (B <= 0 || T <= 0) return fail("batch size and sequence length must be positive, got B=%d T=%d", B, T);
    size_t bt = (size_t)B * T, V = m->config.vocab_size, E = m->config.embed_size, H = m->config.hidden_size;
    size_t lbh = (size_t)m->config.n_layers * B * H;
    if ((int)bt > m->max_bt || B > m->max_b || !m->acts_memory) {
        free(m->acts_memory); free(m->inputs); free(m->targets);
        size_t total = 2 * bt * E + 2 * bt * H + bt * V + bt + 4 * lbh;
        m->acts_memory = (float*)alloc_floats(total);
        m->inputs = (int*)malloc(bt * sizeof(int));
        m->targets = (int*)malloc(bt * sizeof(int));
        if (!m->acts_memory || !m->inputs || !m->targets) return fail("out of memory for activations (B=%d T=%d)", B, T);
        m->max_bt = (int)bt; m->max_b = B;
    }
    size_t widest = V > H ? V : H;
    if (matmul_reserve(bt > widest ? bt : widest, widest)) return -1;
    float* p = m->acts_memory;
    m->x = p; p += bt * E;
    m->dx = p; p += bt * E;
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
    memcpy(m->inputs, inputs, bt * sizeof(int));
    m->has_targets = targets != NULL;
    if (targets)
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++) m->targets[(size_t)t * B + b] = targets[(size_t)b * T + t];
    embedding_forward(m->x, m->emb, inputs, B, T, m->config.embed_size);
    if (stack_forward_acts(&m->rnn, m->x, h0, c0, B, T)) return -1;
    const float* top = m->rnn.h[m->config.n_layers - 1] + (size_t)B * H;
    if (m->rnn.training && m->dropout > 0.0f) dropout_forward(m->head_in, m->head_mask, top, bt * H, m->dropout, &m->rng);
    else memcpy(m->head_in, top, bt * H * sizeof(float));
    matmul(m->logits, m->head_in, H, 1, m->head_w, 1, H, (int)bt, V, H, 0);
    // bias, then log-sum-exp per row and the mean cross-entropy
    double loss = 0.0;
    #pragma omp parallel for schedule(static) reduction(+:loss)
    for (long r = 0; r < (long)bt; r++) {
        float* z = m->logits + (size_t)r * V;
        float mx = -FLT_MAX;
        for (int v = 0; v < V; v++) { z[v] += m->head_b[v]; mx = z[v] > mx ? z[v] : mx; }
        float sum = 0.0f;
        for (int v = 0; v < V; v++) sum += expf(z[v] - mx);
        m->lse[r] = mx + logf(sum);
        if (targets) loss += m->lse[r] - z[m->targets[r]];
    }
    m->loss = targets ? (float)(loss / (double)bt) : 0.0f;
    stack_final_states(m->h_n, m->c_n, &m->rnn);
    return 0;
}

void model_zero_grad(Model* m) { memset(m->grads, 0, m->num_params * sizeof(float)); }

// d(mean loss) = 1; overwrites the logits with their gradient
int model_backward(Model* m) {
    if (!m->B || !m->has_targets) return fail("backward needs a forward pass with targets first");
    int B = m->B, T = m->T, V = m->config.vocab_size, H = m->config.hidden_size;
    size_t bt = (size_t)B * T;
    float scale = 1.0f / (float)bt;
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < (long)bt; r++) {
        float* z = m->logits + (size_t)r * V;
        for (int v = 0; v < V; v++) z[v] = expf(z[v] - m->lse[r]) * scale;
        z[m->targets[r]] -= scale;
    }
    matmul(m->dhead_w, m->logits, 1, V, m->head_in, H, 1, V, H, (int)bt, 1);
    colsum_accumulate(m->dhead_b, m->logits, bt, V);
    matmul(m->rnn.dy, m->logits, V, 1, m->head_w, H, 1, (int)bt, H, V, 0);
    if (m->rnn.training && m->dropout > 0.0f) dropout_backward(m->rnn.dy, m->head_mask, bt * H);
    stack_backward_acts(&m->rnn, m->dx, m->dh0, m->dc0, NULL, NULL);
    embedding_backward(m->demb, m->dx, m->inputs, B, T, m->config.embed_size);
    m->has_targets = 0;   // the logits now hold gradients
    return 0;
}

// ----------------------------------------------------------------------------
// optimizer: global-norm clipping (torch clip_grad_norm_) and AdamW (torch.optim.AdamW)

float model_grad_norm(const Model* m) {
    double ss = 0.0;
    #pragma omp parallel for schedule(static) reduction(+:ss)
    for (long i = 0; i < (long)m->num_params; i++) ss += (double)m->grads[i] * m->grads[i];
    return (float)sqrt(ss);
}

// clips, then takes one AdamW step; weight decay applies to every parameter. Returns the norm before clipping.
int model_step(Model* m, float lr, float beta1, float beta2, float eps, float weight_decay, float max_grad_norm,
               float* grad_norm) {
    if (!m->m) {
        m->m = (float*)alloc_floats(m->num_params);
        m->v = (float*)alloc_floats(m->num_params);
        if (!m->m || !m->v) return fail("out of memory for AdamW state");
    }
    float norm = model_grad_norm(m);
    if (grad_norm) *grad_norm = norm;
    float clip = 1.0f;
    if (max_grad_norm > 0.0f) { clip = max_grad_norm / (norm + 1e-6f); if (clip > 1.0f) clip = 1.0f; }
    m->adam_t++;
    float bc1 = 1.0f - powf(beta1, (float)m->adam_t);
    float bc2_sqrt = sqrtf(1.0f - powf(beta2, (float)m->adam_t));
    float step_size = lr / bc1;
    float decay = 1.0f - lr * weight_decay;
    #pragma omp parallel for schedule(static)
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
    if (config_check(c)) return fail("%s: bad model config: %s", path, pyrnn_error_msg);
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
