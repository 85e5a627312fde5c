// Shared by the fuzz targets in fuzz/: each target includes ../c/fileio.h (and reference.h), then this
// file. The readers there are blob_load (path -> whole file in one malloc)
// followed by a parser over that Blob (tokens_parse, checkpoint_parse, reference_parse). The
// targets call the same parsers on a Blob filled from the fuzzer's bytes, in a malloc of exactly
// that size as blob_load makes it, so AddressSanitizer sees any read past the file's end.
#define FUZZ_CHECK(c) do { if (!(c)) { fprintf(stderr, "fuzz check failed: %s (%s:%d)\n", #c, __FILE__, __LINE__); abort(); } } while (0)

// what blob_load would leave after reading a file holding exactly these bytes
static void fuzz_blob(Blob* b, const uint8_t* data, size_t size, const char* path) {
    memset(b, 0, sizeof(*b));
    b->path = path;
    b->size = size;
    b->data = (unsigned char*)malloc(size ? size : 1);
    if (!b->data) abort();
    if (size) memcpy(b->data, data, size);
}

// reads every float of a range the parser handed out, so ASan checks the whole range is in bounds
static float fuzz_touch(const void* p, size_t n_words) {
    const unsigned char* q = (const unsigned char*)p;
    float s = 0.0f;
    for (size_t i = 0; i < n_words; i++) {
        float x;
        memcpy(&x, q + 4 * i, 4);
        s += x == x ? 0.0f : 1.0f;
    }
    return s;
}

// call before each parse, then fuzz_check_error on rejection: a rejected input must leave a
// one-line message, never none
static void fuzz_reset_error(void) { pyrnn_error_msg[0] = 0; }
static void fuzz_check_error(void) {
    const char* e = pyrnn_last_error();
    FUZZ_CHECK(e[0] != 0 && strchr(e, '\n') == NULL);
}

// the parsers' messages start with the file's path, and name it once (a message that repeats it
// was formatted from itself: pyrnn_error_msg passed as an argument of fail)
static void fuzz_check_parse_error(const char* path) {
    fuzz_check_error();
    const char* e = pyrnn_last_error();
    size_t n = strlen(path);
    FUZZ_CHECK(strncmp(e, path, n) == 0 && e[n] == ':' && strstr(e + n, path) == NULL);
}
