"""cffi (API mode) build of pyrnn._crnn: c/train_rnn.c compiled as a library.

setup.py runs this through `cffi_modules`; `python pyrnn/_build.py` builds in place too, and
`python pyrnn/_build.py DIR` builds a separate copy of the package in DIR (see build_package).
PYRNN_ARCH picks the CPU to build for, as the Makefile's ARCH does: by default (any) every CPU,
with the kernels of every instruction set picked at run time (so a wheel runs anywhere);
PYRNN_ARCH=native, x86-64-v3 (AVX2 + FMA), x86-64-v4 (AVX-512) or any other -march value builds
that CPU's kernels alone.
The struct declarations below are partial (`...;`): cffi asks the C compiler for the real
layout, so fields the C side adds later never break the binding, and only the fields Python
reads are named here.
"""
import glob
import importlib.util
import os

from cffi import FFI

PKG_DIR = os.path.dirname(os.path.realpath(__file__))   # the real package, also when run through a link
ROOT = os.path.dirname(PKG_DIR)
C_DIR = os.path.join(ROOT, 'c')

CDEF = """
typedef struct { int cell, vocab_size, embed_size, hidden_size, n_layers; ...; } Config;

typedef struct {
    float **mask;        /* per layer l < L-1: (T, B, H) dropout mask on its output, 0 or 1/(1-p) */
    ...;
} Stack;

typedef struct {
    size_t num_params;
    float* params;
    float* grads;
    ...;
} Layer;

typedef struct {
    size_t num_params;
    float* params;       /* embedding.weight, rnn.*, head.weight, head.bias */
    float* grads;
    float* m;            /* AdamW moments, NULL until the first step or model_adam_alloc */
    float* v;
    int adam_t;
    Stack rnn;
    uint64_t rng;        /* the dropout generator's state */
    int B, T;            /* shape of the last forward */
    float *head_mask, *logits, *h_n, *c_n, *dh0, *dc0;
    float loss;
    ...;
} Model;

const char* pyrnn_isa(void);   /* the kernel set new models take ("avx2"), NULL if none (PYRNN_ISA) */
int pyrnn_set_isa(const char* name);   /* NULL: the widest this CPU runs */
const char* pyrnn_isa_list(int cpu_only);
void model_set_bf16(Model* m, int bf16);
void model_set_regularisers(Model* m, int locked, float weight_drop, float embed_dropout);
void layer_set_bf16(Layer* m, int bf16);
const char* pyrnn_build_flags(void);   /* the compiler flags below, as this build was made */
const char* pyrnn_last_error(void);
void pyrnn_set_num_threads(int n);
int pyrnn_get_num_threads(void);

Layer* layer_new(int cell, int input_size, int hidden_size, int n_layers, int has_bias);
int layer_forward_api(Layer* m, float* out, float* h_n, float* c_n, const float* x, const float* h0,
                      const float* c0, const int* lengths, int B, int T);
int layer_forward_tokens(Layer* m, float* out, float* h_n, float* c_n, const int* tokens, const float* table, int V,
                         const float* h0, const float* c0, const int* lengths, int B, int T);
int layer_backward_api(Layer* m, float* dx, float* dh0, float* dc0, const float* dout,
                       const float* dh_n, const float* dc_n);
void layer_zero_grad(Layer* m);
void layer_bind(Layer* m, float* const* params, float* const* grads);   /* tensors the caller owns */
void layer_free(Layer* m);
uint64_t pyrnn_dropout_state(uint64_t seed);
uint64_t pyrnn_dropout_key(uint64_t* rng);
void pyrnn_dropout_forward(float* y, float* mask, const float* x, float p, uint64_t key, int site, int T, int B,
                           int width);

Model* model_new(Config c);
void model_set_training(Model* m, int training, float dropout);
int model_forward(Model* m, const int* inputs, const int* targets, const float* h0, const float* c0,
                  int B, int T);
int model_backward(Model* m);
void model_zero_grad(Model* m);
int model_step(Model* m, float lr, float beta1, float beta2, float eps, float weight_decay,
               float max_grad_norm, float* grad_norm);
int model_adam_alloc(Model* m);
double pyrnn_sum_squares(const float* x, size_t n);
void adamw_update(float* params, float* m, float* v, const float* grads, size_t n, float grad_scale, int t,
                  float lr, float beta1, float beta2, float eps, float weight_decay);
void model_free(Model* m);
int model_sample(Model* m, int* out, const int* prime, int n_prime, int n, float temperature, int top_k,
                 uint64_t seed);
"""


def _load_cflags():
    # by path: cffi runs this file outside the package, and pyrnn/__init__ needs the built extension
    spec = importlib.util.spec_from_file_location('pyrnn_cflags', os.path.join(PKG_DIR, '_cflags.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cflags = _load_cflags()   # the flag probe the Makefile uses too


def _flags():
    cc = cflags.compiler()
    arch = os.environ.get('PYRNN_ARCH') or 'any'
    try:
        build = cflags.build_flags(cc, arch)
    except ValueError as e:
        raise RuntimeError(f'PYRNN_ARCH={arch}: {e}') from None
    omp = [f for f in build if f == '-fopenmp']
    quiet = ['-Wno-unused-function'] + ([] if omp else ['-Wno-unknown-pragmas'])
    # Python's own CFLAGS carry -fwrapv, which blocks loop optimisations and cost 25% of a step
    return build + quiet + cflags.accepted(cc, ['-fno-wrapv']), omp


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
_compile_args, _link_args = _flags()
ffibuilder.set_source(
    'pyrnn._crnn',
    '#define PYRNN_LIBRARY\n#include "train_rnn.c"\n'
    f'const char* pyrnn_build_flags(void) {{ return "{" ".join(_compile_args)}"; }}\n',
    include_dirs=[C_DIR],
    # rebuild when the C core or a header it includes changes
    depends=[os.path.join(C_DIR, 'train_rnn.c')] + sorted(glob.glob(os.path.join(C_DIR, '*.h'))),
    extra_compile_args=_compile_args,
    extra_link_args=_link_args,
    libraries=['m'],
)


def build_package(folder):
    """The extension built into folder/pyrnn/, beside links to this package's .py files: Python run
    in `folder` (or with it first on sys.path) imports that build, and the installed one stays as it
    is. Returns the extension's path."""
    pkg = os.path.join(folder, 'pyrnn')
    os.makedirs(pkg, exist_ok=True)
    for f in glob.glob(os.path.join(pkg, '_crnn*')):   # flags are not tracked: always a fresh build
        os.remove(f)
    so = ffibuilder.compile(tmpdir=folder)
    for src in glob.glob(os.path.join(PKG_DIR, '*.py')):
        dst = os.path.join(pkg, os.path.basename(src))
        if os.path.lexists(dst):
            os.remove(dst)
        os.symlink(src, dst)
    return so


if __name__ == '__main__':
    import sys
    if len(sys.argv) > 1:
        print(build_package(sys.argv[1]))
    else:
        ffibuilder.compile(tmpdir=ROOT, verbose=True)
