/*
pyrnn on the GPU: the character LM of c/train_rnn.c with the recurrent stack in cuDNN and
everything else (embedding, head, softmax cross-entropy, clipping, AdamW) in a few kernels and
cuBLAS calls of our own. Same model, same flat parameter layout (torch state_dict order), same
AdamW and clipping semantics; the host side (flags, data, checkpoints, sampling, errors) is the
CPU file itself, included below.

    ./train_gpu [--math fp32|tf32] [--cudnn-algo standard|static|small_h|dynamic] <CPU trainer flags>

--math fp32 (default): cuDNN FMA math and plain fp32 cuBLAS, what the compare-outputs harness
checks; tf32 lets cuDNN (CUDNN_DEFAULT_MATH) and cuBLAS use TF32 tensor cores, PyTorch's default
for fp32 RNNs. Dropout is not implemented on the GPU: a run asking for it is refused.

Layout: our flat params on the device are the master copy (AdamW, clipping and checkpoints work
on that one buffer). cuDNN wants its own weight space, so the recurrent part is copied into it
before a forward (only when the params changed) and its gradient space is added back into our
flat grads after the backward, through a list of (flat offset, weight-space offset, count)
segments built once from cudnnGetRNNWeightParams. Activations are time-major (row t*B + b), as on
the CPU, which is cuDNN's SEQ_MAJOR layout. One stream; the host waits only where it reads a
result (loss, norm, states).

Built three ways: ./train_gpu (this file), ./test_gpu (cuda/test_rnn.cu includes this file with
PYRNN_CUDA_NO_MAIN) and lib/libpyrnn_cuda.so (-DPYRNN_CUDA_LIB, the extern "C" API at the end).
*/
#define PYRNN_NO_MAIN
#include "../c/train_rnn.c"

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
// kernels

#define WARP 32
#define ROWS_PER_BLOCK 8            // softmax: one warp per row
#define REDUCE_THREADS 256          // deterministic reductions: fixed block size ...
#define NORM_BLOCKS 512             // ... and a fixed number of partial sums

static int threads_for(int n) { return n >= 256 ? 256 : ((n + WARP - 1) / WARP) * WARP; }

// x[(t*B + b)*E + e] = table[inputs[b*T + t]*E + e]; one block per (t, b) row
__global__ void embedding_forward_kernel(float* x, const float* table, const int* inputs, int B, int T, int E) {
    int row = blockIdx.x, t = row / B, b = row % B;
    const float* src = table + (size_t)inputs[(size_t)b * T + t] * E;
    float* dst = x + (size_t)row * E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) dst[e] = src[e];
}

// dtable[token] += dx[row]; rows sharing a token collide, hence the atomics (order not fixed)
__global__ void embedding_backward_kernel(float* dtable, const float* dx, const int* inputs, int B, int T, int E) {
    int row = blockIdx.x, t = row / B, b = row % B;
    float* dst = dtable + (size_t)inputs[(size_t)b * T + t] * E;
    const float* src = dx + (size_t)row * E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) atomicAdd(dst + e, src[e]);
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
// the model on the device

typedef struct {
    Config config;
    int B, T, G, tf32;
    size_t num_params, n_emb, lbh;                  // P, V*E, L*B*H
    uint64_t rng;                                    // kept for checkpoints; no dropout masks to draw
    int adam_t;
    cudaStream_t stream;
    cudnnHandle_t dnn;
    cublasHandle_t blas;
    // flat buffers in torch state_dict order: the master copy
    float *params, *grads, *m, *v;
    float *head_w, *head_b, *dhead_w, *dhead_b;      // views into params / grads
    // cuDNN
    cudnnRNNDescriptor_t rnn;
    cudnnDropoutDescriptor_t drop;
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
    // activations, time-major
    int *inputs, *targets;                           // (B, T) as given
    float *x, *dx, *y, *dy, *logits, *dlogits, *row_loss, *ones;
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
} GpuLM;

static int is_lstm(const GpuLM* g) { return g->config.cell == CELL_LSTM; }

static void gpu_lm_destroy(GpuLM* g) {
    if (!g) return;
    if (g->stream) cudaStreamSynchronize(g->stream);
    void* bufs[] = { g->params, g->grads, g->m, g->v, g->ws, g->dws, g->work, g->reserve, g->seq_lengths, g->segs,
                     g->inputs, g->targets, g->x, g->dx, g->y, g->dy, g->logits, g->dlogits, g->row_loss, g->ones,
                     g->h[0], g->h[1], g->c[0], g->c[1], g->eh[0], g->eh[1], g->ec[0], g->ec[1],
                     g->dhx, g->dcx, g->zeros, g->norm_partials, g->scalars };
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) if (bufs[i]) cudaFree(bufs[i]);
    if (g->host_scalars) cudaFreeHost(g->host_scalars);
    if (g->xdesc) cudnnDestroyRNNDataDescriptor(g->xdesc);
    if (g->ydesc) cudnnDestroyRNNDataDescriptor(g->ydesc);
    if (g->hdesc) cudnnDestroyTensorDescriptor(g->hdesc);
    if (g->rnn) cudnnDestroyRNNDescriptor(g->rnn);
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

static int gpu_lm_init(GpuLM* g, Config c, int B, int T, int tf32, int algo) {
    if (config_check(&c)) return -1;
    if (B <= 0 || T <= 0) return fail("batch size and sequence length must be positive, got B=%d T=%d", B, T);
    if ((long)B * T > INT32_MAX / 2) return fail("B*T = %ld is too large", (long)B * T);
    g->config = c; g->B = B; g->T = T; g->tf32 = tf32;
    g->G = cell_gates(c.cell);
    g->num_params = model_num_params(c);
    g->n_emb = (size_t)c.vocab_size * c.embed_size;
    g->lbh = (size_t)c.n_layers * B * c.hidden_size;
    int V = c.vocab_size, E = c.embed_size, H = c.hidden_size, L = c.n_layers;
    size_t P = g->num_params, bt = (size_t)B * T;

    int n_dev = 0;   // first CUDA call: a machine without a usable GPU fails here, with a clear message
    CUDA_CHECK(cudaGetDeviceCount(&n_dev));
    if (n_dev < 1) return fail("no CUDA device found");
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

    // the recurrent stack: torch semantics are cuDNN's with DOUBLE_BIAS, linear input, no projection
    // (projSize must equal hiddenSize), padded IO for the unpacked (T, B, C) layout
    cudnnRNNMode_t mode = c.cell == CELL_RNN ? CUDNN_RNN_TANH : c.cell == CELL_RNN_RELU ? CUDNN_RNN_RELU
                        : c.cell == CELL_LSTM ? CUDNN_LSTM : CUDNN_GRU;
    CUDNN_CHECK(cudnnCreateDropoutDescriptor(&g->drop));
    CUDNN_CHECK(cudnnSetDropoutDescriptor(g->drop, g->dnn, 0.0f, NULL, 0, 0));   // no dropout, no RNG states
    CUDNN_CHECK(cudnnCreateRNNDescriptor(&g->rnn));
    CUDNN_CHECK(cudnnSetRNNDescriptor_v8(g->rnn, (cudnnRNNAlgo_t)algo, mode, CUDNN_RNN_DOUBLE_BIAS, CUDNN_UNIDIRECTIONAL,
                                         CUDNN_LINEAR_INPUT, CUDNN_DATA_FLOAT, CUDNN_DATA_FLOAT,
                                         tf32 ? CUDNN_DEFAULT_MATH : CUDNN_FMA_MATH, E, H, H, L, g->drop,
                                         CUDNN_RNN_PADDED_IO_ENABLED));
    if (algo == CUDNN_RNN_ALGO_PERSIST_DYNAMIC) CUDNN_CHECK(cudnnBuildRNNDynamic(g->dnn, g->rnn, B));

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

    // weight space, its gradient, and the temp spaces: sized once for this (B, T)
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

    // activations
    size_t lbh = g->lbh;
    if (gpu_alloc(&g->inputs, bt * sizeof(int), "inputs") || gpu_alloc(&g->targets, bt * sizeof(int), "targets") ||
        gpu_alloc(&g->x, bt * E * 4, "embeddings") || gpu_alloc(&g->dx, bt * E * 4, "embedding gradients") ||
        gpu_alloc(&g->y, bt * H * 4, "RNN outputs") || gpu_alloc(&g->dy, bt * H * 4, "RNN output gradients") ||
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
    fill_kernel<<<(unsigned)((bt + 255) / 256 < 1024 ? (bt + 255) / 256 : 1024), 256, 0, g->stream>>>(g->ones, 1.0f, bt);
    LAUNCH_CHECK("fill_kernel");
    CUDA_CHECK(cudaMallocHost((void**)&g->host_scalars, 4 * sizeof(float)));
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
    return 0;
}

static GpuLM* gpu_lm_create(Config c, int B, int T, int tf32, int algo) {
    GpuLM* g = (GpuLM*)calloc(1, sizeof(GpuLM));
    if (!g) { fail("out of memory"); return NULL; }
    if (gpu_lm_init(g, c, B, T, tf32, algo)) { gpu_lm_destroy(g); return NULL; }
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

// token ids are checked on the host: a bad one would read outside the embedding table
static int gpu_upload_tokens(GpuLM* g, const int* inputs, const int* targets) {
    size_t bt = (size_t)g->B * g->T;
    int V = g->config.vocab_size;
    for (size_t i = 0; i < bt; i++) {
        if (inputs[i] < 0 || inputs[i] >= V)
            return fail("input token %d at position %zu is outside the vocabulary [0, %d)", inputs[i], i, V);
        if (targets && (targets[i] < 0 || targets[i] >= V))
            return fail("target token %d at position %zu is outside the vocabulary [0, %d)", targets[i], i, V);
    }
    if (gpu_upload(g->inputs, inputs, bt * sizeof(int), g)) return -1;
    if (targets && gpu_upload(g->targets, targets, bt * sizeof(int), g)) return -1;
    return 0;
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
// -> head -> bias + softmax cross-entropy (+ dlogits when training with targets). The loss, if
// any, is left in scalars[0]. training selects CUDNN_FWD_MODE_TRAINING, which fills the reserve
// space that the backward pass reads.
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
    // logits (T*B, V) = y (T*B, H) W^T; row-major on our side is column-major transposed on cuBLAS's
    const float one = 1.0f, zero = 0.0f;
    CUBLAS_CHECK(cublasSgemm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, V, bt, H, &one, g->head_w, H, g->y, H, &zero, g->logits, V));
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

// d(mean loss) back through the head, cuDNN (data, then weights) and the embedding; gradients
// accumulate into g->grads; dL/dh0, dL/dc0 land in dhx, dcx. The gradient of the final state is
// zero (truncated BPTT: nothing downstream of this batch).
static int gpu_backward(GpuLM* g) {
    if (!g->fwd_ready) return fail("backward needs a training forward pass with targets first");
    g->fwd_ready = 0;   // the reserve space is spent
    const Config* c = &g->config;
    int B = g->B, T = g->T, V = c->vocab_size, E = c->embed_size, H = c->hidden_size;
    int bt = B * T, lstm = is_lstm(g);
    const float one = 1.0f, zero = 0.0f;
    // head: dW (V, H) += dlogits^T y; db += column sums of dlogits; dy (T*B, H) = dlogits W
    CUBLAS_CHECK(cublasSgemm(g->blas, CUBLAS_OP_N, CUBLAS_OP_T, H, V, bt, &one, g->y, H, g->dlogits, V, &one, g->dhead_w, H));
    CUBLAS_CHECK(cublasSgemv(g->blas, CUBLAS_OP_N, V, bt, &one, g->dlogits, V, g->ones, 1, &one, g->dhead_b, 1));
    CUBLAS_CHECK(cublasSgemm(g->blas, CUBLAS_OP_N, CUBLAS_OP_N, H, bt, V, &one, g->head_w, H, g->dlogits, V, &zero, g->dy, H));
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
    embedding_backward_kernel<<<bt, threads_for(E), 0, g->stream>>>(g->grads, g->dx, g->inputs, B, T, E);
    LAUNCH_CHECK("embedding_backward_kernel");
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
    size_t blocks = (P + 255) / 256;
    adamw_kernel<<<(unsigned)(blocks > 4096 ? 4096 : blocks), 256, 0, g->stream>>>(
        g->params, g->m, g->v, g->grads, P, g->scalars, beta1, beta2, eps, 1.0f - lr * weight_decay, lr / bc1, bc2_sqrt);
    LAUNCH_CHECK("adamw_kernel");
    g->weights_dirty = 1;
    return 0;
}

// after gpu_step, scalars copied to host_scalars: count the step if it was taken
static void gpu_step_done(GpuLM* g) {
    if (g->host_scalars[3] != 0.0f) g->adam_t++;
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

static int gpu_math_tf32 = 0;                        // --math tf32
static int gpu_rnn_algo = CUDNN_RNN_ALGO_STANDARD;   // --cudnn-algo

static void* gb_create(Config c, int B, int T, float dropout) {
    if (dropout > 0.0f) {
        fail("the GPU trainer does not implement dropout (asked for %g): train with dropout 0, or on the CPU", (double)dropout);
        return NULL;
    }
    GpuLM* g = gpu_lm_create(c, B, T, gpu_math_tf32, gpu_rnn_algo);
    return g;
}

static void gb_destroy(void* self) { gpu_lm_destroy((GpuLM*)self); }

static int gb_set_params(void* self, const float* params, const float* m, const float* v, int adam_t, uint64_t rng) {
    GpuLM* g = (GpuLM*)self;
    g->rng = rng;
    return gpu_set_params(g, params, m, v, adam_t);
}

static int gb_get_params(void* self, float* params, float* m, float* v, int* adam_t, uint64_t* rng) {
    GpuLM* g = (GpuLM*)self;
    size_t bytes = g->num_params * 4;
    if (params && gpu_download(params, g->params, bytes, g)) return -1;
    if (m && gpu_download(m, g->m, bytes, g)) return -1;
    if (v && gpu_download(v, g->v, bytes, g)) return -1;
    if (adam_t) *adam_t = g->adam_t;
    if (rng) *rng = g->rng;
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

// forward from the carried state, backward, clip + AdamW; the final state becomes the carried one
static int gb_train_step(void* self, float* loss, float* grad_norm, const int* inputs, const int* targets, const StepParams* sp) {
    GpuLM* g = (GpuLM*)self;
    int cur = g->cur, nxt = 1 - cur;
    if (gpu_upload_tokens(g, inputs, targets)) return -1;
    if (gpu_forward(g, 1, 1, g->h[cur], g->c[cur], g->h[nxt], g->c[nxt])) return -1;
    if (gpu_zero_grad(g) || gpu_backward(g)) return -1;
    if (gpu_step(g, sp->lr, sp->beta1, sp->beta2, sp->eps, sp->weight_decay, sp->max_grad_norm)) return -1;
    if (gpu_download(g->host_scalars, g->scalars, 4 * sizeof(float), g)) return -1;
    gpu_step_done(g);
    g->cur = nxt;
    if (loss) *loss = g->host_scalars[0];
    if (grad_norm) *grad_norm = g->host_scalars[1];
    return 0;
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
    "cuda", gb_create, gb_destroy, gb_set_params, gb_get_params, gb_set_state, gb_get_state, gb_train_step, gb_eval_step,
};

// our own flags (--math, --cudnn-algo) are taken out of argv; the rest goes to the shared driver
int main(int argc, char** argv) {
    static const char* algos[] = { "standard", "static", "dynamic", "small_h" };   // cudnnRNNAlgo_t order
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
        } else {
            int found = -1;
            for (int k = 0; k < 4; k++) if (strcmp(val, algos[k]) == 0) found = k;
            if (found < 0) { fprintf(stderr, "error: --cudnn-algo must be standard, static, small_h or dynamic, got '%s'\n", val); return 2; }
            gpu_rnn_algo = found;
        }
    }
    argv[n] = NULL;
    for (int i = 1; i < n; i++)
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            printf("GPU flags (before or among the others):\n"
                   "  --math fp32|tf32       fp32: exact (cuDNN FMA math, no TF32); tf32: tensor cores (default fp32)\n"
                   "  --cudnn-algo standard|static|small_h|dynamic   cuDNN RNN algorithm (default standard)\n"
                   "dropout (-p) is not implemented on the GPU\n");
            break;
        }
    return train_main(n, argv, &gpu_backend);
}

#endif

// ----------------------------------------------------------------------------
// the library behind pyrnn/_cuda.py (lib/libpyrnn_cuda.so): the same model, driven step by step

extern "C" {

// cell 0..3 as in docs/formats.md; tf32 0 = exact fp32 (FMA) math. Env PYRNN_CUDNN_ALGO=0..3 picks
// the cuDNN algorithm (default 0, STANDARD). NULL on error (see gpu_last_error).
void* gpu_lm_new(int cell, int V, int E, int H, int L, int B, int T, int tf32) {
    Config c;
    c.cell = cell; c.vocab_size = V; c.embed_size = E; c.hidden_size = H; c.n_layers = L;
    const char* env = getenv("PYRNN_CUDNN_ALGO");
    int algo = env && *env ? atoi(env) : CUDNN_RNN_ALGO_STANDARD;
    if (algo < 0 || algo > 3) { fail("PYRNN_CUDNN_ALGO must be 0..3, got '%s'", env); return NULL; }
    return gpu_lm_create(c, B, T, tf32 != 0, algo);
}

void gpu_lm_free(void* self) { gpu_lm_destroy((GpuLM*)self); }

const char* gpu_last_error(void) { return pyrnn_last_error(); }

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
int gpu_lm_forward(void* self, float* loss, const int* inputs, const int* targets, const float* h0, const float* c0) {
    GpuLM* g = (GpuLM*)self;
    if (gpu_upload_tokens(g, inputs, targets)) return -1;
    if (gpu_set_lbh(g, g->h[0], h0)) return -1;
    if (is_lstm(g) && gpu_set_lbh(g, g->c[0], c0)) return -1;
    g->cur = 0;
    if (gpu_forward(g, 1, targets != NULL, g->h[0], g->c[0], g->h[1], g->c[1])) return -1;
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

}  // extern "C"
