/*
pyrnn: train a character-level RNN, LSTM or GRU language model on the CPU, in one C file.

Semantics are PyTorch's nn.RNN / nn.LSTM / nn.GRU: the same parameter names and shapes, the same
gate order (LSTM i,f,g,o; GRU r,z,n with r applied to W_hn h + b_hn) and both biases, so weights
move to and from torch unchanged. Every layer has an explicit forward and backward pass (BPTT).

Layout: time-major activations (row t*B + b), parameters / gradients / activations each in one
contiguous buffer addressed through pointer tables (the parameter layout is common.h's size table).
Backward passes accumulate into gradients that the caller zeroed first.

Reads top to bottom: embedding, the cells, dropout, the stack, the layer API, the language model,
AdamW, sampling, then the trainer: the CPU backend and main. The machinery lives beside it, one
header each; none of them calls back into this file.

Built two ways: the trainer (./train_cpu, ./train_cpu_mpi), and with -DPYRNN_LIBRARY the model
alone, without the driver or main (the Python extension, the compare-outputs harness and the GPU
trainer's host side include it so). It also compiles as C++ (cuda/train_rnn.cu), hence the casts.
*/
#include "common.h"     // errors, allocation, RNG, the cell table, Config and the parameter layout
#include "fastmath.h"   // exp, sigmoid and tanh without libm, for the gate loops
#include "matmul.h"     // the GEMM, the thread split, parallel sums; isa.h: the per-ISA kernels and cells
#include "fileio.h"     // token files, checkpoints, CRC-32, atomic writes
#ifndef PYRNN_LIBRARY
#include "driver.h"     // the trainer: the Backend table, flags and the training loop (dist.h: MPI)
#endif

// ----------------------------------------------------------------------------
// embedding: x[r] = table[tokens[r]] for n rows (time-major, as the stack runs)

static void embedding_forward(float* x, const float* table, const int* tokens, long n, int E) {
    #pragma omp parallel for schedule(static) if (n * E > PAR_MIN_WORK)
    for (long r = 0; r < n; r++) memcpy(x + r * E, table + (size_t)tokens[r] * E, E * sizeof(float));
}

// row_scale (V) or NULL: the embedding-dropout mask the forward read the rows through
static void embedding_backward(float* dtable, const float* dx, const int* tokens, const float* row_scale, long n,
                               int E) {
    // serial over rows: two rows may share a token
    for (long r = 0; r < n; r++) {
        float* row = dtable + (size_t)tokens[r] * E;
        float scale = row_scale ? row_scale[tokens[r]] : 1.0f;
        for (int e = 0; e < E; e++) row[e] += dx[r * E + e] * scale;
    }
}

// ----------------------------------------------------------------------------
// the regularisers' masks: each element is 0 or 1/(1-p), so a mask's backward is the same multiply.
// The draws are counter-based: element j of row r of a site is draw j of a splitmix64 sequence
// seeded by hashing (the pass's key, the site, the row's id), so a mask depends on the key and on
// global indices only, never on which process holds a stream or how many it holds (data-parallel
// ranks draw what one process would). Sites 1..L are the layers' outputs (L: the head's input),
// then each layer's W_hh (weight drop) and the embedding's rows.
enum { SITE_WEIGHT_DROP = 1 << 16, SITE_EMBEDDING = 2 << 16 };

// mask (n_rows, width). Row r's id is (r / B) << 32 | (first + r % B): a step and a global stream for
// dropout, or the stream alone when per_step is 0 (locked dropout: the same mask at every step), or
// r itself for the rows of a weight or of the embedding (B = n_rows, first = 0, per_step = 0)
static void draw_mask(float* mask, float p, uint64_t key, int site, long n_rows, int width, int B, int first,
                      int per_step) {
    float scale = 1.0f / (1.0f - p);
    uint64_t site_seed = key + (uint64_t)site;
    uint64_t site_key = rng_next(&site_seed);
    #pragma omp parallel for schedule(static) if (n_rows * width > PAR_MIN_WORK)
    for (long r = 0; r < n_rows; r++) {
        uint64_t step = per_step ? (uint64_t)(r / B) << 32 : 0;
        uint64_t row_seed = site_key ^ (step | (uint32_t)(first + r % B));
        uint64_t draws = rng_next(&row_seed);
        for (int j = 0; j < width; j++) mask[(size_t)r * width + j] = rng_uniform(&draws) < p ? 0.0f : scale;
    }
}

static void multiply(float* y, const float* x, const float* mask, size_t n) {
    #pragma omp parallel for schedule(static) if ((long)n > PAR_MIN_WORK)
    for (long i = 0; i < (long)n; i++) y[i] = x[i] * mask[i];
}

// dropout of x (T, B, H), whose row t*B + b is global stream first + b: y = x * mask
static void dropout_forward(float* y, float* mask, const float* x, float p, int locked, uint64_t key, int site,
                            int first, int T, int B, int H) {
    draw_mask(mask, p, key, site, (long)T * B, H, B, first, !locked);
    multiply(y, x, mask, (size_t)T * B * H);
}

static void dropout_backward(float* dx, const float* mask, size_t n) {
    for (size_t i = 0; i < n; i++) dx[i] *= mask[i];
}

// the generator's state for a model made with seed (model_init; pyrnn's C layers start from it too)
uint64_t pyrnn_dropout_state(uint64_t seed) { return seed ^ 0x5DEECE66Dull; }

// ----------------------------------------------------------------------------
// the recurrent stack: L layers of one cell type. Parameters and gradients live in the caller's
// flat buffers (torch order per layer: weight_ih, weight_hh, bias_ih, bias_hh); activations here.

typedef struct {
    int cell, input_size, hidden_size, n_layers, has_bias;
    // regularisers, applied while training (TrainOptions); embed_dropout needs a table
    float dropout, weight_drop, embed_dropout;
    int locked;
    int training;
    int dropped, weights_dropped, rows_dropped;   // what the last forward applied (backward must match it)
    uint64_t* rng;       // the owner's generator: one draw per pass that regularises, the key of its masks
    uint64_t drop_key;   // the last pass's
    float **w_dropped, **w_mask;   // per layer (G*H, H), weight drop: W_hh * mask, and the mask
    float* w_drop_memory;
    int first_stream;    // global index of batch row 0 (a data-parallel rank's first stream)
    Matmul* mm;          // the owner's GEMM context: its kernels (ISA, precision) and scratch
    // per-layer pointer tables into the parameter and gradient buffers
    float **w_ih, **w_hh, **b_ih, **b_hh;
    float **dw_ih, **dw_hh, **db_ih, **db_hh;
    float* zero_bias;    // stands in for the biases when has_bias == 0
    float* zero_bias_grad;
    // activations of the last forward, capacity for max_bt rows of B*T
    int B, T;
    const int* lengths;  // (B) packed-sequence lengths in [1, T], or NULL: every row runs all T steps
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
    const float* table;  // what this pass reads: table_weights, or table_dropped
    const float* table_weights;
    float* dtable;
    float *table_dropped, *table_mask;   // embedding dropout: (V, input_size) rows scaled by (V) mask
    int table_rows;      // V, fixed at creation; 0 when the stack never reads tokens
    float *proj;         // (V, G*H)
    float *dproj;        // (V, G*H), rows by slot: the batch's distinct tokens in order
    float *table_seen;   // (V, input_size): table rows of those tokens, then their gradients
    int *token_slot;     // (V): each token's slot, -1 if the batch did not see it
    int *seen;           // (V): the token in each slot
    int *row_slot;       // (B*T): the slot of each row's token
    int n_seen;
    float *bias_sums;    // (G*H) column sums of one layer's gate gradients
    float *gh;           // (B, G*H) recurrent projection of one step
    float *dgates, *dgates_h, *dy, *dh, *dc;
    float *w_packed;     // W_hh laid out once per pass for the per-step GEMMs
} Stack;

// the stack's per-layer pointer tables, for allocating and freeing them
enum { N_STACK_TABLES = 16 };
static void stack_tables(float*** out[N_STACK_TABLES], Stack* s) {
    float*** all[N_STACK_TABLES] = { &s->w_ih, &s->w_hh, &s->b_ih, &s->b_hh, &s->dw_ih, &s->dw_hh, &s->db_ih,
                                     &s->db_hh, &s->h, &s->c, &s->gates, &s->hn, &s->xin, &s->mask, &s->w_dropped,
                                     &s->w_mask };
    memcpy(out, all, sizeof(all));
}

// points layer l's tensors, in torch's order (weight_ih, weight_hh, bias_ih, bias_hh), at param[k] and
// grad[k] (param or grad NULL: those stay as they are); a NULL bias (as in a stack without biases)
// reads zeros and writes to scratch
static void stack_point_layer(Stack* s, int l, float* const* param, float* const* grad) {
    float** param_tables[N_KINDS] = { s->w_ih, s->w_hh, s->b_ih, s->b_hh };
    float** grad_tables[N_KINDS] = { s->dw_ih, s->dw_hh, s->db_ih, s->db_hh };
    for (int k = 0; k < N_KINDS; k++) {
        if (param) param_tables[k][l] = param[k] ? param[k] : s->zero_bias;
        if (grad) grad_tables[k][l] = grad[k] ? grad[k] : s->zero_bias_grad;
    }
}

// points every layer into flat params / grads, one walk over the layout of common.h; returns the floats used
static size_t stack_point(Stack* s, float* params, float* grads) {
    size_t off = 0;
    for (int l = 0; l < s->n_layers; l++) {
        float *param[N_KINDS], *grad[N_KINDS];
        for (int k = 0; k < N_KINDS; k++) {
            size_t n = stack_tensor_numel(s->cell, s->input_size, s->hidden_size, s->has_bias, l, k);
            param[k] = n ? params + off : NULL;
            grad[k] = n ? grads + off : NULL;
            off += n;
        }
        stack_point_layer(s, l, param, grad);
    }
    return off;
}

// points the stack's tables into params / grads; returns the number of floats used, or 0 on error
static size_t stack_init(Stack* s, int cell, int input_size, int hidden_size, int n_layers, int has_bias,
                         float* params, float* grads) {
    memset(s, 0, sizeof(*s));
    if (stack_config_check(cell, input_size, hidden_size, n_layers)) return 0;
    s->cell = cell; s->input_size = input_size; s->hidden_size = hidden_size;
    s->n_layers = n_layers; s->has_bias = has_bias;
    int L = n_layers, H = hidden_size, GH = cell_gates(cell) * H;
    float*** tables[N_STACK_TABLES];
    stack_tables(tables, s);
    for (int i = 0; i < N_STACK_TABLES; i++) {
        *tables[i] = (float**)calloc(L, sizeof(float*));
        if (!*tables[i]) { fail("out of memory"); return 0; }
    }
    s->zero_bias = (float*)alloc_floats(GH);
    s->zero_bias_grad = (float*)alloc_floats(GH);
    if (!s->zero_bias || !s->zero_bias_grad) { fail("out of memory"); return 0; }
    return stack_point(s, params, grads);
}

// A batch of at least V rows looks layer 0's projection up by token (a V-row GEMM); fewer rows, as
// when sampling one token at a time, embed and multiply. The caller sets s->tokens by this rule.
static int lookup_pays(size_t rows, size_t V) { return V > 0 && rows >= V; }

// Layers project their input step by step inside the recurrence, unless they look it up by token or
// a thread's rows would not fill a register tile (then the per-step product would be mostly padding,
// and one GEMM over all T steps goes first). Forward and backward each decide once, outside their
// parallel region: inside it the thread count may read differently (OMP_NUM_THREADS=1,8).
static int looks_up(const Stack* s, int l) { return l == 0 && s->tokens; }
static int projects_per_step(const Stack* s, int l) {
    return !looks_up(s, l) && s->B >= s->mm->k->mr * omp_get_max_threads();
}

static void stack_free(Stack* s) {
    float*** tables[N_STACK_TABLES];
    stack_tables(tables, s);
    for (int i = 0; i < N_STACK_TABLES; i++) { free(*tables[i]); *tables[i] = NULL; }
    free(s->zero_bias); free(s->zero_bias_grad); free(s->acts_memory); free(s->w_packed); free(s->token_slot);
    free(s->w_drop_memory); free(s->table_dropped);
    s->token_slot = s->seen = s->row_slot = NULL;
    s->zero_bias = s->zero_bias_grad = s->acts_memory = s->w_packed = s->w_drop_memory = s->table_dropped = NULL;
}

// (re)lays out the activation buffer for B x T; allocates only when the shape grows
static int stack_reserve(Stack* s, int B, int T) {
    if (batch_shape_check(B, T)) return -1;
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
        // W_hh^T (forward), then W_hh (backward)
        size_t fwd = packed_b_size(s->mm->k, H, (int)GH), bwd = packed_b_size(s->mm->k, (int)GH, H);
        s->w_packed = (float*)alloc_floats(fwd > bwd ? fwd : bwd);
        if (!s->w_packed) return fail("out of memory for packed weights");
        free(s->token_slot);
        size_t rows = s->table_rows ? bt : 0;   // + 1 below: never malloc(0)
        s->token_slot = (int*)malloc((2 * (size_t)s->table_rows + rows + 1) * sizeof(int));
        if (!s->token_slot) return fail("out of memory");
        s->seen = s->token_slot + s->table_rows;
        s->row_slot = s->seen + s->table_rows;
        // op(B) of x W_ih^T, dY^T h, dY^T x, dY W_ih (whole T, or packed once for the per-step products)
        // and dproj^T table, for layer inputs of width In (layer 0) and H
        size_t in_max = (size_t)(In > H ? In : H);
        size_t shapes[] = { in_max, GH, bt, (size_t)H, bt, in_max, GH, in_max, lookup_rows, in_max };
        if (matmul_reserve(s->mm, shapes, 5)) return -1;
        s->max_bt = bt; s->max_b = B;
    }
    s->B = B; s->T = T;
    float* parts[N_PARTS];
    float* p = s->acts_memory;
    for (int i = 0; i < N_PARTS; i++) { parts[i] = p; p += (sizes[i] + 15) / 16 * 16; }
    float *h = parts[0], *c = parts[1], *gates = parts[2], *hn = parts[3], *xin = parts[4], *mask = parts[5];
    s->gh = parts[6]; s->dgates = parts[7]; s->dgates_h = parts[8]; s->dy = parts[9];
    s->dh = parts[10]; s->dc = parts[11];
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
    for (long r = 0; r < bt; r++) s->row_slot[r] = s->token_slot[s->tokens[r]];
    s->mm->k->sum_by_slot(s->dproj, s->dgates, s->row_slot, bt, n, GH);
    for (int i = 0; i < n; i++)
        memcpy(s->table_seen + (size_t)i * E, s->table + (size_t)s->seen[i] * E, E * sizeof(float));
    matmul(s->mm, s->dw_ih[0], s->dproj, 1, GH, s->table_seen, E, 1, GH, E, n, 1);
    matmul(s->mm, s->table_seen, s->dproj, GH, 1, s->w_ih[0], E, 1, n, E, GH, 0);
    for (int i = 0; i < n; i++) {   // a dropped embedding row's gradient goes through its scale
        float* row = s->dtable + (size_t)s->seen[i] * E;
        float scale = s->rows_dropped ? s->table_mask[s->seen[i]] : 1.0f;
        for (int e = 0; e < E; e++) row[e] += s->table_seen[(size_t)i * E + e] * scale;
    }
}

// Layer l's input projection, gx = x W_ih^T (no bias), and its gradients, taken one of three ways:
// rows of proj looked up by token; step by step inside the recurrence, so a step's gate rows are
// still in cache for the cell (6% of a medium LSTM step against one GEMM over all T, whose 8 MB of
// output went to memory and back), with W_ih packed in the matmul scratch, which nothing else uses
// until the recurrence ends; or one GEMM over all T before the recurrence. Both directions are
// called before the recurrence, at each step t for the calling thread's rows [b0, b1), and after,
// with the pass's one per_step decision (projects_per_step).
typedef enum { PROJ_BEFORE, PROJ_STEP, PROJ_AFTER } ProjPhase;

static void project_inputs_forward(Stack* s, int l, int per_step, ProjPhase phase, int t, int b0, int b1) {
    int B = s->B, GH = cell_gates(s->cell) * s->hidden_size, in = l == 0 ? s->input_size : s->hidden_size;
    int lookup = looks_up(s, l);
    float* gx = s->gates[l] + (size_t)t * B * GH;
    if (phase == PROJ_BEFORE) {
        if (lookup) matmul(s->mm, s->proj, s->table, in, 1, s->w_ih[0], 1, in, s->table_rows, GH, in, 0);
        else if (per_step) pack_b(s->mm->k, s->mm->b, s->w_ih[l], in, GH, 1, in);
        else matmul(s->mm, gx, s->xin[l], in, 1, s->w_ih[l], 1, in, B * s->T, GH, in, 0);
    } else if (phase == PROJ_STEP && lookup) {
        for (int b = b0; b < b1; b++)
            memcpy(gx + (size_t)b * GH, s->proj + (size_t)s->tokens[(size_t)t * B + b] * GH, GH * sizeof(float));
    } else if (phase == PROJ_STEP && per_step) {
        s->mm->k->gemm_rows(gx + (size_t)b0 * GH, GH, s->xin[l] + ((size_t)t * B + b0) * in, in, s->mm->b, b1 - b0,
                            GH, in, 0);
    }
}

// dxin receives dL/dx (step by step into dy's rows of step t, already read, when dxin is dy)
static void project_inputs_backward(Stack* s, int l, int per_step, float* dxin, ProjPhase phase, int t, int b0,
                                    int b1) {
    int B = s->B, GH = cell_gates(s->cell) * s->hidden_size, in = l == 0 ? s->input_size : s->hidden_size;
    long bt = (long)B * s->T;
    int lookup = looks_up(s, l);
    if (phase == PROJ_BEFORE && per_step) {
        pack_b(s->mm->k, s->mm->b, s->w_ih[l], GH, in, in, 1);
    } else if (phase == PROJ_STEP && per_step) {
        const float* dg = s->dgates + (size_t)t * B * GH;
        s->mm->k->gemm_rows(dxin + ((size_t)t * B + b0) * in, in, dg + (size_t)b0 * GH, GH, s->mm->b, b1 - b0, in,
                            GH, 0);
    } else if (phase == PROJ_AFTER && lookup) {
        input_projection_lookup_backward(s);
    } else if (phase == PROJ_AFTER) {
        matmul(s->mm, s->dw_ih[l], s->dgates, 1, GH, s->xin[l], in, 1, GH, in, (int)bt, 1);
        if (!per_step) matmul(s->mm, dxin, s->dgates, GH, 1, s->w_ih[l], in, 1, (int)bt, in, GH, 0);
    }
}

// Packed sequences: rows [r0, end) split into runs alike at step t, each either running (*on = 1)
// or past its sequence's end; returns the end of the run that starts at r0
static int next_run(int* on, const Stack* s, int t, int r0, int end) {
    if (!s->lengths) { *on = 1; return end; }
    *on = t < s->lengths[r0];
    int r1 = r0 + 1;
    while (r1 < end && (t < s->lengths[r1]) == *on) r1++;
    return r1;
}

static void layer_forward(Stack* s, int l) {
    int B = s->B, T = s->T, H = s->hidden_size, GH = cell_gates(s->cell) * H;
    size_t bh = (size_t)B * H, rows_bytes;
    const Kernels* k = s->mm->k;
    float *h = s->h[l], *c = s->c[l], *gates = s->gates[l];
    const float *b_ih = s->b_ih[l], *b_hh = s->b_hh[l];
    int per_step = projects_per_step(s, l);
    project_inputs_forward(s, l, per_step, PROJ_BEFORE, 0, 0, 0);
    pack_b(k, s->w_packed, s->weights_dropped ? s->w_dropped[l] : s->w_hh[l], H, GH, 1, H);
    // batch rows never interact in the recurrence: each thread runs all T steps for its own rows,
    // with no barrier inside the loop (a barrier per step dominated small models)
    #pragma omp parallel if ((long)B * GH * H > PAR_MIN_WORK)
    {
        int b0, b1;
        thread_rows(&b0, &b1, B);
        for (int t = 0; t < T && b1 > b0; t++) {
            float *gx = gates + (size_t)t * B * GH, *h_prev = h + t * bh, *h_t = h + (t + 1) * bh;
            project_inputs_forward(s, l, per_step, PROJ_STEP, t, b0, b1);
            k->gemm_rows(s->gh + (size_t)b0 * GH, GH, h_prev + (size_t)b0 * H, H, s->w_packed, b1 - b0, GH, H, 0);
            for (int r0 = b0, r1, on; r0 < b1; r0 = r1) {   // runs of rows whose sequence goes on, or has ended
                r1 = next_run(&on, s, t, r0, b1);
                if (!on) {   // an ended sequence holds its state, so h_n is the state at its last step
                    rows_bytes = (size_t)(r1 - r0) * H * sizeof(float);
                    memcpy(h_t + (size_t)r0 * H, h_prev + (size_t)r0 * H, rows_bytes);
                    if (c) memcpy(c + (t + 1) * bh + (size_t)r0 * H, c + t * bh + (size_t)r0 * H, rows_bytes);
                    continue;
                }
                switch (s->cell) {
                case CELL_RNN: case CELL_RNN_RELU:
                    k->rnn_forward(h_t, gx, s->gh, b_ih, b_hh, s->cell == CELL_RNN_RELU, r0, r1, H); break;
                case CELL_LSTM:
                    k->lstm_forward(h_t, c + (t + 1) * bh, gx, s->gh, c + t * bh, b_ih, b_hh, r0, r1, H); break;
                case CELL_GRU:
                    k->gru_forward(h_t, gx, s->hn[l] + t * bh, s->gh, h_prev, b_ih, b_hh, r0, r1, H); break;
                }
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
    const Kernels* k = s->mm->k;
    if (looks_up(s, l)) k->colsum(s->bias_sums, s->dproj, s->n_seen, GH);
    else k->colsum(s->bias_sums, s->dgates, bt, GH);
    for (int j = 0; j < GH; j++) s->db_ih[l][j] += s->bias_sums[j];
    if (s->dgates_h == s->dgates) { for (int j = 0; j < GH; j++) s->db_hh[l][j] += s->bias_sums[j]; }
    else k->colsum(s->db_hh[l], s->dgates_h, bt, GH);
}

// dy holds dL/d(output of layer l); writes dL/d(input of layer l) to dxin
static void layer_backward(Stack* s, int l, float* dxin, float* dh0, float* dc0, const float* dh_n,
                           const float* dc_n) {
    int B = s->B, T = s->T, H = s->hidden_size, GH = cell_gates(s->cell) * H;
    size_t bh = (size_t)B * H, bt = (size_t)B * T;
    const Kernels* k = s->mm->k;
    const float *h = s->h[l], *c = s->c[l];
    float *dh = s->dh, *dc = s->dc;
    if (dh_n) memcpy(dh, dh_n, bh * sizeof(float)); else memset(dh, 0, bh * sizeof(float));
    if (c) { if (dc_n) memcpy(dc, dc_n, bh * sizeof(float)); else memset(dc, 0, bh * sizeof(float)); }
    pack_b(k, s->w_packed, s->weights_dropped ? s->w_dropped[l] : s->w_hh[l], GH, H, H, 1);
    int per_step = projects_per_step(s, l);
    project_inputs_backward(s, l, per_step, dxin, PROJ_BEFORE, 0, 0, 0);
    #pragma omp parallel if ((long)B * GH * H > PAR_MIN_WORK)
    {
        int b0, b1;   // as in forward: each thread owns its batch rows through all T steps
        thread_rows(&b0, &b1, B);
        for (int t = T - 1; t >= 0 && b1 > b0; t--) {
            const float* dy_t = s->dy + t * bh;
            float* dg = s->dgates + (size_t)t * B * GH;
            float* dgh = s->dgates_h + (size_t)t * B * GH;
            const float* g = s->gates[l] + (size_t)t * B * GH;
            for (int r0 = b0, r1, on; r0 < b1; r0 = r1) {
                r1 = next_run(&on, s, t, r0, b1);
                if (!on) {   // the held state passes dh and dc through unchanged; no gate saw this step
                    memset(dg + (size_t)r0 * GH, 0, (size_t)(r1 - r0) * GH * sizeof(float));
                    if (dgh != dg) memset(dgh + (size_t)r0 * GH, 0, (size_t)(r1 - r0) * GH * sizeof(float));
                    continue;
                }
                switch (s->cell) {
                case CELL_RNN: case CELL_RNN_RELU:
                    k->rnn_backward(dg, dh, dy_t, h + (t + 1) * bh, s->cell == CELL_RNN_RELU, r0, r1, H); break;
                case CELL_LSTM:
                    k->lstm_backward(dg, dh, dc, dy_t, g, c + (t + 1) * bh, c + t * bh, r0, r1, H); break;
                case CELL_GRU:
                    k->gru_backward(dg, dgh, dh, dy_t, g, s->hn[l] + t * bh, h + t * bh, r0, r1, H); break;
                }
            }
            k->gemm_rows(dh + (size_t)b0 * H, H, dgh + (size_t)b0 * GH, GH, s->w_packed, b1 - b0, H, GH, 1);
            project_inputs_backward(s, l, per_step, dxin, PROJ_STEP, t, b0, b1);
        }
    }
    // weight gradients for all T steps at once; under weight drop, through the mask (w_dropped is
    // free by now: the recurrence above read its packed copy)
    if (s->weights_dropped) {
        matmul(s->mm, s->w_dropped[l], s->dgates_h, 1, GH, h, H, 1, GH, H, (int)bt, 0);
        const float* mask = s->w_mask[l];
        float *dw = s->dw_hh[l], *g = s->w_dropped[l];
        #pragma omp parallel for schedule(static) if ((long)GH * H > PAR_MIN_WORK)
        for (long i = 0; i < (long)GH * H; i++) dw[i] += g[i] * mask[i];
    } else {
        matmul(s->mm, s->dw_hh[l], s->dgates_h, 1, GH, h, H, 1, GH, H, (int)bt, 1);
    }
    project_inputs_backward(s, l, per_step, dxin, PROJ_AFTER, 0, 0, 0);
    if (s->has_bias) bias_backward(s, l);
    if (dh0) memcpy(dh0, dh, bh * sizeof(float));
    if (dc0 && c) memcpy(dc0, dc, bh * sizeof(float));
}

// A training pass that regularises takes one draw of the owner's generator, the key of all its
// masks, and drops its weights and embedding rows here, before anything reads them (a stack with no
// generator, the layer API's, never regularises)
static int stack_begin_pass(Stack* s) {
    int on = s->training && s->rng;
    s->dropped = on && s->dropout > 0.0f;
    s->weights_dropped = on && s->weight_drop > 0.0f;
    s->rows_dropped = on && s->embed_dropout > 0.0f && s->table_rows > 0;
    s->table = s->table_weights;
    if (!s->dropped && !s->weights_dropped && !s->rows_dropped) return 0;
    s->drop_key = rng_next(s->rng);
    int L = s->n_layers, H = s->hidden_size, GH = cell_gates(s->cell) * H, V = s->table_rows, E = s->input_size;
    if (s->weights_dropped) {
        size_t n = (size_t)GH * H;
        if (!s->w_drop_memory && !(s->w_drop_memory = (float*)alloc_floats(2 * L * n)))
            return fail("out of memory for weight drop");
        for (int l = 0; l < L; l++) {
            s->w_dropped[l] = s->w_drop_memory + 2 * l * n;
            s->w_mask[l] = s->w_dropped[l] + n;
            draw_mask(s->w_mask[l], s->weight_drop, s->drop_key, SITE_WEIGHT_DROP + l, GH, H, GH, 0, 0);
            multiply(s->w_dropped[l], s->w_hh[l], s->w_mask[l], n);
        }
    }
    if (s->rows_dropped) {
        if (!s->table_dropped && !(s->table_dropped = (float*)alloc_floats((size_t)V * E + V)))
            return fail("out of memory for embedding dropout");
        s->table_mask = s->table_dropped + (size_t)V * E;
        draw_mask(s->table_mask, s->embed_dropout, s->drop_key, SITE_EMBEDDING, V, 1, V, 0, 0);
        for (int v = 0; v < V; v++)
            for (int e = 0; e < E; e++)
                s->table_dropped[(size_t)v * E + e] = s->table_weights[(size_t)v * E + e] * s->table_mask[v];
        s->table = s->table_dropped;
    }
    return 0;
}

// x: (T, B, input_size), taken as layer 0's input by pointer (must stay alive until backward);
// NULL when layer 0 looks its input up by s->tokens
static int stack_forward_acts(Stack* s, const float* x, const float* h0, const float* c0, int B, int T) {
    if (stack_reserve(s, B, T)) return -1;
    int L = s->n_layers, H = s->hidden_size;
    size_t bh = (size_t)B * H;
    s->xin[0] = (float*)x;
    for (int l = 0; l < L; l++) {
        if (h0) memcpy(s->h[l], h0 + l * bh, bh * sizeof(float)); else memset(s->h[l], 0, bh * sizeof(float));
        if (s->cell == CELL_LSTM) {
            if (c0) memcpy(s->c[l], c0 + l * bh, bh * sizeof(float)); else memset(s->c[l], 0, bh * sizeof(float));
        }
        if (l > 0 && s->dropped)
            dropout_forward(s->xin[l], s->mask[l - 1], s->h[l - 1] + bh, s->dropout, s->locked, s->drop_key, l,
                            s->first_stream, T, B, H);
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
    int* lengths;        // copy of the last forward's sequence lengths (B), or NULL
    size_t lengths_cap;
    int* tokens;         // layer_forward_tokens: the last input's token ids (T, B), or NULL after layer_forward_api
    size_t tokens_cap;
    int by_token;        // 1 after layer_forward_tokens: backward's dx is then the table's gradient
    int embedded;        // 1: its rows were embedded into x (a batch of fewer than V rows; backward scatters dx)
    float* dx;           // then dL/dx, before it is scattered
    size_t dx_cap;
    Matmul mm;
} Layer;

void layer_free(Layer* m) {
    if (!m) return;
    stack_free(&m->s);
    matmul_free(&m->mm);
    free(m->params); free(m->grads); free(m->x); free(m->lengths); free(m->tokens); free(m->dx);
    free(m);
}

Layer* layer_new(int cell, int input_size, int hidden_size, int n_layers, int has_bias) {
    if (stack_config_check(cell, input_size, hidden_size, n_layers)) return NULL;
    Layer* m = (Layer*)calloc(1, sizeof(Layer));
    if (!m) { fail("out of memory"); return NULL; }
    m->num_params = stack_num_params(cell, input_size, hidden_size, n_layers, has_bias);
    m->params = (float*)alloc_floats(m->num_params);
    m->grads = (float*)alloc_floats(m->num_params);
    if (!m->params || !m->grads) { fail("out of memory"); layer_free(m); return NULL; }
    if (matmul_init(&m->mm) ||
        !stack_init(&m->s, cell, input_size, hidden_size, n_layers, has_bias, m->params, m->grads)) {
        layer_free(m);
        return NULL;
    }
    m->s.mm = &m->mm;
    return m;
}

// The layer computes with tensors the caller owns from now on (pyrnn.torch: a torch module's parameters
// and the gradients autograd receives): params and grads hold N_KINDS pointers per layer in torch's order,
// NULL for the biases of a layer without; params or grads NULL: the layer's own buffers. Nothing is copied
// or cached: each pass reads the weights where they are, and backward accumulates into grads.
void layer_bind(Layer* m, float* const* params, float* const* grads) {
    stack_point(&m->s, m->params, m->grads);
    for (int l = 0; l < m->s.n_layers; l++)
        stack_point_layer(&m->s, l, params ? params + l * N_KINDS : NULL, grads ? grads + l * N_KINDS : NULL);
}

// bf16 (1) or fp32 (0) GEMM operands from the next forward on
void layer_set_bf16(Layer* m, int bf16) { matmul_set_bf16(&m->mm, bf16); }

// rows t >= lengths[b] of a (T, B, width) block, zeroed: what a packed sequence holds past its end
static void zero_past_lengths(float* y, const int* lengths, int B, int T, int width) {
    for (int t = 0; t < T && lengths; t++)
        for (int b = 0; b < B; b++)
            if (t >= lengths[b]) memset(y + ((size_t)t * B + b) * width, 0, (size_t)width * sizeof(float));
}

// x (T, B, input_size) -> out (T, B, H), h_n / c_n (L, B, H); h0 / c0 may be NULL (zeros). lengths
// (B, each in [1, T]) or NULL: torch's packed sequences, so out is zero past a sequence's end and
// h_n / c_n hold each sequence's state at its last step
// what both forwards share: the lengths' copy, room for the input, then the stack and its outputs
static int layer_lengths(Layer* m, const int* lengths, int B, int T) {
    m->s.B = 0;   // until this forward succeeds, backward refuses: what it would read may be freed below
    if (batch_shape_check(B, T)) return -1;
    if (lengths) {
        for (int b = 0; b < B; b++)
            if (lengths[b] < 1 || lengths[b] > T)
                return fail("length %d of sequence %d is outside [1, %d]", lengths[b], b, T);
        if ((size_t)B > m->lengths_cap) {
            free(m->lengths);
            m->lengths = (int*)malloc((size_t)B * sizeof(int));
            m->lengths_cap = m->lengths ? (size_t)B : 0;
            if (!m->lengths) return fail("out of memory");
        }
        memcpy(m->lengths, lengths, (size_t)B * sizeof(int));
    }
    m->s.lengths = lengths ? m->lengths : NULL;
    size_t n = (size_t)T * B * m->s.input_size;
    if (n > m->x_cap) {
        free(m->x);
        m->x = (float*)alloc_floats(n);
        m->x_cap = m->x ? n : 0;
        if (!m->x) return fail("out of memory for the input copy");
    }
    return 0;
}

static int layer_run(Layer* m, float* out, float* h_n, float* c_n, const float* x, const float* h0, const float* c0,
                     int B, int T) {
    if (stack_begin_pass(&m->s) || stack_forward_acts(&m->s, x, h0, c0, B, T)) return -1;
    size_t bh = (size_t)B * m->s.hidden_size;
    memcpy(out, m->s.h[m->s.n_layers - 1] + bh, (size_t)T * bh * sizeof(float));
    zero_past_lengths(out, m->s.lengths, B, T, m->s.hidden_size);
    stack_final_states(h_n, c_n, &m->s);
    return 0;
}

int layer_forward_api(Layer* m, float* out, float* h_n, float* c_n, const float* x, const float* h0,
                      const float* c0, const int* lengths, int B, int T) {
    if (layer_lengths(m, lengths, B, T)) return -1;
    m->s.tokens = NULL;
    m->s.table = m->s.table_weights = NULL;
    m->s.dtable = NULL;
    m->by_token = m->embedded = 0;
    memcpy(m->x, x, (size_t)T * B * m->s.input_size * sizeof(float));
    // padding past a sequence's end is never read as input, but dW_ih sums over every row of x
    zero_past_lengths(m->x, m->s.lengths, B, T, m->s.input_size);
    return layer_run(m, out, h_n, c_n, m->x, h0, c0, B, T);
}

// layer_forward_api with the input rows of table (V, input_size) named by tokens (T, B), as an
// embedding gives them: from V rows on, layer 0 looks its projection up by token (a V-row GEMM, as the
// language model does), and the next backward adds the table's gradient to its dx, of shape (V,
// input_size). table must hold until then. pyrnn.torch runs a torch.nn.Embedding's output this way.
int layer_forward_tokens(Layer* m, float* out, float* h_n, float* c_n, const int* tokens, const float* table, int V,
                         const float* h0, const float* c0, const int* lengths, int B, int T) {
    if (layer_lengths(m, lengths, B, T)) return -1;
    size_t bt = (size_t)B * T;
    if (V <= 0) return fail("vocabulary size must be positive, got %d", V);
    if (tokens_check(tokens, bt, V, "input")) return -1;
    if (bt > m->tokens_cap) {
        free(m->tokens);
        m->tokens = (int*)malloc(bt * sizeof(int));
        m->tokens_cap = m->tokens ? bt : 0;
        if (!m->tokens) return fail("out of memory");
    }
    memcpy(m->tokens, tokens, bt * sizeof(int));
    if (V != m->s.table_rows) { m->s.table_rows = V; m->s.max_bt = 0; }   // the lookup's buffers are per V
    m->s.table = m->s.table_weights = table;
    m->by_token = 1;
    m->embedded = !lookup_pays(bt, (size_t)V);
    m->s.tokens = m->embedded ? NULL : m->tokens;
    if (m->embedded) {
        size_t n = bt * m->s.input_size;
        if (n > m->dx_cap) {
            free(m->dx);
            m->dx = (float*)alloc_floats(n);
            m->dx_cap = m->dx ? n : 0;
            if (!m->dx) return fail("out of memory");
        }
        embedding_forward(m->x, table, m->tokens, (long)bt, m->s.input_size);
        zero_past_lengths(m->x, m->s.lengths, B, T, m->s.input_size);
    }
    return layer_run(m, out, h_n, c_n, m->embedded ? m->x : NULL, h0, c0, B, T);
}

// dout (T, B, H), dh_n / dc_n may be NULL -> dx (T, B, in), dh0 / dc0 (L, B, H); grads accumulate, and so
// does dx (V, in), the table's gradient, after layer_forward_tokens
int layer_backward_api(Layer* m, float* dx, float* dh0, float* dc0, const float* dout, const float* dh_n,
                       const float* dc_n) {
    if (!m->s.B) return fail("backward called before forward");
    memcpy(m->s.dy, dout, (size_t)m->s.T * m->s.B * m->s.hidden_size * sizeof(float));
    zero_past_lengths(m->s.dy, m->s.lengths, m->s.B, m->s.T, m->s.hidden_size);   // those outputs were zeros
    float* dtable = m->by_token ? dx : NULL;
    m->s.dtable = m->embedded ? NULL : dtable;   // looked up by token: the stack adds to dtable itself
    if (m->by_token) dx = m->embedded ? m->dx : NULL;
    stack_backward_acts(&m->s, dx, dh0, dc0, dh_n, dc_n);
    if (m->embedded)   // embedded rows: their gradient, scattered into the table's
        embedding_backward(dtable, m->dx, m->tokens, NULL, (long)m->s.B * m->s.T, m->s.input_size);
    return 0;
}

void layer_zero_grad(Layer* m) { zero_floats(m->grads, m->num_params); }

// dropout between layers for pyrnn's C engine, which runs one single-layer Layer per layer and
// direction and joins them itself: a pass's key (one draw of *rng), then each site's mask applied to
// x (T, B, width) as a stack applies it, so the masks are the model's and the oracle's
uint64_t pyrnn_dropout_key(uint64_t* rng) { return rng_next(rng); }
void pyrnn_dropout_forward(float* y, float* mask, const float* x, float p, uint64_t key, int site, int T, int B,
                           int width) {
    dropout_forward(y, mask, x, p, 0, key, site, 0, T, B, width);
}

// ----------------------------------------------------------------------------
// the character language model: Embedding(V, E) -> stack -> Linear(H, V) -> mean cross-entropy

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
    Matmul mm;
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

void model_free(Model* m) {
    if (!m) return;
    stack_free(&m->rnn);
    matmul_free(&m->mm);
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
    if (!m->params || !m->grads) {
        fail("out of memory for %zu parameters", m->num_params);
        model_free(m);
        return NULL;
    }
    if (matmul_init(&m->mm)) { model_free(m); return NULL; }
    // the layout's offsets (common.h): embedding, the stack from rnn.weight_ih_l0 on, head
    size_t off[4], numel;
    int where[4] = { 0, 1, model_tensor_count(&c) - 2, model_tensor_count(&c) - 1 };
    char name[64];
    for (int i = 0; i < 4; i++) model_tensor_info(&c, where[i], name, sizeof(name), &off[i], &numel);
    m->emb = m->params + off[0]; m->demb = m->grads + off[0];
    if (!stack_init(&m->rnn, c.cell, c.embed_size, c.hidden_size, c.n_layers, 1, m->params + off[1],
                    m->grads + off[1])) {
        model_free(m);
        return NULL;
    }
    m->head_w = m->params + off[2]; m->dhead_w = m->grads + off[2];
    m->head_b = m->params + off[3]; m->dhead_b = m->grads + off[3];
    m->rnn.rng = &m->rng;
    m->rnn.mm = &m->mm;
    m->rnn.table = m->rnn.table_weights = m->emb; m->rnn.dtable = m->demb; m->rnn.table_rows = c.vocab_size;
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
    m->rng = pyrnn_dropout_state(seed);
    m->adam_t = 0;
    if (m->m) memset(m->m, 0, m->num_params * sizeof(float));
    if (m->v) memset(m->v, 0, m->num_params * sizeof(float));
}

// bf16 (1) or fp32 (0) GEMM operands from the next forward on; parameters and state stay fp32
void model_set_bf16(Model* m, int bf16) { matmul_set_bf16(&m->mm, bf16); }

// the regularisers beyond dropout (TrainOptions), applied while training
void model_set_regularisers(Model* m, int locked, float weight_drop, float embed_dropout) {
    m->rnn.locked = locked;
    m->rnn.weight_drop = weight_drop;
    m->rnn.embed_dropout = embed_dropout;
}

void model_set_training(Model* m, int training, float dropout) {
    m->rnn.training = training;
    m->rnn.dropout = dropout;
    m->dropout = dropout;
}

// the stack reads embedded rows only for batches of fewer than V rows (see model_forward)
static size_t embedded_rows(size_t bt, size_t V) { return bt < V ? bt : V; }

static int model_reserve(Model* m, int B, int T) {
    if (batch_shape_check(B, T)) return -1;
    size_t bt = (size_t)B * T, V = m->config.vocab_size, E = m->config.embed_size, H = m->config.hidden_size;
    size_t lbh = (size_t)m->config.n_layers * B * H;
    if (bt > m->max_bt || (size_t)B > m->max_b || !m->acts_memory) {
        free(m->acts_memory); free(m->inputs); free(m->targets);
        size_t total = 2 * embedded_rows(bt, V) * E + 2 * bt * H + bt * V + bt + 4 * lbh;
        m->acts_memory = (float*)alloc_floats(total);
        m->inputs = (int*)malloc(bt * sizeof(int));
        m->targets = (int*)malloc(bt * sizeof(int));
        m->max_bt = m->max_b = 0;
        if (!m->acts_memory || !m->inputs || !m->targets)
            return fail("out of memory for activations (B=%d T=%d)", B, T);
        m->max_bt = bt; m->max_b = B;
    }
    size_t shapes[] = { H, V, bt, H, V, H };   // op(B) of h W^T, dlogits^T h, dlogits W
    if (matmul_reserve(&m->mm, shapes, 3)) return -1;
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
    m->has_targets = 0;   // until this forward succeeds, backward refuses (the buffers may be reallocated)
    if (model_reserve(m, B, T)) return -1;
    size_t bt = (size_t)B * T;
    if (tokens_check(inputs, bt, V, "input") || (targets && tokens_check(targets, bt, V, "target"))) return -1;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            m->inputs[(size_t)t * B + b] = inputs[(size_t)b * T + t];
            if (targets) m->targets[(size_t)t * B + b] = targets[(size_t)b * T + t];
        }
    int lookup = lookup_pays(bt, (size_t)V);
    m->rnn.tokens = lookup ? m->inputs : NULL;
    if (stack_begin_pass(&m->rnn)) return -1;
    if (!lookup) embedding_forward(m->x, m->rnn.table, m->inputs, (long)bt, m->config.embed_size);
    if (stack_forward_acts(&m->rnn, lookup ? NULL : m->x, h0, c0, B, T)) return -1;
    const float* top = m->rnn.h[m->config.n_layers - 1] + (size_t)B * H;
    if (m->rnn.dropped)
        dropout_forward(m->head_in, m->head_mask, top, m->dropout, m->rnn.locked, m->rnn.drop_key, m->config.n_layers,
                        m->rnn.first_stream, T, B, H);
    m->head_x = m->rnn.dropped ? m->head_in : top;
    matmul(&m->mm, m->logits, m->head_x, H, 1, m->head_w, 1, H, (int)bt, V, H, 0);
    // bias, then log-sum-exp per row and the mean cross-entropy
    m->mm.k->logits_lse(m->lse, m->logits, m->head_b, (long)bt, V);
    double loss = 0.0;   // serial and in double: fixed order, and cheap next to the GEMMs
    if (targets) for (size_t r = 0; r < bt; r++) loss += m->lse[r] - m->logits[r * V + m->targets[r]];
    m->loss = targets ? (float)(loss / (double)bt) : 0.0f;
    stack_final_states(m->h_n, m->c_n, &m->rnn);
    m->has_targets = targets != NULL;
    return 0;
}

void model_zero_grad(Model* m) { zero_floats(m->grads, m->num_params); }

// d(mean loss) = 1; overwrites the logits with their gradient
int model_backward(Model* m) {
    if (!m->B || !m->has_targets) return fail("backward needs a forward pass with targets first");
    int B = m->B, T = m->T, V = m->config.vocab_size, H = m->config.hidden_size;
    size_t bt = (size_t)B * T;
    m->mm.k->logits_grad(m->logits, m->lse, m->targets, 1.0f / (float)bt, (long)bt, V);   // softmax - onehot
    matmul(&m->mm, m->dhead_w, m->logits, 1, V, m->head_x, H, 1, V, H, (int)bt, 1);
    m->mm.k->colsum(m->dhead_b, m->logits, bt, V);
    matmul(&m->mm, m->rnn.dy, m->logits, V, 1, m->head_w, H, 1, (int)bt, H, V, 0);
    if (m->rnn.dropped) dropout_backward(m->rnn.dy, m->head_mask, bt * H);
    stack_backward_acts(&m->rnn, m->dx, m->dh0, m->dc0, NULL, NULL);
    if (!m->rnn.tokens)
        embedding_backward(m->demb, m->dx, m->inputs, m->rnn.rows_dropped ? m->rnn.table_mask : NULL, (long)bt,
                           m->config.embed_size);
    m->has_targets = 0;   // the logits now hold gradients
    return 0;
}

// ----------------------------------------------------------------------------
// optimizer: global-norm clipping (torch clip_grad_norm_) and AdamW (torch.optim.AdamW)

// sum of squares of n floats, in the fixed order of sum_squares (the norm the clip and the log see)
double pyrnn_sum_squares(const float* x, size_t n) { return sum_squares(x, n); }

// one AdamW update of n floats: the gradient scaled by grad_scale (the clip factor), t the number of
// this step (1-based). The model's step and the layer API's optimizer (pyrnn.AdamW) both run this.
static void adamw_run(const Kernels* k, float* params, float* m, float* v, const float* grads, size_t n,
                      float grad_scale, int t, float lr, float beta1, float beta2, float eps, float weight_decay) {
    float bc1 = 1.0f - powf(beta1, (float)t);
    k->adamw(params, m, v, grads, n, grad_scale, 1.0f - lr * weight_decay, lr / bc1,
             sqrtf(1.0f - powf(beta2, (float)t)), beta1, beta2, eps);
}

// the layer API's, on the chosen kernel set (a bad PYRNN_ISA leaves none, and no layer to update either)
void adamw_update(float* params, float* m, float* v, const float* grads, size_t n, float grad_scale, int t,
                  float lr, float beta1, float beta2, float eps, float weight_decay) {
    const KernelSet* set = kernel_set_chosen();
    if (set) adamw_run(set->fp32, params, m, v, grads, n, grad_scale, t, lr, beta1, beta2, eps, weight_decay);
}

// the AdamW moments, zeroed, unless the model has them already
int model_adam_alloc(Model* m) {
    if (m->m) return 0;
    m->m = (float*)alloc_floats(m->num_params);
    m->v = (float*)alloc_floats(m->num_params);
    if (!m->m || !m->v) { free(m->m); free(m->v); m->m = m->v = NULL; return fail("out of memory for AdamW state"); }
    return 0;
}

float model_grad_norm(const Model* m) {
    return (float)sqrt(sum_squares(m->grads, m->num_params));
}

// clips, then takes one AdamW step; weight decay applies to every parameter. Reports the norm before
// clipping, and skips the update entirely when that norm is not finite.
int model_step(Model* m, float lr, float beta1, float beta2, float eps, float weight_decay, float max_grad_norm,
               float* grad_norm) {
    if (model_adam_alloc(m)) return -1;
    float norm = model_grad_norm(m);
    if (grad_norm) *grad_norm = norm;
    if (!isfinite(norm)) return 0;   // a NaN or Inf gradient never reaches the parameters; the caller decides
    float clip = 1.0f;
    if (max_grad_norm > 0.0f) { clip = max_grad_norm / (norm + 1e-6f); if (clip > 1.0f) clip = 1.0f; }
    m->adam_t++;
    adamw_run(m->mm.k, m->params, m->m, m->v, m->grads, m->num_params, clip, m->adam_t, lr, beta1, beta2, eps,
              weight_decay);
    return 0;
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
int model_sample(Model* m, int* out, const int* prime, int n_prime, int n, float temperature, int top_k,
                 uint64_t seed) {
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
// the trainer: the CPU backend, which fills the driver's Backend table with the model above

#ifndef PYRNN_LIBRARY

// test hook: PYRNN_FAULT_NAN_GRAD_STEP=N (read once, in cpu_create) sets one gradient element to NaN
// after the backward pass of optimizer step N (1-based; the training step when none was skipped),
// once per process, so tests can reach the non-finite-gradient path (-N stop / skip); set on one rank
// only, it poisons that rank's gradient before the ranks average it. Unset: no effect.
typedef struct { Model* m; float *h, *c; int B, T; int fault_nan_step; char about[64]; } CpuRun;

static void cpu_destroy(void* self) {
    CpuRun* r = (CpuRun*)self;
    if (!r) return;
    model_free(r->m); free(r->h); free(r->c); free(r);
}

static void* cpu_create(Config c, int B, int T, const TrainOptions* opts) {
    CpuRun* r = (CpuRun*)calloc(1, sizeof(CpuRun));
    if (!r) { fail("out of memory"); return NULL; }
    size_t lbh = (size_t)c.n_layers * B * c.hidden_size;
    r->m = model_new(c);
    r->h = (float*)alloc_floats(lbh);
    r->c = (float*)alloc_floats(lbh);
    r->B = B; r->T = T;
    if (!r->m || !r->h || !r->c || model_adam_alloc(r->m)) {
        if (r->m) fail("out of memory");
        cpu_destroy(r);
        return NULL;
    }
    model_set_training(r->m, 1, opts->dropout);   // the dropout generator's state arrives with set_params or init
    model_set_regularisers(r->m, opts->locked, opts->weight_drop, opts->embed_dropout);
    model_set_bf16(r->m, opts->bf16);
    r->m->rnn.first_stream = dist_first_stream(B);   // masks follow the global stream
    const char* fault = getenv("PYRNN_FAULT_NAN_GRAD_STEP");
    r->fault_nan_step = fault ? atoi(fault) : 0;
    return r;
}

static const char* cpu_about(void* self) {
    const Kernels* k = ((CpuRun*)self)->m->mm.k;
    snprintf(((CpuRun*)self)->about, sizeof(((CpuRun*)self)->about), "%s kernels%s", k->isa,
             strcmp(k->precision, "bf16") ? "" : k->bf16_native ? ", bf16" : ", bf16 emulated");
    return ((CpuRun*)self)->about;
}

static int cpu_init(void* self, uint64_t seed) { model_init(((CpuRun*)self)->m, seed); return 0; }

static int cpu_set_params(void* self, const float* params, const float* m, const float* v, int adam_t, uint64_t rng) {
    Model* md = ((CpuRun*)self)->m;
    size_t n = md->num_params * sizeof(float);
    memcpy(md->params, params, n);
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
    if (m) memcpy(m, md->m, n);
    if (v) memcpy(v, md->v, n);
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

static int cpu_train_step(void* self, float* loss, float* grad_norm, const int* inputs, const int* targets,
                          const StepParams* sp) {
    CpuRun* r = (CpuRun*)self;
    Model* m = r->m;
    int status = model_forward(m, inputs, targets, r->h, r->c, r->B, r->T);
    if (status == 0) { model_zero_grad(m); status = model_backward(m); }
    if (status == 0 && r->fault_nan_step > 0 && m->adam_t + 1 == r->fault_nan_step) {
        m->grads[0] = NAN;
        r->fault_nan_step = 0;
    }
    // every rank reaches this, failed or not: the loss and gradients become means over all ranks' streams
    *loss = m->loss;
    if (dist_step_mean(status, loss, m->grads, m->num_params)) return -1;
    // replicated on every rank; create allocated the AdamW state, so nothing below fails
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

// the training model samples itself: its carried state lives in CpuRun, which sampling leaves alone
static int cpu_sample(void* self, int* out, int prime, int n, float temperature, int top_k, uint64_t seed) {
    return model_sample(((CpuRun*)self)->m, out, &prime, 1, n, temperature, top_k, seed);
}

static const Backend cpu_backend = {
    "cpu", cpu_create, cpu_destroy, cpu_about, cpu_init, cpu_set_params, cpu_get_params, cpu_set_state,
    cpu_get_state, cpu_train_step, cpu_eval_step, cpu_sample,
};

int main(int argc, char** argv) { return train_main(argc, argv, &cpu_backend); }

#endif
