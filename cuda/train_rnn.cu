/*
pyrnn's GPU trainer: ./train_gpu, the character LM of c/train_rnn.c with the recurrent stack in
cuDNN (cuda/gpu_model.cuh), behind the shared training driver (c/driver.h: flags, data,
checkpoints, eval, sampling, errors). This file is the driver's Backend table for the GPU model and
main, which takes the GPU's own flags out of argv:

    ./train_gpu [--math fp32|tf32] [--cudnn-algo auto|standard|persist_static|persist_small_h] <train_cpu flags>

--math fp32 (default): cuDNN FMA math and plain fp32 cuBLAS, what the compare-outputs harness
checks; tf32 lets cuDNN (CUDNN_DEFAULT_MATH) and cuBLAS use TF32 tensor cores, PyTorch's default
for fp32 RNNs. --cudnn-algo (default auto, or $PYRNN_CUDNN_ALGO): see gpu_auto_algos and
rnn_fallback (cuda/cudnn_rnn.cuh); the choice and the reason for it are printed when the model is
made. With -DUSE_MPI and NCCL, ./train_gpu_mpi averages each step over ranks (cuda/mpi_nccl.cuh).
The host model of c/train_rnn.c draws the initial weights and samples, as for every backend.
*/
#define PYRNN_LIBRARY
#include "../c/train_rnn.c"   // the model on the host: initial weights and sampling
#include "../c/driver.h"      // the Backend table, flags and the training loop
#include "gpu_model.cuh"      // the model on the device
#include "mpi_nccl.cuh"       // data-parallel ranks (./train_gpu_mpi); no-ops in one process

static int gpu_math_tf32 = 0;                // --math tf32
static int gpu_rnn_algo = GPU_ALGO_AUTO;     // --cudnn-algo, else $PYRNN_CUDNN_ALGO, else auto

static void* gb_create(Config c, int B, int T, const TrainOptions* opts) {
    float dropout = opts->dropout;
    if (opts->bf16) {
        fail("-M bf16 is a CPU precision (given, or from the checkpoint resumed: -M fp32 overrides it); on the "
             "GPU, --math tf32 runs the tensor cores");
        return NULL;
    }
    if (opts->weight_drop > 0.0f || opts->embed_dropout > 0.0f || opts->locked) {
        fail("%s is not implemented on the GPU yet (given, or from the checkpoint resumed: -W 0, -D 0 or -d step "
             "overrides it; train_cpu has it); cuDNN's dropout is per step: use -p",
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

static const char* gb_about(void* self) { return ((GpuLM*)self)->label; }

static int gb_set_params(void* self, const float* params, const float* m, const float* v, int adam_t, uint64_t rng) {
    GpuLM* g = (GpuLM*)self;
    if (gpu_set_rng(g, rng) || gpu_set_params(g, params)) return -1;
    return gpu_set_adam(g, m, v, adam_t);
}

// asked for rng: a checkpoint is being written (see gpu_get_rng)
static int gb_get_params(void* self, float* params, float* m, float* v, int* adam_t, uint64_t* rng) {
    GpuLM* g = (GpuLM*)self;
    if (gpu_get_params(g, params, m, v, adam_t)) return -1;
    return rng ? gpu_get_rng(g, rng) : 0;
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
    int status = gpu_get_params(g, host->params, NULL, NULL, NULL);
    if (status == 0) status = model_sample(host, out, &prime, 1, n, temperature, top_k, seed);
    model_free(host);
    return status;
}

// every rank reaches nccl_step_mean, failed or not: the loss and gradients become means over all ranks
static int gb_train_step(void* self, float* loss, float* grad_norm, const int* inputs, const int* targets,
                         const StepParams* sp) {
    GpuLM* g = (GpuLM*)self;
    int status = gpu_train_grads(g, inputs, targets);
    if (nccl_step_mean(status, g->scalars, g->grads, g->num_params, g->stream)) return -1;
    if (gpu_train_update(g, loss, grad_norm, sp->lr, sp->beta1, sp->beta2, sp->eps, sp->weight_decay,
                         sp->max_grad_norm)) return -1;
    return nccl_step_timed();   // the all-reduce's time, now that the step has been waited for
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
            fprintf(stderr, "error: --cudnn-algo must be auto, standard, persist_static or persist_small_h, got "
                    "'%s'\n", val);
            return 2;
        }
    }
    argv[n] = NULL;
    for (int i = 1; i < n; i++)
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            printf("GPU flags (before or among the others):\n"
                   "  --math fp32|tf32       fp32: exact (cuDNN FMA math, no TF32); tf32: tensor cores\n"
                   "                         (default fp32)\n"
                   "  --cudnn-algo auto|standard|persist_static|persist_small_h\n"
                   "                         cuDNN RNN algorithm (default auto, or $PYRNN_CUDNN_ALGO): auto takes\n"
                   "                         persist_small_h for small H, persist_static where the shape suits it,\n"
                   "                         else standard, the first that cuDNN runs (in fp32: and that gives\n"
                   "                         standard's results); the choice is printed\n");
            break;
        }
    return train_main(n, argv, &gpu_backend);
}

