// fileio.h: the files pyrnn reads and writes (docs/formats.md). Token files and the data loader over
// them, checkpoints with their CRC-32, the `latest` pointer, and atomic writes (NAME.tmp, fsync,
// rename). Every reader loads a whole file, then takes bounded pieces, so a short or hostile file
// only ever produces a message.
#pragma once
#include "common.h"

// ----------------------------------------------------------------------------
// reading files we did not write

typedef struct {
    unsigned char* data;
    size_t size, pos;
    const char* path;
} Blob;

void blob_free(Blob* b) { free(b->data); b->data = NULL; b->size = b->pos = 0; }

int blob_load(Blob* b, const char* path) {
    memset(b, 0, sizeof(*b));
    b->path = path;
    FILE* f = fopen(path, "rb");
    if (!f) return fail("%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) { fclose(f); return fail("%s: not a regular file", path); }
    b->size = (size_t)st.st_size;
    b->data = (unsigned char*)malloc(b->size ? b->size : 1);
    if (!b->data) { fclose(f); return fail("%s: out of memory reading %zu bytes", path, b->size); }
    size_t got = fread(b->data, 1, b->size, f);
    int err = ferror(f);
    fclose(f);
    if (err || got != b->size) { blob_free(b); return fail("%s: read error", path); }
    return 0;
}

// the next n bytes, or an error naming what was missing
static const void* blob_take(Blob* b, size_t n, const char* what) {
    if (n > b->size - b->pos) {
        fail("%s: truncated: %s needs %zu bytes, %zu left", b->path, what, n, b->size - b->pos);
        return NULL;
    }
    const void* p = b->data + b->pos;
    b->pos += n;
    return p;
}

static int blob_done(const Blob* b) {
    if (b->pos != b->size) return fail("%s: %zu unexpected trailing bytes", b->path, b->size - b->pos);
    return 0;
}

// n = a * b * c ... with overflow and sanity checks, for sizes read from a file header
static int checked_count(size_t* n, const int* dims, int n_dims, const char* path) {
    size_t total = 1;
    for (int i = 0; i < n_dims; i++) {
        if (dims[i] < 0 || (dims[i] > 0 && total > ((size_t)1 << 40) / (size_t)dims[i]))
            return fail("%s: header sizes are out of range", path);
        total *= (size_t)dims[i];
    }
    *n = total;
    return 0;
}

// config read from a file header: the same rules as on the command line, plus a sane upper bound
static int config_from_header(Config* c, const int* h, const char* path) {
    c->cell = h[0]; c->vocab_size = h[1]; c->embed_size = h[2]; c->hidden_size = h[3]; c->n_layers = h[4];
    if (config_check(c)) {
        char why[sizeof(pyrnn_error_msg)];   // fail() writes pyrnn_error_msg: never pass it as its own argument
        snprintf(why, sizeof(why), "%s", pyrnn_error_msg);
        return fail("%s: bad model config: %s", path, why);
    }
    if (c->vocab_size > 256 || c->embed_size > 65536 || c->hidden_size > 65536 || c->n_layers > 64)
        return fail("%s: model config out of range (V=%d E=%d H=%d L=%d)", path, c->vocab_size, c->embed_size,
                    c->hidden_size, c->n_layers);
    return 0;
}

// ----------------------------------------------------------------------------
// token files (docs/formats.md): a 1024-byte header with the vocabulary, then one byte per token

#define TOKENS_MAGIC 20261101
#define TOKENS_VERSION 1
#define TOKENS_HEADER 1024

typedef struct {
    Blob blob;
    int vocab_size;
    unsigned char vocab[256];
    const unsigned char* tokens;
    size_t n_tokens;
} TokenFile;

void tokens_free(TokenFile* f) { blob_free(&f->blob); }

static int tokens_parse(TokenFile* f, const char* path) {
    const unsigned char* h = (const unsigned char*)blob_take(&f->blob, TOKENS_HEADER, "header");
    if (!h) return -1;
    int32_t magic, version, vocab_size;
    int64_t n;
    memcpy(&magic, h, 4); memcpy(&version, h + 4, 4); memcpy(&vocab_size, h + 8, 4); memcpy(&n, h + 16, 8);
    if (magic != TOKENS_MAGIC)
        return fail("%s: not a pyrnn token file (bad magic; make one with `python -m pyrnn prepare`)", path);
    if (version != TOKENS_VERSION)
        return fail("%s: token file version %d, this build reads version %d", path, version, TOKENS_VERSION);
    if (vocab_size < 1 || vocab_size > 256) return fail("%s: vocabulary size %d is outside 1..256", path, vocab_size);
    if (n < 0 || (uint64_t)n != f->blob.size - TOKENS_HEADER)
        return fail("%s: header says %lld tokens but the file holds %zu (truncated or corrupted)", path, (long long)n,
                    f->blob.size - TOKENS_HEADER);
    f->vocab_size = vocab_size;
    memcpy(f->vocab, h + 24, 256);
    f->tokens = (const unsigned char*)blob_take(&f->blob, (size_t)n, "tokens");
    f->n_tokens = (size_t)n;
    for (size_t i = 0; i < f->n_tokens; i++)
        if (f->tokens[i] >= vocab_size)
            return fail("%s: token %d at position %zu is outside the vocabulary [0, %d)", path, f->tokens[i], i,
                        vocab_size);
    return 0;
}

int tokens_load(TokenFile* f, const char* path) {
    memset(f, 0, sizeof(*f));
    if (blob_load(&f->blob, path)) return -1;
    if (tokens_parse(f, path)) { tokens_free(f); return -1; }
    return 0;
}

// ----------------------------------------------------------------------------
// data loader, char-rnn layout: the text is cut into B contiguous streams, and batch k takes tokens
// [k*T, (k+1)*T] of every stream, so row b of batch k+1 continues row b of batch k and the final
// hidden state of one batch is the right initial state of the next

typedef struct {
    const unsigned char* tokens;
    size_t stream_len;   // tokens per stream, a multiple of T
    int B, T;
    long n_batches, pos;
} DataLoader;

int loader_init(DataLoader* d, const TokenFile* f, int B, int T, const char* what) {
    memset(d, 0, sizeof(*d));
    if (B <= 0 || T <= 0) return fail("batch size and sequence length must be positive, got B=%d T=%d", B, T);
    d->tokens = f->tokens; d->B = B; d->T = T;
    d->n_batches = f->n_tokens > 0 ? (long)((f->n_tokens - 1) / ((size_t)B * T)) : 0;
    if (d->n_batches < 1)
        return fail("%s split has %zu tokens, too few for one batch of B=%d x T=%d (needs %zu)", what, f->n_tokens,
                    B, T, (size_t)B * T + 1);
    d->stream_len = (size_t)d->n_batches * T;
    return 0;
}

// next batch into inputs / targets (B, T); returns 1 when this batch starts a new pass over the data
int loader_next(DataLoader* d, int* inputs, int* targets) {
    int wrapped = d->pos == 0;
    for (int b = 0; b < d->B; b++) {
        const unsigned char* src = d->tokens + (size_t)b * d->stream_len + (size_t)d->pos * d->T;
        for (int t = 0; t < d->T; t++) {
            inputs[(size_t)b * d->T + t] = src[t];
            targets[(size_t)b * d->T + t] = src[t + 1];
        }
    }
    d->pos = (d->pos + 1) % d->n_batches;
    return wrapped;
}

// ----------------------------------------------------------------------------
// checkpoints (docs/formats.md): written to NAME.tmp, fsynced, renamed, so a reader only ever sees
// a complete file; the CRC-32 at the end catches everything else

#define CKPT_MAGIC 20261102
#define CKPT_VERSION 1

static uint32_t crc32_update(uint32_t crc, const unsigned char* p, size_t n) {
    static uint32_t table[256];
    if (!table[1])
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
    crc = ~crc;
    for (size_t i = 0; i < n; i++) crc = table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

typedef struct {
    Config config;
    int B, T, step, carry, adam_t;
    TrainOptions opts;       // as trained (zeros, fp32, in files that predate them), so a loaded model knows
    int planned_steps;       // the step count a -x budget fixed (0: none), so a resumed run keeps its schedule
    unsigned char vocab[256];
    float *params, *m, *v;   // model_num_params(config) each
    int64_t data_pos;
    float *h, *c;            // (L, B, H); c only for LSTM
    uint64_t rng;
    Blob blob;               // what the pointers point into, after checkpoint_load
} Checkpoint;

// writes all of a piece or fails; the stream remembers the running CRC
typedef struct { FILE* f; uint32_t crc; int failed; } Writer;
static void writer_put(Writer* w, const void* p, size_t n) {
    if (w->failed || n == 0) return;
    if (fwrite(p, 1, n, w->f) != n) { w->failed = 1; return; }
    w->crc = crc32_update(w->crc, (const unsigned char*)p, n);
}

static int fsync_dir_of(const char* path) {
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s", path);
    char* slash = strrchr(dir, '/');
    if (slash) *slash = 0; else snprintf(dir, sizeof(dir), ".");
    int fd = open(dir, O_RDONLY);
    if (fd < 0) return 0;   // best effort: some file systems do not allow opening a directory
    fsync(fd);
    close(fd);
    return 0;
}

// the generic atomic write: fill NAME.tmp through fn, fsync, rename over NAME
static int write_atomically(const char* path, void (*fn)(Writer*, const void*), const void* arg) {
    char tmp[4096];
    if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp)) return fail("%s: path too long", path);
    Writer w = { fopen(tmp, "wb"), 0, 0 };
    if (!w.f) return fail("%s: cannot write: %s", tmp, strerror(errno));
    fn(&w, arg);
    int ok = !w.failed && fflush(w.f) == 0 && fsync(fileno(w.f)) == 0;
    int err = errno;
    ok = (fclose(w.f) == 0) && ok;
    if (!ok) { unlink(tmp); return fail("%s: write failed: %s", tmp, strerror(err ? err : EIO)); }
    if (rename(tmp, path) != 0) { err = errno; unlink(tmp); return fail("%s: rename failed: %s", path, strerror(err)); }
    return fsync_dir_of(path);
}

static void checkpoint_write_fn(Writer* w, const void* arg) {
    const Checkpoint* k = (const Checkpoint*)arg;
    int32_t header[64] = { 0 };
    header[0] = CKPT_MAGIC; header[1] = CKPT_VERSION;
    header[2] = k->config.cell; header[3] = k->config.vocab_size; header[4] = k->config.embed_size;
    header[5] = k->config.hidden_size; header[6] = k->config.n_layers;
    header[7] = k->B; header[8] = k->T; header[9] = k->step; header[10] = k->carry; header[11] = k->adam_t;
    memcpy(&header[12], &k->opts.dropout, 4);
    header[13] = k->opts.bf16;
    header[14] = k->opts.locked;
    memcpy(&header[15], &k->opts.weight_drop, 4);
    memcpy(&header[16], &k->opts.embed_dropout, 4);
    header[17] = k->planned_steps;
    size_t P = model_num_params(k->config), lbh = (size_t)k->config.n_layers * k->B * k->config.hidden_size;
    writer_put(w, header, sizeof(header));
    writer_put(w, k->vocab, 256);
    writer_put(w, k->params, P * 4);
    writer_put(w, k->m, P * 4);
    writer_put(w, k->v, P * 4);
    writer_put(w, &k->data_pos, 8);
    writer_put(w, k->h, lbh * 4);
    if (k->config.cell == CELL_LSTM) writer_put(w, k->c, lbh * 4);
    writer_put(w, &k->rng, 8);
    uint32_t crc = w->crc;
    writer_put(w, &crc, 4);
}

int checkpoint_save(const Checkpoint* k, const char* path) { return write_atomically(path, checkpoint_write_fn, k); }

static int checkpoint_parse(Checkpoint* k, const char* path) {
    Blob* b = &k->blob;
    if (b->size < 4) return fail("%s: truncated checkpoint (%zu bytes)", path, b->size);
    uint32_t stored;
    memcpy(&stored, b->data + b->size - 4, 4);
    const int32_t* h = (const int32_t*)blob_take(b, 64 * 4, "header");
    if (!h) return -1;
    if (h[0] != CKPT_MAGIC) return fail("%s: not a pyrnn checkpoint (bad magic)", path);
    if (h[1] != CKPT_VERSION)
        return fail("%s: checkpoint version %d, this build reads version %d", path, h[1], CKPT_VERSION);
    if (crc32_update(0, b->data, b->size - 4) != stored)
        return fail("%s: checksum mismatch (corrupted or truncated checkpoint)", path);
    if (config_from_header(&k->config, h + 2, path)) return -1;
    k->B = h[7]; k->T = h[8]; k->step = h[9]; k->carry = h[10]; k->adam_t = h[11];
    memcpy(&k->opts.dropout, &h[12], 4);
    k->opts.bf16 = h[13];
    k->opts.locked = h[14];
    memcpy(&k->opts.weight_drop, &h[15], 4);
    memcpy(&k->opts.embed_dropout, &h[16], 4);
    k->planned_steps = h[17];
    const TrainOptions* o = &k->opts;
    if (!(o->dropout >= 0.0f && o->dropout < 1.0f) || !(o->weight_drop >= 0.0f && o->weight_drop < 1.0f) ||
        !(o->embed_dropout >= 0.0f && o->embed_dropout < 1.0f))
        return fail("%s: bad dropout rate in header", path);
    if ((o->bf16 != 0 && o->bf16 != 1) || (o->locked != 0 && o->locked != 1) || k->planned_steps < 0)
        return fail("%s: bad options in header", path);
    if (k->B < 0 || k->T < 0 || k->step < 0 || k->adam_t < 0) return fail("%s: bad B, T or step in header", path);
    size_t P = model_num_params(k->config), lbh = 0;
    int dims[] = { k->config.n_layers, k->B, k->config.hidden_size };
    if (checked_count(&lbh, dims, 3, path)) return -1;
    const void* p;
    if (!(p = blob_take(b, 256, "vocabulary"))) return -1;
    memcpy(k->vocab, p, 256);
    if (!(k->params = (float*)blob_take(b, P * 4, "params"))) return -1;
    if (!(k->m = (float*)blob_take(b, P * 4, "AdamW m"))) return -1;
    if (!(k->v = (float*)blob_take(b, P * 4, "AdamW v"))) return -1;
    if (!(p = blob_take(b, 8, "data position"))) return -1;
    memcpy(&k->data_pos, p, 8);
    if (!(k->h = (float*)blob_take(b, lbh * 4, "hidden state"))) return -1;
    k->c = NULL;
    if (k->config.cell == CELL_LSTM && !(k->c = (float*)blob_take(b, lbh * 4, "cell state"))) return -1;
    if (!(p = blob_take(b, 8, "rng state"))) return -1;
    memcpy(&k->rng, p, 8);
    if (!blob_take(b, 4, "checksum")) return -1;
    if (blob_done(b)) return -1;
    if (k->data_pos < 0) return fail("%s: negative data position", path);
    return 0;
}

int checkpoint_load(Checkpoint* k, const char* path) {
    memset(k, 0, sizeof(*k));
    if (blob_load(&k->blob, path)) return -1;
    if (checkpoint_parse(k, path)) { blob_free(&k->blob); return -1; }
    return 0;
}

void checkpoint_free(Checkpoint* k) { blob_free(&k->blob); }

// `latest` is a one-line text file naming the newest complete checkpoint, replaced atomically
static void latest_write_fn(Writer* w, const void* arg) {
    const char* name = (const char*)arg;
    writer_put(w, name, strlen(name));
    writer_put(w, "\n", 1);
}

static int resolve_latest(char* out, size_t out_size, const char* out_dir) {
    char path[4096], name[1024];
    snprintf(path, sizeof(path), "%s/latest", out_dir);
    FILE* f = fopen(path, "r");
    if (!f) return fail("%s: no checkpoint to resume from: %s", path, strerror(errno));
    name[0] = 0;   // an empty file leaves name untouched
    int ok = fgets(name, sizeof(name), f) != NULL;
    fclose(f);
    name[strcspn(name, "\r\n")] = 0;
    if (!ok || !name[0] || strchr(name, '/')) return fail("%s: does not name a checkpoint", path);
    snprintf(out, out_size, "%s/%s", out_dir, name);
    return 0;
}

