"""A stand-in for lib/libpyrnn_cuda.so that runs without a GPU: the C model of c/train_rnn.c behind
the library's call table (pyrnn._cuda.CALLS), built with the C extension's own flags so that its
arithmetic is the extension's. CharLM(backend='cuda') on it must be backend 'c' to the bit, which
checks everything the cuda engine moves between the host and the device. Shared by the test
modules that drive the cuda backend without a GPU."""
import os
import shlex
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STAND_IN = r'''
// the C model behind the call table of lib/libpyrnn_cuda.so; its dropout masks are the C model's
#define PYRNN_LIBRARY
#include "train_rnn.c"

typedef struct { Model* m; int B, T, cur; float *h[2], *c[2]; } Fake;
static size_t lbh(const Fake* f) { return (size_t)f->m->config.n_layers * f->B * f->m->config.hidden_size; }
static int lstm(const Fake* f) { return f->m->config.cell == CELL_LSTM; }
static size_t P(void* self) { return ((Fake*)self)->m->num_params * sizeof(float); }

void* gpu_lm_new(int cell, int V, int E, int H, int L, int B, int T, int tf32, const char* algo, float dropout) {
    (void)tf32; (void)algo;
    Config c = { cell, V, E, H, L };
    Fake* f = (Fake*)calloc(1, sizeof(Fake));
    if (!f || !(f->m = model_new(c)) || model_adam_alloc(f->m)) return NULL;
    f->B = B; f->T = T;
    for (int i = 0; i < 2; i++) { f->h[i] = (float*)alloc_floats(lbh(f)); f->c[i] = (float*)alloc_floats(lbh(f)); }
    model_set_training(f->m, 1, dropout);
    return f;
}
void gpu_lm_free(void* self) {
    Fake* f = (Fake*)self;
    model_free(f->m);
    for (int i = 0; i < 2; i++) { free(f->h[i]); free(f->c[i]); }
    free(f);
}
const char* gpu_last_error(void) { return pyrnn_last_error(); }
const char* gpu_lm_about(void* self) { (void)self; return "a CPU stand-in"; }
const char* gpu_lm_algo(void* self) { (void)self; return "standard"; }
int gpu_lm_set_params(void* self, const float* p) { memcpy(((Fake*)self)->m->params, p, P(self)); return 0; }
int gpu_lm_get_params(void* self, float* p) { memcpy(p, ((Fake*)self)->m->params, P(self)); return 0; }
int gpu_lm_get_grads(void* self, float* g) { memcpy(g, ((Fake*)self)->m->grads, P(self)); return 0; }
int gpu_lm_set_grads(void* self, const float* g) { memcpy(((Fake*)self)->m->grads, g, P(self)); return 0; }
int gpu_lm_set_adam(void* self, const float* m, const float* v, int t) {
    Model* md = ((Fake*)self)->m;
    if (m) memcpy(md->m, m, P(self)); else memset(md->m, 0, P(self));
    if (v) memcpy(md->v, v, P(self)); else memset(md->v, 0, P(self));
    md->adam_t = t;
    return 0;
}
int gpu_lm_get_adam(void* self, float* m, float* v, int* t) {
    Model* md = ((Fake*)self)->m;
    memcpy(m, md->m, P(self)); memcpy(v, md->v, P(self)); *t = md->adam_t;
    return 0;
}
int gpu_lm_set_rng(void* self, uint64_t rng) { ((Fake*)self)->m->rng = rng; return 0; }
int gpu_lm_get_rng(void* self, uint64_t* rng) { *rng = ((Fake*)self)->m->rng; return 0; }
int gpu_lm_set_dropout(void* self, float p) { model_set_training(((Fake*)self)->m, 1, p); return 0; }
static int forward(Fake* f, float* loss, const int* x, const int* y, const float* h0, const float* c0, int to) {
    if (model_forward(f->m, x, y, h0, c0, f->B, f->T)) return -1;
    memcpy(f->h[to], f->m->h_n, lbh(f) * 4); memcpy(f->c[to], f->m->c_n, lbh(f) * 4);
    if (loss) *loss = f->m->loss;
    return 0;
}
int gpu_lm_forward(void* self, float* loss, const int* x, const int* y, const float* h0, const float* c0) {
    Fake* f = (Fake*)self;
    f->cur = 1;
    return forward(f, loss, x, y, h0, c0, 1);
}
int gpu_lm_get_logits(void* self, float* out) {
    Fake* f = (Fake*)self;
    memcpy(out, f->m->logits, (size_t)f->B * f->T * f->m->config.vocab_size * 4);
    return 0;
}
int gpu_lm_get_final_state(void* self, float* h, float* c) {
    Fake* f = (Fake*)self;
    if (h) memcpy(h, f->m->h_n, lbh(f) * 4);
    if (c && lstm(f)) memcpy(c, f->m->c_n, lbh(f) * 4);
    return 0;
}
int gpu_lm_backward(void* self) { return model_backward(((Fake*)self)->m); }
int gpu_lm_get_dstate(void* self, float* dh, float* dc) {
    Fake* f = (Fake*)self;
    if (dh) memcpy(dh, f->m->dh0, lbh(f) * 4);
    if (dc && lstm(f)) memcpy(dc, f->m->dc0, lbh(f) * 4);
    return 0;
}
int gpu_lm_zero_grad(void* self) { model_zero_grad(((Fake*)self)->m); return 0; }
int gpu_lm_step(void* self, float* norm, float lr, float b1, float b2, float eps, float wd, float clip) {
    return model_step(((Fake*)self)->m, lr, b1, b2, eps, wd, clip, norm);
}
int gpu_lm_train_step(void* self, float* loss, float* norm, const int* x, const int* y, float lr, float b1,
                      float b2, float eps, float wd, float clip) {
    Fake* f = (Fake*)self;
    if (forward(f, loss, x, y, f->h[f->cur], lstm(f) ? f->c[f->cur] : NULL, 1 - f->cur)) return -1;
    model_zero_grad(f->m);
    if (model_backward(f->m) || model_step(f->m, lr, b1, b2, eps, wd, clip, norm)) return -1;
    f->cur = 1 - f->cur;
    return 0;
}
'''


def build(folder):
    """The stand-in's path, built in folder; None (with the reason) when it cannot be built here."""
    try:
        from pyrnn import _crnn
    except ImportError:
        return None, 'the C extension is not built (python3 pyrnn/_build.py)'
    cc = shlex.split(os.environ.get('CC', 'cc'))
    if not shutil.which(cc[0]):
        return None, 'no C compiler for the stand-in library'
    flags = [f for f in _crnn.ffi.string(_crnn.lib.pyrnn_build_flags()).decode().split() if f != '-fopenmp']
    src, so = os.path.join(folder, 'stand_in.c'), os.path.join(folder, 'libpyrnn_cuda_stand_in.so')
    with open(src, 'w') as f:
        f.write(STAND_IN)
    r = subprocess.run([*cc, *flags, '-Wno-unknown-pragmas', '-shared', '-fPIC', '-I', os.path.join(ROOT, 'c'), src,
                        '-o', so, '-lm'], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f'the stand-in library does not build: {r.stderr[-3000:]}')
    return so, None
