// driver.h: the training driver shared by the CPU and GPU trainers. The Backend table a model fills,
// the flags, and train_main: data, carried state, logging, eval, sampling and checkpoints, in one
// process or data-parallel over MPI ranks (dist.h). It reaches a model only through its Backend, so
// it depends on no model file: c/train_rnn.c and cuda/train_rnn.cu include it and fill the table.
#pragma once
#include "common.h"
#include "dist.h"
#include "fileio.h"

// backends: train_main runs any model that fills this table (the CPU model in c/train_rnn.c,
// the cuDNN one in cuda/train_rnn.cu)

typedef struct { float lr, beta1, beta2, eps, weight_decay, max_grad_norm; } StepParams;

typedef struct {
    const char* name;
    void* (*create)(Config c, int B, int T, const TrainOptions* opts);
    void (*destroy)(void* self);
    // what the model runs on, for the banner ("avx2 kernels")
    const char* (*about)(void* self);
    // fresh weights drawn from the seed (torch's default init), AdamW state zeroed, the run's generator seeded
    int (*init)(void* self, uint64_t seed);
    // flat parameters (torch order) and AdamW state to / from host buffers; m, v may be NULL
    int (*set_params)(void* self, const float* params, const float* m, const float* v, int adam_t, uint64_t rng);
    int (*get_params)(void* self, float* params, float* m, float* v, int* adam_t, uint64_t* rng);
    // the carried hidden state (L, B, H) lives in the backend; NULL means zeros
    int (*set_state)(void* self, const float* h, const float* c);
    int (*get_state)(void* self, float* h, float* c);
    // forward from the carried state, backward, clip, AdamW (skipped when the gradient is not
    // finite); the final state becomes the carried state. Between backward and the update it agrees
    // with the other ranks on the step and averages the loss and gradients over them (the CPU backend
    // through dist_step_mean in dist.h, the GPU's through nccl_step_mean on the device; nothing in one
    // process) and sets dist.step_averaged. B is this rank's share of the streams.
    int (*train_step)(void* self, float* loss, float* grad_norm, const int* inputs, const int* targets,
                      const StepParams* sp);
    // forward only, no dropout, from host state h, c, which it overwrites with the final state
    int (*eval_step)(void* self, float* loss, const int* inputs, const int* targets, float* h, float* c);
    // n tokens drawn after the prime token from the current weights; the carried state is untouched
    int (*sample)(void* self, int* out, int prime, int n, float temperature, int top_k, uint64_t seed);
} Backend;

// ----------------------------------------------------------------------------
// the training driver: flags, data, carried state, logging, eval, sampling, checkpoints

typedef struct {
    const char *train_path, *val_path, *out_dir, *resume, *cell_name, *nonfinite, *precision, *masks;
    int n_layers, embed_size, hidden_size, B, T, max_steps, eval_every, sample_every, ckpt_every;
    int warmup, threads, carry, sample_len, top_k, budget;
    float lr, weight_decay, grad_clip, final_lr_frac, dropout, temperature, weight_drop, embed_dropout;
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
        if (a[0] != '-' || !a[1] || a[2])
            return fail("unexpected argument '%s' (flags are a dash and one letter; -h lists them)", a);
        Flag* f = NULL;
        for (int k = 0; k < n; k++) if (flags[k].flag == a[1]) f = &flags[k];
        if (!f) return fail("unknown flag %s (-h lists them)", a);
        if (i + 1 >= argc) return fail("flag %s needs a value", a);
        const char* v = argv[++i];
        char* end = NULL;
        errno = 0;
        if (f->kind == 'i') {
            long x = strtol(v, &end, 10);
            if (!*v || *end || errno || x < -2147483647L || x > 2147483647L)
                return fail("flag %s needs an integer, got '%s'", a, v);
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

static int check_args(const TrainArgs* a) {
    if (cell_from_name(a->cell_name) < 0) return fail("-c: unknown cell '%s' (expected %s)", a->cell_name, cell_list());
    struct { int v; const char* what; } positive[] = {
        { a->n_layers, "-L layers" }, { a->embed_size, "-E embedding size" }, { a->hidden_size, "-H hidden size" },
        { a->B, "-b batch size" }, { a->T, "-t sequence length" },
    };
    for (size_t i = 0; i < sizeof(positive) / sizeof(positive[0]); i++)
        if (positive[i].v <= 0) return fail("%s must be positive, got %d", positive[i].what, positive[i].v);
    if (a->n_layers > 64 || a->embed_size > 65536 || a->hidden_size > 65536) return fail("-L, -E or -H is too large");
    if ((long long)a->B * a->T > MAX_BATCH_TOKENS) return fail("-b x -t is too large");
    if (a->max_steps < 0) return fail("-n max steps must be >= 0, got %d", a->max_steps);
    if (!(a->lr > 0.0f)) return fail("-l learning rate must be positive, got %g", a->lr);
    if (a->weight_decay < 0.0f) return fail("-w weight decay must be >= 0, got %g", a->weight_decay);
    if (a->grad_clip < 0.0f) return fail("-g grad clip must be >= 0 (0 = off), got %g", a->grad_clip);
    if (a->dropout < 0.0f || a->dropout >= 1.0f) return fail("-p dropout must be in [0, 1), got %g", a->dropout);
    if (a->weight_drop < 0.0f || a->weight_drop >= 1.0f)
        return fail("-W weight drop must be in [0, 1), got %g", a->weight_drop);
    if (a->embed_dropout < 0.0f || a->embed_dropout >= 1.0f)
        return fail("-D embedding dropout must be in [0, 1), got %g", a->embed_dropout);
    if (strcmp(a->masks, "step") != 0 && strcmp(a->masks, "locked") != 0)
        return fail("-d must be step or locked, got '%s'", a->masks);
    if (a->budget < 0) return fail("-x budget must be >= 0 seconds (0 = none), got %d", a->budget);
    if (a->final_lr_frac < 0.0f || a->final_lr_frac > 1.0f)
        return fail("-q final lr fraction must be in [0, 1], got %g", a->final_lr_frac);
    if (a->eval_every < 0 || a->sample_every < 0 || a->ckpt_every < 0 || a->warmup < 0 || a->threads < 0 ||
        a->sample_len < 0 || a->top_k < 0)
        return fail("-v, -s, -k, -u, -P, -m and -K must be >= 0");
    if (a->carry != 0 && a->carry != 1) return fail("-C must be 0 or 1, got %d", a->carry);
    if (strcmp(a->nonfinite, "stop") != 0 && strcmp(a->nonfinite, "skip") != 0)
        return fail("-N must be stop or skip, got '%s'", a->nonfinite);
    if (strcmp(a->precision, "fp32") != 0 && strcmp(a->precision, "bf16") != 0)
        return fail("-M must be fp32 or bf16, got '%s'", a->precision);
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
            if (mkdir(p, 0755) != 0 && errno != EEXIST)
                return fail("-o %s: cannot create %s: %s", path, p, strerror(errno));
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
// zeros and carried across batches. Each rank evaluates its own local_B streams of every batch and
// the ranks' means are averaged; every rank returns the same outcome.
static int evaluate(float* val_loss, const Backend* be, void* run, const TokenFile* val, int B, int T, int local_B,
                    int* inputs, int* targets, float* h, float* c, size_t local_lbh) {
    DataLoader d;
    int status = loader_init(&d, val, B, T, "val");
    size_t first = (size_t)dist_first_stream(local_B) * T;
    double total = 0.0;
    memset(h, 0, local_lbh * sizeof(float));
    memset(c, 0, local_lbh * sizeof(float));
    for (long k = 0; status == 0 && k < d.n_batches; k++) {
        float loss = 0.0f;
        loader_next(&d, inputs, targets);
        status = be->eval_step(run, &loss, inputs + first, targets + first, h, c);
        total += loss;
    }
    if (dist_agree_sum(status, &total, 1)) return -1;
    *val_loss = (float)(total / ((double)d.n_batches * dist.size));
    return 0;
}

static void print_sample(const Backend* be, void* run, const TokenFile* train, int n, float temperature, int top_k,
                         uint64_t seed) {
    if (n <= 0) return;
    int prime = 0;   // a newline when the vocabulary has one, so samples start at a line
    for (int v = 0; v < train->vocab_size; v++) if (train->vocab[v] == '\n') prime = v;
    int* out = (int*)malloc(n * sizeof(int));
    if (!out) return;
    if (be->sample(run, out, prime, n, temperature, top_k, seed) == 0) {
        printf("---- sample ----\n");
        for (int i = 0; i < n; i++) putchar(train->vocab[out[i]]);
        printf("\n----------------\n");
    }
    free(out);
}

// whether every float is finite (a serial pass: it runs once per checkpoint)
static int all_finite(const float* x, size_t n) {
    float acc = 0.0f;
    for (size_t i = 0; i < n; i++) acc += x[i] * 0.0f;   // 0 * inf and 0 * nan are nan
    return acc == 0.0f;
}

typedef struct {
    const char* out_dir;
    char previous[2][64];   // the two newest checkpoint names this run wrote; older ones are removed
} CkptKeeper;

static int save_checkpoint(CkptKeeper* keeper, Checkpoint* k) {
    char name[64], path[4096], latest[4096];
    size_t P = model_num_params(k->config);
    if (!all_finite(k->params, P) || !all_finite(k->m, P) || !all_finite(k->v, P))
        // a finite loss and gradient can still overflow the update (e.g. a huge -l): never save that
        return fail("step %d: the parameters or AdamW state overflowed in the update; stopping without saving "
                    "(the last checkpoint in %s is intact; try a smaller -l)", k->step, keeper->out_dir);
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

// the rows of streams [first, first + n) of every layer of an (L, B, H) state, into mine (L, n, H)
static void take_streams(float* mine, const float* all, int L, int B, int first, int n, int H) {
    size_t row = (size_t)H * sizeof(float);
    for (int l = 0; l < L; l++) memcpy(mine + (size_t)l * n * H, all + ((size_t)l * B + first) * H, n * row);
}

// threads per rank: -P, else OMP_NUM_THREADS, else this rank's share of the cores it may run on (a
// rank that mpiexec bound to its own cores sees only those, and keeps them all)
static void set_threads(int threads) {
    if (threads > 0) { omp_set_num_threads(threads); return; }
    if (dist.local_ranks > 1 && !getenv("OMP_NUM_THREADS") && omp_get_max_threads() >= sysconf(_SC_NPROCESSORS_ONLN)) {
        int share = omp_get_max_threads() / dist.local_ranks;
        omp_set_num_threads(share > 1 ? share : 1);
    }
}

// -o and its log.jsonl, appended to when resuming
static int open_log(FILE** log, const char* out_dir, int append) {
    char path[4096];
    if (make_dirs(out_dir)) return -1;
    snprintf(path, sizeof(path), "%s/log.jsonl", out_dir);
    *log = fopen(path, append ? "a" : "w");
    if (!*log) return fail("-o %s: cannot write %s: %s", out_dir, path, strerror(errno));
    return 0;
}

// a resumed run's arguments: flags given explicitly must agree with the checkpoint ck (at ck_path); the
// rest come from it
static int resume_args(TrainArgs* a, int* planned_steps, const Flag* flags, int n_flags, const Checkpoint* ck,
                       const char* ck_path, const TokenFile* train) {
    Config k = ck->config;
#define DIFFERS(flag, field, value) (given(flags, n_flags, flag) && (field) != (value))
    if (DIFFERS('c', k.cell, cell_from_name(a->cell_name)) || DIFFERS('L', k.n_layers, a->n_layers) ||
        DIFFERS('E', k.embed_size, a->embed_size) || DIFFERS('H', k.hidden_size, a->hidden_size))
        return fail("%s holds a %s model with L=%d E=%d H=%d, which does not match the flags given", ck_path,
                    cell_names[k.cell], k.n_layers, k.embed_size, k.hidden_size);
#undef DIFFERS
    if (k.vocab_size != train->vocab_size || memcmp(ck->vocab, train->vocab, 256) != 0)
        return fail("%s was trained on a vocabulary of %d symbols that differs from %s (%d)", ck_path, k.vocab_size,
                    a->train_path, train->vocab_size);
    // the global stream layout (-b is the global batch): any number of ranks that divides B resumes it
    if (ck->B > 0 && (ck->B != a->B || ck->T != a->T)) {
        if (given(flags, n_flags, 'b') || given(flags, n_flags, 't'))
            return fail("%s was trained with -b %d -t %d; resuming needs the same stream layout", ck_path, ck->B,
                        ck->T);
        a->B = ck->B; a->T = ck->T;
    }
    // so does the carried-state mode, which decides what the data position means
    if (ck->B > 0 && ck->carry != a->carry) {
        if (given(flags, n_flags, 'C'))
            return fail("%s was trained with -C %d; resuming needs the same -C", ck_path, ck->carry);
        a->carry = ck->carry;
    }
    // the options may change what the checkpoint trained with; unsaid, each carries on
    const TrainOptions* o = &ck->opts;
    if (!given(flags, n_flags, 'p')) a->dropout = o->dropout;
    if (!given(flags, n_flags, 'M')) a->precision = o->bf16 ? "bf16" : "fp32";
    if (!given(flags, n_flags, 'd')) a->masks = o->locked ? "locked" : "step";
    if (!given(flags, n_flags, 'W')) a->weight_drop = o->weight_drop;
    if (!given(flags, n_flags, 'D')) a->embed_dropout = o->embed_dropout;
    // a budget's step count goes on (the cosine schedule depends on it); -n still bounds it
    if (ck->planned_steps > 0) {
        *planned_steps = ck->planned_steps;
        if (!given(flags, n_flags, 'n') || *planned_steps < a->max_steps) a->max_steps = *planned_steps;
    }
    return 0;
}

// -x SECONDS: a wall-clock budget, counted from the start of the process. Once the warmup is over
// (and at least 10 steps ran) the run has timed its steps, and an evaluation, and fixes the step count
// so that the cosine schedule ends inside the budget, with 2% and a second to spare. Whenever the time
// left would not hold the end-of-run work (before the count is fixed too, as with a long warmup, or
// after, should the machine slow down), the run ends early rather than overrun. Every rank takes rank
// 0's decisions.
typedef struct {
    double budget_ms, start_ms;   // budget_ms 0: none
    int plan_after;               // the step at whose end the count is fixed; -1 once it is
    double train_ms, eval_ms, sample_ms, ckpt_ms;   // train_ms: summed over n_timed steps; the others, the last
    int n_timed;
} Budget;

static int rank0_decides(int x) {
    double v = dist.rank == 0 ? (double)x : 0.0;
    dist_agree_sum(0, &v, 1);
    return (int)v;
}

// the end-of-run work still to come, with the margin
static double budget_tail_ms(const Budget* b) {
    return b->eval_ms + b->sample_ms + b->ckpt_ms + 0.02 * b->budget_ms + 1000.0;
}

// the last step (1-based) that fits, given the steps done and the periodic work per step; at most upper
static int budget_plan(const Budget* b, const TrainArgs* a, int have_val, int done, int upper) {
    double per_step = b->train_ms / (b->n_timed > 0 ? b->n_timed : 1);
    if (have_val && a->eval_every) per_step += b->eval_ms / a->eval_every;
    if (a->sample_every) per_step += b->sample_ms / a->sample_every;
    if (a->ckpt_every) per_step += b->ckpt_ms / a->ckpt_every;
    double left = b->budget_ms - (now_ms() - b->start_ms) - budget_tail_ms(b);
    double more = left > 0.0 ? left / per_step : 0.0;
    int planned = more > (double)(upper - done) ? upper : done + (int)more;
    printf("budget %.0f s: a step takes %.1f ms with its share of eval, samples and checkpoints; %.0f s left: "
           "training to step %d\n", b->budget_ms / 1e3, per_step, left / 1e3, planned);
    return rank0_decides(planned);
}

static double process_start_ms;

// Every failure is agreed on, so all ranks leave for `error` together and none is left waiting in a
// collective: TRY(x) for a step that may fail on one rank alone (one small all-reduce of the outcome;
// nothing in one process), SAME(x) for one whose outcome every rank already shares (a decision on
// the same numbers, or a collective that agrees itself: train_step, evaluate).
#define TRY(x) do { if (dist_agree((x) != 0 ? -1 : 0)) goto error; } while (0)
#define SAME(x) do { if ((x) != 0) goto error; } while (0)

static int train_run(int argc, char** argv, const Backend* be) {
    TrainArgs a = {
        "data/tinyshakespeare/train.bin", "data/tinyshakespeare/val.bin", "out", "", "lstm", "stop", "fp32", "step",
        2, 128, 256, 32, 64, 2000, 200, 500, 0,
        0, 0, 1, 200, 0, 0,
        2e-3f, 0.01f, 1.0f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f,
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
        { 'n', 'i', &a.max_steps, "max steps (total, counting resumed ones; with -x, an upper bound)", 0 },
        { 'x', 'i', &a.budget, "wall-clock budget in seconds: fits the step count to it (0 = none)", 0 },
        { 'l', 'f', &a.lr, "learning rate (AdamW, betas 0.9 0.999, eps 1e-8)", 0 },
        { 'w', 'f', &a.weight_decay, "weight decay (all parameters)", 0 },
        { 'g', 'f', &a.grad_clip, "global grad-norm clip (0 = off)", 0 },
        { 'u', 'i', &a.warmup, "linear warmup steps", 0 },
        { 'q', 'f', &a.final_lr_frac, "cosine decay to this fraction of -l (1 = constant)", 0 },
        { 'p', 'f', &a.dropout, "dropout between layers and before the head", 0 },
        { 'd', 's', &a.masks, "dropout masks: step (fresh each step) or locked (one per stream per batch)", 0 },
        { 'W', 'f', &a.weight_drop, "weight drop: DropConnect on every W_hh, one mask per batch", 0 },
        { 'D', 'f', &a.embed_dropout, "embedding dropout: whole rows of the table, one mask per batch", 0 },
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
        { 'M', 's', &a.precision, "GEMM precision: fp32, or bf16 operands with fp32 sums", 0 },
    };
    int n_flags = sizeof(flags) / sizeof(flags[0]);
    int status = parse_flags(flags, n_flags, argc, argv);
    // every rank parses the same flags, so all stop here alike; rank 0 says why
    if (status) {
        if (status < 0 && dist.rank == 0) fprintf(stderr, "error: %s\n", pyrnn_last_error());
        return status < 0 ? 2 : 0;
    }
    if (check_args(&a)) { if (dist.rank == 0) fprintf(stderr, "error: %s\n", pyrnn_last_error()); return 2; }

    TokenFile train = { 0 }, val = { 0 };
    Checkpoint ck = { 0 };
    void* run = NULL;
    FILE* log = NULL;
    float *params = NULL, *m = NULL, *v = NULL, *h = NULL, *c = NULL, *h_all = NULL, *c_all = NULL;
    int *inputs = NULL, *targets = NULL;
    int exit_code = 1, have_val = a.val_path[0] != 0, lead = dist.rank == 0;
    char path[4096];
    set_threads(a.threads);

    // one block for the run: every `goto error` leaves the scope of what it declares (C++ compiles
    // this file too, and forbids jumping over an initialisation)
    {
        TRY(tokens_load(&train, a.train_path));
        if (have_val) {
            TRY(tokens_load(&val, a.val_path));
            if (val.vocab_size != train.vocab_size || memcmp(val.vocab, train.vocab, 256) != 0)
                TRY(fail("%s and %s have different vocabularies", a.train_path, a.val_path));
        }
        Config cfg = { cell_from_name(a.cell_name), train.vocab_size, a.embed_size, a.hidden_size, a.n_layers };
        int start_step = 0, planned_steps = 0;
        if (a.resume[0]) {
            const char* ck_path = a.resume;
            if (strcmp(a.resume, "latest") == 0) { TRY(resolve_latest(path, sizeof(path), a.out_dir)); ck_path = path; }
            TRY(checkpoint_load(&ck, ck_path));
            TRY(resume_args(&a, &planned_steps, flags, n_flags, &ck, ck_path, &train));
            TRY(check_args(&a));   // what came from the file obeys the same limits as flags
            cfg = ck.config;
            start_step = ck.step;
            printf("resuming from %s at step %d\n", ck_path, ck.step);
        }
        if (a.B % dist.size != 0)
            TRY(fail("-b %d is the global batch, which the %d ranks must divide evenly: use a -b divisible by %d, or "
                     "a number of ranks that divides %d", a.B, dist.size, dist.size, a.B));
        int local_B = a.B / dist.size, first = dist_first_stream(local_B);
        if (dist.size > 1 && (size_t)local_B * cfg.hidden_size > 2147483647u) TRY(fail("-b / ranks x -H is too large"));

        DataLoader loader;
        TRY(loader_init(&loader, &train, a.B, a.T, "train"));
        if (have_val) { DataLoader probe; TRY(loader_init(&probe, &val, a.B, a.T, "val")); }

        // h, c: this rank's carried state (L, B/R, H); h_all, c_all on rank 0: every stream's, for checkpoints
        size_t P = model_num_params(cfg), lbh = (size_t)cfg.n_layers * local_B * cfg.hidden_size;
        size_t bt = (size_t)a.B * a.T;
        params = (float*)alloc_floats(P); m = (float*)alloc_floats(P); v = (float*)alloc_floats(P);
        h = (float*)alloc_floats(lbh); c = (float*)alloc_floats(lbh);
        if (lead) { h_all = (float*)alloc_floats(lbh * dist.size); c_all = (float*)alloc_floats(lbh * dist.size); }
        inputs = (int*)malloc(bt * sizeof(int)); targets = (int*)malloc(bt * sizeof(int));
        TRY(params && m && v && h && c && (!lead || (h_all && c_all)) && inputs && targets ? 0 : fail("out of memory"));
        TrainOptions opts = { a.dropout, strcmp(a.masks, "locked") == 0, a.weight_drop, a.embed_dropout,
                              strcmp(a.precision, "bf16") == 0 };
        run = be->create(cfg, local_B, a.T, &opts);
        TRY(run ? 0 : -1);
        // rank 0 alone writes the log and checkpoints; opened only now, so that nothing refused above (a
        // backend's options, a kernel set this CPU lacks) touches an earlier run's log in -o
        TRY(lead ? open_log(&log, a.out_dir, a.resume[0] != 0) : 0);
        if (a.resume[0]) {
            // every rank read the same file, and takes its own streams' states from it
            TRY(be->set_params(run, ck.params, ck.m, ck.v, ck.adam_t, ck.rng));
            if (ck.B == a.B && ck.T == a.T) {   // same stream layout: continue where it stopped
                take_streams(h, ck.h, cfg.n_layers, a.B, first, local_B, cfg.hidden_size);
                if (ck.c) take_streams(c, ck.c, cfg.n_layers, a.B, first, local_B, cfg.hidden_size);
                TRY(be->set_state(run, a.carry ? h : NULL, a.carry && ck.c ? c : NULL));
                loader.pos = (long)(ck.data_pos % loader.n_batches);
            } else {                            // saved without a layout (B = 0): start of the data
                TRY(be->set_state(run, NULL, NULL));
            }
        } else {
            // the draw depends on the seed alone, so every rank starts from the same weights
            TRY(be->init(run, (uint64_t)a.seed));
            TRY(be->set_state(run, NULL, NULL));
        }

        printf("pyrnn %s | %s L=%d E=%d H=%d V=%d | %.2fM params | B=%d T=%d | lr %g wd %g clip %g | threads %d | %s\n",
               be->name, cell_names[cfg.cell], cfg.n_layers, cfg.embed_size, cfg.hidden_size, cfg.vocab_size, P / 1e6,
               a.B, a.T, a.lr, a.weight_decay, a.grad_clip, omp_get_max_threads(), be->about(run));
        if (dist.size > 1)
            printf("%d ranks, %d streams and %d threads each\n", dist.size, local_B, omp_get_max_threads());
        printf("train %zu tokens (%ld batches per pass), val %zu tokens\n", train.n_tokens, loader.n_batches,
               val.n_tokens);

        CkptKeeper keeper;
        memset(&keeper, 0, sizeof(keeper));
        keeper.out_dir = a.out_dir;
        StepParams sp = { a.lr, 0.9f, 0.999f, 1e-8f, a.weight_decay, a.grad_clip };
        int skip = strcmp(a.nonfinite, "skip") == 0;
        float val_loss = NAN;
        Budget budget = { a.budget * 1e3, process_start_ms, 0, 0.0, 0.0, 0.0, 0.0, 0 };
        if (a.budget > 0) {
            budget.plan_after = planned_steps ? -1 : start_step + (a.warmup > 10 ? a.warmup : 10);
            if (!planned_steps && !given(flags, n_flags, 'n')) a.max_steps = 1 << 30;   // until the count is fixed
        }
        for (int step = start_step; step < a.max_steps; step++) {
            sp.lr = lr_at(&a, step);
            int wrapped = loader_next(&loader, inputs, targets);
            if (!a.carry || wrapped) TRY(be->set_state(run, NULL, NULL));   // a new pass does not continue the last one
            float loss = 0.0f, norm = 0.0f;
            double t0 = now_ms(), comm0 = dist.comm_ms;
            dist.step_averaged = 0;
            // the backend agrees on the step's outcome itself (dist_step_mean, before its gradients' all-reduce)
            SAME(be->train_step(run, &loss, &norm, inputs + (size_t)first * a.T, targets + (size_t)first * a.T, &sp));
            double ms = now_ms() - t0, comm_ms = dist.comm_ms - comm0;
            if (step >= start_step + 3) { budget.train_ms += ms; budget.n_timed++; }   // past the first allocations
            if (dist.size > 1 && !dist.step_averaged)
                SAME(fail("the %s backend does not average its gradients over ranks: run it as one process", be->name));
            if (!isfinite(loss) || !isfinite(norm)) {
                if (!skip) {
                    const char* what = isfinite(loss) ? "gradient norm" : "loss";
                    fail("step %d: the %s is %s; stopping (the last checkpoint in %s is intact; -N skip skips such "
                         "steps)", step + 1, what, isnan(isfinite(loss) ? norm : loss) ? "NaN" : "Inf", a.out_dir);
                    goto error;
                }
                // the end-of-step work below (eval, sample, checkpoint) still happens on schedule
                printf("step %d: non-finite %s, update skipped and state reset\n", step + 1,
                       isfinite(loss) ? "gradient" : "loss");
                TRY(be->set_state(run, NULL, NULL));
            } else {
                char comm[64] = "";
                if (dist.size > 1) snprintf(comm, sizeof(comm), " (all-reduce %.1f)", comm_ms);
                printf("step %5d/%d | loss %.4f | norm %.3f | lr %.2e | %.1f ms%s | %.0f tok/s\n", step + 1,
                       a.max_steps, loss, norm, sp.lr, ms, comm, bt / (ms / 1e3));
                if (log)
                    fprintf(log, "{\"step\": %d, \"train_loss\": %.6f, \"grad_norm\": %.6f, \"lr\": %.6g, "
                            "\"ms\": %.3f, \"comm_ms\": %.3f, \"tok_s\": %.1f}\n", step + 1, loss, norm, sp.lr, ms,
                            comm_ms, bt / (ms / 1e3));
            }
            if (budget.budget_ms > 0.0 && step + 1 < a.max_steps &&
                rank0_decides(now_ms() - budget.start_ms + budget_tail_ms(&budget) > budget.budget_ms)) {
                printf("budget: out of time, ending at step %d of %d\n", step + 1, a.max_steps);
                a.max_steps = step + 1;
            }
            int last = step + 1 == a.max_steps;
            int plan = step + 1 == budget.plan_after && !last;
            if (have_val && ((a.eval_every && (step + 1) % a.eval_every == 0) || last || plan)) {
                double e0 = now_ms();
                SAME(evaluate(&val_loss, be, run, &val, a.B, a.T, local_B, inputs, targets, h, c, lbh));
                budget.eval_ms = now_ms() - e0;
                printf("step %5d | val loss %.4f\n", step + 1, val_loss);
                if (log)   // with the wall time since the process started, for loss-against-time curves
                    fprintf(log, "{\"step\": %d, \"val_loss\": %.6f, \"elapsed_s\": %.1f}\n", step + 1, val_loss,
                            (now_ms() - process_start_ms) / 1e3);
            }
            if (plan) {
                a.max_steps = planned_steps = budget_plan(&budget, &a, have_val, step + 1, a.max_steps);
                budget.plan_after = -1;
                last = step + 1 == a.max_steps;
                if (log) fprintf(log, "{\"step\": %d, \"planned_steps\": %d}\n", step + 1, planned_steps);
            }
            if (log) fflush(log);
            if (lead && ((a.sample_every && (step + 1) % a.sample_every == 0) || last)) {
                double s0 = now_ms();
                print_sample(be, run, &train, a.sample_len, a.temperature, a.top_k, (uint64_t)a.seed + step);
                budget.sample_ms = now_ms() - s0;
            }
            if ((a.ckpt_every && (step + 1) % a.ckpt_every == 0) || last) {
                double k0 = now_ms();
                // rank 0 writes its replica of the model and every rank's carried state, in global stream order
                Checkpoint k;
                memset(&k, 0, sizeof(k));
                TRY(be->get_params(run, params, m, v, &k.adam_t, &k.rng));
                TRY(be->get_state(run, h, c));
                // the replicas must hold the same bits, or rank 0's alone would hide the others' drift
                if (dist.size > 1 && !dist_same(crc32_update(0, (const unsigned char*)params, P * sizeof(float))))
                    SAME(fail("step %d: the ranks' parameters differ (every rank must run the same build with the "
                              "same -P); "
                              "stopping without saving (the last checkpoint in %s is intact)", step + 1, a.out_dir));
                dist_gather_streams(h_all, h, cfg.n_layers, local_B, cfg.hidden_size);
                dist_gather_streams(c_all, c, cfg.n_layers, local_B, cfg.hidden_size);
                k.config = cfg; k.B = a.B; k.T = a.T; k.step = step + 1; k.carry = a.carry; k.opts = opts;
                k.planned_steps = planned_steps;
                memcpy(k.vocab, train.vocab, 256);
                k.params = params; k.m = m; k.v = v; k.h = h_all; k.c = c_all;
                k.data_pos = loader.pos;
                TRY(lead ? save_checkpoint(&keeper, &k) : 0);
                printf("saved %s/%s\n", a.out_dir, keeper.previous[0]);
                budget.ckpt_ms = now_ms() - k0;
            }
        }
        if (start_step >= a.max_steps)
            printf("checkpoint is at step %d, -n is %d: nothing to train\n", start_step, a.max_steps);
        if (isfinite(val_loss)) printf("final val loss %.4f\n", val_loss);
        exit_code = 0;
    }
    goto done;
error:
    if (lead) fprintf(stderr, "error: %s\n", pyrnn_last_error());   // every rank holds the same message
done:
    if (run) be->destroy(run);
    if (log) fclose(log);
    free(params); free(m); free(v); free(h); free(c); free(h_all); free(c_all); free(inputs); free(targets);
    tokens_free(&train); tokens_free(&val); checkpoint_free(&ck);
    return exit_code;
}

int train_main(int argc, char** argv, const Backend* be) {
    process_start_ms = now_ms();
    if (dist_init()) { fprintf(stderr, "error: %s\n", pyrnn_last_error()); return 1; }
    // rank 0 alone prints (a rank whose stdout cannot be silenced prints too, which is harmless)
    FILE* out = dist.rank > 0 ? freopen("/dev/null", "w", stdout) : stdout;
    (void)out;
    int exit_code = train_run(argc, argv, be);
    dist_finalize();
    return exit_code;
}
