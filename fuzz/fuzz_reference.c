// libFuzzer target for reference files (docs/formats.md), as read by c/test_rnn.c: reference_parse
// on arbitrary bytes. Every input must load or be rejected with a message; an accepted one must
// hand out arrays that lie inside the file (every word is read back here, under ASan).
#include "../c/fileio.h"   // the readers under test, and nothing of the model
#include "../c/reference.h"
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    Reference r;
    memset(&r, 0, sizeof(r));
    fuzz_blob(&r.blob, data, size, "fuzz.bin");
    fuzz_reset_error();
    if (reference_parse(&r, "fuzz.bin") != 0) {
        fuzz_check_parse_error("fuzz.bin");
        reference_free(&r);
        return 0;
    }
    const Config* c = &r.config;
    FUZZ_CHECK(config_check(c) == 0 && r.B > 0 && r.T > 0 && r.n_steps >= 0);
    size_t bt = (size_t)r.B * r.T, lbh = (size_t)c->n_layers * r.B * c->hidden_size;
    size_t lc = c->cell == CELL_LSTM ? lbh : 0, P = model_num_params(*c), S = (size_t)r.n_steps;
    size_t words = 2 * bt + 3 * lbh + 3 * lc + 3 * P + bt * c->vocab_size + 1 + 2 * S;
    FUZZ_CHECK(size == 4 * (64 + 16 + words));
    float s = fuzz_touch(r.inputs, bt) + fuzz_touch(r.targets, bt) + fuzz_touch(r.h0, lbh) + fuzz_touch(r.params, P) +
              fuzz_touch(r.logits, bt * c->vocab_size) + fuzz_touch(r.loss, 1) + fuzz_touch(r.grads, P) +
              fuzz_touch(r.dh0, lbh) + fuzz_touch(r.h_n, lbh) + fuzz_touch(r.step_losses, S) +
              fuzz_touch(r.step_norms, S) + fuzz_touch(r.params_after, P);
    if (lc) s += fuzz_touch(r.c0, lc) + fuzz_touch(r.dc0, lc) + fuzz_touch(r.c_n, lc);
    for (size_t i = 0; i < bt; i++) FUZZ_CHECK(r.inputs[i] >= 0 && r.inputs[i] < c->vocab_size);
    (void)s;
    reference_free(&r);
    return 0;
}
