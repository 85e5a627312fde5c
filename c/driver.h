// driver.h: the training driver shared by the CPU and GPU trainers. The Backend table a model fills,
// the flags, and train_main: data, carried state, logging, eval, sampling and checkpoints. Include
// after the model (the host model draws the initial weights and samples).
#pragma once
#include "common.h"
#include "fileio.h"

// backends: train_main runs any model that fills this table (the CPU model in c/train_rnn.c,
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

