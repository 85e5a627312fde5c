/*
gpu_model.cuh: the character LM of c/train_rnn.c on the GPU. Embedding(V, E) -> the recurrent stack
on cuDNN (cudnn_rnn.cuh) -> dropout -> Linear(H, V) on cuBLAS -> bias + softmax cross-entropy, and
the global-norm clip and AdamW, in kernels of our own (kernels.cuh). Same model, same flat
parameter layout (torch state_dict order, common.h's table), same AdamW and clipping semantics.
train_gpu's backend (cuda/train_rnn.cu) and the library behind pyrnn/_cuda.py (cuda/lib_rnn.cu)
are both built on these functions.

Layout: our flat params on the device are the master copy (AdamW, clipping and checkpoints work on
that one buffer); the stack's part is copied into cuDNN's weight space before a forward, only when
the params changed. Activations are time-major (row t*B + b), as on the CPU. One stream; a
training step waits once, for the loss and the gradient norm.

Deterministic: the same inputs give the same bits, run after run (the embedding gradient is summed
in a fixed order, every reduction has a fixed shape, cuBLAS has one workspace configuration), so a
resumed run continues exactly.

Dropout: cuDNN's dropout descriptor between layers, our dropout_kernel before the head. The masks
need not match the CPU's; they follow from the run's generator `rng` (in the checkpoint): the
head's mask of a step from a seed drawn from rng, and cuDNN's generator is re-seeded from rng
whenever rng enters (gpu_set_rng) or leaves (gpu_get_rng) the model, or the rate changes, so a
resumed run draws what the uninterrupted one drew.
*/
#pragma once
#include "cudnn_rnn.cuh"   // the stack on cuDNN: descriptors, algorithm choice, weight map

typedef struct {
    Config config;
    int B, T, tf32;
    float dropout;                                   // the rate of training forwards (0: none)
    size_t num_params, lbh;
    uint64_t rng;                                    // the run's generator (checkpointed): dropout seeds
    uint64_t head_seed;                              // the last training forward's head-dropout seed
    int adam_t;
    int fault_nan_step;                              // PYRNN_FAULT_NAN_GRAD_STEP (train_gpu only)
    char about[1400];                                // device, libraries, math and algorithm, for the log
    char label[64];                                  // "cuDNN persist_small_h, fp32", for the banner
    cudaStream_t stream;
    cudnnHandle_t dnn;
    cublasHandle_t blas;
    // flat buffers in torch state_dict order: the master copy
    float *params, *grads, *m, *v;
    float *head_w, *head_b, *dhead_w, *dhead_b;      // views into params / grads
    float *rnn_params, *rnn_grads;                   // the stack's part (rnn.*)
    CudnnRnn rnn;
    int weights_dirty;                               // params changed since the last copy into cuDNN's
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
    float *dhx, *dcx;                                // (L, B, H)
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
static size_t gpu_bt(const GpuLM* g) { return (size_t)g->B * g->T; }

static void gpu_lm_destroy(GpuLM* g) {
    if (!g) return;
    if (g->stream) CUDA_RELEASE(cudaStreamSynchronize(g->stream));
    rnn_free(&g->rnn);
    void* bufs[] = { g->params, g->grads, g->m, g->v, g->dev_tokens, g->chunk_sums,
                     g->x, g->dx, g->y, g->dy, g->head_in, g->logits, g->dlogits, g->row_loss, g->ones,
                     g->h[0], g->h[1], g->c[0], g->c[1], g->eh[0], g->eh[1], g->ec[0], g->ec[1],
                     g->dhx, g->dcx, g->norm_partials, g->scalars };
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) gpu_free(bufs[i]);
    if (g->host_scalars) CUDA_RELEASE(cudaFreeHost(g->host_scalars));
    if (g->host_tokens) CUDA_RELEASE(cudaFreeHost(g->host_tokens));
    free(g->counts);
    if (g->dnn) CUDNN_RELEASE(cudnnDestroy(g->dnn));
    if (g->blas) CUBLAS_RELEASE(cublasDestroy(g->blas));
    if (g->stream) CUDA_RELEASE(cudaStreamDestroy(g->stream));
    free(g);
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
    snprintf(g->label, sizeof(g->label), "cuDNN %s, %s", gpu_algo_name(g->rnn.algo), g->tf32 ? "tf32" : "fp32");
    if (dnn / 10000 != CUDNN_MAJOR)
        return fail("cuDNN %zu.%zu was loaded, this build needs cuDNN %d (check LD_LIBRARY_PATH, or rebuild)",
                    dnn / 10000, dnn % 10000 / 100, CUDNN_MAJOR);
    return 0;
}

// the seed of cuDNN's dropout generator, from the run's generator
static uint64_t gpu_dropout_seed(const GpuLM* g) { return mix64(g->rng ^ 0xD1B54A32D192ED03ull); }

// the rate of training forwards, between layers and before the head; changing it restarts cuDNN's
// generator from rng
static int gpu_set_dropout(GpuLM* g, float p) {
    if (!(p >= 0.0f && p < 1.0f)) return fail("dropout must be in [0, 1), got %g", (double)p);
    if (p == g->dropout) return 0;
    if (g->fwd_ready)   // cuDNN's backward reads the forward's masks through the descriptor
        return fail("the dropout rate cannot change between a forward pass and its backward");
    if (p > 0.0f && !g->head_in &&
        gpu_alloc(&g->head_in, gpu_bt(g) * g->config.hidden_size * 4, "the head's dropped input")) return -1;
    if (rnn_set_dropout(&g->rnn, p, gpu_dropout_seed(g))) return -1;
    g->dropout = p;
    return 0;
}

// the run's generator arrives (fresh: from the seed; resumed: from the checkpoint) or is asked for
// (a checkpoint is being written): either way cuDNN's generator restarts from it, as it will in a
// run resumed from that checkpoint
static int gpu_set_rng(GpuLM* g, uint64_t rng) {
    g->rng = rng;
    return rnn_seed_dropout(&g->rnn, gpu_dropout_seed(g));
}

static int gpu_get_rng(GpuLM* g, uint64_t* rng) {
    *rng = g->rng;
    return rnn_seed_dropout(&g->rnn, gpu_dropout_seed(g));
}

static int gpu_lm_init(GpuLM* g, Config c, int B, int T, int tf32, int algo, float dropout) {
    if (gpu_fix_cublas_workspace()) return -1;   // before any handle exists
    if (config_check(&c) || batch_shape_check(B, T)) return -1;
    if (!(dropout >= 0.0f && dropout < 1.0f)) return fail("dropout must be in [0, 1), got %g", (double)dropout);
    g->config = c; g->B = B; g->T = T; g->tf32 = tf32;
    g->num_params = model_num_params(c);
    g->lbh = (size_t)c.n_layers * B * c.hidden_size;
    g->rng = 1;
    int V = c.vocab_size, E = c.embed_size, H = c.hidden_size, L = c.n_layers;
    size_t P = g->num_params, bt = gpu_bt(g);

    if (gpu_check_device()) return -1;   // the first CUDA call: a machine without a usable GPU stops here
    CUDA_CHECK(cudaStreamCreate(&g->stream));
    CUDNN_CHECK(cudnnCreate(&g->dnn));
    CUDNN_CHECK(cudnnSetStream(g->dnn, g->stream));
    CUBLAS_CHECK(cublasCreate(&g->blas));
    CUBLAS_CHECK(cublasSetStream(g->blas, g->stream));
    CUBLAS_CHECK(cublasSetMathMode(g->blas, tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));

    // parameters, gradients, AdamW moments: one buffer each, with views by the layout table
    if (gpu_alloc(&g->params, P * 4, "parameters") || gpu_alloc(&g->grads, P * 4, "gradients") ||
        gpu_alloc(&g->m, P * 4, "AdamW m") || gpu_alloc(&g->v, P * 4, "AdamW v")) return -1;
    float* zero_params[] = { g->params, g->grads, g->m, g->v };
    for (int i = 0; i < 4; i++) CUDA_CHECK(cudaMemset(zero_params[i], 0, P * 4));
    char name[64];
    size_t off[3], numel;
    int where[3] = { 1, model_tensor_count(&c) - 2, model_tensor_count(&c) - 1 };   // rnn.*, head.weight, head.bias
    for (int i = 0; i < 3; i++) model_tensor_info(&c, where[i], name, sizeof(name), &off[i], &numel);
    g->rnn_params = g->params + off[0]; g->rnn_grads = g->grads + off[0];
    g->head_w = g->params + off[1]; g->dhead_w = g->grads + off[1];
    g->head_b = g->params + off[2]; g->dhead_b = g->grads + off[2];

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
        gpu_alloc(&g->logits, bt * V * 4, "logits") || gpu_alloc(&g->dlogits, bt * V * 4, "logit gradients") ||
        gpu_alloc(&g->row_loss, bt * 4, "row losses") || gpu_alloc(&g->ones, bt * 4, "ones") ||
        gpu_alloc(&g->h[0], lbh * 4, "hidden state") || gpu_alloc(&g->h[1], lbh * 4, "hidden state") ||
        gpu_alloc(&g->c[0], lbh * 4, "cell state") || gpu_alloc(&g->c[1], lbh * 4, "cell state") ||
        gpu_alloc(&g->eh[0], lbh * 4, "eval state") || gpu_alloc(&g->eh[1], lbh * 4, "eval state") ||
        gpu_alloc(&g->ec[0], lbh * 4, "eval state") || gpu_alloc(&g->ec[1], lbh * 4, "eval state") ||
        gpu_alloc(&g->dhx, lbh * 4, "state gradients") || gpu_alloc(&g->dcx, lbh * 4, "state gradients") ||
        gpu_alloc(&g->norm_partials, NORM_BLOCKS * sizeof(double), "norm partials") ||
        gpu_alloc(&g->scalars, 4 * sizeof(float), "scalars"))
        return -1;
    float* zero_bufs[] = { g->h[0], g->h[1], g->c[0], g->c[1], g->eh[0], g->eh[1], g->ec[0], g->ec[1], g->dhx,
                           g->dcx };
    for (size_t i = 0; i < sizeof(zero_bufs) / sizeof(zero_bufs[0]); i++)
        CUDA_CHECK(cudaMemset(zero_bufs[i], 0, lbh * 4));
    CUDA_CHECK(cudaMemset(g->scalars, 0, 4 * sizeof(float)));
    CUDA_CHECK(cudaMemset(g->row_loss, 0, bt * 4));
    fill_kernel<<<blocks_for(bt, 1024), 256, 0, g->stream>>>(g->ones, 1.0f, bt);
    LAUNCH_CHECK("fill_kernel");
    CUDA_CHECK(cudaMallocHost((void**)&g->host_scalars, 4 * sizeof(float)));

    // the stack: the algorithm is chosen (and tried with this dropout rate) once, here
    char algo_note[900];
    if (rnn_init(&g->rnn, g->dnn, g->stream, c.cell, E, H, L, B, T, tf32)) return -1;
    if (rnn_choose(&g->rnn, algo, dropout, algo_note, sizeof(algo_note))) return -1;
    g->weights_dirty = 1;   // the trial left its own weights in cuDNN's weight space
    if (gpu_set_dropout(g, dropout) || gpu_set_rng(g, g->rng)) return -1;
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

// n floats from the host, or zeros for NULL; waits, so src may be freed on return
static int gpu_set_floats(GpuLM* g, float* dst, const float* src, size_t n) {
    if (src) { if (gpu_upload(dst, src, n * 4, g)) return -1; }
    else CUDA_CHECK(cudaMemsetAsync(dst, 0, n * 4, g->stream));
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
    return 0;
}

// state (L, B, H) from the host, or zeros for NULL (no wait: the caller's next step waits)
static int gpu_set_lbh(GpuLM* g, float* dst, const float* src) {
    if (src) return gpu_upload(dst, src, g->lbh * 4, g);
    CUDA_CHECK(cudaMemsetAsync(dst, 0, g->lbh * 4, g->stream));
    return 0;
}

static int gpu_set_params(GpuLM* g, const float* params) {
    g->weights_dirty = 1;
    return gpu_set_floats(g, g->params, params, g->num_params);
}

// AdamW's moments and step count (m, v NULL: zeros); the parameters are left as they are
static int gpu_set_adam(GpuLM* g, const float* m, const float* v, int adam_t) {
    if (adam_t < 0) return fail("AdamW step count must be >= 0, got %d", adam_t);
    if (gpu_set_floats(g, g->m, m, g->num_params) || gpu_set_floats(g, g->v, v, g->num_params)) return -1;
    g->adam_t = adam_t;
    return 0;
}

// what is not NULL of params, m, v, adam_t
static int gpu_get_params(GpuLM* g, float* params, float* m, float* v, int* adam_t) {
    size_t bytes = g->num_params * 4;
    if (params && gpu_download(params, g->params, bytes, g)) return -1;
    if (m && gpu_download(m, g->m, bytes, g)) return -1;
    if (v && gpu_download(v, g->v, bytes, g)) return -1;
    if (adam_t) *adam_t = g->adam_t;
    return 0;
}

// Token ids are checked here: a bad one would read outside the embedding table. The staging
// buffer is pinned, so the copy is truly asynchronous; every caller has waited on the stream since
// the last copy out of it (a step ends by reading the loss). With the tokens goes the embedding
// gradient's order: each token's rows (t*B + b), in row order, cut into chunks of EMB_CHUNK.
static int gpu_upload_tokens(GpuLM* g, const int* inputs, const int* targets) {
    int B = g->B, T = g->T, V = g->config.vocab_size;
    size_t bt = gpu_bt(g);
    if (tokens_check(inputs, bt, V, "input") || (targets && tokens_check(targets, bt, V, "target"))) return -1;
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

// Tokens already on the device. Runs embedding -> cuDNN stack (from hx, cx; final state to hy, cy)
// -> dropout (training) -> head -> bias + softmax cross-entropy (+ dlogits when training with
// targets). The loss, if any, is left in scalars[0]. training selects cuDNN's training mode,
// which fills the reserve space that the backward pass reads, and applies dropout.
static int gpu_forward(GpuLM* g, int training, int has_targets, const float* hx, const float* cx, float* hy,
                       float* cy) {
    const Config* c = &g->config;
    int B = g->B, T = g->T, V = c->vocab_size, E = c->embed_size, H = c->hidden_size;
    int bt = B * T;
    g->fwd_ready = 0;
    if (g->weights_dirty) {
        if (rnn_load_weights(&g->rnn, g->rnn_params)) return -1;
        g->weights_dirty = 0;
    }
    embedding_forward_kernel<<<bt, threads_for(E), 0, g->stream>>>(g->x, g->params, g->inputs, B, T, E);
    LAUNCH_CHECK("embedding_forward_kernel");
    if (rnn_forward(&g->rnn, training, g->x, g->y, hx, hy, cx, cy)) return -1;
    g->fwd_dropped = training && g->dropout > 0.0f;
    g->head_x = g->y;
    if (g->fwd_dropped) {
        g->head_seed = rng_next(&g->rng);
        dropout_kernel<<<blocks_for((size_t)bt * H, 4096), 256, 0, g->stream>>>(
            g->head_in, g->y, (size_t)bt * H, g->dropout, 1.0f / (1.0f - g->dropout), g->head_seed);
        LAUNCH_CHECK("dropout_kernel");
        g->head_x = g->head_in;
    }
    // logits (T*B, V) = head_x (T*B, H) W^T; row-major on our side is column-major transposed on cuBLAS's
    const float one = 1.0f, zero = 0.0f;
    CUBLAS_CHECK(cublasSgemm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, V, bt, H, &one, g->head_w, H, g->head_x, H, &zero,
                             g->logits, V));
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
    int V = c->vocab_size, E = c->embed_size, H = c->hidden_size, bt = (int)gpu_bt(g);
    const float one = 1.0f, zero = 0.0f;
    // head: dW (V, H) += dlogits^T head_x; db += column sums of dlogits; dy (T*B, H) = dlogits W
    CUBLAS_CHECK(cublasSgemm(g->blas, CUBLAS_OP_N, CUBLAS_OP_T, H, V, bt, &one, g->head_x, H, g->dlogits, V, &one,
                             g->dhead_w, H));
    CUBLAS_CHECK(cublasSgemv(g->blas, CUBLAS_OP_N, V, bt, &one, g->dlogits, V, g->ones, 1, &one, g->dhead_b, 1));
    CUBLAS_CHECK(cublasSgemm(g->blas, CUBLAS_OP_N, CUBLAS_OP_N, H, bt, V, &one, g->head_w, H, g->dlogits, V, &zero,
                             g->dy, H));
    if (g->fwd_dropped) {   // the forward's mask again, from its seed
        dropout_kernel<<<blocks_for((size_t)bt * H, 4096), 256, 0, g->stream>>>(
            g->dy, g->dy, (size_t)bt * H, g->dropout, 1.0f / (1.0f - g->dropout), g->head_seed);
        LAUNCH_CHECK("dropout_kernel");
    }
    const float* cx = is_lstm(g) ? g->fwd_cx : NULL;
    if (rnn_backward(&g->rnn, g->x, g->y, g->dy, g->dx, g->fwd_hx, g->dhx, cx, g->dcx)) return -1;
    if (rnn_add_grads(&g->rnn, g->rnn_grads)) return -1;
    embedding_chunk_sums_kernel<<<g->n_chunks, threads_for(E), 0, g->stream>>>(g->chunk_sums, g->dx, g->rows,
                                                                                g->chunk_start, E);
    LAUNCH_CHECK("embedding_chunk_sums_kernel");
    embedding_add_kernel<<<g->n_tokens, threads_for(E), 0, g->stream>>>(g->grads, g->chunk_sums, g->token,
                                                                         g->token_chunk, E);
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
    grad_norm_finalize_kernel<<<1, REDUCE_THREADS, 0, g->stream>>>(g->scalars, g->norm_partials, NORM_BLOCKS,
                                                                   max_grad_norm);
    LAUNCH_CHECK("grad_norm_finalize_kernel");
    int t = g->adam_t + 1;
    float bc1 = 1.0f - powf(beta1, (float)t);
    float bc2_sqrt = sqrtf(1.0f - powf(beta2, (float)t));
    adamw_kernel<<<blocks_for(P, 4096), 256, 0, g->stream>>>(
        g->params, g->m, g->v, g->grads, P, g->scalars, beta1, beta2, eps, 1.0f - lr * weight_decay, lr / bc1,
        bc2_sqrt);
    LAUNCH_CHECK("adamw_kernel");
    g->weights_dirty = 1;
    return 0;
}

// after gpu_step, scalars copied to host_scalars: count the step if it was taken
static void gpu_step_done(GpuLM* g) {
    if (g->host_scalars[3] != 0.0f) g->adam_t++;
}

// PYRNN_FAULT_NAN_GRAD_STEP (fault_nan_step) poisons one gradient element of that optimizer step,
// as the CPU backend does
static int gpu_poison_grad(GpuLM* g) {
    if (g->fault_nan_step <= 0 || g->adam_t + 1 != g->fault_nan_step) return 0;
    fill_kernel<<<1, WARP, 0, g->stream>>>(g->grads, NAN, 1);
    LAUNCH_CHECK("fill_kernel");
    g->fault_nan_step = 0;
    return 0;
}

// A training step is two halves, so that a data-parallel trainer can average the gradients
// between them. The first: forward from the carried state, zero grads, backward.
static int gpu_train_grads(GpuLM* g, const int* inputs, const int* targets) {
    int cur = g->cur, nxt = 1 - cur;
    if (gpu_upload_tokens(g, inputs, targets) || gpu_forward(g, 1, 1, g->h[cur], g->c[cur], g->h[nxt], g->c[nxt]) ||
        gpu_zero_grad(g) || gpu_backward(g) || gpu_poison_grad(g)) return -1;
    return 0;
}

// The second: clip + AdamW, and the host waits once, for the loss and the norm; the final state
// becomes the carried one.
static int gpu_train_update(GpuLM* g, float* loss, float* grad_norm, float lr, float beta1, float beta2, float eps,
                            float weight_decay, float max_grad_norm) {
    if (gpu_step(g, lr, beta1, beta2, eps, weight_decay, max_grad_norm)) return -1;
    if (gpu_download(g->host_scalars, g->scalars, 4 * sizeof(float), g)) return -1;
    gpu_step_done(g);
    g->cur = 1 - g->cur;
    if (loss) *loss = g->host_scalars[0];
    if (grad_norm) *grad_norm = g->host_scalars[1];
    return 0;
}
