/*
pyrnn on the GPU: the character LM of c/train_rnn.c with the recurrent stack in cuDNN and
everything else (embedding, head, dropout before the head, softmax cross-entropy, clipping, AdamW)
in a few kernels and cuBLAS calls of our own. Same model, same flat parameter layout (torch
state_dict order), same AdamW and clipping semantics; the host side (flags, data, checkpoints,
sampling, errors) is the CPU file itself, included below.

    ./train_gpu [--math fp32|tf32] [--cudnn-algo auto|standard|persist_static|persist_small_h] <CPU trainer flags>

--math fp32 (default): cuDNN FMA math and plain fp32 cuBLAS, what the compare-outputs harness
checks; tf32 lets cuDNN (CUDNN_DEFAULT_MATH) and cuBLAS use TF32 tensor cores, PyTorch's default
for fp32 RNNs. --cudnn-algo (default auto, or $PYRNN_CUDNN_ALGO): see gpu_auto_algos; the choice
and the reason for it are printed when the model is made.

Layout: our flat params on the device are the master copy (AdamW, clipping and checkpoints work
on that one buffer). cuDNN wants its own weight space, so the recurrent part is copied into it
before a forward (only when the params changed) and its gradient space is added back into our
flat grads after the backward, through a list of (flat offset, weight-space offset, count)
segments built once from cudnnGetRNNWeightParams. Activations are time-major (row t*B + b), as on
the CPU, which is cuDNN's SEQ_MAJOR layout. One stream; a training step waits once, for the loss
and the gradient norm.

Deterministic: the same inputs give the same bits, run after run (the embedding gradient is summed
in a fixed order, every reduction has a fixed shape), so a resumed run continues exactly.

Dropout (-p): cuDNN's dropout descriptor between layers, our dropout_kernel before the head. The
masks need not match the CPU's; they follow from the run's generator `rng` (in the checkpoint):
the head's mask of a step from a seed drawn from rng, and cuDNN's generator is re-seeded from rng
whenever rng enters (set_params) or leaves (get_params) the model, so a resumed run draws what
the uninterrupted one drew.

Built three ways: ./train_gpu (this file), ./test_gpu (cuda/test_rnn.cu includes this file with
PYRNN_CUDA_NO_MAIN) and lib/libpyrnn_cuda.so (-DPYRNN_CUDA_LIB, the extern "C" API at the end);
with -DUSE_MPI and NCCL, ./train_gpu_mpi averages each step over ranks (cuda/mpi_nccl.cuh).
*/
#define PYRNN_LIBRARY
#include "../c/train_rnn.c"   // the model on the host: initial weights, sampling, the harness's reference
#include "../c/driver.h"      // the Backend table, flags and the training loop
#include "mpi_nccl.cuh"   // data-parallel ranks (./train_gpu_mpi); no-ops in one process

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>

// ----------------------------------------------------------------------------
// errors: every CUDA / cuDNN / cuBLAS failure becomes a one-line message naming the call, e.g.
// "cudaMalloc: out of memory (cuda/train_rnn.cu:123)"; nothing here exits

static int gpu_fail(const char* call, const char* what, const char* file, int line) {
    int n = 0;
    while (call[n] && call[n] != '(' && n < 64) n++;   // "cudaMalloc(&p, n)" -> "cudaMalloc"
    return fail("%.*s: %s (%s:%d)", n, call, what, file, line);
}

static int gpu_fail_cudnn(const char* call, cudnnStatus_t s, const char* file, int line) {
    char detail[512];
    detail[0] = 0;
    cudnnGetLastErrorString(detail, sizeof(detail));   // often says which argument was rejected
    char what[768];
    snprintf(what, sizeof(what), "%s%s%s", cudnnGetErrorString(s), detail[0] ? ": " : "", detail);
    for (char* p = what; *p; p++) if (*p == '\n') *p = ' ';
    return gpu_fail(call, what, file, line);
}

#define CUDA_CHECK(call) do { cudaError_t e_ = (call); \
    if (e_ != cudaSuccess) return gpu_fail(#call, cudaGetErrorString(e_), __FILE__, __LINE__); } while (0)
#define CUDNN_CHECK(call) do { cudnnStatus_t s_ = (call); \
    if (s_ != CUDNN_STATUS_SUCCESS) return gpu_fail_cudnn(#call, s_, __FILE__, __LINE__); } while (0)
#define CUBLAS_CHECK(call) do { cublasStatus_t s_ = (call); \
    if (s_ != CUBLAS_STATUS_SUCCESS) return gpu_fail(#call, cublasGetStatusString(s_), __FILE__, __LINE__); } while (0)
// after a kernel launch: a bad configuration or a missing kernel image shows up here, faults at the next sync
#define LAUNCH_CHECK(kernel) do { cudaError_t e_ = cudaGetLastError(); \
    if (e_ != cudaSuccess) return gpu_fail(kernel, cudaGetErrorString(e_), __FILE__, __LINE__); } while (0)

// ----------------------------------------------------------------------------
// the driver and the device: a too-old driver, no driver and no GPU each get their own message

// "580.159.03" from /proc/driver/nvidia/version, or "" where the kernel module does not say
static void nvidia_driver_release(char* out, size_t size) {
    out[0] = 0;
    FILE* f = fopen("/proc/driver/nvidia/version", "r");
    if (!f) return;
    char line[512];
    if (fgets(line, sizeof(line), f)) {
        const char* p = strstr(line, "Kernel Module");
        if (p) {
            p += strlen("Kernel Module");
            while (*p == ' ' || *p == '\t') p++;
            size_t n = 0;
            while (p[n] && p[n] != ' ' && p[n] != '\t' && p[n] != '\n' && n + 1 < size) n++;
            snprintf(out, size, "%.*s", (int)n, p);
        }
    }
    fclose(f);
}

// the oldest driver branch that runs a CUDA major version (its x.0 release)
static const char* driver_branch_for(int cuda_major) {
    return cuda_major >= 13 ? "R580" : cuda_major == 12 ? "R525" : "R450";
}

// CUDA versions are 1000 * major + 10 * minor. Minor-version compatibility lets a driver of the
// same major run a newer minor runtime, so only the major is compared before asking for devices.
static int gpu_check_device(void) {
    int runtime = 0, driver = 0;
    CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
    CUDA_CHECK(cudaDriverGetVersion(&driver));   // 0 when no driver is installed
    int rt_major = runtime / 1000, rt_minor = runtime % 1000 / 10;
    char release[64], found[160];
    nvidia_driver_release(release, sizeof(release));
    if (release[0]) snprintf(found, sizeof(found), "driver %s, for CUDA %d.%d", release, driver / 1000, driver % 1000 / 10);
    else snprintf(found, sizeof(found), "a driver for CUDA %d.%d", driver / 1000, driver % 1000 / 10);
    if (driver == 0)
        return fail("no NVIDIA driver found (libcuda.so.1 is missing or cannot be loaded); this build uses CUDA %d.%d, "
                    "which needs driver %s or newer", rt_major, rt_minor, driver_branch_for(rt_major));
    if (driver / 1000 < rt_major)
        return fail("the NVIDIA driver is too old: found %s, this build uses CUDA %d.%d, which needs driver %s or newer; "
                    "update the driver, or rebuild with a CUDA %d toolkit (nvcc %d: make cuda_deps then installs the "
                    "-cu%d wheels)", found, rt_major, rt_minor, driver_branch_for(rt_major), driver / 1000, driver / 1000,
                    driver / 1000);
    int n_dev = 0;
    cudaError_t e = cudaGetDeviceCount(&n_dev);
    if (e == cudaErrorNoDevice || (e == cudaSuccess && n_dev < 1))
        return fail("no CUDA device found: the NVIDIA driver is installed (%s) but sees no GPU", found);
    if (e == cudaErrorInsufficientDriver)
        return fail("the NVIDIA driver is too old: found %s, this build uses CUDA %d.%d; update the driver to the "
                    "one of CUDA %d.%d or newer", found, rt_major, rt_minor, rt_major, rt_minor);
    if (e != cudaSuccess) return fail("cudaGetDeviceCount: %s (%s)", cudaGetErrorString(e), found);
    return 0;
}

// ----------------------------------------------------------------------------
// kernels

#define WARP 32
#define ROWS_PER_BLOCK 8            // softmax: one warp per row
#define REDUCE_THREADS 256          // deterministic reductions: fixed block size ...
#define NORM_BLOCKS 512             // ... and a fixed number of partial sums
#define EMB_CHUNK 32                // embedding gradient: rows summed per block, in order

static int threads_for(int n) { return n >= 256 ? 256 : ((n + WARP - 1) / WARP) * WARP; }
static unsigned blocks_for(size_t n, size_t cap) { size_t b = (n + 255) / 256; return (unsigned)(b < 1 ? 1 : b > cap ? cap : b); }

// x[(t*B + b)*E + e] = table[inputs[b*T + t]*E + e]; one block per (t, b) row
__global__ void embedding_forward_kernel(float* x, const float* table, const int* inputs, int B, int T, int E) {
    int row = blockIdx.x, t = row / B, b = row % B;
    const float* src = table + (size_t)inputs[(size_t)b * T + t] * E;
    float* dst = x + (size_t)row * E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) dst[e] = src[e];
}

// The embedding gradient in a fixed order (no atomics): the host lists the rows of each token in
// row order, cut into chunks of at most EMB_CHUNK rows (gpu_upload_tokens). Block k sums chunk k's
// rows of dx; then block j adds token j's chunk sums, in order, to its row of the table's gradient.
__global__ void embedding_chunk_sums_kernel(float* sums, const float* dx, const int* rows, const int* chunk_start, int E) {
    int k = blockIdx.x, lo = chunk_start[k], hi = chunk_start[k + 1];
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        float s = 0.0f;
        for (int i = lo; i < hi; i++) s += dx[(size_t)rows[i] * E + e];
        sums[(size_t)k * E + e] = s;
    }
}

__global__ void embedding_add_kernel(float* dtable, const float* sums, const int* token, const int* token_chunk, int E) {
    int j = blockIdx.x, lo = token_chunk[j], hi = token_chunk[j + 1];
    float* dst = dtable + (size_t)token[j] * E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        float s = 0.0f;
        for (int k = lo; k < hi; k++) s += sums[(size_t)k * E + e];
        dst[e] += s;
    }
}

// splitmix64's output function: a counter through it gives independent uniform 64-bit values
__host__ __device__ static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
#define GOLDEN 0x9E3779B97F4A7C15ull

// the next value of a splitmix64 generator
static uint64_t split_next(uint64_t* state) { *state += GOLDEN; return mix64(*state); }

// out = in * mask, mask[i] = 0 with probability p, else 1/(1-p), drawn from (seed, i) alone: the
// backward pass calls it again with the same seed on the gradient. In place is fine.
__global__ void dropout_kernel(float* out, const float* in, size_t n, float p, float scale, uint64_t seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float u = (float)(mix64(seed + (i + 1) * GOLDEN) >> 40) * (1.0f / 16777216.0f);
        out[i] = u < p ? 0.0f : in[i] * scale;
    }
}

__device__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One warp per row r = t*B + b of the logits (T*B, V): adds the head bias in place, then the
// row's cross-entropy against targets (B, T) and, if dlogits is given, d(mean loss)/d(logits)
// = (softmax - onehot) * scale, computed as on the CPU. targets may be NULL (bias only).
__global__ void softmax_xent_kernel(float* logits, float* dlogits, float* row_loss, const float* bias,
                                    const int* targets, int B, int T, int V, float scale) {
    int lane = threadIdx.x % WARP;
    long row = (long)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
    if (row >= (long)B * T) return;   // whole warps leave together: the row is per warp
    float* z = logits + row * V;
    float mx = -FLT_MAX;
    for (int v = lane; v < V; v += WARP) {
        float zv = z[v] + bias[v];
        z[v] = zv;
        mx = fmaxf(mx, zv);
    }
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int v = lane; v < V; v += WARP) sum += expf(z[v] - mx);
    sum = warp_sum(sum);
    if (!targets) return;
    float lse = mx + logf(sum);
    __syncwarp();   // z[y] below was written by another lane
    int t = (int)(row / B), b = (int)(row % B);
    int y = targets[(size_t)b * T + t];
    if (lane == 0) row_loss[row] = lse - z[y];
    if (dlogits) {
        float* d = dlogits + row * V;
        for (int v = lane; v < V; v += WARP) {
            float p = expf(z[v] - lse) * scale;
            d[v] = v == y ? p - scale : p;
        }
    }
}

// sum of v over the block, in a fixed order (same answer every run); all threads get it
__device__ double block_sum(double v, double* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) sh[threadIdx.x] += sh[threadIdx.x + k];
        __syncthreads();
    }
    double total = sh[0];
    __syncthreads();
    return total;
}

// scalars[0] = mean of row_loss[0..n); one block of REDUCE_THREADS
__global__ void loss_mean_kernel(float* scalars, const float* row_loss, long n) {
    __shared__ double sh[REDUCE_THREADS];
    double s = 0.0;
    for (long i = threadIdx.x; i < n; i += blockDim.x) s += row_loss[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) scalars[0] = (float)(s / (double)n);
}

// partials[block] = sum of g^2 over a fixed grid-stride slice; NORM_BLOCKS x REDUCE_THREADS
__global__ void sumsq_partials_kernel(double* partials, const float* g, size_t n) {
    __shared__ double sh[REDUCE_THREADS];
    double s = 0.0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        double v = g[i];
        s += v * v;
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// scalars[1] = global norm, scalars[2] = clip factor (torch clip_grad_norm_), scalars[3] = 1 if the
// norm is finite (else the update is skipped, as on the CPU); one block
__global__ void grad_norm_finalize_kernel(float* scalars, const double* partials, int n_partials, float max_norm) {
    __shared__ double sh[REDUCE_THREADS];
    double s = 0.0;
    for (int i = threadIdx.x; i < n_partials; i += blockDim.x) s += partials[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) {
        float norm = (float)sqrt(s);
        float clip = 1.0f;
        if (max_norm > 0.0f) { clip = max_norm / (norm + 1e-6f); if (clip > 1.0f) clip = 1.0f; }
        scalars[1] = norm;
        scalars[2] = clip;
        scalars[3] = isfinite(norm) ? 1.0f : 0.0f;
    }
}

// clip (factor from the device, no host round trip) + AdamW, exactly as model_step on the CPU;
// nothing at all when the norm is not finite: a NaN gradient must never reach the parameters
__global__ void adamw_kernel(float* params, float* m, float* v, const float* grads, size_t n, const float* scalars,
                             float beta1, float beta2, float eps, float decay, float step_size, float bc2_sqrt) {
    if (scalars[3] == 0.0f) return;
    float clip = scalars[2];
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float g = grads[i] * clip;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        params[i] = params[i] * decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

// one piece of the recurrent weights: n floats at flat[flat_off] <-> weight space [ws_off]
typedef struct { size_t flat_off, ws_off, n; } WeightSeg;

// blockIdx.y picks the segment; ws <- flat
__global__ void segments_to_ws_kernel(float* ws, const float* flat, const WeightSeg* segs) {
    WeightSeg s = segs[blockIdx.y];
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < s.n; i += (size_t)gridDim.x * blockDim.x)
        ws[s.ws_off + i] = flat[s.flat_off + i];
}

// flat += ws (gradients accumulate, as every backward here does)
__global__ void segments_add_kernel(float* flat, const float* ws, const WeightSeg* segs) {
    WeightSeg s = segs[blockIdx.y];
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < s.n; i += (size_t)gridDim.x * blockDim.x)
        flat[s.flat_off + i] += ws[s.ws_off + i];
}

__global__ void fill_kernel(float* x, float value, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) x[i] = value;
}

// ----------------------------------------------------------------------------
// cuDNN's RNN algorithms, by the names --cudnn-algo and $PYRNN_CUDNN_ALGO take. PERSIST_DYNAMIC is
// left out: it compiles kernels at run time through NVRTC, which the pinned wheels do not bring.

#define GPU_ALGO_AUTO -1
static const struct { const char* name; int algo; } gpu_algos[] = {
    { "standard", CUDNN_RNN_ALGO_STANDARD },
    { "persist_static", CUDNN_RNN_ALGO_PERSIST_STATIC },
    { "persist_small_h", CUDNN_RNN_ALGO_PERSIST_STATIC_SMALL_H },
};
#define N_GPU_ALGOS ((int)(sizeof(gpu_algos) / sizeof(gpu_algos[0])))

static const char* gpu_algo_name(int algo) {
    for (int i = 0; i < N_GPU_ALGOS; i++) if (gpu_algos[i].algo == algo) return gpu_algos[i].name;
    return algo == GPU_ALGO_AUTO ? "auto" : "?";
}

// "auto" or an algorithm name -> GPU_ALGO_AUTO or the cudnnRNNAlgo_t; NULL or "" is auto
static int gpu_algo_parse(int* algo, const char* name) {
    if (!name || !*name || strcmp(name, "auto") == 0) { *algo = GPU_ALGO_AUTO; return 0; }
    for (int i = 0; i < N_GPU_ALGOS; i++) if (strcmp(name, gpu_algos[i].name) == 0) { *algo = gpu_algos[i].algo; return 0; }
    return fail("unknown cuDNN RNN algorithm '%s' (expected auto, standard, persist_static or persist_small_h)", name);
}

// set when an algorithm asked for by name is one cuDNN does not run for the model (test_gpu exits 3)
int gpu_algo_refused = 0;

// What auto tries, best first; the first that cuDNN sets up and runs is kept. The rules are
// PyTorch's (aten/src/ATen/native/cudnn/RNN.cpp, get_algo): SMALL_H for non-double data when H is
// at most 128 (LSTM, GRU) or 256 (RNN) -- torch's backward-pass limits; it allows 192 / 384 in the
// forward pass, but one descriptor serves both here -- and PERSIST_STATIC for shapes torch's
// heuristics accept (H and E multiples of 128, H <= 1024, B a multiple of 8 up to 128; no GRU,
// which torch found slower; no tanh / relu RNN with B >= 96 and H >= 896), which torch takes for
// fp16 only: here the device benchmark decides whether it pays in fp32. Else STANDARD.
static int gpu_auto_algos(int* out, char* why, size_t why_size, const Config* c, int B) {
    int n = 0, H = c->hidden_size, E = c->embed_size;
    int gated = c->cell == CELL_LSTM || c->cell == CELL_GRU, h_max = gated ? 128 : 256;
    if (H <= h_max) {
        out[n++] = CUDNN_RNN_ALGO_PERSIST_STATIC_SMALL_H;
        snprintf(why, why_size, "H=%d <= %d for %s", H, h_max, cell_names[c->cell]);
    } else {
        snprintf(why, why_size, "H=%d > %d for %s", H, h_max, cell_names[c->cell]);
    }
    int rnn_large = !gated && B >= 96 && H >= 896;
    if (H % 128 == 0 && E % 128 == 0 && H <= 1024 && B % 8 == 0 && B <= 128 && c->cell != CELL_GRU && !rnn_large)
        out[n++] = CUDNN_RNN_ALGO_PERSIST_STATIC;
    out[n++] = CUDNN_RNN_ALGO_STANDARD;
    return n;
}

// ----------------------------------------------------------------------------
// the model on the device

typedef struct {
    Config config;
    int B, T, G, tf32;
    int algo;                                        // the cudnnRNNAlgo_t in use
    char about[1200];                                // device, libraries, math and algorithm, for the log
    float dropout;
    size_t num_params, n_emb, lbh;
    uint64_t rng;                                    // the run's generator (checkpointed): dropout seeds
    uint64_t head_seed;                              // the last training forward's head-dropout seed
    int adam_t;
    int fault_nan_step;                              // PYRNN_FAULT_NAN_GRAD_STEP (train_gpu only)
    cudaStream_t stream;
    cudnnHandle_t dnn;
    cublasHandle_t blas;
    // flat buffers in torch state_dict order: the master copy
    float *params, *grads, *m, *v;
    float *head_w, *head_b, *dhead_w, *dhead_b;      // views into params / grads
    // cuDNN
    cudnnRNNDescriptor_t rnn;
    cudnnDropoutDescriptor_t drop;
    void* drop_states;                               // cuDNN's dropout generator (dropout > 0, L > 1)
    size_t drop_states_bytes;
    cudnnRNNDataDescriptor_t xdesc, ydesc;
    cudnnTensorDescriptor_t hdesc;
    size_t ws_bytes, work_bytes, reserve_bytes;
    float *ws, *dws;                                 // weight space and its gradient
    void *work, *reserve;
    int* seq_lengths;                                // (B,) all T, on the device as cuDNN requires
    WeightSeg* segs;                                 // device copy of the weight map
    int n_segs;
    size_t max_seg;
    int weights_dirty;                               // params changed since the last copy into ws
    // tokens and the embedding gradient's order, staged in pinned memory and sent in one copy:
    // inputs (bt), targets (bt), rows (bt), chunk_start (max_chunks + 1), token (V), token_chunk (V + 1)
    int *host_tokens, *dev_tokens;
    size_t token_ints, max_chunks;
    int *inputs, *targets, *rows, *chunk_start, *token, *token_chunk;   // views into dev_tokens
    int n_chunks, n_tokens;                          // of the last upload
    int* counts;                                     // host scratch (V + 1)
    float* chunk_sums;                               // (max_chunks, E)
    // activations, time-major
    float *x, *dx, *y, *dy, *head_in, *logits, *dlogits, *row_loss, *ones;
    const float* head_x;                             // what the head read: y, or head_in after dropout
    float *h[2], *c[2];                              // carried state (h[cur]) and the next one
    int cur;
    float *eh[2], *ec[2];                            // eval's own states, so it never touches the carried one
    float *dhx, *dcx, *zeros;                        // (L, B, H); zeros stands in for dhy / dcy
    double* norm_partials;
    float* scalars;                                  // device: loss, norm, clip, norm is finite
    float* host_scalars;                             // pinned mirror
    // the last forward: its initial / final states, for backward and get_final_state
    const float *fwd_hx, *fwd_cx;
    float *fwd_hy, *fwd_cy;
    int fwd_ready;                                   // training forward with targets, not yet backpropagated
    int fwd_dropped;                                 // and it applied dropout
} GpuLM;

static int is_lstm(const GpuLM* g) { return g->config.cell == CELL_LSTM; }

// the recurrent part, which is set up once per algorithm tried
static void gpu_rnn_release(GpuLM* g) {
    void* bufs[] = { g->ws, g->dws, g->work, g->reserve, g->segs };
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) if (bufs[i]) cudaFree(bufs[i]);
    g->ws = g->dws = NULL; g->work = g->reserve = NULL; g->segs = NULL;
    g->ws_bytes = g->work_bytes = g->reserve_bytes = 0;
    g->n_segs = 0;
    if (g->rnn) cudnnDestroyRNNDescriptor(g->rnn);
    g->rnn = NULL;
}

static void gpu_lm_destroy(GpuLM* g) {
    if (!g) return;
    if (g->stream) cudaStreamSynchronize(g->stream);
    gpu_rnn_release(g);
    void* bufs[] = { g->params, g->grads, g->m, g->v, g->seq_lengths, g->dev_tokens, g->chunk_sums, g->drop_states,
                     g->x, g->dx, g->y, g->dy, g->head_in, g->logits, g->dlogits, g->row_loss, g->ones,
                     g->h[0], g->h[1], g->c[0], g->c[1], g->eh[0], g->eh[1], g->ec[0], g->ec[1],
                     g->dhx, g->dcx, g->zeros, g->norm_partials, g->scalars };
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) if (bufs[i]) cudaFree(bufs[i]);
    if (g->host_scalars) cudaFreeHost(g->host_scalars);
    if (g->host_tokens) cudaFreeHost(g->host_tokens);
    free(g->counts);
    if (g->xdesc) cudnnDestroyRNNDataDescriptor(g->xdesc);
    if (g->ydesc) cudnnDestroyRNNDataDescriptor(g->ydesc);
    if (g->hdesc) cudnnDestroyTensorDescriptor(g->hdesc);
    if (g->drop) cudnnDestroyDropoutDescriptor(g->drop);
    if (g->dnn) cudnnDestroy(g->dnn);
    if (g->blas) cublasDestroy(g->blas);
    if (g->stream) cudaStreamDestroy(g->stream);
    free(g);
}

static int gpu_alloc(void* p, size_t n_bytes, const char* what) {
    void** pp = (void**)p;
    cudaError_t e = cudaMalloc(pp, n_bytes ? n_bytes : 4);
    if (e != cudaSuccess) { *pp = NULL; return fail("cudaMalloc: %s for %s (%zu bytes)", cudaGetErrorString(e), what, n_bytes); }
    return 0;
}

static size_t tensor_numel(cudnnTensorDescriptor_t d, int* dims, int* nb) {
    cudnnDataType_t dt;
    int strides[8];
    *nb = 0;
    if (cudnnGetTensorNdDescriptor(d, 8, &dt, nb, dims, strides) != CUDNN_STATUS_SUCCESS) return 0;
    size_t n = 1;
    for (int i = 0; i < *nb && i < 8; i++) n *= (size_t)dims[i];
    return *nb > 0 ? n : 0;
}

static int seg_compare(const void* a, const void* b) {
    size_t x = ((const WeightSeg*)a)->ws_off, y = ((const WeightSeg*)b)->ws_off;
    return x < y ? -1 : x > y;
}

// The weight map: for layer l and cuDNN linear layer id (0..G-1 input matrices W, G..2G-1 recurrent
// matrices R, in torch's gate order), cudnnGetRNNWeightParams gives the matrix (H rows of `in`
// floats, row-major, as torch's gate block) and, with DOUBLE_BIAS, the b_ih (id < G) or b_hh
// (id >= G) gate vector. Torch's weight_ih_l{l} is the G gate blocks stacked: block k is rows
// [k*H, (k+1)*H).
static int gpu_build_weight_map(GpuLM* g) {
    const Config* c = &g->config;
    int L = c->n_layers, H = c->hidden_size, G = g->G;
    int n_segs = L * 2 * G * 2;
    WeightSeg* segs = (WeightSeg*)calloc(n_segs, sizeof(WeightSeg));
    if (!segs) return fail("out of memory");
    cudnnTensorDescriptor_t mdesc = NULL, bdesc = NULL;
    int rc = -1, k = 0;
    size_t ws_floats = g->ws_bytes / sizeof(float), covered = 0;
    char name[64];
    if (cudnnCreateTensorDescriptor(&mdesc) != CUDNN_STATUS_SUCCESS || cudnnCreateTensorDescriptor(&bdesc) != CUDNN_STATUS_SUCCESS) {
        fail("cudnnCreateTensorDescriptor failed");
        goto done;
    }
    for (int l = 0; l < L; l++) {
        int in = l == 0 ? c->embed_size : H;
        size_t off[4], numel;   // weight_ih, weight_hh, bias_ih, bias_hh of layer l in the flat buffer
        for (int t = 0; t < 4; t++) model_tensor_info(c, 1 + 4 * l + t, name, sizeof(name), &off[t], &numel);
        for (int id = 0; id < 2 * G; id++) {
            int rec = id >= G, gate = id % G, cols = rec ? H : in;
            void *maddr = NULL, *baddr = NULL;
            cudnnStatus_t s = cudnnGetRNNWeightParams(g->dnn, g->rnn, l, g->ws_bytes, g->ws, id, mdesc, &maddr, bdesc, &baddr);
            if (s != CUDNN_STATUS_SUCCESS) { gpu_fail_cudnn("cudnnGetRNNWeightParams", s, __FILE__, __LINE__); goto done; }
            int md[8], bd[8], mnb, bnb;
            size_t mn = tensor_numel(mdesc, md, &mnb), bn = tensor_numel(bdesc, bd, &bnb);
            if (!maddr || !baddr || mn != (size_t)H * cols || bn != (size_t)H || (mnb == 3 && (md[1] != H || md[2] != cols))) {
                fail("cuDNN weight layout not understood: layer %d linear id %d: matrix %d dims (%d, %d, %d), bias %zu floats; "
                     "expected (1, %d, %d) and %d", l, id, mnb, md[0], mnb > 1 ? md[1] : 0, mnb > 2 ? md[2] : 0, bn, H, cols, H);
                goto done;
            }
            size_t m_off = (size_t)((char*)maddr - (char*)g->ws), b_off = (size_t)((char*)baddr - (char*)g->ws);
            if (m_off % sizeof(float) || b_off % sizeof(float) || m_off / 4 + mn > ws_floats || b_off / 4 + bn > ws_floats) {
                fail("cuDNN weight params for layer %d id %d fall outside the weight space", l, id);
                goto done;
            }
            segs[k++] = { off[rec ? 1 : 0] + (size_t)gate * H * cols, m_off / 4, mn };
            segs[k++] = { off[rec ? 3 : 2] + (size_t)gate * H, b_off / 4, bn };
            covered += mn + bn;
        }
    }
    // the segments must not overlap (any padding cuDNN leaves between them stays zero)
    qsort(segs, k, sizeof(WeightSeg), seg_compare);
    for (int i = 0; i + 1 < k; i++)
        if (segs[i].ws_off + segs[i].n > segs[i + 1].ws_off) { fail("cuDNN weight params overlap in the weight space"); goto done; }
    if (covered > ws_floats) { fail("cuDNN weight space holds %zu floats, the recurrent params are %zu", ws_floats, covered); goto done; }
    g->max_seg = 0;
    for (int i = 0; i < k; i++) if (segs[i].n > g->max_seg) g->max_seg = segs[i].n;
    if (gpu_alloc(&g->segs, k * sizeof(WeightSeg), "the weight map")) goto done;
    if (cudaMemcpy(g->segs, segs, k * sizeof(WeightSeg), cudaMemcpyHostToDevice) != cudaSuccess) {
        fail("cudaMemcpy: could not upload the weight map");
        goto done;
    }
    g->n_segs = k;
    rc = 0;
done:
    if (mdesc) cudnnDestroyTensorDescriptor(mdesc);
    if (bdesc) cudnnDestroyTensorDescriptor(bdesc);
    free(segs);
    return rc;
}

// the RNN descriptor for one algorithm, its weight space, temp spaces and weight map
static int gpu_rnn_setup(GpuLM* g, int algo) {
    const Config* c = &g->config;
    int E = c->embed_size, H = c->hidden_size, L = c->n_layers;
    g->algo = algo;
    // torch semantics are cuDNN's with DOUBLE_BIAS, linear input, no projection (projSize must
    // equal hiddenSize), padded IO for the unpacked (T, B, C) layout
    cudnnRNNMode_t mode = c->cell == CELL_RNN ? CUDNN_RNN_TANH : c->cell == CELL_RNN_RELU ? CUDNN_RNN_RELU
                        : c->cell == CELL_LSTM ? CUDNN_LSTM : CUDNN_GRU;
    CUDNN_CHECK(cudnnCreateRNNDescriptor(&g->rnn));
    CUDNN_CHECK(cudnnSetRNNDescriptor_v8(g->rnn, (cudnnRNNAlgo_t)algo, mode, CUDNN_RNN_DOUBLE_BIAS, CUDNN_UNIDIRECTIONAL,
                                         CUDNN_LINEAR_INPUT, CUDNN_DATA_FLOAT, CUDNN_DATA_FLOAT,
                                         g->tf32 ? CUDNN_DEFAULT_MATH : CUDNN_FMA_MATH, E, H, H, L, g->drop,
                                         CUDNN_RNN_PADDED_IO_ENABLED));
    size_t work_train = 0, work_infer = 0, reserve_infer = 0;
    CUDNN_CHECK(cudnnGetRNNWeightSpaceSize(g->dnn, g->rnn, &g->ws_bytes));
    CUDNN_CHECK(cudnnGetRNNTempSpaceSizes(g->dnn, g->rnn, CUDNN_FWD_MODE_TRAINING, g->xdesc, &work_train, &g->reserve_bytes));
    CUDNN_CHECK(cudnnGetRNNTempSpaceSizes(g->dnn, g->rnn, CUDNN_FWD_MODE_INFERENCE, g->xdesc, &work_infer, &reserve_infer));
    g->work_bytes = work_train > work_infer ? work_train : work_infer;
    if (gpu_alloc(&g->ws, g->ws_bytes, "the cuDNN weight space") || gpu_alloc(&g->dws, g->ws_bytes, "the cuDNN weight gradient") ||
        gpu_alloc(&g->work, g->work_bytes, "the cuDNN workspace") || gpu_alloc(&g->reserve, g->reserve_bytes, "the cuDNN reserve space"))
        return -1;
    CUDA_CHECK(cudaMemset(g->ws, 0, g->ws_bytes));
    if (gpu_build_weight_map(g)) return -1;
    g->weights_dirty = 1;
    return 0;
}

// every cuDNN call a run makes (training forward, both backward passes, inference forward), once,
// on zeros: some shapes are refused only when an algorithm's kernels are launched
static int gpu_rnn_trial(GpuLM* g) {
    size_t bt = (size_t)g->B * g->T;
    int lstm = is_lstm(g);
    const Config* c = &g->config;
    CUDA_CHECK(cudaMemsetAsync(g->x, 0, bt * c->embed_size * 4, g->stream));
    CUDA_CHECK(cudaMemsetAsync(g->dy, 0, bt * c->hidden_size * 4, g->stream));
    const float* cz = lstm ? g->zeros : NULL;
    float *cy = lstm ? g->c[1] : NULL, *dcx = lstm ? g->dcx : NULL;
    CUDNN_CHECK(cudnnRNNForward(g->dnn, g->rnn, CUDNN_FWD_MODE_TRAINING, g->seq_lengths, g->xdesc, g->x, g->ydesc, g->y,
                                g->hdesc, g->zeros, g->h[1], g->hdesc, cz, cy, g->ws_bytes, g->ws,
                                g->work_bytes, g->work, g->reserve_bytes, g->reserve));
    CUDNN_CHECK(cudnnRNNBackwardData_v8(g->dnn, g->rnn, g->seq_lengths, g->ydesc, g->y, g->dy, g->xdesc, g->dx,
                                        g->hdesc, g->zeros, g->zeros, g->dhx, g->hdesc, cz, cz, dcx,
                                        g->ws_bytes, g->ws, g->work_bytes, g->work, g->reserve_bytes, g->reserve));
    CUDA_CHECK(cudaMemsetAsync(g->dws, 0, g->ws_bytes, g->stream));
    CUDNN_CHECK(cudnnRNNBackwardWeights_v8(g->dnn, g->rnn, CUDNN_WGRAD_MODE_ADD, g->seq_lengths, g->xdesc, g->x,
                                           g->hdesc, g->zeros, g->ydesc, g->y, g->ws_bytes, g->dws,
                                           g->work_bytes, g->work, g->reserve_bytes, g->reserve));
    CUDNN_CHECK(cudnnRNNForward(g->dnn, g->rnn, CUDNN_FWD_MODE_INFERENCE, g->seq_lengths, g->xdesc, g->x, g->ydesc, g->y,
                                g->hdesc, g->zeros, g->h[1], g->hdesc, cz, cy, g->ws_bytes, g->ws,
                                g->work_bytes, g->work, 0, NULL));
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
    return 0;
}

// algo: a cudnnRNNAlgo_t, or GPU_ALGO_AUTO for the first of gpu_auto_algos that cuDNN runs. The
// choice and its reason go into note.
static int gpu_rnn_choose(GpuLM* g, int algo, char* note, size_t note_size) {
    int candidates[4], n = 1;
    char why[128], refused[512];
    refused[0] = 0;
    candidates[0] = algo;
    if (algo == GPU_ALGO_AUTO) n = gpu_auto_algos(candidates, why, sizeof(why), &g->config, g->B);
    for (int i = 0; i < n; i++) {
        if (gpu_rnn_setup(g, candidates[i]) == 0 && gpu_rnn_trial(g) == 0) {
            if (algo != GPU_ALGO_AUTO) snprintf(note, note_size, "%s (asked for)", gpu_algo_name(candidates[i]));
            else snprintf(note, note_size, "%s (auto: %s%s%s)", gpu_algo_name(candidates[i]), why, refused[0] ? "; " : "", refused);
            return 0;
        }
        if (cudaGetLastError() == cudaErrorIllegalAddress) return -1;   // the context is gone: nothing else will run
        size_t len = strlen(refused);
        snprintf(refused + len, sizeof(refused) - len, "%scuDNN refused %s: %.150s", len ? "; " : "",
                 gpu_algo_name(candidates[i]), pyrnn_last_error());
        gpu_rnn_release(g);
    }
    if (algo != GPU_ALGO_AUTO) {
        gpu_algo_refused = 1;
        const Config* c = &g->config;
        return fail("cuDNN does not run the %s algorithm for this model (%s L=%d E=%d H=%d, B=%d T=%d): %s; "
                    "--cudnn-algo auto picks one that runs", gpu_algo_name(algo), cell_names[c->cell], c->n_layers,
                    c->embed_size, c->hidden_size, g->B, g->T, refused);
    }
    return fail("cuDNN runs no RNN algorithm for this model: %s", refused);
}

// the device, the libraries and the math, one line for the log
static int gpu_describe(GpuLM* g, const char* algo_note) {
    int dev = 0, runtime = 0, driver = 0, blas[3] = { 0, 0, 0 };
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
    CUDA_CHECK(cudaDriverGetVersion(&driver));
    CUBLAS_CHECK(cublasGetProperty(MAJOR_VERSION, &blas[0]));
    CUBLAS_CHECK(cublasGetProperty(MINOR_VERSION, &blas[1]));
    CUBLAS_CHECK(cublasGetProperty(PATCH_LEVEL, &blas[2]));
    size_t dnn = cudnnGetVersion();
    char release[64];
    nvidia_driver_release(release, sizeof(release));
    snprintf(g->about, sizeof(g->about),
             "%s (sm_%d%d, %d SMs) | driver %s%sCUDA %d.%d | runtime %d.%d | cuDNN %zu.%zu.%zu | cuBLAS %d.%d.%d | "
             "math %s | cuDNN RNN algorithm %s", prop.name, prop.major, prop.minor, prop.multiProcessorCount, release,
             release[0] ? ", " : "", driver / 1000, driver % 1000 / 10, runtime / 1000, runtime % 1000 / 10,
             dnn / 10000, dnn % 10000 / 100, dnn % 100, blas[0], blas[1], blas[2],
             g->tf32 ? "tf32 (tensor cores)" : "fp32 (FMA, no TF32)", algo_note);
    if (dnn / 10000 != CUDNN_MAJOR)
        return fail("cuDNN %zu.%zu was loaded, this build needs cuDNN %d (check LD_LIBRARY_PATH, or rebuild)",
                    dnn / 10000, dnn % 10000 / 100, CUDNN_MAJOR);
    return 0;
}

static int gpu_lm_init(GpuLM* g, Config c, int B, int T, int tf32, int algo, float dropout) {
    if (config_check(&c)) return -1;
    if (B <= 0 || T <= 0) return fail("batch size and sequence length must be positive, got B=%d T=%d", B, T);
    if ((long)B * T > INT32_MAX / 4) return fail("B*T = %ld is too large", (long)B * T);
    if (!(dropout >= 0.0f && dropout < 1.0f)) return fail("dropout must be in [0, 1), got %g", (double)dropout);
    g->config = c; g->B = B; g->T = T; g->tf32 = tf32; g->dropout = dropout;
    g->G = cell_gates(c.cell);
    g->num_params = model_num_params(c);
    g->n_emb = (size_t)c.vocab_size * c.embed_size;
    g->lbh = (size_t)c.n_layers * B * c.hidden_size;
    int V = c.vocab_size, E = c.embed_size, H = c.hidden_size, L = c.n_layers;
    size_t P = g->num_params, bt = (size_t)B * T;

    if (gpu_check_device()) return -1;   // the first CUDA call: a machine without a usable GPU stops here
    CUDA_CHECK(cudaStreamCreate(&g->stream));
    CUDNN_CHECK(cudnnCreate(&g->dnn));
    CUDNN_CHECK(cudnnSetStream(g->dnn, g->stream));
    CUBLAS_CHECK(cublasCreate(&g->blas));
    CUBLAS_CHECK(cublasSetStream(g->blas, g->stream));
    CUBLAS_CHECK(cublasSetMathMode(g->blas, tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));

    // parameters, gradients, AdamW moments: one buffer each
    if (gpu_alloc(&g->params, P * 4, "parameters") || gpu_alloc(&g->grads, P * 4, "gradients") ||
        gpu_alloc(&g->m, P * 4, "AdamW m") || gpu_alloc(&g->v, P * 4, "AdamW v")) return -1;
    CUDA_CHECK(cudaMemset(g->params, 0, P * 4));
    CUDA_CHECK(cudaMemset(g->grads, 0, P * 4));
    CUDA_CHECK(cudaMemset(g->m, 0, P * 4));
    CUDA_CHECK(cudaMemset(g->v, 0, P * 4));
    char name[64];
    size_t off, numel;
    model_tensor_info(&c, 1 + 4 * L, name, sizeof(name), &off, &numel);       // head.weight
    g->head_w = g->params + off; g->dhead_w = g->grads + off;
    model_tensor_info(&c, 2 + 4 * L, name, sizeof(name), &off, &numel);       // head.bias
    g->head_b = g->params + off; g->dhead_b = g->grads + off;

    // tokens: a token's rows make at most rows / EMB_CHUNK + 1 chunks
    g->max_chunks = bt / EMB_CHUNK + V + 1;
    g->token_ints = 3 * bt + (g->max_chunks + 1) + V + (V + 1);
    CUDA_CHECK(cudaMallocHost((void**)&g->host_tokens, g->token_ints * sizeof(int)));
    g->counts = (int*)calloc(V + 1, sizeof(int));
    if (!g->counts) return fail("out of memory");
    if (gpu_alloc(&g->dev_tokens, g->token_ints * sizeof(int), "tokens") ||
        gpu_alloc(&g->chunk_sums, g->max_chunks * E * 4, "embedding gradient sums")) return -1;
    g->inputs = g->dev_tokens; g->targets = g->inputs + bt; g->rows = g->targets + bt;
    g->chunk_start = g->rows + bt; g->token = g->chunk_start + g->max_chunks + 1; g->token_chunk = g->token + V;

    // activations
    size_t lbh = g->lbh;
    if (gpu_alloc(&g->x, bt * E * 4, "embeddings") || gpu_alloc(&g->dx, bt * E * 4, "embedding gradients") ||
        gpu_alloc(&g->y, bt * H * 4, "RNN outputs") || gpu_alloc(&g->dy, bt * H * 4, "RNN output gradients") ||
        (dropout > 0.0f && gpu_alloc(&g->head_in, bt * H * 4, "the head's dropped input")) ||
        gpu_alloc(&g->logits, bt * V * 4, "logits") || gpu_alloc(&g->dlogits, bt * V * 4, "logit gradients") ||
        gpu_alloc(&g->row_loss, bt * 4, "row losses") || gpu_alloc(&g->ones, bt * 4, "ones") ||
        gpu_alloc(&g->h[0], lbh * 4, "hidden state") || gpu_alloc(&g->h[1], lbh * 4, "hidden state") ||
        gpu_alloc(&g->c[0], lbh * 4, "cell state") || gpu_alloc(&g->c[1], lbh * 4, "cell state") ||
        gpu_alloc(&g->eh[0], lbh * 4, "eval state") || gpu_alloc(&g->eh[1], lbh * 4, "eval state") ||
        gpu_alloc(&g->ec[0], lbh * 4, "eval state") || gpu_alloc(&g->ec[1], lbh * 4, "eval state") ||
        gpu_alloc(&g->dhx, lbh * 4, "state gradients") || gpu_alloc(&g->dcx, lbh * 4, "state gradients") ||
        gpu_alloc(&g->zeros, lbh * 4, "zeros") || gpu_alloc(&g->norm_partials, NORM_BLOCKS * sizeof(double), "norm partials") ||
        gpu_alloc(&g->scalars, 4 * sizeof(float), "scalars"))
        return -1;
    float* zero_bufs[] = { g->h[0], g->h[1], g->c[0], g->c[1], g->eh[0], g->eh[1], g->ec[0], g->ec[1], g->dhx, g->dcx, g->zeros };
    for (size_t i = 0; i < sizeof(zero_bufs) / sizeof(zero_bufs[0]); i++) CUDA_CHECK(cudaMemset(zero_bufs[i], 0, lbh * 4));
    CUDA_CHECK(cudaMemset(g->scalars, 0, 4 * sizeof(float)));
    CUDA_CHECK(cudaMemset(g->row_loss, 0, bt * 4));
    fill_kernel<<<blocks_for(bt, 1024), 256, 0, g->stream>>>(g->ones, 1.0f, bt);
    LAUNCH_CHECK("fill_kernel");
    CUDA_CHECK(cudaMallocHost((void**)&g->host_scalars, 4 * sizeof(float)));

    // x (T, B, E) and y (T, B, H), every sequence full length; cuDNN wants the lengths on the device too
    int* lengths = (int*)malloc(B * sizeof(int));
    if (!lengths) return fail("out of memory");
    for (int b = 0; b < B; b++) lengths[b] = T;
    float pad = 0.0f;
    cudnnStatus_t s = cudnnCreateRNNDataDescriptor(&g->xdesc);
    if (s == CUDNN_STATUS_SUCCESS) s = cudnnCreateRNNDataDescriptor(&g->ydesc);
    if (s == CUDNN_STATUS_SUCCESS)
        s = cudnnSetRNNDataDescriptor(g->xdesc, CUDNN_DATA_FLOAT, CUDNN_RNN_DATA_LAYOUT_SEQ_MAJOR_UNPACKED, T, B, E, lengths, &pad);
    if (s == CUDNN_STATUS_SUCCESS)
        s = cudnnSetRNNDataDescriptor(g->ydesc, CUDNN_DATA_FLOAT, CUDNN_RNN_DATA_LAYOUT_SEQ_MAJOR_UNPACKED, T, B, H, lengths, &pad);
    int rc = s != CUDNN_STATUS_SUCCESS ? gpu_fail_cudnn("cudnnSetRNNDataDescriptor", s, __FILE__, __LINE__)
           : gpu_alloc(&g->seq_lengths, B * sizeof(int), "sequence lengths");
    cudaError_t e = rc ? cudaSuccess : cudaMemcpy(g->seq_lengths, lengths, B * sizeof(int), cudaMemcpyHostToDevice);
    free(lengths);
    if (rc) return -1;
    if (e != cudaSuccess) return gpu_fail("cudaMemcpy", cudaGetErrorString(e), __FILE__, __LINE__);
    int hdims[3] = { L, B, H }, hstrides[3] = { B * H, H, 1 };
    CUDNN_CHECK(cudnnCreateTensorDescriptor(&g->hdesc));
    CUDNN_CHECK(cudnnSetTensorNdDescriptor(g->hdesc, CUDNN_DATA_FLOAT, 3, hdims, hstrides));

    // dropout between layers: cuDNN's generator states, seeded again when rng arrives (set_params)
    CUDNN_CHECK(cudnnCreateDropoutDescriptor(&g->drop));
    if (dropout > 0.0f && L > 1) {
        CUDNN_CHECK(cudnnDropoutGetStatesSize(g->dnn, &g->drop_states_bytes));
        if (gpu_alloc(&g->drop_states, g->drop_states_bytes, "cuDNN dropout states")) return -1;
        CUDNN_CHECK(cudnnSetDropoutDescriptor(g->drop, g->dnn, dropout, g->drop_states, g->drop_states_bytes, 0));
    } else {
        CUDNN_CHECK(cudnnSetDropoutDescriptor(g->drop, g->dnn, 0.0f, NULL, 0, 0));
    }

    char algo_note[640];
    if (gpu_rnn_choose(g, algo, algo_note, sizeof(algo_note))) return -1;
    if (gpu_describe(g, algo_note)) return -1;
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
    return 0;
}

static GpuLM* gpu_lm_create(Config c, int B, int T, int tf32, int algo, float dropout) {
    GpuLM* g = (GpuLM*)calloc(1, sizeof(GpuLM));
    if (!g) { fail("out of memory"); return NULL; }
    if (gpu_lm_init(g, c, B, T, tf32, algo, dropout)) { gpu_lm_destroy(g); return NULL; }
    return g;
}

// ---- host <-> device

static int gpu_upload(void* dst, const void* src, size_t bytes, GpuLM* g) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, g->stream));
    return 0;
}

// copies to the host and waits, so the caller may read dst on return
static int gpu_download(void* dst, const void* src, size_t bytes, GpuLM* g) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, g->stream));
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
    return 0;
}

// state (L, B, H) from the host, or zeros for NULL
static int gpu_set_lbh(GpuLM* g, float* dst, const float* src) {
    if (src) return gpu_upload(dst, src, g->lbh * 4, g);
    CUDA_CHECK(cudaMemsetAsync(dst, 0, g->lbh * 4, g->stream));
    return 0;
}

// Token ids are checked here: a bad one would read outside the embedding table. The staging
// buffer is pinned, so the copy is truly asynchronous; every caller has waited on the stream since
// the last copy out of it (a step ends by reading the loss). With the tokens goes the embedding
// gradient's order: each token's rows (t*B + b), in row order, cut into chunks of EMB_CHUNK.
static int gpu_upload_tokens(GpuLM* g, const int* inputs, const int* targets) {
    int B = g->B, T = g->T, V = g->config.vocab_size;
    size_t bt = (size_t)B * T;
    for (size_t i = 0; i < bt; i++) {
        if (inputs[i] < 0 || inputs[i] >= V)
            return fail("input token %d at position %zu is outside the vocabulary [0, %d)", inputs[i], i, V);
        if (targets && (targets[i] < 0 || targets[i] >= V))
            return fail("target token %d at position %zu is outside the vocabulary [0, %d)", targets[i], i, V);
    }
    int *h_inputs = g->host_tokens, *h_targets = h_inputs + bt, *rows = h_targets + bt;
    int *chunk_start = rows + bt, *token = chunk_start + g->max_chunks + 1, *token_chunk = token + V;
    memcpy(h_inputs, inputs, bt * sizeof(int));
    if (targets) memcpy(h_targets, targets, bt * sizeof(int));
    int* next = g->counts;   // counting sort: next[v] = where token v's next row goes
    memset(next, 0, (V + 1) * sizeof(int));
    for (size_t i = 0; i < bt; i++) next[inputs[i] + 1]++;
    for (int v = 0; v < V; v++) next[v + 1] += next[v];
    int n_chunks = 0, n_tokens = 0;
    for (int v = 0; v < V; v++) {
        if (next[v + 1] == next[v]) continue;
        token[n_tokens] = v;
        token_chunk[n_tokens++] = n_chunks;
        for (int r = next[v]; r < next[v + 1]; r += EMB_CHUNK) chunk_start[n_chunks++] = r;
    }
    chunk_start[n_chunks] = (int)bt;
    token_chunk[n_tokens] = n_chunks;
    for (size_t r = 0; r < bt; r++) {   // rows in increasing order within each token
        int v = inputs[(r % B) * T + r / B];
        rows[next[v]++] = (int)r;
    }
    g->n_chunks = n_chunks;
    g->n_tokens = n_tokens;
    return gpu_upload(g->dev_tokens, g->host_tokens, g->token_ints * sizeof(int), g);
}

// ---- forward / backward

static int gpu_sync_weights(GpuLM* g) {
    if (!g->weights_dirty) return 0;
    size_t blocks = (g->max_seg + 256 * 8 - 1) / (256 * 8);
    dim3 grid((unsigned)(blocks < 1 ? 1 : blocks > 128 ? 128 : blocks), (unsigned)g->n_segs);
    segments_to_ws_kernel<<<grid, 256, 0, g->stream>>>(g->ws, g->params, g->segs);
    LAUNCH_CHECK("segments_to_ws_kernel");
    g->weights_dirty = 0;
    return 0;
}

// Tokens already on the device. Runs embedding -> cuDNN stack (from hx, cx; final state to hy, cy)
// -> dropout (training) -> head -> bias + softmax cross-entropy (+ dlogits when training with
// targets). The loss, if any, is left in scalars[0]. training selects CUDNN_FWD_MODE_TRAINING,
// which fills the reserve space that the backward pass reads, and applies dropout.
static int gpu_forward(GpuLM* g, int training, int has_targets, const float* hx, const float* cx, float* hy, float* cy) {
    const Config* c = &g->config;
    int B = g->B, T = g->T, V = c->vocab_size, E = c->embed_size, H = c->hidden_size;
    int bt = B * T, lstm = is_lstm(g);
    g->fwd_ready = 0;
    if (gpu_sync_weights(g)) return -1;
    embedding_forward_kernel<<<bt, threads_for(E), 0, g->stream>>>(g->x, g->params, g->inputs, B, T, E);
    LAUNCH_CHECK("embedding_forward_kernel");
    CUDNN_CHECK(cudnnRNNForward(g->dnn, g->rnn, training ? CUDNN_FWD_MODE_TRAINING : CUDNN_FWD_MODE_INFERENCE,
                                g->seq_lengths, g->xdesc, g->x, g->ydesc, g->y, g->hdesc, hx, hy,
                                g->hdesc, lstm ? cx : NULL, lstm ? cy : NULL, g->ws_bytes, g->ws,
                                g->work_bytes, g->work, training ? g->reserve_bytes : 0, training ? g->reserve : NULL));
    g->fwd_dropped = training && g->dropout > 0.0f;
    g->head_x = g->y;
    if (g->fwd_dropped) {
        g->head_seed = split_next(&g->rng);
        dropout_kernel<<<blocks_for((size_t)bt * H, 4096), 256, 0, g->stream>>>(
            g->head_in, g->y, (size_t)bt * H, g->dropout, 1.0f / (1.0f - g->dropout), g->head_seed);
        LAUNCH_CHECK("dropout_kernel");
        g->head_x = g->head_in;
    }
    // logits (T*B, V) = head_x (T*B, H) W^T; row-major on our side is column-major transposed on cuBLAS's
    const float one = 1.0f, zero = 0.0f;
    CUBLAS_CHECK(cublasSgemm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, V, bt, H, &one, g->head_w, H, g->head_x, H, &zero, g->logits, V));
    float* dlogits = training && has_targets ? g->dlogits : NULL;
    softmax_xent_kernel<<<(bt + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK, ROWS_PER_BLOCK * WARP, 0, g->stream>>>(
        g->logits, dlogits, g->row_loss, g->head_b, has_targets ? g->targets : NULL, B, T, V, 1.0f / (float)bt);
    LAUNCH_CHECK("softmax_xent_kernel");
    if (has_targets) {
        loss_mean_kernel<<<1, REDUCE_THREADS, 0, g->stream>>>(g->scalars, g->row_loss, bt);
        LAUNCH_CHECK("loss_mean_kernel");
    }
    g->fwd_hx = hx; g->fwd_cx = cx; g->fwd_hy = hy; g->fwd_cy = cy;
    g->fwd_ready = training && has_targets;
    return 0;
}

// d(mean loss) back through the head, the dropout, cuDNN (data, then weights) and the embedding;
// gradients accumulate into g->grads; dL/dh0, dL/dc0 land in dhx, dcx. The gradient of the final
// state is zero (truncated BPTT: nothing downstream of this batch).
static int gpu_backward(GpuLM* g) {
    if (!g->fwd_ready) return fail("backward needs a training forward pass with targets first");
    g->fwd_ready = 0;   // the reserve space is spent
    const Config* c = &g->config;
    int B = g->B, T = g->T, V = c->vocab_size, E = c->embed_size, H = c->hidden_size;
    int bt = B * T, lstm = is_lstm(g);
    const float one = 1.0f, zero = 0.0f;
    // head: dW (V, H) += dlogits^T head_x; db += column sums of dlogits; dy (T*B, H) = dlogits W
    CUBLAS_CHECK(cublasSgemm(g->blas, CUBLAS_OP_N, CUBLAS_OP_T, H, V, bt, &one, g->head_x, H, g->dlogits, V, &one, g->dhead_w, H));
    CUBLAS_CHECK(cublasSgemv(g->blas, CUBLAS_OP_N, V, bt, &one, g->dlogits, V, g->ones, 1, &one, g->dhead_b, 1));
    CUBLAS_CHECK(cublasSgemm(g->blas, CUBLAS_OP_N, CUBLAS_OP_N, H, bt, V, &one, g->head_w, H, g->dlogits, V, &zero, g->dy, H));
    if (g->fwd_dropped) {   // the forward's mask again, from its seed
        dropout_kernel<<<blocks_for((size_t)bt * H, 4096), 256, 0, g->stream>>>(
            g->dy, g->dy, (size_t)bt * H, g->dropout, 1.0f / (1.0f - g->dropout), g->head_seed);
        LAUNCH_CHECK("dropout_kernel");
    }
    // cuDNN: data first (it leaves what the weight pass needs in the reserve space), then weights
    CUDNN_CHECK(cudnnRNNBackwardData_v8(g->dnn, g->rnn, g->seq_lengths, g->ydesc, g->y, g->dy, g->xdesc, g->dx,
                                        g->hdesc, g->fwd_hx, g->zeros, g->dhx,
                                        g->hdesc, lstm ? g->fwd_cx : NULL, lstm ? g->zeros : NULL, lstm ? g->dcx : NULL,
                                        g->ws_bytes, g->ws, g->work_bytes, g->work, g->reserve_bytes, g->reserve));
    CUDA_CHECK(cudaMemsetAsync(g->dws, 0, g->ws_bytes, g->stream));
    CUDNN_CHECK(cudnnRNNBackwardWeights_v8(g->dnn, g->rnn, CUDNN_WGRAD_MODE_ADD, g->seq_lengths, g->xdesc, g->x,
                                           g->hdesc, g->fwd_hx, g->ydesc, g->y, g->ws_bytes, g->dws,
                                           g->work_bytes, g->work, g->reserve_bytes, g->reserve));
    size_t blocks = (g->max_seg + 256 * 8 - 1) / (256 * 8);
    dim3 grid((unsigned)(blocks < 1 ? 1 : blocks > 128 ? 128 : blocks), (unsigned)g->n_segs);
    segments_add_kernel<<<grid, 256, 0, g->stream>>>(g->grads, g->dws, g->segs);
    LAUNCH_CHECK("segments_add_kernel");
    embedding_chunk_sums_kernel<<<g->n_chunks, threads_for(E), 0, g->stream>>>(g->chunk_sums, g->dx, g->rows, g->chunk_start, E);
    LAUNCH_CHECK("embedding_chunk_sums_kernel");
    embedding_add_kernel<<<g->n_tokens, threads_for(E), 0, g->stream>>>(g->grads, g->chunk_sums, g->token, g->token_chunk, E);
    LAUNCH_CHECK("embedding_add_kernel");
    return 0;
}

static int gpu_zero_grad(GpuLM* g) {
    CUDA_CHECK(cudaMemsetAsync(g->grads, 0, g->num_params * 4, g->stream));
    return 0;
}

// global norm -> clip factor -> AdamW, all on the device; the norm stays in scalars[1]. The step
// counter is the host's: the kernel uses t + 1, and gpu_step_done commits it once the host has seen
// the norm (the update is skipped on the device when the norm is not finite).
static int gpu_step(GpuLM* g, float lr, float beta1, float beta2, float eps, float weight_decay, float max_grad_norm) {
    size_t P = g->num_params;
    sumsq_partials_kernel<<<NORM_BLOCKS, REDUCE_THREADS, 0, g->stream>>>(g->norm_partials, g->grads, P);
    LAUNCH_CHECK("sumsq_partials_kernel");
    grad_norm_finalize_kernel<<<1, REDUCE_THREADS, 0, g->stream>>>(g->scalars, g->norm_partials, NORM_BLOCKS, max_grad_norm);
    LAUNCH_CHECK("grad_norm_finalize_kernel");
    int t = g->adam_t + 1;
    float bc1 = 1.0f - powf(beta1, (float)t);
    float bc2_sqrt = sqrtf(1.0f - powf(beta2, (float)t));
    adamw_kernel<<<blocks_for(P, 4096), 256, 0, g->stream>>>(
        g->params, g->m, g->v, g->grads, P, g->scalars, beta1, beta2, eps, 1.0f - lr * weight_decay, lr / bc1, bc2_sqrt);
    LAUNCH_CHECK("adamw_kernel");
    g->weights_dirty = 1;
    return 0;
}

// after gpu_step, scalars copied to host_scalars: count the step if it was taken
static void gpu_step_done(GpuLM* g) {
    if (g->host_scalars[3] != 0.0f) g->adam_t++;
}

// One training step from the carried state: forward, backward, clip + AdamW; the final state
// becomes the carried one. The host waits once, for the loss and the norm. PYRNN_FAULT_NAN_GRAD_STEP
// (fault_nan_step) poisons one gradient element of that optimizer step, as the CPU backend does.
static int gpu_poison_grad(GpuLM* g) {
    if (g->fault_nan_step <= 0 || g->adam_t + 1 != g->fault_nan_step) return 0;
    fill_kernel<<<1, WARP, 0, g->stream>>>(g->grads, NAN, 1);
    LAUNCH_CHECK("fill_kernel");
    g->fault_nan_step = 0;
    return 0;
}

static int gpu_train_step(GpuLM* g, float* loss, float* grad_norm, const int* inputs, const int* targets, const StepParams* sp) {
    int cur = g->cur, nxt = 1 - cur;
    int status = gpu_upload_tokens(g, inputs, targets) || gpu_forward(g, 1, 1, g->h[cur], g->c[cur], g->h[nxt], g->c[nxt]) ||
                 gpu_zero_grad(g) || gpu_backward(g) || gpu_poison_grad(g) ? -1 : 0;
    // every rank reaches this, failed or not: the loss and gradients become means over all ranks
    if (nccl_step_mean(status, g->scalars, g->grads, g->num_params, g->stream)) return -1;
    if (gpu_step(g, sp->lr, sp->beta1, sp->beta2, sp->eps, sp->weight_decay, sp->max_grad_norm)) return -1;
    if (gpu_download(g->host_scalars, g->scalars, 4 * sizeof(float), g)) return -1;
    gpu_step_done(g);
    g->cur = nxt;
    if (loss) *loss = g->host_scalars[0];
    if (grad_norm) *grad_norm = g->host_scalars[1];
    return 0;
}

static int gpu_set_params(GpuLM* g, const float* params, const float* m, const float* v, int adam_t) {
    size_t bytes = g->num_params * 4;
    if (params && gpu_upload(g->params, params, bytes, g)) return -1;
    if (m) { if (gpu_upload(g->m, m, bytes, g)) return -1; } else CUDA_CHECK(cudaMemsetAsync(g->m, 0, bytes, g->stream));
    if (v) { if (gpu_upload(g->v, v, bytes, g)) return -1; } else CUDA_CHECK(cudaMemsetAsync(g->v, 0, bytes, g->stream));
    g->adam_t = adam_t;
    g->weights_dirty = 1;
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
    return 0;
}

// ----------------------------------------------------------------------------
// the backend table for the shared driver (train_main in c/train_rnn.c)

#if !defined(PYRNN_CUDA_LIB) && !defined(PYRNN_CUDA_NO_MAIN)

static int gpu_math_tf32 = 0;                // --math tf32
static int gpu_rnn_algo = GPU_ALGO_AUTO;     // --cudnn-algo, else $PYRNN_CUDNN_ALGO, else auto

static void* gb_create(Config c, int B, int T, const TrainOptions* opts) {
    float dropout = opts->dropout;
    if (opts->bf16) {
        fail("-M bf16 is a CPU precision; on the GPU, --math tf32 runs the tensor cores");
        return NULL;
    }
    if (opts->weight_drop > 0.0f || opts->embed_dropout > 0.0f || opts->locked) {
        fail("%s is not implemented on the GPU yet (train_cpu has it); cuDNN's dropout is per step: use -p",
             opts->weight_drop > 0.0f ? "-W weight drop" : opts->embed_dropout > 0.0f ? "-D embedding dropout"
                                                                                  : "-d locked");
        return NULL;
    }
    if (dropout > 0.0f && dist.size > 1) {   // the CPU's counter-based masks follow the global stream; cuDNN's do not
        fail("-p %g on %d GPU ranks: cuDNN's dropout masks depend on the rank, so the run would not train what one "
             "process trains; use -p 0 with train_gpu_mpi", dropout, dist.size);
        return NULL;
    }
    if (nccl_init()) return NULL;   // this rank's GPU, before anything is allocated on one
    GpuLM* g = gpu_lm_create(c, B, T, gpu_math_tf32, gpu_rnn_algo, dropout);
    if (!g) return NULL;
    printf("gpu: %s\n", g->about);
    const char* fault = getenv("PYRNN_FAULT_NAN_GRAD_STEP");   // test hook, as in cpu_create
    g->fault_nan_step = fault ? atoi(fault) : 0;
    return g;
}

static void gb_destroy(void* self) {
    gpu_lm_destroy((GpuLM*)self);
    nccl_free();
}

// cuDNN's dropout generator, seeded from the run's generator (no effect without dropout states)
static int gpu_seed_dropout(GpuLM* g) {
    if (!g->drop_states) return 0;
    CUDNN_CHECK(cudnnSetDropoutDescriptor(g->drop, g->dnn, g->dropout, g->drop_states, g->drop_states_bytes,
                                          (unsigned long long)mix64(g->rng ^ 0xD1B54A32D192ED03ull)));
    return 0;
}

// the run's generator arrives here (fresh: from the seed; resumed: from the checkpoint)
static int gb_set_params(void* self, const float* params, const float* m, const float* v, int adam_t, uint64_t rng) {
    GpuLM* g = (GpuLM*)self;
    g->rng = rng;
    if (gpu_seed_dropout(g)) return -1;
    return gpu_set_params(g, params, m, v, adam_t);
}

// asked for rng (a checkpoint is being written): cuDNN's dropout generator restarts from it here,
// as it will in a run resumed from that checkpoint
static int gb_get_params(void* self, float* params, float* m, float* v, int* adam_t, uint64_t* rng) {
    GpuLM* g = (GpuLM*)self;
    size_t bytes = g->num_params * 4;
    if (params && gpu_download(params, g->params, bytes, g)) return -1;
    if (m && gpu_download(m, g->m, bytes, g)) return -1;
    if (v && gpu_download(v, g->v, bytes, g)) return -1;
    if (adam_t) *adam_t = g->adam_t;
    if (rng) {
        *rng = g->rng;
        if (gpu_seed_dropout(g)) return -1;
    }
    return 0;
}

static int gb_set_state(void* self, const float* h, const float* c) {
    GpuLM* g = (GpuLM*)self;
    if (gpu_set_lbh(g, g->h[g->cur], h)) return -1;
    if (is_lstm(g) && gpu_set_lbh(g, g->c[g->cur], c)) return -1;
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
    return 0;
}

static int gb_get_state(void* self, float* h, float* c) {
    GpuLM* g = (GpuLM*)self;
    if (h && gpu_download(h, g->h[g->cur], g->lbh * 4, g)) return -1;
    if (c && is_lstm(g) && gpu_download(c, g->c[g->cur], g->lbh * 4, g)) return -1;
    return 0;
}

static const char* gb_about(void* self) { (void)self; return "cuDNN"; }

// the host model draws the weights (one init for every backend), then they move to the device
static int gb_init(void* self, uint64_t seed) {
    GpuLM* g = (GpuLM*)self;
    Model* host = model_new(g->config);
    if (!host) return -1;
    model_init(host, seed);
    int status = gb_set_params(self, host->params, NULL, NULL, 0, host->rng);
    model_free(host);
    return status;
}

// sampling runs on the host model, with the device's current weights
static int gb_sample(void* self, int* out, int prime, int n, float temperature, int top_k, uint64_t seed) {
    GpuLM* g = (GpuLM*)self;
    Model* host = model_new(g->config);
    if (!host) return -1;
    int status = gpu_download(host->params, g->params, g->num_params * 4, g);
    if (status == 0) status = model_sample(host, out, &prime, 1, n, temperature, top_k, seed);
    model_free(host);
    return status;
}

static int gb_train_step(void* self, float* loss, float* grad_norm, const int* inputs, const int* targets, const StepParams* sp) {
    return gpu_train_step((GpuLM*)self, loss, grad_norm, inputs, targets, sp);
}

// forward only (inference mode, no dropout) from the host's h, c, which receive the final state
static int gb_eval_step(void* self, float* loss, const int* inputs, const int* targets, float* h, float* c) {
    GpuLM* g = (GpuLM*)self;
    int lstm = is_lstm(g);
    if (gpu_upload_tokens(g, inputs, targets)) return -1;
    if (gpu_set_lbh(g, g->eh[0], h)) return -1;
    if (lstm && gpu_set_lbh(g, g->ec[0], c)) return -1;
    if (gpu_forward(g, 0, targets != NULL, g->eh[0], g->ec[0], g->eh[1], g->ec[1])) return -1;
    if (gpu_download(g->host_scalars, g->scalars, sizeof(float), g)) return -1;
    if (loss) *loss = targets ? g->host_scalars[0] : 0.0f;
    if (h && gpu_download(h, g->eh[1], g->lbh * 4, g)) return -1;
    if (c && lstm && gpu_download(c, g->ec[1], g->lbh * 4, g)) return -1;
    return 0;
}

static const Backend gpu_backend = {
    "cuda", gb_create, gb_destroy, gb_about, gb_init, gb_set_params, gb_get_params, gb_set_state, gb_get_state,
    gb_train_step, gb_eval_step, gb_sample,
};

// our own flags (--math, --cudnn-algo) are taken out of argv; the rest goes to the shared driver
int main(int argc, char** argv) {
    if (gpu_algo_parse(&gpu_rnn_algo, getenv("PYRNN_CUDNN_ALGO"))) {
        fprintf(stderr, "error: PYRNN_CUDNN_ALGO: %s\n", pyrnn_last_error());
        return 2;
    }
    int n = 1;
    for (int i = 1; i < argc; i++) {
        const char* a = argv[i];
        const char* val = NULL;
        int is_math = strncmp(a, "--math", 6) == 0 && (a[6] == 0 || a[6] == '=');
        int is_algo = strncmp(a, "--cudnn-algo", 12) == 0 && (a[12] == 0 || a[12] == '=');
        if (!is_math && !is_algo) { argv[n++] = argv[i]; continue; }
        const char* eq = strchr(a, '=');
        if (eq) val = eq + 1;
        else if (i + 1 < argc) val = argv[++i];
        else { fprintf(stderr, "error: %s needs a value\n", a); return 2; }
        if (is_math) {
            if (strcmp(val, "fp32") == 0) gpu_math_tf32 = 0;
            else if (strcmp(val, "tf32") == 0) gpu_math_tf32 = 1;
            else { fprintf(stderr, "error: --math must be fp32 or tf32, got '%s'\n", val); return 2; }
        } else if (!*val || gpu_algo_parse(&gpu_rnn_algo, val)) {
            fprintf(stderr, "error: --cudnn-algo must be auto, standard, persist_static or persist_small_h, got '%s'\n", val);
            return 2;
        }
    }
    argv[n] = NULL;
    for (int i = 1; i < n; i++)
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            printf("GPU flags (before or among the others):\n"
                   "  --math fp32|tf32       fp32: exact (cuDNN FMA math, no TF32); tf32: tensor cores (default fp32)\n"
                   "  --cudnn-algo auto|standard|persist_static|persist_small_h\n"
                   "                         cuDNN RNN algorithm (default auto, or $PYRNN_CUDNN_ALGO): auto takes\n"
                   "                         persist_small_h for small H, persist_static where the shape suits it,\n"
                   "                         else standard, the first that cuDNN runs; the choice is printed\n");
            break;
        }
    return train_main(n, argv, &gpu_backend);
}

#endif

// ----------------------------------------------------------------------------
// the library behind pyrnn/_cuda.py (lib/libpyrnn_cuda.so): the same model, driven step by step

extern "C" {

// cell 0..3 as in docs/formats.md; tf32 0 = exact fp32 (FMA) math; algo "auto", "standard",
// "persist_static" or "persist_small_h" (NULL or "": $PYRNN_CUDNN_ALGO, else auto). No dropout.
// NULL on error (see gpu_last_error).
void* gpu_lm_new(int cell, int V, int E, int H, int L, int B, int T, int tf32, const char* algo) {
    Config c;
    c.cell = cell; c.vocab_size = V; c.embed_size = E; c.hidden_size = H; c.n_layers = L;
    int a = GPU_ALGO_AUTO;
    if (gpu_algo_parse(&a, algo && *algo ? algo : getenv("PYRNN_CUDNN_ALGO"))) return NULL;
    return gpu_lm_create(c, B, T, tf32 != 0, a, 0.0f);
}

void gpu_lm_free(void* self) { gpu_lm_destroy((GpuLM*)self); }

const char* gpu_last_error(void) { return pyrnn_last_error(); }

// one line: device, driver, libraries, math, the cuDNN algorithm and why it was chosen
const char* gpu_lm_about(void* self) { return ((GpuLM*)self)->about; }

// the cuDNN RNN algorithm in use, by name
const char* gpu_lm_algo(void* self) { return gpu_algo_name(((GpuLM*)self)->algo); }

// params (P,) in torch state_dict order; also resets the AdamW state
int gpu_lm_set_params(void* self, const float* params) { return gpu_set_params((GpuLM*)self, params, NULL, NULL, 0); }

int gpu_lm_get_params(void* self, float* params) {
    GpuLM* g = (GpuLM*)self;
    return gpu_download(params, g->params, g->num_params * 4, g);
}

int gpu_lm_get_grads(void* self, float* grads) {
    GpuLM* g = (GpuLM*)self;
    return gpu_download(grads, g->grads, g->num_params * 4, g);
}

// training-mode forward of inputs (B, T) from h0 / c0 (L, B, H; NULL = zeros). With targets
// (B, T) it also writes the mean loss and readies backward; targets may be NULL (logits only).
// The final state becomes the carried state of gpu_lm_train_step.
int gpu_lm_forward(void* self, float* loss, const int* inputs, const int* targets, const float* h0, const float* c0) {
    GpuLM* g = (GpuLM*)self;
    if (gpu_upload_tokens(g, inputs, targets)) return -1;
    if (gpu_set_lbh(g, g->h[0], h0)) return -1;
    if (is_lstm(g) && gpu_set_lbh(g, g->c[0], c0)) return -1;
    if (gpu_forward(g, 1, targets != NULL, g->h[0], g->c[0], g->h[1], g->c[1])) return -1;
    g->cur = 1;
    if (gpu_download(g->host_scalars, g->scalars, sizeof(float), g)) return -1;
    if (loss) *loss = targets ? g->host_scalars[0] : 0.0f;
    return 0;
}

// logits of the last forward, (T, B, V)
int gpu_lm_get_logits(void* self, float* logits) {
    GpuLM* g = (GpuLM*)self;
    return gpu_download(logits, g->logits, (size_t)g->B * g->T * g->config.vocab_size * 4, g);
}

// final states (L, B, H) of the last forward; c_n only for LSTM (may be NULL)
int gpu_lm_get_final_state(void* self, float* h_n, float* c_n) {
    GpuLM* g = (GpuLM*)self;
    if (!g->fwd_hy) return fail("no forward pass yet");
    if (h_n && gpu_download(h_n, g->fwd_hy, g->lbh * 4, g)) return -1;
    if (c_n && is_lstm(g) && gpu_download(c_n, g->fwd_cy, g->lbh * 4, g)) return -1;
    return 0;
}

// gradients of the mean loss accumulate into the grads (zero them first); dh0 / dc0 are kept
int gpu_lm_backward(void* self) {
    GpuLM* g = (GpuLM*)self;
    if (gpu_backward(g)) return -1;
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
    return 0;
}

// dL/dh0, dL/dc0 (L, B, H) of the last backward; dc0 only for LSTM (may be NULL)
int gpu_lm_get_dstate(void* self, float* dh0, float* dc0) {
    GpuLM* g = (GpuLM*)self;
    if (dh0 && gpu_download(dh0, g->dhx, g->lbh * 4, g)) return -1;
    if (dc0 && is_lstm(g) && gpu_download(dc0, g->dcx, g->lbh * 4, g)) return -1;
    return 0;
}

int gpu_lm_zero_grad(void* self) { return gpu_zero_grad((GpuLM*)self); }

// clip to max_norm (0 = off) and one AdamW step; grad_norm gets the norm before clipping. A
// non-finite norm skips the update (parameters, moments and step count stay as they were).
int gpu_lm_step(void* self, float* grad_norm, float lr, float beta1, float beta2, float eps, float weight_decay, float max_norm) {
    GpuLM* g = (GpuLM*)self;
    if (gpu_step(g, lr, beta1, beta2, eps, weight_decay, max_norm)) return -1;
    if (gpu_download(g->host_scalars, g->scalars, 4 * sizeof(float), g)) return -1;
    gpu_step_done(g);
    if (grad_norm) *grad_norm = g->host_scalars[1];
    return 0;
}

// train_gpu's step: forward from the carried state (zeros at first, or what the last forward
// ended in), zero grads, backward, clip + AdamW, one wait; loss and grad_norm as the two above
int gpu_lm_train_step(void* self, float* loss, float* grad_norm, const int* inputs, const int* targets, float lr,
                      float beta1, float beta2, float eps, float weight_decay, float max_norm) {
    StepParams sp = { lr, beta1, beta2, eps, weight_decay, max_norm };
    return gpu_train_step((GpuLM*)self, loss, grad_norm, inputs, targets, &sp);
}

}  // extern "C"
