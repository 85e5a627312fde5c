// kernel_table.h: what every instruction set's kernels (kernels.h) fill and share: the Kernels table a
// model calls through, the packed k-block, and rounding to bf16.
#pragma once
#include "common.h"
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>   // VDPBF16PS; gcc's intrinsics carry their own target, so any set may use them
#endif

#define KC 256   // rows of op(B) in one packed k-block, the same for every ISA
// below this much work per parallel region, waking threads costs more than it saves
#define PAR_MIN_WORK (1L << 15)

// the kernels of one ISA in one precision; a model holds a pointer to its set
typedef struct {
    const char* isa;          // "avx2"
    const char* precision;    // "fp32" or "bf16"
    int mr, nr;               // the register tile: rows of A, columns of a packed panel of B
    int bf16_native;          // bf16 products in hardware (else emulated, to the same results)
    // bp <- op(B) (K x N, row and column strides rs, cs) in this set's packed panels; by a team or not
    void (*pack_b)(float* bp, const float* b, int K, int N, long rs, long cs);
    // C (M x N, row stride ldc) (+)= op(A) * packed op(B): by every thread of a team; on one thread
    void (*gemm_team)(float* c, long ldc, const float* a, long a_rs, long a_cs, const float* bp, int M, int N,
                      int K, int accumulate);
    void (*gemm_rows)(float* c, long ldc, const float* a, long a_rs, const float* bp, int M, int N, int K,
                      int accumulate);
    // the cells (cells.h) for batch rows [b0, b1)
    void (*rnn_forward)(float* h, const float* gx, const float* gh, const float* b_ih, const float* b_hh,
                        int relu, int b0, int b1, int H);
    void (*rnn_backward)(float* dgates, float* dh, const float* dy, const float* h, int relu, int b0, int b1, int H);
    void (*lstm_forward)(float* h, float* c, float* gates, const float* gh, const float* c_prev,
                         const float* b_ih, const float* b_hh, int b0, int b1, int H);
    void (*lstm_backward)(float* dgates, float* dh, float* dc, const float* dy, const float* gates, const float* c,
                          const float* c_prev, int b0, int b1, int H);
    void (*gru_forward)(float* h, float* gates, float* hn, const float* gh, const float* h_prev,
                        const float* b_ih, const float* b_hh, int b0, int b1, int H);
    void (*gru_backward)(float* dgates, float* dgates_h, float* dh, const float* dy, const float* gates,
                         const float* hn, const float* h_prev, int b0, int b1, int H);
    // the other loops of a step, by the whole team: the head's softmax and its gradient, column sums,
    // rows summed by slot (the token lookup's gradients), AdamW (each kernels.h)
    void (*logits_lse)(float* lse, float* logits, const float* bias, long rows, int V);
    void (*logits_grad)(float* logits, const float* lse, const int* targets, float scale, long rows, int V);
    void (*colsum)(float* out, const float* x, long rows, int cols);
    void (*sum_by_slot)(float* out, const float* x, const int* slot, long rows, int n_slots, int cols);
    void (*adamw)(float* params, float* m, float* v, const float* grads, size_t n, float grad_scale, float decay,
                  float step_size, float bc2_sqrt, float beta1, float beta2, float eps);
} Kernels;

// x rounded to bf16, to nearest even (NaN stays NaN): the high 16 bits of its fp32 pattern
static inline uint32_t bf16_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof(u));
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (u >> 16) | 0x40u;
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

