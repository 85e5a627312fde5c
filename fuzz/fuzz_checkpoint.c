// libFuzzer target for checkpoints (docs/formats.md) and the `latest` file that names them.
// Each input is parsed twice by checkpoint_parse: as it is (a random edit almost always breaks the
// CRC-32, so this mostly tests the early rejections), and with its last 4 bytes replaced by the
// right CRC, so the fuzzer also reaches everything after the checksum. The bytes are also written
// as a `latest` file and resolved (resolve_latest reads it with stdio from a real file in /dev/shm).
// Every input must load or be rejected with a message; nothing may be read past the file's end.
#include "../c/fileio.h"   // the readers under test, and nothing of the model
#include "fuzz_common.h"

static void parse_one(const uint8_t* data, size_t size, int fix_crc) {
    Checkpoint k;
    memset(&k, 0, sizeof(k));
    fuzz_blob(&k.blob, data, size, "fuzz.bin");
    if (fix_crc) {
        if (size < 4) { blob_free(&k.blob); return; }
        uint32_t crc = crc32_update(0, k.blob.data, size - 4);
        memcpy(k.blob.data + size - 4, &crc, 4);
    }
    fuzz_reset_error();
    if (checkpoint_parse(&k, "fuzz.bin") != 0) {
        fuzz_check_parse_error("fuzz.bin");
        checkpoint_free(&k);
        return;
    }
    FUZZ_CHECK(config_check(&k.config) == 0 && k.B >= 0 && k.T >= 0 && k.step >= 0 && k.data_pos >= 0);
    size_t P = model_num_params(k.config), lbh = (size_t)k.config.n_layers * k.B * k.config.hidden_size;
    size_t lc = k.config.cell == CELL_LSTM ? lbh : 0;
    FUZZ_CHECK(size == 256 + 256 + 12 * P + 8 + 4 * (lbh + lc) + 8 + 4);
    float s = fuzz_touch(k.params, P) + fuzz_touch(k.m, P) + fuzz_touch(k.v, P) + fuzz_touch(k.h, lbh);
    if (lc) s += fuzz_touch(k.c, lc);
    (void)s;
    checkpoint_free(&k);
}

static char latest_dir[256];
static void remove_latest_dir(void) {
    char path[512];
    snprintf(path, sizeof(path), "%s/latest", latest_dir);
    unlink(path);
    rmdir(latest_dir);
}

static void resolve_one(const uint8_t* data, size_t size) {
    char* dir = latest_dir;
    if (!dir[0]) {
        snprintf(dir, sizeof(latest_dir), "/dev/shm/pyrnn-fuzz-%d", (int)getpid());
        if (mkdir(dir, 0700) != 0 && errno != EEXIST) snprintf(dir, sizeof(latest_dir), "/tmp/pyrnn-fuzz-%d", (int)getpid());
        mkdir(dir, 0700);
        atexit(remove_latest_dir);
    }
    char path[512], out[4096];
    snprintf(path, sizeof(path), "%s/latest", dir);
    FILE* f = fopen(path, "wb");
    if (!f) return;   // no writable scratch space: the in-memory parsers above still ran
    if (size) fwrite(data, 1, size, f);
    fclose(f);
    fuzz_reset_error();
    if (resolve_latest(out, sizeof(out), dir) != 0) { fuzz_check_error(); return; }
    const char* name = out + strlen(dir) + 1;
    FUZZ_CHECK(strncmp(out, dir, strlen(dir)) == 0 && name[0] && !strchr(name, '/') && !strpbrk(name, "\r\n"));
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    parse_one(data, size, 0);
    parse_one(data, size, 1);
    resolve_one(data, size);
    return 0;
}
