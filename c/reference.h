// Reader for the reference files written by `python -m pyrnn.reference` (docs/formats.md), and the
// harness's tensor comparison; shared by c/test_rnn.c and cuda/test_rnn.cu.
#pragma once

#define REFERENCE_MAGIC 20261103
#define REFERENCE_VERSION 1

typedef struct {
    Config config;
    int B, T, n_steps, seed;
    int bf16;            // the oracle rounded every matmul's operands to bf16 (header word 11)
    float lr, beta1, beta2, eps, weight_decay, max_grad_norm;
    const int *inputs, *targets;
    const float *h0, *c0, *params, *logits, *loss, *grads, *dh0, *dc0, *h_n, *c_n;
    const float *step_losses, *step_norms, *params_after;
    Blob blob;
} Reference;

static int reference_parse(Reference* r, const char* path) {
    Blob* b = &r->blob;
    const int* header = (const int*)blob_take(b, 64 * sizeof(int), "header");
    const float* hp = header ? (const float*)blob_take(b, 16 * sizeof(float), "hyperparameters") : NULL;
    if (!hp) return -1;
    if (header[0] != REFERENCE_MAGIC) return fail("%s: not a pyrnn reference file (bad magic)", path);
    if (header[1] != REFERENCE_VERSION) {
        return fail("%s: reference version %d, this build reads version %d", path, header[1], REFERENCE_VERSION);
    }
    if (config_from_header(&r->config, header + 2, path)) return -1;
    r->B = header[7]; r->T = header[8]; r->n_steps = header[9]; r->seed = header[10]; r->bf16 = header[11];
    if (r->B <= 0 || r->T <= 0 || r->n_steps < 0) return fail("%s: bad B, T or steps in header", path);
    if (r->bf16 != 0 && r->bf16 != 1) return fail("%s: bad precision %d in header", path, r->bf16);
    r->lr = hp[0]; r->beta1 = hp[1]; r->beta2 = hp[2]; r->eps = hp[3]; r->weight_decay = hp[4];
    r->max_grad_norm = hp[5];
    const Config* c = &r->config;
    size_t bt = 0, lbh = 0, btv = 0;
    int d_bt[] = { r->B, r->T }, d_lbh[] = { c->n_layers, r->B, c->hidden_size };
    int d_btv[] = { r->B, r->T, c->vocab_size };
    if (checked_count(&bt, d_bt, 2, path) || checked_count(&lbh, d_lbh, 3, path) ||
        checked_count(&btv, d_btv, 3, path))
        return -1;
    size_t P = model_num_params(*c), lc = c->cell == CELL_LSTM ? lbh : 0, S = (size_t)r->n_steps;
    struct { const void** dst; size_t n; const char* what; } parts[] = {
        { (const void**)&r->inputs, bt, "inputs" }, { (const void**)&r->targets, bt, "targets" },
        { (const void**)&r->h0, lbh, "h0" }, { (const void**)&r->c0, lc, "c0" },
        { (const void**)&r->params, P, "params" }, { (const void**)&r->logits, btv, "logits" },
        { (const void**)&r->loss, 1, "loss" }, { (const void**)&r->grads, P, "grads" },
        { (const void**)&r->dh0, lbh, "dh0" }, { (const void**)&r->dc0, lc, "dc0" },
        { (const void**)&r->h_n, lbh, "h_n" }, { (const void**)&r->c_n, lc, "c_n" },
        { (const void**)&r->step_losses, S, "step_losses" }, { (const void**)&r->step_norms, S, "step_norms" },
        { (const void**)&r->params_after, P, "params_after" },
    };
    for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++) {
        *parts[i].dst = blob_take(b, parts[i].n * 4, parts[i].what);
        if (!*parts[i].dst) return -1;
    }
    if (blob_done(b)) return -1;
    for (size_t i = 0; i < bt; i++)
        if (r->inputs[i] < 0 || r->inputs[i] >= c->vocab_size || r->targets[i] < 0 || r->targets[i] >= c->vocab_size) {
            return fail("%s: token at position %zu is outside the vocabulary [0, %d)", path, i, c->vocab_size);
        }
    return 0;
}

int reference_load(Reference* r, const char* path) {
    memset(r, 0, sizeof(*r));
    if (blob_load(&r->blob, path)) return -1;
    if (reference_parse(r, path)) { blob_free(&r->blob); return -1; }
    return 0;
}

void reference_free(Reference* r) { blob_free(&r->blob); }

// ---- comparing: one line per tensor, counting failures (used by both harnesses)

static int n_failed = 0;

// relative error ||a - b|| / ||b||, with the max abs diff for the eye
static void check(const char* name, const float* a, const float* b, size_t n, float tol) {
    double diff2 = 0.0, ref2 = 0.0, maxabs = 0.0;
    int finite = 1;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        if (!isfinite(a[i])) finite = 0;
        diff2 += d * d;
        ref2 += (double)b[i] * b[i];
        if (fabs(d) > maxabs) maxabs = fabs(d);
    }
    double rel = ref2 > 0.0 ? sqrt(diff2 / ref2) : sqrt(diff2);
    int ok = finite && rel <= tol;
    if (!ok) n_failed++;
    printf("%-24s n=%-8zu max abs diff %.3e  rel err %.3e  %s\n", name, n, maxabs, rel, ok ? "OK" : "NOT OK");
}

// one line per parameter tensor, in state_dict order
static void check_params(const char* what, const Config* c, const float* a, const float* b, float tol) {
    char name[128];
    for (int i = 0; i < model_tensor_count(c); i++) {
        size_t off, n;
        model_tensor_info(c, i, name, sizeof(name), &off, &n);
        char label[160];
        snprintf(label, sizeof(label), "%s %s", what, name);
        check(label, a + off, b + off, n, tol);
    }
}
