// cells.h: the recurrent cells, one time step, fused over the gates, as forward / backward pairs.
// Written once; isa.h compiles them into every instruction set's kernels (each call here is inlined
// into a kernels.h wrapper built for that ISA, so the gate loops vectorize at its full width).
#pragma once
#include "common.h"
#include "fastmath.h"

#define CELL_INLINE static inline __attribute__((always_inline))

// recurrent cells, one time step, fused over the gates, for batch rows [b0, b1). On entry gx holds
// W_ih x_t (no bias) and gh holds W_hh h_{t-1} (no bias). Forward writes h_t (and c_t) and keeps
// what backward needs.

CELL_INLINE void rnn_cell_forward(float* h, const float* gx, const float* gh, const float* b_ih,
                                  const float* b_hh, int relu, int b0, int b1, int H) {
    for (int b = b0; b < b1; b++) {
        size_t k = (size_t)b * H;   // two loops: tanh inside a branch would keep the loop scalar on AVX2
        if (relu) {
            #pragma omp simd
            for (int j = 0; j < H; j++) {
                float pre = gx[k + j] + b_ih[j] + gh[k + j] + b_hh[j];
                h[k + j] = pre > 0.0f ? pre : 0.0f;
            }
        } else {
            #pragma omp simd
            for (int j = 0; j < H; j++) h[k + j] = tanh_approx(gx[k + j] + b_ih[j] + gh[k + j] + b_hh[j]);
        }
    }
}

// Backward cells take dL/dh_t as dh (what came back through W_hh) plus dy (what the layer above
// sent), and leave in dh the part of dL/dh_{t-1} that bypasses W_hh.
CELL_INLINE void rnn_cell_backward(float* dgates, float* dh, const float* dy, const float* h, int relu, int b0, int b1,
                                   int H) {
    for (int b = b0; b < b1; b++)
        #pragma omp simd
        for (int j = 0; j < H; j++) {
            size_t k = (size_t)b * H + j;
            float d = dh[k] + dy[k];
            dgates[k] = relu ? (h[k] > 0.0f ? d : 0.0f) : d * (1.0f - h[k] * h[k]);
            dh[k] = 0.0f;
        }
}

// gates: in, W_ih x_t; out, activated i, f, g, o
CELL_INLINE void lstm_cell_forward(float* h, float* c, float* gates, const float* gh, const float* c_prev,
                                   const float* b_ih, const float* b_hh, int b0, int b1, int H) {
    for (int b = b0; b < b1; b++) {
        float* g = gates + (size_t)b * 4 * H;
        const float* r = gh + (size_t)b * 4 * H;
        #pragma omp simd
        for (int j = 0; j < H; j++) {
            float i_ = sigmoidf(g[j] + b_ih[j] + r[j] + b_hh[j]);
            float f_ = sigmoidf(g[H + j] + b_ih[H + j] + r[H + j] + b_hh[H + j]);
            float g_ = tanh_approx(g[2 * H + j] + b_ih[2 * H + j] + r[2 * H + j] + b_hh[2 * H + j]);
            float o_ = sigmoidf(g[3 * H + j] + b_ih[3 * H + j] + r[3 * H + j] + b_hh[3 * H + j]);
            size_t k = (size_t)b * H + j;
            float ct = f_ * c_prev[k] + i_ * g_;
            c[k] = ct;
            h[k] = o_ * tanh_approx(ct);
            g[j] = i_; g[H + j] = f_; g[2 * H + j] = g_; g[3 * H + j] = o_;
        }
    }
}

CELL_INLINE void lstm_cell_backward(float* dgates, float* dh, float* dc, const float* dy, const float* gates,
                                    const float* c, const float* c_prev, int b0, int b1, int H) {
    // dc: in, dL/dc_t from step t+1; out, dL/dc_{t-1}
    for (int b = b0; b < b1; b++) {
        const float* g = gates + (size_t)b * 4 * H;
        float* dg = dgates + (size_t)b * 4 * H;
        #pragma omp simd
        for (int j = 0; j < H; j++) {
            size_t k = (size_t)b * H + j;
            float i_ = g[j], f_ = g[H + j], g_ = g[2 * H + j], o_ = g[3 * H + j];
            float tc = tanh_approx(c[k]);
            float d = dh[k] + dy[k];
            float dct = dc[k] + d * o_ * (1.0f - tc * tc);
            dg[j] = dct * g_ * i_ * (1.0f - i_);
            dg[H + j] = dct * c_prev[k] * f_ * (1.0f - f_);
            dg[2 * H + j] = dct * i_ * (1.0f - g_ * g_);
            dg[3 * H + j] = d * tc * o_ * (1.0f - o_);
            dc[k] = dct * f_;
            dh[k] = 0.0f;
        }
    }
}

// gates: in, W_ih x_t; out, activated r, z, n. hn keeps W_hn h_{t-1} + b_hn, which r multiplies.
CELL_INLINE void gru_cell_forward(float* h, float* gates, float* hn, const float* gh, const float* h_prev,
                                  const float* b_ih, const float* b_hh, int b0, int b1, int H) {
    for (int b = b0; b < b1; b++) {
        float* g = gates + (size_t)b * 3 * H;
        const float* r = gh + (size_t)b * 3 * H;
        #pragma omp simd
        for (int j = 0; j < H; j++) {
            size_t k = (size_t)b * H + j;
            float r_ = sigmoidf(g[j] + b_ih[j] + r[j] + b_hh[j]);
            float z_ = sigmoidf(g[H + j] + b_ih[H + j] + r[H + j] + b_hh[H + j]);
            float hn_ = r[2 * H + j] + b_hh[2 * H + j];
            float n_ = tanh_approx(g[2 * H + j] + b_ih[2 * H + j] + r_ * hn_);
            h[k] = (1.0f - z_) * n_ + z_ * h_prev[k];
            g[j] = r_; g[H + j] = z_; g[2 * H + j] = n_;
            hn[k] = hn_;
        }
    }
}

CELL_INLINE void gru_cell_backward(float* dgates, float* dgates_h, float* dh, const float* dy, const float* gates,
                                   const float* hn, const float* h_prev, int b0, int b1, int H) {
    // dgates_h differs from dgates only in the n block: r scales W_hn h + b_hn
    for (int b = b0; b < b1; b++) {
        const float* g = gates + (size_t)b * 3 * H;
        float* dg = dgates + (size_t)b * 3 * H;
        float* dgh = dgates_h + (size_t)b * 3 * H;
        #pragma omp simd
        for (int j = 0; j < H; j++) {
            size_t k = (size_t)b * H + j;
            float r_ = g[j], z_ = g[H + j], n_ = g[2 * H + j];
            float d = dh[k] + dy[k];
            float dn = d * (1.0f - z_) * (1.0f - n_ * n_);
            float dr = dn * hn[k] * r_ * (1.0f - r_);
            float dz = d * (h_prev[k] - n_) * z_ * (1.0f - z_);
            dg[j] = dr; dg[H + j] = dz; dg[2 * H + j] = dn;
            dgh[j] = dr; dgh[H + j] = dz; dgh[2 * H + j] = dn * r_;
            dh[k] = d * z_;
        }
    }
}

