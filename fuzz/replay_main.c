// A standalone driver for the fuzz targets when libFuzzer is not at hand (gcc, or replaying in
// tests): link it with one fuzz_*.c and build with -fsanitize=address,undefined.
//
//   replay [-mutations=N] [-seed=S] [-max_total_time=SECONDS] [-crash_dir=DIR] [-v] FILE|DIR ...
//
// Runs the target on every file given (directories: every file inside, sorted by name), then,
// with -mutations=N, on N random mutations of each of them (bit flips, byte overwrites with
// boundary values, truncation, insertion, duplication of a chunk, 32-bit boundary integers at
// aligned offsets) until the time box runs out. Not coverage-guided: a fallback, and the regression
// replay of fuzz/corpus and fuzz/crashes. When a run dies (ASan report, UBSan halt, abort, a hang
// past 10 s) the input is written to -crash_dir as crash-<target>-<hash> first.
#include <dirent.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));

static const uint8_t* current = NULL;
static size_t current_size = 0;
static const char* crash_dir = NULL;
static const char* target_name = "target";

static void save_current(void) {
    if (!crash_dir || !current) return;
    uint64_t h = 1469598103934665603ull;   // FNV-1a, to name the file
    for (size_t i = 0; i < current_size; i++) h = (h ^ current[i]) * 1099511628211ull;
    char path[4096];
    snprintf(path, sizeof(path), "%s/crash-%s-%016llx", crash_dir, target_name, (unsigned long long)h);
    FILE* f = fopen(path, "wb");
    if (!f) return;
    fwrite(current, 1, current_size, f);
    fclose(f);
    fprintf(stderr, "replay: input that failed written to %s\n", path);
}

static void on_signal(int sig) {
    fprintf(stderr, "replay: %s\n", sig == SIGALRM ? "timeout (10 s) on one input" : "fatal signal");
    save_current();
    _exit(1);
}

static void run_one(const uint8_t* data, size_t size) {
    // an exact-size copy, so ASan sees reads past the end (the target copies again as blob_load would)
    uint8_t* copy = (uint8_t*)malloc(size ? size : 1);
    if (!copy) abort();
    if (size) memcpy(copy, data, size);
    current = copy; current_size = size;
    alarm(10);
    LLVMFuzzerTestOneInput(copy, size);
    alarm(0);
    current = NULL;
    free(copy);
}

static uint64_t rng_state = 1;
static uint64_t next_rand(void) {   // xorshift64*
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

// one random mutation of src into dst (capacity cap); returns the new size
static size_t mutate(uint8_t* dst, size_t cap, const uint8_t* src, size_t n) {
    static const uint32_t interesting[] = { 0, 1, 2, 3, 4, 0x7f, 0x80, 0xff, 0x100, 256, 257, 1024, 65536, 65537,
                                            0x7fffffff, 0x80000000u, 0xffffffffu, 0xfffffffeu, 20261101, 20261102,
                                            20261103 };
    size_t m = n < cap ? n : cap;
    memcpy(dst, src, m);
    int rounds = 1 + (int)(next_rand() % 4);
    for (int r = 0; r < rounds; r++) {
        uint64_t x = next_rand();
        switch (x % 7) {
        case 0: if (m) dst[next_rand() % m] ^= (uint8_t)(1u << (next_rand() % 8)); break;   // bit flip
        case 1: if (m) dst[next_rand() % m] = (uint8_t)interesting[next_rand() % 8]; break;   // byte
        case 2: if (m >= 4) {   // an aligned 32-bit word: header fields live there
                    size_t at = (next_rand() % (m / 4)) * 4;
                    if (next_rand() % 2 && at > 32 * 4) at = (next_rand() % 16) * 4;   // mostly the header
                    uint32_t v = interesting[next_rand() % (sizeof(interesting) / sizeof(interesting[0]))];
                    if (next_rand() % 4 == 0) v = (uint32_t)(int32_t) - (int32_t)(next_rand() % 3);
                    memcpy(dst + at, &v, 4);
                } break;
        case 3: if (m) m = next_rand() % m; break;   // truncate
        case 4: if (m < cap) {   // insert a byte
                    size_t at = m ? next_rand() % (m + 1) : 0;
                    memmove(dst + at + 1, dst + at, m - at);
                    dst[at] = (uint8_t)next_rand(); m++;
                } break;
        case 5: if (m) {   // duplicate a chunk at the end
                    size_t at = next_rand() % m, len = 1 + next_rand() % 64;
                    if (at + len > m) len = m - at;
                    if (m + len <= cap) { memmove(dst + m, dst + at, len); m += len; }
                } break;
        case 6: if (m >= 8) {   // a 64-bit count (the token file's N, the data position)
                    size_t at = (next_rand() % (m / 8)) * 8;
                    int64_t v = (int64_t)(next_rand() % 5) - 2 + (next_rand() % 2 ? (int64_t)m - 1024 : 0);
                    memcpy(dst + at, &v, 8);
                } break;
        }
    }
    return m;
}

typedef struct { uint8_t* data; size_t size; } Input;

static int read_file(const char* path, Input* in) {
    FILE* f = fopen(path, "rb");
    if (!f) return -1;
    size_t cap = 4096, n = 0;
    uint8_t* buf = (uint8_t*)malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) { cap *= 2; buf = (uint8_t*)realloc(buf, cap); }
    }
    fclose(f);
    if (!buf) return -1;
    in->data = buf; in->size = n;
    return 0;
}

static int compare_names(const void* a, const void* b) { return strcmp(*(char* const*)a, *(char* const*)b); }

int main(int argc, char** argv) {
    long mutations = 0, max_seconds = 0;
    int verbose = 0;
    unsigned long long seed = 1;
    Input* inputs = NULL;
    size_t n_inputs = 0, cap_inputs = 0;
    const char* slash = strrchr(argv[0], '/');
    target_name = slash ? slash + 1 : argv[0];
    if (strncmp(target_name, "replay_", 7) == 0) target_name += 7;
    signal(SIGALRM, on_signal);
    signal(SIGSEGV, on_signal);
    signal(SIGABRT, on_signal);
    if (__sanitizer_set_death_callback) __sanitizer_set_death_callback(save_current);
    for (int i = 1; i < argc; i++) {
        const char* a = argv[i];
        if (strncmp(a, "-mutations=", 11) == 0) { mutations = atol(a + 11); continue; }
        if (strncmp(a, "-seed=", 6) == 0) { seed = strtoull(a + 6, NULL, 10); continue; }
        if (strncmp(a, "-max_total_time=", 16) == 0) { max_seconds = atol(a + 16); continue; }
        if (strncmp(a, "-crash_dir=", 11) == 0) { crash_dir = a + 11; continue; }
        if (strcmp(a, "-v") == 0) { verbose = 1; continue; }
        if (a[0] == '-') { fprintf(stderr, "replay: unknown option %s\n", a); return 2; }
        // a directory: every regular file in it, sorted; else the file itself
        char** names = NULL;
        size_t n_names = 0;
        DIR* d = opendir(a);
        if (d) {
            struct dirent* e;
            while ((e = readdir(d)) != NULL) {
                if (e->d_name[0] == '.') continue;
                names = (char**)realloc(names, (n_names + 1) * sizeof(char*));
                size_t len = strlen(a) + strlen(e->d_name) + 2;
                names[n_names] = (char*)malloc(len);
                snprintf(names[n_names++], len, "%s/%s", a, e->d_name);
            }
            closedir(d);
            if (n_names) qsort(names, n_names, sizeof(char*), compare_names);
        } else {
            names = (char**)malloc(sizeof(char*));
            names[0] = strdup(a);
            n_names = 1;
        }
        for (size_t k = 0; k < n_names; k++) {
            Input in;
            if (read_file(names[k], &in) != 0) { fprintf(stderr, "replay: cannot read %s\n", names[k]); return 2; }
            if (verbose) fprintf(stderr, "replay: %s (%zu bytes)\n", names[k], in.size);
            if (n_inputs == cap_inputs) {
                cap_inputs = cap_inputs ? 2 * cap_inputs : 64;
                inputs = (Input*)realloc(inputs, cap_inputs * sizeof(Input));
            }
            inputs[n_inputs++] = in;
            free(names[k]);
        }
        free(names);
    }
    for (size_t i = 0; i < n_inputs; i++) run_one(inputs[i].data, inputs[i].size);
    printf("replay %s: %zu files ok\n", target_name, n_inputs);
    long long done = 0;
    if (mutations > 0 && n_inputs > 0) {
        rng_state = seed * 0x9E3779B97F4A7C15ull + 1;
        size_t cap = 0;
        for (size_t i = 0; i < n_inputs; i++) if (inputs[i].size > cap) cap = inputs[i].size;
        cap = cap * 2 + 64;
        uint8_t* buf = (uint8_t*)malloc(cap);
        time_t t0 = time(NULL);
        for (long r = 0; r < mutations; r++) {
            for (size_t i = 0; i < n_inputs; i++) {
                size_t n = mutate(buf, cap, inputs[i].data, inputs[i].size);
                run_one(buf, n);
                done++;
            }
            if (max_seconds > 0 && time(NULL) - t0 >= max_seconds) break;
        }
        free(buf);
        printf("replay %s: %lld random mutations ok (seed %llu)\n", target_name, done, seed);
    }
    for (size_t i = 0; i < n_inputs; i++) free(inputs[i].data);
    free(inputs);
    return 0;
}
