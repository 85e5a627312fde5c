/*
Compare-outputs harness for the GPU model: loads a reference file written by the NumPy oracle, runs
the cuDNN trainer on the same batch and prints one line per tensor, as c/test_rnn.c does for the
CPU. Exits non-zero on any mismatch.
    ./test_gpu ref/ref_lstm.bin [-tol 1e-4] [-tf32] [-algo auto|standard|persist_static|persist_small_h]
Default math is exact fp32 (cuDNN FMA math, no TF32 in cuBLAS); -tf32 is for looking, not for
passing (expect ~1e-3). -algo picks cuDNN's RNN algorithm (default auto); exit status 3 means
cuDNN does not run the one asked for at this shape.
*/
#include "lib_rnn.cu"          // the library's API, as pyrnn/_cuda.py drives it
#include "../c/fileio.h"       // Blob, for the reference reader
#include "../c/reference.h"    // the reference file and the per-tensor checks

static int die(void) {
    fprintf(stderr, "error: %s\n", pyrnn_last_error());
    return 1;
}

int main(int argc, char** argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s REFERENCE_FILE [-tol X] [-tf32] [-algo NAME]\n", argv[0]); return 2; }
    float tolerance = 1e-4f;
    int tf32 = 0;
    const char* algo = "auto";
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "-tol") == 0 && i + 1 < argc) tolerance = strtof(argv[++i], NULL);
        else if (strcmp(argv[i], "-tf32") == 0) tf32 = 1;
        else if (strcmp(argv[i], "-algo") == 0 && i + 1 < argc) algo = argv[++i];
        else { fprintf(stderr, "unknown argument '%s'\n", argv[i]); return 2; }
    }
    Reference r;
    if (reference_load(&r, argv[1])) return die();
    Config c = r.config;
    size_t bh = (size_t)c.n_layers * r.B * c.hidden_size, P = model_num_params(c);
    size_t btv = (size_t)r.B * r.T * c.vocab_size;
    int lstm = c.cell == CELL_LSTM;
    printf("reference %s: cell=%s V=%d E=%d H=%d L=%d B=%d T=%d steps=%d | gpu %s math\n", argv[1], cell_names[c.cell],
           c.vocab_size, c.embed_size, c.hidden_size, c.n_layers, r.B, r.T, r.n_steps, tf32 ? "tf32" : "fp32");
    void* g = gpu_lm_new(c.cell, c.vocab_size, c.embed_size, c.hidden_size, c.n_layers, r.B, r.T, tf32, algo, 0.0f);
    if (!g) return gpu_algo_refused ? (die(), 3) : die();
    printf("gpu: %s\n", gpu_lm_about(g));
    float* logits = (float*)malloc(btv * sizeof(float));
    float* grads = (float*)malloc(P * sizeof(float));
    float* params = (float*)malloc(P * sizeof(float));
    float* states = (float*)malloc(4 * bh * sizeof(float));   // h_n, c_n, dh0, dc0
    float* losses = (float*)malloc((r.n_steps + 1) * sizeof(float));
    float* norms = (float*)malloc((r.n_steps + 1) * sizeof(float));
    if (!logits || !grads || !params || !states || !losses || !norms) {
        fprintf(stderr, "error: out of memory\n");
        return 1;
    }
    float *h_n = states, *c_n = states + bh, *dh0 = states + 2 * bh, *dc0 = states + 3 * bh;
    const float* c0 = lstm ? r.c0 : NULL;

    // one forward / backward on the reference batch
    float loss = 0.0f;
    if (gpu_lm_set_params(g, r.params) || gpu_lm_forward(g, &loss, r.inputs, r.targets, r.h0, c0)) return die();
    if (gpu_lm_get_logits(g, logits) || gpu_lm_get_final_state(g, h_n, lstm ? c_n : NULL)) return die();
    check("logits", logits, r.logits, btv, tolerance);
    check("loss", &loss, r.loss, 1, tolerance);
    check("h_n", h_n, r.h_n, bh, tolerance);
    if (lstm) check("c_n", c_n, r.c_n, bh, tolerance);
    if (gpu_lm_zero_grad(g) || gpu_lm_backward(g) || gpu_lm_get_grads(g, grads) ||
        gpu_lm_get_dstate(g, dh0, lstm ? dc0 : NULL)) return die();
    check_params("grad", &c, grads, r.grads, tolerance);
    check("grad h0", dh0, r.dh0, bh, tolerance);
    if (lstm) check("grad c0", dc0, r.dc0, bh, tolerance);

    // n_steps of AdamW with clipping on the same batch, from the same params and a fresh optimizer
    if (gpu_lm_set_params(g, r.params) || gpu_lm_set_adam(g, NULL, NULL, 0)) return die();
    for (int s = 0; s < r.n_steps; s++) {
        if (gpu_lm_forward(g, &losses[s], r.inputs, r.targets, r.h0, c0)) return die();
        if (gpu_lm_zero_grad(g) || gpu_lm_backward(g)) return die();
        if (gpu_lm_step(g, &norms[s], r.lr, r.beta1, r.beta2, r.eps, r.weight_decay, r.max_grad_norm)) return die();
    }
    if (r.n_steps > 0) {
        if (gpu_lm_get_params(g, params)) return die();
        check("step losses", losses, r.step_losses, r.n_steps, tolerance);
        check("step grad norms", norms, r.step_norms, r.n_steps, tolerance);
        check_params("after steps", &c, params, r.params_after, tolerance);
    }
    gpu_lm_free(g);
    free(logits); free(grads); free(params); free(states); free(losses); free(norms);
    reference_free(&r);
    printf(n_failed ? "FAILED: %d tensors differ\n" : "overall: OK\n", n_failed);
    return n_failed ? 1 : 0;
}
