// kernels.h: the hot loops of a step, written once and compiled once per instruction set. isa.h
// includes this file for each ISA, under that ISA's target pragma and with KERNEL_ISA (its name),
// VEC_FLOATS (floats in a vector register), MR (rows of the register tile) and BF16_NATIVE defined
// (and undefined again at the end). Every function here takes the ISA's suffix (KFN), and each
// inclusion ends in two Kernels tables:
// fp32, and bf16 (products of bf16-rounded operands, accumulated in fp32). Inside:
//   - the GEMM: op(B) packed into NR-wide column panels, then an MR x NR register tile, in fp32 and
//     in bf16 (operands rounded to bf16 while packing; VDPBF16PS where the ISA has it);
//   - the cells' row loops (cells.h), inlined here so their gate loops vectorize at the ISA's width;
//   - the step's other loops over many elements: the head's softmax, column sums, AdamW.
// No include guard: it is meant to be included once per ISA (what it includes has guards).
//
// The register tile is MR rows x NR columns, NR = NV vectors, sized so the MR * NV accumulators, NV
// vectors of B and one broadcast of A fit the register file (more would spill to the stack in the
// inner loop; make check_spills reads the assembly of every ISA):
//   AVX-512 (32 zmm):       8 x 32  = 16 accumulators + 2 + 1
//   AVX2 + FMA (16 ymm):    6 x 16  = 12 accumulators + 2 + 1
//   NEON (32 q):            8 x 8   = 16 accumulators + 2 + 1
//   SSE2 and the rest (16): 6 x 8   = 12 accumulators + 2 + 1, 16-byte vectors

#include "cells.h"          // the cells, inlined into this set's wrappers
#include "kernel_table.h"   // Kernels, KC, bf16_bits

#define KFN(name) KFN_PASTE(name, KERNEL_ISA)
#define KFN_PASTE(name, isa) KFN_PASTE2(name, isa)
#define KFN_PASTE2(name, isa) name##_##isa
#define NV 2
#define NR (NV * VEC_FLOATS)
#define vecf KFN(vecf)
#define vecu KFN(vecu)
typedef float vecf __attribute__((vector_size(VEC_FLOATS * sizeof(float))));
typedef uint32_t vecu __attribute__((vector_size(VEC_FLOATS * sizeof(uint32_t))));

// One instance of a tile per row count, so a short edge tile (16 rows per thread make 6 + 6 + 4 on
// AVX2) does no wasted multiplies: CALL(rows) for rows = mr, with mr < MR listed and MR the default.
#if MR == 8
#define TILE_SWITCH(mr, CALL) switch (mr) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
    case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; default: CALL(MR); break; }
#elif MR == 6
#define TILE_SWITCH(mr, CALL) switch (mr) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
    case 5: CALL(5); break; default: CALL(MR); break; }
#else
#error "kernels.h: give the tile's edge instances for this MR"
#endif

// ----------------------------------------------------------------------------
// fp32

// bp <- op(B) as [k-block][column panel][k][NR], zero-padded past N; call from inside a team or not.
// The k-blocks are independent, so the team meets once, at the end, not after each.
static void KFN(pack_b)(float* bp, const float* b, int K, int N, long rs, long cs) {
    int n_panels = (N + NR - 1) / NR;
    for (int k0 = 0; k0 < K; k0 += KC) {
        int kc = K - k0 < KC ? K - k0 : KC;
        float* block = bp + (size_t)k0 * n_panels * NR;
        #pragma omp for schedule(static) nowait
        for (int jp = 0; jp < n_panels; jp++) {
            float* panel = block + (size_t)jp * kc * NR;
            int nr = N - jp * NR < NR ? N - jp * NR : NR;
            for (int k = 0; k < kc; k++) {
                const float* src = b + (long)(k0 + k) * rs + (long)jp * NR * cs;
                float* dst = panel + (size_t)k * NR;
                if (cs == 1) { memcpy(dst, src, nr * sizeof(float)); }
                else { for (int j = 0; j < nr; j++) dst[j] = src[(long)j * cs]; }
                for (int j = nr; j < NR; j++) dst[j] = 0.0f;
            }
        }
    }
    #pragma omp barrier
}

// C (rows x nr) (+)= acc from the tile's accumulators
static inline __attribute__((always_inline)) void KFN(tile_store)(float* c, long ldc, vecf acc[MR][NV], int rows,
                                                                   int nr, int accumulate) {
    for (int i = 0; i < rows; i++) {
        float* ci = c + (long)i * ldc;
        if (nr == NR) {   // whole rows as unaligned vectors (a fixed-size memcpy is one load / store)
            for (int v = 0; v < NV; v++) {
                vecf out = acc[i][v];
                if (accumulate) { vecf old; memcpy(&old, ci + v * VEC_FLOATS, sizeof(old)); out += old; }
                memcpy(ci + v * VEC_FLOATS, &out, sizeof(out));
            }
        } else {
            float r[NR];
            memcpy(r, acc[i], sizeof(r));
            if (accumulate) { for (int j = 0; j < nr; j++) ci[j] += r[j]; }
            else { for (int j = 0; j < nr; j++) ci[j] = r[j]; }
        }
    }
}

// the register tile, `rows` (<= MR) x NR: acc = sum_k a(i, k) * bp[k][j], then C (+)= acc. Inlined
// with constant rows and strides, so the accumulators stay in registers.
static inline __attribute__((always_inline)) void KFN(tile)(float* c, long ldc, const float* a, long a_rs,
                                                             long a_cs, const float* bp, int kc, int rows, int nr,
                                                             int accumulate) {
    vecf acc[MR][NV];
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = (vecf){ 0 };   // in registers, not a memset call
    for (int k = 0; k < kc; k++) {
        vecf b[NV];
        for (int v = 0; v < NV; v++) b[v] = *(const vecf*)(bp + (size_t)k * NR + v * VEC_FLOATS);
        for (int i = 0; i < rows; i++) {
            float ai = a[i * a_rs + (long)k * a_cs];
            for (int v = 0; v < NV; v++) acc[i][v] += ai * b[v];
        }
    }
    KFN(tile_store)(c, ldc, acc, rows, nr, accumulate);
}

// Kept out of line, so the inner loops have names to find in the assembly (scripts/check_spills.py).
// A is row-major (a_cs == 1) or transposed (a_rs == 1).
#define TILE_ROWMAJOR(rows) KFN(tile)(c, ldc, a, a_rs, 1, bp, kc, rows, nr, acc)
#define TILE_TRANSPOSED(rows) KFN(tile)(c, ldc, a, 1, a_cs, bp, kc, rows, nr, acc)
#define TILE_COPIED(rows) KFN(tile)(c, ldc, a, 1, MR, bp, kc, rows, nr, acc)
__attribute__((noinline)) static void KFN(tile_rowmajor)(float* c, long ldc, const float* a, long a_rs,
                                                          const float* bp, int kc, int mr, int nr, int acc) {
    TILE_SWITCH(mr, TILE_ROWMAJOR)
}
__attribute__((noinline)) static void KFN(tile_transposed)(float* c, long ldc, const float* a, long a_cs,
                                                            const float* bp, int kc, int mr, int nr, int acc) {
    TILE_SWITCH(mr, TILE_TRANSPOSED)
}
// a tile copied to [k][MR] first (the weight gradients' A, bf16's rounded A): its stride a constant
__attribute__((noinline)) static void KFN(tile_copied)(float* c, long ldc, const float* a, const float* bp, int kc,
                                                        int mr, int nr, int acc) {
    TILE_SWITCH(mr, TILE_COPIED)
}
#undef TILE_ROWMAJOR
#undef TILE_TRANSPOSED
#undef TILE_COPIED

// C (M x N, row stride ldc) (+)= op(A) * packed op(B); called by every thread of a team, and C is
// complete once the team has met (the end of the caller's parallel region). A is row-major
// (a_cs == 1) or transposed (a_rs == 1). Every k-block deals its tiles to the threads by the same
// static schedule, so a thread only ever adds to its own tiles: no barrier between k-blocks.
static void KFN(gemm_team)(float* c, long ldc, const float* a, long a_rs, long a_cs, const float* bp, int M, int N,
                           int K, int accumulate) {
    int n_panels = (N + NR - 1) / NR, m_panels = (M + MR - 1) / MR;
    for (int k0 = 0; k0 < K; k0 += KC) {
        int kc = K - k0 < KC ? K - k0 : KC;
        int acc = accumulate || k0 > 0;
        const float* bblock = bp + (size_t)k0 * n_panels * NR;
        if (a_rs == 1 && a_cs != 1 && n_panels > 8) {
            // Transposed A (the weight gradients dY^T X): a tile's MR values of one k are contiguous, but
            // consecutive k are a row of dY apart, often a page. Copy the tile's kc x MR block once, then
            // meet every panel of B with it; read in place, each panel paid a TLB miss per k. The copy
            // pays for itself once a tile meets more than 8 panels (measured: AVX2 dW of 1024 x 256
            // went from 80 to 97 GFLOP/s, while 4 panels ran 10% slower copied).
            #pragma omp for schedule(static) nowait
            for (int ip = 0; ip < m_panels; ip++) {
                float at[KC * MR] __attribute__((aligned(64)));
                int mr = M - ip * MR < MR ? M - ip * MR : MR;
                const float* src = a + (long)ip * MR + (long)k0 * a_cs;
                for (int k = 0; k < kc; k++)   // a fixed-size copy compiles to one vector move, not a call
                    if (mr == MR) memcpy(at + k * MR, src + (long)k * a_cs, MR * sizeof(float));
                    else for (int i = 0; i < mr; i++) at[k * MR + i] = src[(long)k * a_cs + i];
                for (int jp = 0; jp < n_panels; jp++) {
                    int nr = N - jp * NR < NR ? N - jp * NR : NR;
                    KFN(tile_copied)(c + (long)ip * MR * ldc + jp * NR, ldc, at, bblock + (size_t)jp * kc * NR, kc, mr,
                                     nr, acc);
                }
            }
            continue;
        }
        // panels of B outermost: each thread keeps its B panels in cache while A streams by
        #pragma omp for collapse(2) schedule(static) nowait
        for (int jp = 0; jp < n_panels; jp++) {
            for (int ip = 0; ip < m_panels; ip++) {
                int mr = M - ip * MR < MR ? M - ip * MR : MR;
                int nr = N - jp * NR < NR ? N - jp * NR : NR;
                float* ct = c + (long)ip * MR * ldc + jp * NR;
                const float* at = a + (long)ip * MR * a_rs + (long)k0 * a_cs;
                const float* bt = bblock + (size_t)jp * kc * NR;
                if (a_cs == 1) KFN(tile_rowmajor)(ct, ldc, at, a_rs, bt, kc, mr, nr, acc);
                else KFN(tile_transposed)(ct, ldc, at, a_cs, bt, kc, mr, nr, acc);
            }
        }
    }
}

// C (M x N) (+)= A (M x K, row-major) * packed op(B), on the calling thread alone
static void KFN(gemm_rows)(float* c, long ldc, const float* a, long a_rs, const float* bp, int M, int N, int K,
                           int accumulate) {
    int n_panels = (N + NR - 1) / NR;
    for (int k0 = 0; k0 < K; k0 += KC) {
        int kc = K - k0 < KC ? K - k0 : KC;
        const float* bblock = bp + (size_t)k0 * n_panels * NR;
        for (int jp = 0; jp < n_panels; jp++)
            for (int i0 = 0; i0 < M; i0 += MR)
                KFN(tile_rowmajor)(c + (long)i0 * ldc + jp * NR, ldc, a + (long)i0 * a_rs + k0, a_rs,
                                   bblock + (size_t)jp * kc * NR, kc, M - i0 < MR ? M - i0 : MR,
                                   N - jp * NR < NR ? N - jp * NR : NR, accumulate || k0 > 0);
    }
}

// ----------------------------------------------------------------------------
// bf16: both operands rounded to bf16 (round to nearest even) as they are packed, products summed in
// fp32. Two values of k make a pair, and a pair adds its odd product first, then its even one, as
// VDPBF16PS does. A product of two bf16 values is exact in fp32, so the emulated kernel, the fp32 tile
// over the rounded values in that order, sums exactly what the native instruction sums (up to
// denormals, which VDPBF16PS flushes to zero): the same results on every CPU.
//   native:   op(B) as [k-block][panel][k pair][NR] 32-bit lanes of two bf16 (even k low, odd k high),
//             A's row panel as [k pair][MR] lanes, and VDPBF16PS;
//   emulated: op(B) as [k-block][panel][k pair][odd k, even k][NR] floats, A's row panel likewise
//             ([k pair][odd, even][MR]), and the fp32 tile of a copied A.
// Each k-block holds an even number of rows of k (KC is even), so only the last pads one row of zeros.

// the bf16 value of x, as a float
static inline float KFN(bf16_float)(float x) {
    uint32_t u = bf16_bits(x) << 16;
    memcpy(&x, &u, sizeof(x));
    return x;
}

static void KFN(pack_b_bf16)(float* bp, const float* b, int K, int N, long rs, long cs) {
    int n_panels = (N + NR - 1) / NR;
    for (int k0 = 0; k0 < K; k0 += KC) {
        int kc = K - k0 < KC ? K - k0 : KC, kp = (kc + 1) / 2;
        #pragma omp for schedule(static) nowait
        for (int jp = 0; jp < n_panels; jp++) {
            int nr = N - jp * NR < NR ? N - jp * NR : NR;
            for (int p = 0; p < kp; p++) {
                const float* even = b + (long)(k0 + 2 * p) * rs + (long)jp * NR * cs;
                const float* odd = 2 * p + 1 < kc ? even + rs : NULL;
#if BF16_NATIVE
                uint32_t* dst = (uint32_t*)bp + (size_t)(k0 / 2) * n_panels * NR + ((size_t)jp * kp + p) * NR;
                for (int j = 0; j < nr; j++)
                    dst[j] = bf16_bits(even[(long)j * cs]) | (odd ? bf16_bits(odd[(long)j * cs]) << 16 : 0u);
                for (int j = nr; j < NR; j++) dst[j] = 0u;
#else
                float* dst = bp + (size_t)k0 * n_panels * NR + ((size_t)jp * kp + p) * 2 * NR;
                for (int j = 0; j < nr; j++) {
                    dst[j] = odd ? KFN(bf16_float)(odd[(long)j * cs]) : 0.0f;
                    dst[NR + j] = KFN(bf16_float)(even[(long)j * cs]);
                }
                for (int j = nr; j < NR; j++) dst[j] = dst[NR + j] = 0.0f;
#endif
            }
        }
    }
    #pragma omp barrier
}

#if BF16_NATIVE
// acc += the lane pairs of a (broadcast) times those of b: VDPBF16PS. BF16_NATIVE 2 is a test build's
// stand-in (-DPYRNN_TEST_PAIRS, set avx2pairs): the native layout with the instruction's arithmetic
// written out, so a CPU without it checks everything of the native path but the instruction itself.
static inline __attribute__((always_inline)) vecf KFN(dot_pairs)(vecf acc, uint32_t a, vecu b) {
#if BF16_NATIVE == 1
    vecu ab = (vecu){ 0 } + a;
    return (vecf)_mm512_dpbf16_ps((__m512)acc, (__m512bh)ab, (__m512bh)b);
#else
    float a_odd, a_even;
    uint32_t odd_bits = a & 0xFFFF0000u, even_bits = a << 16;
    memcpy(&a_odd, &odd_bits, sizeof(a_odd));
    memcpy(&a_even, &even_bits, sizeof(a_even));
    acc += a_odd * (vecf)(b & 0xFFFF0000u);
    acc += a_even * (vecf)(b << 16);
    return acc;
#endif
}

static inline __attribute__((always_inline)) void KFN(tile_bf16)(float* c, long ldc, const uint32_t* at,
                                                                  const uint32_t* bp, int kp, int rows, int nr,
                                                                  int accumulate) {
    vecf acc[MR][NV];
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = (vecf){ 0 };
    for (int p = 0; p < kp; p++) {
        vecu b[NV];
        for (int v = 0; v < NV; v++) b[v] = *(const vecu*)(bp + (size_t)p * NR + v * VEC_FLOATS);
        for (int i = 0; i < rows; i++) {
            uint32_t ai = at[p * MR + i];
            for (int v = 0; v < NV; v++) acc[i][v] = KFN(dot_pairs)(acc[i][v], ai, b[v]);
        }
    }
    KFN(tile_store)(c, ldc, acc, rows, nr, accumulate);
}

#define TILE_BF16(rows) KFN(tile_bf16)(c, ldc, at, bp, kp, rows, nr, acc)
__attribute__((noinline)) static void KFN(tile_bf16_rows)(float* c, long ldc, const uint32_t* at,
                                                           const uint32_t* bp, int kp, int mr, int nr, int acc) {
    TILE_SWITCH(mr, TILE_BF16)
}
#undef TILE_BF16
#endif

// one row panel of A (rows <= MR) against every panel of one packed k-block: A rounded once into a
// tile on the stack, in the layout of B's panels
static inline void KFN(panel_bf16)(float* c, long ldc, const float* a, long a_rs, long a_cs, const float* bblock,
                                   int rows, int N, int kc, int acc) {
    int kp = (kc + 1) / 2, n_panels = (N + NR - 1) / NR;
#if BF16_NATIVE
    uint32_t at[KC / 2 * MR] __attribute__((aligned(64)));
#else
    float at[KC * MR] __attribute__((aligned(64)));
#endif
    for (int p = 0; p < kp; p++) {
        int has_odd = 2 * p + 1 < kc;
        for (int i = 0; i < MR; i++) {
            const float* e = a + (long)i * a_rs + (long)(2 * p) * a_cs;
            if (i >= rows) e = NULL;   // rows past the panel read nothing
#if BF16_NATIVE
            at[p * MR + i] = !e ? 0u : bf16_bits(e[0]) | (has_odd ? bf16_bits(e[a_cs]) << 16 : 0u);
#else
            at[2 * p * MR + i] = e && has_odd ? KFN(bf16_float)(e[a_cs]) : 0.0f;
            at[(2 * p + 1) * MR + i] = e ? KFN(bf16_float)(e[0]) : 0.0f;
#endif
        }
    }
    for (int jp = 0; jp < n_panels; jp++) {
        int nr = N - jp * NR < NR ? N - jp * NR : NR;
#if BF16_NATIVE
        KFN(tile_bf16_rows)(c + jp * NR, ldc, at, (const uint32_t*)bblock + (size_t)jp * kp * NR, kp, rows, nr, acc);
#else
        KFN(tile_copied)(c + jp * NR, ldc, at, bblock + (size_t)jp * 2 * kp * NR, 2 * kp, rows, nr, acc);
#endif
    }
}

// k-block k0's packed panels
static inline const float* KFN(bf16_block)(const float* bp, int k0, int n_panels) {
#if BF16_NATIVE
    return (const float*)((const uint32_t*)bp + (size_t)(k0 / 2) * n_panels * NR);
#else
    return bp + (size_t)k0 * n_panels * NR;
#endif
}

// gemm_team and gemm_rows in bf16: each row panel of A meets every panel of B
static void KFN(gemm_team_bf16)(float* c, long ldc, const float* a, long a_rs, long a_cs, const float* bp, int M,
                                int N, int K, int accumulate) {
    int n_panels = (N + NR - 1) / NR, m_panels = (M + MR - 1) / MR;
    for (int k0 = 0; k0 < K; k0 += KC) {
        int kc = K - k0 < KC ? K - k0 : KC;
        const float* bblock = KFN(bf16_block)(bp, k0, n_panels);
        #pragma omp for schedule(static) nowait
        for (int ip = 0; ip < m_panels; ip++)
            KFN(panel_bf16)(c + (long)ip * MR * ldc, ldc, a + (long)ip * MR * a_rs + (long)k0 * a_cs, a_rs, a_cs,
                            bblock, M - ip * MR < MR ? M - ip * MR : MR, N, kc, accumulate || k0 > 0);
    }
}

static void KFN(gemm_rows_bf16)(float* c, long ldc, const float* a, long a_rs, const float* bp, int M, int N, int K,
                                int accumulate) {
    int n_panels = (N + NR - 1) / NR;
    for (int k0 = 0; k0 < K; k0 += KC) {
        int kc = K - k0 < KC ? K - k0 : KC;
        const float* bblock = KFN(bf16_block)(bp, k0, n_panels);
        for (int i0 = 0; i0 < M; i0 += MR)
            KFN(panel_bf16)(c + (long)i0 * ldc, ldc, a + (long)i0 * a_rs + k0, a_rs, 1, bblock,
                            M - i0 < MR ? M - i0 : MR, N, kc, accumulate || k0 > 0);
    }
}

// ----------------------------------------------------------------------------
// the other loops of a step, each by the whole team, built for this ISA like the rest

// per row of logits (rows x V): the bias added, then the log-sum-exp
static void KFN(logits_lse)(float* lse, float* logits, const float* bias, long rows, int V) {
    #pragma omp parallel for schedule(static) if (rows * V > PAR_MIN_WORK)
    for (long r = 0; r < rows; r++) {
        float* z = logits + (size_t)r * V;
        float mx = -FLT_MAX;
        for (int v = 0; v < V; v++) { z[v] += bias[v]; mx = z[v] > mx ? z[v] : mx; }
        float sum = 0.0f;
        for (int v = 0; v < V; v++) sum += exp_approx(z[v] - mx);
        lse[r] = mx + logf(sum);
    }
}

// logits <- d(scale * sum of cross-entropies)/d(logits): (softmax - onehot(target)) * scale
static void KFN(logits_grad)(float* logits, const float* lse, const int* targets, float scale, long rows, int V) {
    #pragma omp parallel for schedule(static) if (rows * V > PAR_MIN_WORK)
    for (long r = 0; r < rows; r++) {
        float* z = logits + (size_t)r * V;
        for (int v = 0; v < V; v++) z[v] = exp_approx(z[v] - lse[r]) * scale;
        z[targets[r]] -= scale;
    }
}

// out[j] += sum over rows of x (rows x cols): rows are streamed in order, each thread owns a slice of
// columns, so reads are contiguous and the summation order is fixed
enum { KFN(SLICE) = 64 };
static void KFN(colsum)(float* out, const float* x, long rows, int cols) {
    #pragma omp parallel for schedule(static) if (rows * cols > PAR_MIN_WORK)
    for (int j0 = 0; j0 < cols; j0 += KFN(SLICE)) {
        int n = cols - j0 < KFN(SLICE) ? cols - j0 : KFN(SLICE);
        float acc[KFN(SLICE)] = { 0 };
        for (long r = 0; r < rows; r++) {
            const float* row = x + r * cols + j0;
            for (int j = 0; j < n; j++) acc[j] += row[j];
        }
        for (int j = 0; j < n; j++) out[j0 + j] += acc[j];
    }
}

// out (n_slots x cols) <- the rows of x (rows x cols) summed by slot[r], in row order (as colsum: a
// slice of columns per thread)
static void KFN(sum_by_slot)(float* out, const float* x, const int* slot, long rows, int n_slots, int cols) {
    #pragma omp parallel for schedule(static) if (rows * cols > PAR_MIN_WORK)
    for (int j0 = 0; j0 < cols; j0 += KFN(SLICE)) {
        int w = cols - j0 < KFN(SLICE) ? cols - j0 : KFN(SLICE);
        for (int i = 0; i < n_slots; i++) memset(out + (size_t)i * cols + j0, 0, w * sizeof(float));
        for (long r = 0; r < rows; r++) {
            float* dst = out + (size_t)slot[r] * cols + j0;
            const float* src = x + r * cols + j0;
            for (int j = 0; j < w; j++) dst[j] += src[j];
        }
    }
}

// one AdamW update of n floats (train_rnn.c's adamw_update computes the step's scalars)
static void KFN(adamw)(float* params, float* m, float* v, const float* grads, size_t n, float grad_scale, float decay,
                       float step_size, float bc2_sqrt, float beta1, float beta2, float eps) {
    #pragma omp parallel for schedule(static) if ((long)n > PAR_MIN_WORK)
    for (long i = 0; i < (long)n; i++) {
        float g = grads[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi; v[i] = vi;
        params[i] = params[i] * decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

// ----------------------------------------------------------------------------
// the cells' row loops, built for this ISA (each wrapper inlines its cells.h function)

static void KFN(rnn_forward)(float* h, const float* gx, const float* gh, const float* b_ih, const float* b_hh,
                             int relu, int b0, int b1, int H) {
    rnn_cell_forward(h, gx, gh, b_ih, b_hh, relu, b0, b1, H);
}
static void KFN(rnn_backward)(float* dgates, float* dh, const float* dy, const float* h, int relu, int b0, int b1,
                              int H) {
    rnn_cell_backward(dgates, dh, dy, h, relu, b0, b1, H);
}
static void KFN(lstm_forward)(float* h, float* c, float* gates, const float* gh, const float* c_prev,
                              const float* b_ih, const float* b_hh, int b0, int b1, int H) {
    lstm_cell_forward(h, c, gates, gh, c_prev, b_ih, b_hh, b0, b1, H);
}
static void KFN(lstm_backward)(float* dgates, float* dh, float* dc, const float* dy, const float* gates,
                               const float* c, const float* c_prev, int b0, int b1, int H) {
    lstm_cell_backward(dgates, dh, dc, dy, gates, c, c_prev, b0, b1, H);
}
static void KFN(gru_forward)(float* h, float* gates, float* hn, const float* gh, const float* h_prev,
                             const float* b_ih, const float* b_hh, int b0, int b1, int H) {
    gru_cell_forward(h, gates, hn, gh, h_prev, b_ih, b_hh, b0, b1, H);
}
static void KFN(gru_backward)(float* dgates, float* dgates_h, float* dh, const float* dy, const float* gates,
                              const float* hn, const float* h_prev, int b0, int b1, int H) {
    gru_cell_backward(dgates, dgates_h, dh, dy, gates, hn, h_prev, b0, b1, H);
}

#define KERNEL_CELLS KFN(rnn_forward), KFN(rnn_backward), KFN(lstm_forward), KFN(lstm_backward), \
    KFN(gru_forward), KFN(gru_backward), KFN(logits_lse), KFN(logits_grad), KFN(colsum), KFN(sum_by_slot), KFN(adamw)
static const Kernels KFN(kernels_fp32) = {
    KERNEL_NAME, "fp32", MR, NR, 0, KFN(pack_b), KFN(gemm_team), KFN(gemm_rows), KERNEL_CELLS,
};
static const Kernels KFN(kernels_bf16) = {
    KERNEL_NAME, "bf16", MR, NR, BF16_NATIVE, KFN(pack_b_bf16), KFN(gemm_team_bf16), KFN(gemm_rows_bf16),
    KERNEL_CELLS,
};
#undef KERNEL_CELLS
#undef TILE_SWITCH
#undef vecf
#undef vecu
#undef NR
#undef NV
#undef KERNEL_ISA
#undef KERNEL_NAME
#undef VEC_FLOATS
#undef MR
#undef BF16_NATIVE
