/*
Compare-outputs harness: loads a reference file written by the NumPy oracle, runs the C trainer on
the same batch and prints one line per tensor. Exits non-zero on any mismatch.
    ./test_cpu ref/ref_lstm.bin [-tol 1e-5]
*/
#define PYRNN_LIBRARY
#include "train_rnn.c"
#include "reference.h"

// bf16 against the oracle's bf16: an operand within the fp32 difference of a rounding boundary may round
// the other way, one bf16 ulp (2^-8); docs/formats.md derives the bound
static float tolerance = 1e-5f, tolerance_bf16 = 2e-3f;


int main(int argc, char** argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s REFERENCE_FILE [-tol X] | --kernels\n", argv[0]); return 2; }
    if (strcmp(argv[1], "--kernels") == 0) {   // the kernel sets this CPU runs, for the ISA suite
        printf("%s\n", pyrnn_isa_list(1));
        return 0;
    }
    int tol_given = 0;
    for (int i = 2; i + 1 < argc; i += 2)
        if (strcmp(argv[i], "-tol") == 0) { tolerance = strtof(argv[i + 1], NULL); tol_given = 1; }
    Reference r;
    if (reference_load(&r, argv[1])) { fprintf(stderr, "error: %s\n", pyrnn_last_error()); return 1; }
    Config c = r.config;
    size_t bh = (size_t)c.n_layers * r.B * c.hidden_size;
    int lstm = c.cell == CELL_LSTM;
    printf("reference %s: cell=%s V=%d E=%d H=%d L=%d B=%d T=%d steps=%d\n", argv[1], cell_names[c.cell],
           c.vocab_size, c.embed_size, c.hidden_size, c.n_layers, r.B, r.T, r.n_steps);
    Model* m = model_new(c);
    if (!m) { fprintf(stderr, "error: %s\n", pyrnn_last_error()); return 1; }
    model_set_bf16(m, r.bf16);
    if (r.bf16 && !tol_given) tolerance = tolerance_bf16;
    printf("kernels: %s %s%s\n", m->mm.k->isa, m->mm.k->precision,
           r.bf16 ? (m->mm.k->bf16_native ? " (native)" : " (emulated)") : "");
    memcpy(m->params, r.params, m->num_params * sizeof(float));
    model_set_training(m, 1, 0.0f);

    // one forward / backward on the reference batch
    if (model_forward(m, r.inputs, r.targets, r.h0, lstm ? r.c0 : NULL, r.B, r.T)) {
        fprintf(stderr, "error: %s\n", pyrnn_last_error());
        return 1;
    }
    check("logits", m->logits, r.logits, (size_t)r.B * r.T * c.vocab_size, tolerance);
    check("loss", &m->loss, r.loss, 1, tolerance);
    check("h_n", m->h_n, r.h_n, bh, tolerance);
    if (lstm) check("c_n", m->c_n, r.c_n, bh, tolerance);
    model_zero_grad(m);
    if (model_backward(m)) { fprintf(stderr, "error: %s\n", pyrnn_last_error()); return 1; }
    check_params("grad", &m->config, m->grads, r.grads, tolerance);
    check("grad h0", m->dh0, r.dh0, bh, tolerance);
    if (lstm) check("grad c0", m->dc0, r.dc0, bh, tolerance);

    // n_steps of AdamW with clipping on the same batch
    float* losses = (float*)malloc((r.n_steps + 1) * sizeof(float));
    float* norms = (float*)malloc((r.n_steps + 1) * sizeof(float));
    memcpy(m->params, r.params, m->num_params * sizeof(float));
    for (int s = 0; s < r.n_steps; s++) {
        model_zero_grad(m);
        if (model_forward(m, r.inputs, r.targets, r.h0, lstm ? r.c0 : NULL, r.B, r.T) || model_backward(m) ||
            model_step(m, r.lr, r.beta1, r.beta2, r.eps, r.weight_decay, r.max_grad_norm, &norms[s])) {
            fprintf(stderr, "error: %s\n", pyrnn_last_error());
            return 1;
        }
        losses[s] = m->loss;
    }
    if (r.n_steps > 0) {
        check("step losses", losses, r.step_losses, r.n_steps, tolerance);
        check("step grad norms", norms, r.step_norms, r.n_steps, tolerance);
        check_params("after steps", &m->config, m->params, r.params_after, tolerance);
    }
    free(losses); free(norms);
    model_free(m);
    reference_free(&r);
    printf(n_failed ? "FAILED: %d tensors differ\n" : "overall: OK\n", n_failed);
    return n_failed ? 1 : 0;
}
