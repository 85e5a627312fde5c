/*
lib/libpyrnn_cuda.so, the library behind pyrnn/_cuda.py and CharLM(backend='cuda'): the GPU model
of cuda/gpu_model.cuh, the one train_gpu trains, driven step by step through a C API. It holds
what the C engine holds: parameters, gradients, AdamW's moments and step count, the dropout rate
and the run's generator, each readable and writable, so that a checkpoint is complete.

Every function but gpu_lm_new returns 0, or -1 with the reason in gpu_last_error() (one line, per
thread). Arrays are float32 / int32 in host memory, C order: parameters, gradients and moments
(P,) in torch state_dict order; tokens (B, T); states (L, B, H), NULL for zeros where an input,
and c only for LSTM (may be NULL). pyrnn/_cuda.py's CALLS lists these signatures once for ctypes,
and tests check the two against each other and against the built library's exports.
*/
#include "gpu_model.cuh"

extern "C" {

// cell 0..3 as in docs/formats.md; tf32 0 = exact fp32 (FMA) math; algo "auto", "standard",
// "persist_static" or "persist_small_h" (NULL or "": $PYRNN_CUDNN_ALGO, else auto); dropout the
// rate of training forwards (gpu_lm_set_dropout changes it). Parameters and moments start at zero,
// the generator at 1. NULL on error (see gpu_last_error).
void* gpu_lm_new(int cell, int V, int E, int H, int L, int B, int T, int tf32, const char* algo, float dropout) {
    Config c;
    c.cell = cell; c.vocab_size = V; c.embed_size = E; c.hidden_size = H; c.n_layers = L;
    int a = GPU_ALGO_AUTO;
    if (gpu_algo_parse(&a, algo && *algo ? algo : getenv("PYRNN_CUDNN_ALGO"))) return NULL;
    return gpu_lm_create(c, B, T, tf32 != 0, a, dropout);
}

void gpu_lm_free(void* self) { gpu_lm_destroy((GpuLM*)self); }

const char* gpu_last_error(void) { return pyrnn_last_error(); }

// one line: device, driver, libraries, math, the cuDNN algorithm, why it was chosen, what was not
const char* gpu_lm_about(void* self) { return ((GpuLM*)self)->about; }

// the cuDNN RNN algorithm in use, by name
const char* gpu_lm_algo(void* self) { return gpu_algo_name(((GpuLM*)self)->rnn.algo); }

// parameters only: AdamW's moments and step count stay as they are (gpu_lm_set_adam sets them)
int gpu_lm_set_params(void* self, const float* params) { return gpu_set_params((GpuLM*)self, params); }

int gpu_lm_get_params(void* self, float* params) { return gpu_get_params((GpuLM*)self, params, NULL, NULL, NULL); }

int gpu_lm_get_grads(void* self, float* grads) {
    GpuLM* g = (GpuLM*)self;
    return gpu_download(grads, g->grads, g->num_params * 4, g);
}

// the gradients (e.g. clipped by the caller); backward adds to them
int gpu_lm_set_grads(void* self, const float* grads) {
    GpuLM* g = (GpuLM*)self;
    return gpu_set_floats(g, g->grads, grads, g->num_params);
}

// AdamW's first and second moments (P,) and the number of steps taken; m, v NULL: zeros
int gpu_lm_set_adam(void* self, const float* m, const float* v, int adam_t) {
    return gpu_set_adam((GpuLM*)self, m, v, adam_t);
}

int gpu_lm_get_adam(void* self, float* m, float* v, int* adam_t) {
    return gpu_get_params((GpuLM*)self, NULL, m, v, adam_t);
}

// the run's generator (checkpoints store it): each training forward with dropout draws the head's
// mask seed from it. Reading or writing it restarts cuDNN's dropout generator from it, so a model
// given a checkpoint's state draws what the model that wrote it draws next.
int gpu_lm_set_rng(void* self, uint64_t rng) { return gpu_set_rng((GpuLM*)self, rng); }

int gpu_lm_get_rng(void* self, uint64_t* rng) { return gpu_get_rng((GpuLM*)self, rng); }

// the dropout rate of training forwards, in [0, 1): 0 for eval mode, where backward still works
int gpu_lm_set_dropout(void* self, float p) { return gpu_set_dropout((GpuLM*)self, p); }

// training-mode forward of inputs (B, T) from h0 / c0 (L, B, H; NULL = zeros), with the current
// dropout rate. With targets (B, T) it also writes the mean loss and readies backward; targets may
// be NULL (logits only). The final state becomes the carried state of gpu_lm_train_step.
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
    return gpu_download(logits, g->logits, gpu_bt(g) * g->config.vocab_size * 4, g);
}

// final states (L, B, H) of the last forward
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

// dL/dh0, dL/dc0 (L, B, H) of the last backward
int gpu_lm_get_dstate(void* self, float* dh0, float* dc0) {
    GpuLM* g = (GpuLM*)self;
    if (dh0 && gpu_download(dh0, g->dhx, g->lbh * 4, g)) return -1;
    if (dc0 && is_lstm(g) && gpu_download(dc0, g->dcx, g->lbh * 4, g)) return -1;
    return 0;
}

int gpu_lm_zero_grad(void* self) { return gpu_zero_grad((GpuLM*)self); }

// clip to max_norm (0 = off) and one AdamW step; grad_norm gets the norm before clipping. A
// non-finite norm skips the update (parameters, moments and step count stay as they were).
int gpu_lm_step(void* self, float* grad_norm, float lr, float beta1, float beta2, float eps, float weight_decay,
                float max_norm) {
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
    GpuLM* g = (GpuLM*)self;
    if (gpu_train_grads(g, inputs, targets)) return -1;
    return gpu_train_update(g, loss, grad_norm, lr, beta1, beta2, eps, weight_decay, max_norm);
}

}  // extern "C"
