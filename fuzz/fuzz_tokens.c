// libFuzzer target for token files (docs/formats.md): tokens_parse on arbitrary bytes, then the
// data loader over what it accepted. Every input must load or be rejected with a message.
//   make fuzz   (clang -fsanitize=fuzzer,address,undefined; see the hardening section of the Makefile)
#include "../c/fileio.h"   // the readers under test, and nothing of the model
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    TokenFile f;
    memset(&f, 0, sizeof(f));
    fuzz_blob(&f.blob, data, size, "fuzz.bin");
    fuzz_reset_error();
    if (tokens_parse(&f, "fuzz.bin") != 0) {
        fuzz_check_parse_error("fuzz.bin");
        tokens_free(&f);
        return 0;
    }
    FUZZ_CHECK(f.vocab_size >= 1 && f.vocab_size <= 256 && f.n_tokens == size - TOKENS_HEADER);
    for (size_t i = 0; i < f.n_tokens; i++) FUZZ_CHECK(f.tokens[i] < f.vocab_size);
    // the loader reads tokens[b * stream_len + pos * T + t (+1)]: walk the first and last batches
    static const int shapes[][2] = { { 1, 1 }, { 1, 7 }, { 2, 3 }, { 3, 1 }, { 4, 16 } };
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        int B = shapes[s][0], T = shapes[s][1];
        DataLoader d;
        if (loader_init(&d, &f, B, T, "train")) { fuzz_check_error(); continue; }
        int *in = (int*)malloc(sizeof(int) * B * T), *tg = (int*)malloc(sizeof(int) * B * T);
        FUZZ_CHECK(in && tg);
        for (int k = 0; k < 3 && k < d.n_batches; k++) loader_next(&d, in, tg);
        d.pos = d.n_batches - 1;
        FUZZ_CHECK(loader_next(&d, in, tg) == (d.n_batches == 1) && d.pos == 0);
        for (int i = 0; i < B * T; i++) FUZZ_CHECK(in[i] < f.vocab_size && tg[i] < f.vocab_size);
        free(in); free(tg);
    }
    tokens_free(&f);
    return 0;
}
