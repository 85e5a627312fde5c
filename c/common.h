// common.h: what every part of pyrnn shares. Includes and OpenMP stand-ins, the per-thread error
// message, aligned allocation, the random generator, the cell table, the model's Config and its
// parameter layout (the one size table that every flat buffer, checkpoint and tensor name follows).
#pragma once
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
// errors: library calls never exit; they return -1 and leave a one-line message here, one per
// thread, so two models used from two threads never overwrite each other's message

static __thread char pyrnn_error_msg[1024];

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
// random numbers: splitmix64, one 64-bit state, cheap to checkpoint. Its output function is shared
// with the GPU's kernels (a counter through it gives independent uniform 64-bit values).

#ifdef __CUDACC__
#define HOST_DEVICE __host__ __device__
#else
#define HOST_DEVICE
#endif
#define RNG_GAMMA 0x9E3779B97F4A7C15ull

HOST_DEVICE static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static uint64_t rng_next(uint64_t* state) { return mix64(*state += RNG_GAMMA); }
static float rng_uniform(uint64_t* state) { return (float)((rng_next(state) >> 40) * (1.0 / 16777216.0)); }
static float rng_normal(uint64_t* state) {
    double u1 = ((rng_next(state) >> 11) + 1.0) * (1.0 / 9007199254740993.0);   // (0, 1]
    double u2 = (rng_next(state) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

// ----------------------------------------------------------------------------
// the cells (ids are stored in checkpoints and reference files) and the model's configuration

enum { CELL_RNN = 0, CELL_RNN_RELU = 1, CELL_LSTM = 2, CELL_GRU = 3, N_CELLS };
static const char* const cell_names[N_CELLS] = { "rnn", "rnn_relu", "lstm", "gru" };
static int cell_gates(int cell) { return cell == CELL_LSTM ? 4 : cell == CELL_GRU ? 3 : 1; }

static int cell_from_name(const char* name) {
    for (int i = 0; i < N_CELLS; i++) if (strcmp(name, cell_names[i]) == 0) return i;
    return -1;
}

// "rnn, rnn_relu, lstm or gru", from the table, for messages
static const char* cell_list(void) {
    static __thread char list[64];   // per thread, as the message it goes into
    if (!list[0])
        for (int i = 0; i < N_CELLS; i++)
            snprintf(list + strlen(list), sizeof(list) - strlen(list), "%s%s", cell_names[i],
                     i + 2 < N_CELLS ? ", " : i + 1 < N_CELLS ? " or " : "");
    return list;
}

typedef struct {
    int cell, vocab_size, embed_size, hidden_size, n_layers;
} Config;

// the one check of a recurrent stack's shape, for the layer API and the language model alike
static int stack_config_check(int cell, int input_size, int hidden_size, int n_layers) {
    if (cell < 0 || cell >= N_CELLS)
        return fail("unknown cell %d (expected 0..%d: %s)", cell, N_CELLS - 1, cell_list());
    if (input_size <= 0) return fail("input size must be positive, got %d", input_size);
    if (hidden_size <= 0) return fail("hidden size must be positive, got %d", hidden_size);
    if (n_layers <= 0) return fail("number of layers must be positive, got %d", n_layers);
    return 0;
}

static int config_check(const Config* c) {
    if (c->vocab_size <= 0) return fail("vocabulary size must be positive, got %d", c->vocab_size);
    if (c->embed_size <= 0) return fail("embedding size must be positive, got %d", c->embed_size);
    return stack_config_check(c->cell, c->embed_size, c->hidden_size, c->n_layers);
}

// a batch of B streams x T steps; the bound keeps every row index in an int
#define MAX_BATCH_TOKENS (1LL << 30)
static int batch_shape_check(int B, int T) {
    if (B <= 0 || T <= 0) return fail("batch size and sequence length must be positive, got B=%d T=%d", B, T);
    if ((long long)B * T > MAX_BATCH_TOKENS) return fail("batch of B=%d x T=%d is too large", B, T);
    return 0;
}

// every token id in [0, V), or a message naming the first that is not
static int tokens_check(const int* tokens, size_t n, int V, const char* what) {
    for (size_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= V)
            return fail("%s token %d at position %zu is outside the vocabulary [0, %d)", what, tokens[i], i, V);
    return 0;
}

// ----------------------------------------------------------------------------
// the parameter layout, described once. A recurrent stack holds per layer, in torch's order,
// weight_ih (G*H, in), weight_hh (G*H, H), bias_ih (G*H), bias_hh (G*H); the language model is
// embedding.weight (V, E), the stack as rnn.*, head.weight (V, H), head.bias (V). Parameters,
// gradients, AdamW moments, checkpoints and the GPU's copies all lay these tensors back to back.

enum { W_IH, W_HH, B_IH, B_HH, N_KINDS };
static const char* const param_kind_names[N_KINDS] = { "weight_ih", "weight_hh", "bias_ih", "bias_hh" };

// floats in tensor `kind` of layer l (0 for a bias the stack does not have)
static size_t stack_tensor_numel(int cell, int input_size, int hidden_size, int has_bias, int l, int kind) {
    size_t GH = (size_t)cell_gates(cell) * hidden_size;
    if (kind == W_IH) return GH * (l == 0 ? input_size : hidden_size);
    if (kind == W_HH) return GH * hidden_size;
    return has_bias ? GH : 0;
}

size_t stack_num_params(int cell, int input_size, int hidden_size, int n_layers, int has_bias) {
    size_t n = 0;
    for (int l = 0; l < n_layers; l++)
        for (int k = 0; k < N_KINDS; k++) n += stack_tensor_numel(cell, input_size, hidden_size, has_bias, l, k);
    return n;
}

// the LM's tensors in state_dict order: name, offset into the flat buffer, element count
int model_tensor_count(const Config* c) { return 3 + N_KINDS * c->n_layers; }

void model_tensor_info(const Config* c, int i, char* name, size_t name_size, size_t* offset, size_t* numel) {
    size_t V = c->vocab_size, E = c->embed_size, H = c->hidden_size, off = 0;
    int n_stack = N_KINDS * c->n_layers;
    for (int j = 0;; j++) {
        size_t n;
        if (j == 0) { n = V * E; snprintf(name, name_size, "embedding.weight"); }
        else if (j <= n_stack) {
            int l = (j - 1) / N_KINDS, k = (j - 1) % N_KINDS;
            n = stack_tensor_numel(c->cell, c->embed_size, c->hidden_size, 1, l, k);
            snprintf(name, name_size, "rnn.%s_l%d", param_kind_names[k], l);
        } else if (j == n_stack + 1) { n = V * H; snprintf(name, name_size, "head.weight"); }
        else { n = V; snprintf(name, name_size, "head.bias"); }
        if (j == i || j == n_stack + 2) { *offset = off; *numel = n; return; }
        off += n;
    }
}

// how a model trains beyond its shape; checkpoints keep it, so a resumed run goes on the same way
typedef struct {
    float dropout;         // between layers and before the head, while training (-p)
    int locked;            // dropout masks: 0 a fresh one per step, 1 one per stream per batch (-d locked)
    float weight_drop;     // DropConnect on every layer's W_hh, one mask per batch (-W)
    float embed_dropout;   // whole rows of the embedding table dropped, one mask per batch (-D)
    int bf16;              // GEMM operands rounded to bf16, products summed in fp32 (-M bf16); else fp32
} TrainOptions;

size_t model_num_params(Config c) {
    char name[64];
    size_t offset, numel;
    model_tensor_info(&c, model_tensor_count(&c) - 1, name, sizeof(name), &offset, &numel);
    return offset + numel;
}
