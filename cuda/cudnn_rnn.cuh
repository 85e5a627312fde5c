// cudnn_rnn.cuh: the recurrent stack on cuDNN. Its descriptors (data, state, dropout, RNN); the
// algorithm (by name, auto's candidates and the fallback that tries them); the weight space and
// the weight map between it and our flat parameters; the forward and backward calls.
//
// The stack's parameters stay in the owner's flat buffer, in torch's order (common.h's layout):
// cuDNN's weight space is a copy made before a forward (rnn_load_weights), and its gradient space
// is added back after a backward (rnn_add_grads), through a list of (flat offset, weight-space
// offset, count) segments built once per algorithm from cudnnGetRNNWeightParams. Activations are
// time-major (row t*B + b), cuDNN's SEQ_MAJOR layout.
#pragma once
#include "gpu_check.cuh"   // errors, gpu_alloc, gpu_sticky_error
#include "kernels.cuh"     // WeightSeg, the segment copies, uniform_fill_kernel

// ----------------------------------------------------------------------------
// cuDNN's RNN algorithms, by the names --cudnn-algo and $PYRNN_CUDNN_ALGO take. PERSIST_DYNAMIC is
// left out: it compiles kernels at run time through NVRTC, which the pinned wheels do not bring.

#define GPU_ALGO_AUTO -1
static const struct { const char* name; int algo; } gpu_algos[] = {
    { "standard", CUDNN_RNN_ALGO_STANDARD },
    { "persist_static", CUDNN_RNN_ALGO_PERSIST_STATIC },
    { "persist_small_h", CUDNN_RNN_ALGO_PERSIST_STATIC_SMALL_H },
};
#define N_GPU_ALGOS ((int)(sizeof(gpu_algos) / sizeof(gpu_algos[0])))

static const char* gpu_algo_name(int algo) {
    for (int i = 0; i < N_GPU_ALGOS; i++) if (gpu_algos[i].algo == algo) return gpu_algos[i].name;
    return algo == GPU_ALGO_AUTO ? "auto" : "?";
}

// "auto" or an algorithm name -> GPU_ALGO_AUTO or the cudnnRNNAlgo_t; NULL or "" is auto
static int gpu_algo_parse(int* algo, const char* name) {
    if (!name || !*name || strcmp(name, "auto") == 0) { *algo = GPU_ALGO_AUTO; return 0; }
    for (int i = 0; i < N_GPU_ALGOS; i++)
        if (strcmp(name, gpu_algos[i].name) == 0) { *algo = gpu_algos[i].algo; return 0; }
    return fail("unknown cuDNN RNN algorithm '%s' (expected auto, standard, persist_static or persist_small_h)", name);
}

// set when an algorithm asked for by name is one cuDNN does not run for the model (test_gpu exits 3)
static int gpu_algo_refused = 0;

// What auto tries, best first. The rules are PyTorch's (aten/src/ATen/native/cudnn/RNN.cpp,
// get_algo): SMALL_H for non-double data when H is at most 128 (LSTM, GRU) or 256 (RNN) -- torch's
// backward-pass limits; it allows 192 / 384 in the forward pass, but one descriptor serves both
// here -- and PERSIST_STATIC for shapes torch's heuristics accept (H and E multiples of 128,
// H <= 1024, B a multiple of 8 up to 128; no GRU, which torch found slower; no tanh / relu RNN
// with B >= 96 and H >= 896), which torch takes for fp16 only: here the device benchmark decides
// whether it pays in fp32. Else STANDARD, which is always last.
static int gpu_auto_algos(int* out, char* why, size_t why_size, int cell, int E, int H, int B) {
    int n = 0;
    int gated = cell == CELL_LSTM || cell == CELL_GRU, h_max = gated ? 128 : 256;
    snprintf(why, why_size, "H=%d %s %d for %s", H, H <= h_max ? "<=" : ">", h_max, cell_names[cell]);
    if (H <= h_max) out[n++] = CUDNN_RNN_ALGO_PERSIST_STATIC_SMALL_H;
    int rnn_large = !gated && B >= 96 && H >= 896;
    if (H % 128 == 0 && E % 128 == 0 && H <= 1024 && B % 8 == 0 && B <= 128 && cell != CELL_GRU && !rnn_large)
        out[n++] = CUDNN_RNN_ALGO_PERSIST_STATIC;
    out[n++] = CUDNN_RNN_ALGO_STANDARD;
    return n;
}

// ----------------------------------------------------------------------------
// the fallback: which candidate is kept, and what the note says about the others

// An fp32 model keeps only an algorithm whose results are those of STANDARD (exact FMA math) to
// within this relative error, the harness's bound against the float64 oracle; an algorithm that
// computes in TF32 inside is about 1e-3 off.
#define RNN_EXACT_TOL 1e-4

// One candidate tried: 0 kept (set up, every call of a run ran, and exact where checked); 1 ran but
// inexact (err: its relative error against STANDARD); -1 did not run (why: pyrnn_last_error()).
// Whatever is not kept is released again.
typedef int (*RnnTrial)(void* ctx, int algo, int check, double* err);

// Tries the candidates in order and keeps the first that passes. check: compare each one but
// STANDARD with STANDARD's results (fp32 auto). After a candidate fails, a sticky CUDA error stops
// everything with its own message: the context is lost, so the next candidate would fail for the
// same reason and be blamed for it. asked: the one candidate was asked for by name. The note says
// what was chosen, why, and what was not kept and why.
static int rnn_fallback(int* chosen, char* note, size_t note_size, const int* candidates, int n, const char* why,
                        int asked, int check, RnnTrial trial, void* ctx, cudaError_t (*sticky)(void)) {
    char skipped[640];
    skipped[0] = 0;
    for (int i = 0; i < n; i++) {
        const char* name = gpu_algo_name(candidates[i]);
        double err = -1.0;
        int rc = trial(ctx, candidates[i], check && candidates[i] != CUDNN_RNN_ALGO_STANDARD, &err);
        if (rc == 0) {
            *chosen = candidates[i];
            if (asked) snprintf(note, note_size, "%s (asked for)", name);
            else snprintf(note, note_size, "%s (auto: %s%s%s)", name, why, skipped[0] ? "; " : "", skipped);
            return 0;
        }
        size_t len = strlen(skipped);
        if (rc > 0) {
            snprintf(skipped + len, sizeof(skipped) - len, "%srejected %s: relative error %.1e against standard, "
                     "over the %.0e of fp32 (not exact)", len ? "; " : "", name, err, RNN_EXACT_TOL);
            continue;
        }
        char first[256];
        snprintf(first, sizeof(first), "%.255s", pyrnn_last_error());
        cudaError_t e = sticky();
        if (e != cudaSuccess)
            return fail("trying cuDNN's %s algorithm left a sticky CUDA error, %s (%s), after: %s; the CUDA context "
                        "is lost, so no other algorithm was tried (--cudnn-algo or PYRNN_CUDNN_ALGO standard avoids "
                        "it)", name, cudaGetErrorName(e), cudaGetErrorString(e), first);
        snprintf(skipped + len, sizeof(skipped) - len, "%scuDNN refused %s: %.150s", len ? "; " : "", name, first);
    }
    if (asked) {
        gpu_algo_refused = 1;
        return fail("cuDNN does not run the %s algorithm for this model: %s; --cudnn-algo auto picks one that runs",
                    gpu_algo_name(candidates[0]), skipped);
    }
    return fail("cuDNN runs no RNN algorithm for this model: %s", skipped);
}

// ----------------------------------------------------------------------------
// the layer

typedef struct {
    int cell, E, H, L, B, T, G, tf32;
    cudnnHandle_t dnn;                               // the owner's handle, on its stream
    cudaStream_t stream;
    int algo;                                        // the cudnnRNNAlgo_t set up, or GPU_ALGO_AUTO for none
    float dropout;                                   // the rate in the dropout descriptor (0 for one layer)
    cudnnRNNDescriptor_t desc;
    cudnnDropoutDescriptor_t drop;
    void* drop_states;                               // cuDNN's dropout generator (dropout > 0, L > 1)
    size_t drop_states_bytes;
    cudnnRNNDataDescriptor_t xdesc, ydesc;           // x (T, B, E) and y (T, B, H), every sequence full length
    cudnnTensorDescriptor_t hdesc;                   // states (L, B, H)
    int* seq_lengths;                                // (B,) all T, on the device as cuDNN requires
    float* zeros;                                    // (L, B, H): the gradient of the final state
    // per algorithm
    size_t ws_bytes, work_bytes, reserve_bytes;
    float *ws, *dws;                                 // weight space and its gradient
    void *work, *reserve;
    WeightSeg* segs;                                 // the weight map, on the device
    int n_segs;
    size_t max_seg;
} CudnnRnn;

static size_t rnn_lbh(const CudnnRnn* r) { return (size_t)r->L * r->B * r->H; }
static size_t rnn_num_params(const CudnnRnn* r) { return stack_num_params(r->cell, r->E, r->H, r->L, 1); }

// the offset of tensor `kind` of layer l in the stack's flat parameters, from common.h's size table
static size_t rnn_tensor_offset(const CudnnRnn* r, int l, int kind) {
    size_t off = 0;
    for (int j = 0; j < l * N_KINDS + kind; j++)
        off += stack_tensor_numel(r->cell, r->E, r->H, 1, j / N_KINDS, j % N_KINDS);
    return off;
}

// what one algorithm holds: its descriptor, weight space, temp spaces and weight map
static void rnn_release(CudnnRnn* r) {
    void* bufs[] = { r->ws, r->dws, r->work, r->reserve, r->segs };
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) gpu_free(bufs[i]);
    r->ws = r->dws = NULL; r->work = r->reserve = NULL; r->segs = NULL;
    r->ws_bytes = r->work_bytes = r->reserve_bytes = 0;
    r->n_segs = 0;
    if (r->desc) CUDNN_RELEASE(cudnnDestroyRNNDescriptor(r->desc));
    r->desc = NULL;
    r->algo = GPU_ALGO_AUTO;
}

static void rnn_free(CudnnRnn* r) {
    rnn_release(r);
    gpu_free(r->seq_lengths); gpu_free(r->zeros); gpu_free(r->drop_states);
    if (r->xdesc) CUDNN_RELEASE(cudnnDestroyRNNDataDescriptor(r->xdesc));
    if (r->ydesc) CUDNN_RELEASE(cudnnDestroyRNNDataDescriptor(r->ydesc));
    if (r->hdesc) CUDNN_RELEASE(cudnnDestroyTensorDescriptor(r->hdesc));
    if (r->drop) CUDNN_RELEASE(cudnnDestroyDropoutDescriptor(r->drop));
    memset(r, 0, sizeof(*r));
}

// the shapes and the descriptors that do not depend on the algorithm; dropout starts at 0
static int rnn_init(CudnnRnn* r, cudnnHandle_t dnn, cudaStream_t stream, int cell, int E, int H, int L, int B, int T,
                    int tf32) {
    memset(r, 0, sizeof(*r));
    r->cell = cell; r->E = E; r->H = H; r->L = L; r->B = B; r->T = T; r->G = cell_gates(cell); r->tf32 = tf32;
    r->dnn = dnn; r->stream = stream; r->algo = GPU_ALGO_AUTO;
    int* lengths = (int*)malloc(B * sizeof(int));
    if (!lengths) return fail("out of memory");
    for (int b = 0; b < B; b++) lengths[b] = T;
    float pad = 0.0f;
    cudnnStatus_t s = cudnnCreateRNNDataDescriptor(&r->xdesc);
    if (s == CUDNN_STATUS_SUCCESS) s = cudnnCreateRNNDataDescriptor(&r->ydesc);
    if (s == CUDNN_STATUS_SUCCESS)
        s = cudnnSetRNNDataDescriptor(r->xdesc, CUDNN_DATA_FLOAT, CUDNN_RNN_DATA_LAYOUT_SEQ_MAJOR_UNPACKED, T, B, E,
                                      lengths, &pad);
    if (s == CUDNN_STATUS_SUCCESS)
        s = cudnnSetRNNDataDescriptor(r->ydesc, CUDNN_DATA_FLOAT, CUDNN_RNN_DATA_LAYOUT_SEQ_MAJOR_UNPACKED, T, B, H,
                                      lengths, &pad);
    int rc = s != CUDNN_STATUS_SUCCESS ? gpu_fail_cudnn("cudnnSetRNNDataDescriptor", s, __FILE__, __LINE__)
           : gpu_alloc(&r->seq_lengths, B * sizeof(int), "sequence lengths");
    cudaError_t e = rc ? cudaSuccess : cudaMemcpy(r->seq_lengths, lengths, B * sizeof(int), cudaMemcpyHostToDevice);
    free(lengths);
    if (rc) return -1;
    if (e != cudaSuccess) return gpu_fail("cudaMemcpy", cudaGetErrorString(e), __FILE__, __LINE__);
    int hdims[3] = { L, B, H }, hstrides[3] = { B * H, H, 1 };
    CUDNN_CHECK(cudnnCreateTensorDescriptor(&r->hdesc));
    CUDNN_CHECK(cudnnSetTensorNdDescriptor(r->hdesc, CUDNN_DATA_FLOAT, 3, hdims, hstrides));
    if (gpu_alloc(&r->zeros, rnn_lbh(r) * 4, "zero states")) return -1;
    CUDA_CHECK(cudaMemset(r->zeros, 0, rnn_lbh(r) * 4));
    CUDNN_CHECK(cudnnCreateDropoutDescriptor(&r->drop));
    CUDNN_CHECK(cudnnSetDropoutDescriptor(r->drop, dnn, 0.0f, NULL, 0, 0));
    return 0;
}

// (Re)sets the RNN descriptor from the algorithm and the dropout descriptor; the temp spaces grow
// to what it needs. torch semantics are cuDNN's with DOUBLE_BIAS, linear input, no projection
// (projSize equals hiddenSize), padded IO for the unpacked (T, B, C) layout.
static int rnn_apply_descriptor(CudnnRnn* r) {
    cudnnRNNMode_t mode = r->cell == CELL_RNN ? CUDNN_RNN_TANH : r->cell == CELL_RNN_RELU ? CUDNN_RNN_RELU
                        : r->cell == CELL_LSTM ? CUDNN_LSTM : CUDNN_GRU;
    CUDNN_CHECK(cudnnSetRNNDescriptor_v8(r->desc, (cudnnRNNAlgo_t)r->algo, mode, CUDNN_RNN_DOUBLE_BIAS,
                                         CUDNN_UNIDIRECTIONAL, CUDNN_LINEAR_INPUT, CUDNN_DATA_FLOAT, CUDNN_DATA_FLOAT,
                                         r->tf32 ? CUDNN_DEFAULT_MATH : CUDNN_FMA_MATH, r->E, r->H, r->H, r->L,
                                         r->drop, CUDNN_RNN_PADDED_IO_ENABLED));
    size_t ws_bytes = 0, work_train = 0, work_infer = 0, reserve = 0, reserve_infer = 0;
    CUDNN_CHECK(cudnnGetRNNWeightSpaceSize(r->dnn, r->desc, &ws_bytes));
    CUDNN_CHECK(cudnnGetRNNTempSpaceSizes(r->dnn, r->desc, CUDNN_FWD_MODE_TRAINING, r->xdesc, &work_train, &reserve));
    CUDNN_CHECK(cudnnGetRNNTempSpaceSizes(r->dnn, r->desc, CUDNN_FWD_MODE_INFERENCE, r->xdesc, &work_infer,
                                          &reserve_infer));
    if (r->ws && ws_bytes != r->ws_bytes)   // the weight map was built for the old one
        return fail("cuDNN's weight space changed size with the dropout rate (%zu -> %zu bytes)", r->ws_bytes,
                    ws_bytes);
    r->ws_bytes = ws_bytes;
    size_t work = work_train > work_infer ? work_train : work_infer;
    if (!r->work || work > r->work_bytes) {
        gpu_free(r->work);
        r->work = NULL;
        if (gpu_alloc(&r->work, work, "the cuDNN workspace")) return -1;
        r->work_bytes = work;
    }
    if (!r->reserve || reserve > r->reserve_bytes) {
        gpu_free(r->reserve);
        r->reserve = NULL;
        if (gpu_alloc(&r->reserve, reserve, "the cuDNN reserve space")) return -1;
        r->reserve_bytes = reserve;
    }
    return 0;
}

static size_t tensor_numel(cudnnTensorDescriptor_t d, int* dims, int* nb) {
    cudnnDataType_t dt;
    int strides[8];
    *nb = 0;
    if (cudnnGetTensorNdDescriptor(d, 8, &dt, nb, dims, strides) != CUDNN_STATUS_SUCCESS) return 0;
    size_t n = 1;
    for (int i = 0; i < *nb && i < 8; i++) n *= (size_t)dims[i];
    return *nb > 0 ? n : 0;
}

static int seg_compare(const void* a, const void* b) {
    size_t x = ((const WeightSeg*)a)->ws_off, y = ((const WeightSeg*)b)->ws_off;
    return x < y ? -1 : x > y;
}

// The weight map: for layer l and cuDNN linear layer id (0..G-1 input matrices W, G..2G-1 recurrent
// matrices R, in torch's gate order), cudnnGetRNNWeightParams gives the matrix (H rows of `in`
// floats, row-major, as torch's gate block) and, with DOUBLE_BIAS, the b_ih (id < G) or b_hh
// (id >= G) gate vector. Torch's weight_ih_l{l} is the G gate blocks stacked: block k is rows
// [k*H, (k+1)*H).
static int rnn_build_weight_map(CudnnRnn* r) {
    int L = r->L, H = r->H, G = r->G;
    int n_segs = L * 2 * G * 2;
    WeightSeg* segs = (WeightSeg*)calloc(n_segs, sizeof(WeightSeg));
    if (!segs) return fail("out of memory");
    cudnnTensorDescriptor_t mdesc = NULL, bdesc = NULL;
    int rc = -1, k = 0;
    size_t ws_floats = r->ws_bytes / sizeof(float), covered = 0;
    cudnnStatus_t s = cudnnCreateTensorDescriptor(&mdesc);
    if (s == CUDNN_STATUS_SUCCESS) s = cudnnCreateTensorDescriptor(&bdesc);
    if (s != CUDNN_STATUS_SUCCESS) {
        gpu_fail_cudnn("cudnnCreateTensorDescriptor", s, __FILE__, __LINE__);
        goto done;
    }
    for (int l = 0; l < L; l++) {
        int in = l == 0 ? r->E : H;
        for (int id = 0; id < 2 * G; id++) {
            int rec = id >= G, gate = id % G, cols = rec ? H : in;
            void *maddr = NULL, *baddr = NULL;
            s = cudnnGetRNNWeightParams(r->dnn, r->desc, l, r->ws_bytes, r->ws, id, mdesc, &maddr, bdesc, &baddr);
            if (s != CUDNN_STATUS_SUCCESS) {
                gpu_fail_cudnn("cudnnGetRNNWeightParams", s, __FILE__, __LINE__);
                goto done;
            }
            int md[8], bd[8], mnb, bnb;
            size_t mn = tensor_numel(mdesc, md, &mnb), bn = tensor_numel(bdesc, bd, &bnb);
            if (!maddr || !baddr || mn != (size_t)H * cols || bn != (size_t)H ||
                (mnb == 3 && (md[1] != H || md[2] != cols))) {
                fail("cuDNN weight layout not understood: layer %d linear id %d: matrix %d dims (%d, %d, %d), bias %zu "
                     "floats; expected (1, %d, %d) and %d", l, id, mnb, md[0], mnb > 1 ? md[1] : 0,
                     mnb > 2 ? md[2] : 0, bn, H, cols, H);
                goto done;
            }
            size_t m_off = (size_t)((char*)maddr - (char*)r->ws), b_off = (size_t)((char*)baddr - (char*)r->ws);
            if (m_off % sizeof(float) || b_off % sizeof(float) || m_off / 4 + mn > ws_floats ||
                b_off / 4 + bn > ws_floats) {
                fail("cuDNN weight params for layer %d id %d fall outside the weight space", l, id);
                goto done;
            }
            segs[k++] = { rnn_tensor_offset(r, l, rec ? W_HH : W_IH) + (size_t)gate * H * cols, m_off / 4, mn };
            segs[k++] = { rnn_tensor_offset(r, l, rec ? B_HH : B_IH) + (size_t)gate * H, b_off / 4, bn };
            covered += mn + bn;
        }
    }
    // the segments must not overlap (any padding cuDNN leaves between them stays zero)
    qsort(segs, k, sizeof(WeightSeg), seg_compare);
    for (int i = 0; i + 1 < k; i++)
        if (segs[i].ws_off + segs[i].n > segs[i + 1].ws_off) {
            fail("cuDNN weight params overlap in the weight space");
            goto done;
        }
    if (covered > ws_floats || covered != rnn_num_params(r)) {
        fail("cuDNN's weight space holds %zu floats and its params %zu, the stack has %zu", ws_floats, covered,
             rnn_num_params(r));
        goto done;
    }
    r->max_seg = 0;
    for (int i = 0; i < k; i++) if (segs[i].n > r->max_seg) r->max_seg = segs[i].n;
    if (gpu_alloc(&r->segs, k * sizeof(WeightSeg), "the weight map")) goto done;
    {
        cudaError_t e = cudaMemcpy(r->segs, segs, k * sizeof(WeightSeg), cudaMemcpyHostToDevice);
        if (e != cudaSuccess) {
            gpu_fail("cudaMemcpy(weight map)", cudaGetErrorString(e), __FILE__, __LINE__);
            goto done;
        }
    }
    r->n_segs = k;
    rc = 0;
done:
    if (mdesc) CUDNN_RELEASE(cudnnDestroyTensorDescriptor(mdesc));
    if (bdesc) CUDNN_RELEASE(cudnnDestroyTensorDescriptor(bdesc));
    free(segs);
    return rc;
}

// the RNN descriptor for one algorithm, its weight space, temp spaces and weight map
static int rnn_setup(CudnnRnn* r, int algo) {
    r->algo = algo;
    CUDNN_CHECK(cudnnCreateRNNDescriptor(&r->desc));
    if (rnn_apply_descriptor(r)) return -1;
    if (gpu_alloc(&r->ws, r->ws_bytes, "the cuDNN weight space") ||
        gpu_alloc(&r->dws, r->ws_bytes, "the cuDNN weight gradient")) return -1;
    CUDA_CHECK(cudaMemset(r->ws, 0, r->ws_bytes));
    return rnn_build_weight_map(r);
}

// the rate between layers (none with one layer) and the seed of cuDNN's generator; unchanged, nothing
static int rnn_set_dropout(CudnnRnn* r, float p, uint64_t seed) {
    if (r->L == 1) p = 0.0f;
    if (p == r->dropout) return 0;
    if (p > 0.0f && !r->drop_states) {
        CUDNN_CHECK(cudnnDropoutGetStatesSize(r->dnn, &r->drop_states_bytes));
        if (gpu_alloc(&r->drop_states, r->drop_states_bytes, "cuDNN dropout states")) return -1;
    }
    if (p > 0.0f)
        CUDNN_CHECK(cudnnSetDropoutDescriptor(r->drop, r->dnn, p, r->drop_states, r->drop_states_bytes,
                                              (unsigned long long)seed));
    else
        CUDNN_CHECK(cudnnSetDropoutDescriptor(r->drop, r->dnn, 0.0f, NULL, 0, 0));
    r->dropout = p;
    return r->desc ? rnn_apply_descriptor(r) : 0;
}

// restarts cuDNN's dropout generator from seed (nothing without dropout)
static int rnn_seed_dropout(CudnnRnn* r, uint64_t seed) {
    if (r->dropout == 0.0f) return 0;
    CUDNN_CHECK(cudnnSetDropoutDescriptor(r->drop, r->dnn, r->dropout, r->drop_states, r->drop_states_bytes,
                                          (unsigned long long)seed));
    return rnn_apply_descriptor(r);
}

static dim3 rnn_segment_grid(const CudnnRnn* r) {
    size_t blocks = (r->max_seg + 256 * 8 - 1) / (256 * 8);
    return dim3((unsigned)(blocks < 1 ? 1 : blocks > 128 ? 128 : blocks), (unsigned)r->n_segs);
}

// the weight space from the stack's flat parameters
static int rnn_load_weights(CudnnRnn* r, const float* flat) {
    segments_to_ws_kernel<<<rnn_segment_grid(r), 256, 0, r->stream>>>(r->ws, flat, r->segs);
    LAUNCH_CHECK("segments_to_ws_kernel");
    return 0;
}

// flat grads += the last backward's weight gradient
static int rnn_add_grads(CudnnRnn* r, float* flat_grads) {
    segments_add_kernel<<<rnn_segment_grid(r), 256, 0, r->stream>>>(flat_grads, r->dws, r->segs);
    LAUNCH_CHECK("segments_add_kernel");
    return 0;
}

// x (T, B, E) -> y (T, B, H) from states hx, cx (NULL: zeros; cx only for LSTM) to the final hy, cy.
// training selects CUDNN_FWD_MODE_TRAINING: dropout applies, and the reserve space that the
// backward pass reads is filled.
static int rnn_forward(CudnnRnn* r, int training, const float* x, float* y, const float* hx, float* hy,
                       const float* cx, float* cy) {
    int lstm = r->cell == CELL_LSTM;
    CUDNN_CHECK(cudnnRNNForward(r->dnn, r->desc, training ? CUDNN_FWD_MODE_TRAINING : CUDNN_FWD_MODE_INFERENCE,
                                r->seq_lengths, r->xdesc, x, r->ydesc, y, r->hdesc, hx ? hx : r->zeros, hy,
                                r->hdesc, lstm ? (cx ? cx : r->zeros) : NULL, lstm ? cy : NULL, r->ws_bytes, r->ws,
                                r->work_bytes, r->work, training ? r->reserve_bytes : 0,
                                training ? r->reserve : NULL));
    return 0;
}

// After a training forward from hx, cx (NULL: zeros) with output y: dx and dhx, dcx from dy (the
// final states' gradients are zero: truncated BPTT), then the weight gradient into dws, which
// rnn_add_grads adds to the flat gradients. Data first: it leaves in the reserve space what the
// weight pass reads.
static int rnn_backward(CudnnRnn* r, const float* x, const float* y, const float* dy, float* dx, const float* hx,
                        float* dhx, const float* cx, float* dcx) {
    int lstm = r->cell == CELL_LSTM;
    hx = hx ? hx : r->zeros;
    CUDNN_CHECK(cudnnRNNBackwardData_v8(r->dnn, r->desc, r->seq_lengths, r->ydesc, y, dy, r->xdesc, dx,
                                        r->hdesc, hx, r->zeros, dhx, r->hdesc, lstm ? (cx ? cx : r->zeros) : NULL,
                                        lstm ? r->zeros : NULL, lstm ? dcx : NULL, r->ws_bytes, r->ws,
                                        r->work_bytes, r->work, r->reserve_bytes, r->reserve));
    CUDA_CHECK(cudaMemsetAsync(r->dws, 0, r->ws_bytes, r->stream));   // ADD mode adds to it
    CUDNN_CHECK(cudnnRNNBackwardWeights_v8(r->dnn, r->desc, CUDNN_WGRAD_MODE_ADD, r->seq_lengths, r->xdesc, x,
                                           r->hdesc, hx, r->ydesc, y, r->ws_bytes, r->dws,
                                           r->work_bytes, r->work, r->reserve_bytes, r->reserve));
    return 0;
}

// ----------------------------------------------------------------------------
// choosing the algorithm: every cuDNN call a run makes (training forward, both backward passes,
// inference forward) on random data, once per candidate, since some shapes are refused only when
// an algorithm's kernels are launched; in fp32 auto, each candidate's results against STANDARD's

// the buffers of a trial, and the reference's results on the host
typedef struct {
    CudnnRnn* r;
    float target_dropout;                            // the model's rate: the kept algorithm ran with it
    float *x, *y, *dy, *dx, *hx, *hy, *cx, *cy, *dhx, *dcx, *w, *dw;
    size_t n_x, n_y, n_h, n_w, n_out;                // n_out: the floats of every output together
    float *ref, *out;                                // host: STANDARD's outputs, a candidate's
    int ref_state;                                   // 0 not run yet, 1 have it, -1 failed (ref_error says why)
    char ref_error[320];
} RnnProbe;

static void probe_free(RnnProbe* p) {
    float* bufs[] = { p->x, p->y, p->dy, p->dx, p->hx, p->hy, p->cx, p->cy, p->dhx, p->dcx, p->w, p->dw };
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) gpu_free(bufs[i]);
    free(p->ref); free(p->out);
}

static int probe_fill(RnnProbe* p, float* x, size_t n, float scale, uint64_t seed) {
    uniform_fill_kernel<<<blocks_for(n, 1024), 256, 0, p->r->stream>>>(x, n, scale, seed);
    LAUNCH_CHECK("uniform_fill_kernel");
    return 0;
}

static int probe_init(RnnProbe* p, CudnnRnn* r, float target_dropout) {
    memset(p, 0, sizeof(*p));
    p->r = r; p->target_dropout = target_dropout;
    size_t bt = (size_t)r->B * r->T;
    p->n_x = bt * r->E; p->n_y = bt * r->H; p->n_h = rnn_lbh(r); p->n_w = rnn_num_params(r);
    p->n_out = p->n_y + p->n_x + 4 * p->n_h + p->n_w;   // y, h_n, c_n, dx, dh0, dc0, the weight gradient
    struct { float** buf; size_t n; } bufs[] = {
        { &p->x, p->n_x }, { &p->y, p->n_y }, { &p->dy, p->n_y }, { &p->dx, p->n_x }, { &p->hx, p->n_h },
        { &p->hy, p->n_h }, { &p->cx, p->n_h }, { &p->cy, p->n_h }, { &p->dhx, p->n_h }, { &p->dcx, p->n_h },
        { &p->w, p->n_w }, { &p->dw, p->n_w } };
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
        if (gpu_alloc(bufs[i].buf, bufs[i].n * 4, "the cuDNN algorithm trial")) return -1;
    float scale = 1.0f / sqrtf((float)r->H);   // torch's init range
    if (probe_fill(p, p->x, p->n_x, 1.0f, 1) || probe_fill(p, p->dy, p->n_y, 1.0f, 2) ||
        probe_fill(p, p->hx, p->n_h, 0.5f, 3) || probe_fill(p, p->cx, p->n_h, 0.5f, 4) ||
        probe_fill(p, p->w, p->n_w, scale, 5)) return -1;
    return 0;
}

// every call of a run, with the algorithm set up in p->r; the training calls last, so that their
// outputs are what is left for probe_download
static int probe_run(RnnProbe* p) {
    CudnnRnn* r = p->r;
    const float* cx = r->cell == CELL_LSTM ? p->cx : NULL;
    if (rnn_load_weights(r, p->w)) return -1;
    if (rnn_forward(r, 0, p->x, p->y, p->hx, p->hy, cx, p->cy)) return -1;
    if (rnn_forward(r, 1, p->x, p->y, p->hx, p->hy, cx, p->cy)) return -1;
    if (rnn_backward(r, p->x, p->y, p->dy, p->dx, p->hx, p->dhx, cx, p->dcx)) return -1;
    CUDA_CHECK(cudaMemsetAsync(p->dw, 0, p->n_w * 4, r->stream));
    if (rnn_add_grads(r, p->dw)) return -1;
    CUDA_CHECK(cudaStreamSynchronize(r->stream));   // a refusal at launch time shows up here
    return 0;
}

// the outputs of the last probe_run to the host: y, h_n, c_n, dx, dh0, dc0, the weight gradient
// (c_n, dc0: zeros unless LSTM)
static int probe_download(RnnProbe* p, float* host) {
    int lstm = p->r->cell == CELL_LSTM;
    struct { const float* src; size_t n; } parts[] = {
        { p->y, p->n_y }, { p->hy, p->n_h }, { lstm ? p->cy : NULL, p->n_h }, { p->dx, p->n_x },
        { p->dhx, p->n_h }, { lstm ? p->dcx : NULL, p->n_h }, { p->dw, p->n_w } };
    for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++) {
        if (parts[i].src) CUDA_CHECK(cudaMemcpy(host, parts[i].src, parts[i].n * 4, cudaMemcpyDeviceToHost));
        else memset(host, 0, parts[i].n * 4);
        host += parts[i].n;
    }
    return 0;
}

// the largest relative error ||out - ref|| / ||ref|| over the outputs (those that are zero on both
// sides, c_n and dc0 without an LSTM, count as exact)
static double probe_error(const RnnProbe* p) {
    size_t sizes[] = { p->n_y, p->n_h, p->n_h, p->n_x, p->n_h, p->n_h, p->n_w };
    const float *a = p->out, *b = p->ref;
    double worst = 0.0;
    for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
        double d2 = 0.0, r2 = 0.0;
        for (size_t i = 0; i < sizes[k]; i++) {
            double d = (double)a[i] - (double)b[i];
            d2 += d * d;
            r2 += (double)b[i] * b[i];
        }
        double err = r2 > 0.0 ? sqrt(d2 / r2) : d2 > 0.0 ? INFINITY : 0.0;
        if (err != err) return err;   // a NaN anywhere is the worst of all
        if (err > worst) worst = err;
        a += sizes[k]; b += sizes[k];
    }
    return worst;
}

// STANDARD's outputs on the probe's data, once: what the other candidates are held to
static int probe_reference(RnnProbe* p) {
    if (p->ref_state) return p->ref_state > 0 ? 0 : fail("%s", p->ref_error);
    CudnnRnn* r = p->r;
    p->ref = (float*)malloc(p->n_out * sizeof(float));
    p->out = (float*)malloc(p->n_out * sizeof(float));
    int rc = !p->ref || !p->out ? fail("out of memory for the exactness check")
           : rnn_set_dropout(r, 0.0f, 0) || rnn_setup(r, CUDNN_RNN_ALGO_STANDARD) || probe_run(p) ||
             probe_download(p, p->ref) ? -1 : 0;
    rnn_release(r);
    p->ref_state = rc ? -1 : 1;
    if (!rc) return 0;
    snprintf(p->ref_error, sizeof(p->ref_error), "standard, the reference of the exactness check, did not run: %.250s",
             pyrnn_last_error());
    return fail("%s", p->ref_error);
}

// RnnTrial on the probe: set up algo, run every call without dropout, hold the results to
// STANDARD's when asked, then run again with the model's dropout (cuDNN runs other kernels then)
static int rnn_trial(void* ctx, int algo, int check, double* err) {
    RnnProbe* p = (RnnProbe*)ctx;
    CudnnRnn* r = p->r;
    if (check && probe_reference(p)) return -1;
    int rc = rnn_set_dropout(r, 0.0f, 0) || rnn_setup(r, algo) || probe_run(p) ? -1 : 0;
    if (rc == 0 && check) {
        rc = probe_download(p, p->out);
        *err = probe_error(p);
        if (rc == 0 && !(*err <= RNN_EXACT_TOL)) rc = 1;
    }
    if (rc == 0 && p->target_dropout > 0.0f && r->L > 1)
        rc = rnn_set_dropout(r, p->target_dropout, 0) || probe_run(p) ? -1 : 0;
    if (rc) rnn_release(r);
    return rc;
}

// algo: a cudnnRNNAlgo_t, or GPU_ALGO_AUTO for the first of gpu_auto_algos that passes its trial,
// in fp32 the exactness check included. The layer is left set up with it and dropout at the rate
// given (seed 0: the owner seeds it). note: the choice, why, and what was not kept and why.
static int rnn_choose(CudnnRnn* r, int algo, float dropout, char* note, size_t note_size) {
    int candidates[4] = { algo }, n = 1, chosen = GPU_ALGO_AUTO;
    char why[128] = "";
    if (algo == GPU_ALGO_AUTO) n = gpu_auto_algos(candidates, why, sizeof(why), r->cell, r->E, r->H, r->B);
    RnnProbe p;
    int rc = probe_init(&p, r, dropout);
    if (rc == 0)
        rc = rnn_fallback(&chosen, note, note_size, candidates, n, why, algo != GPU_ALGO_AUTO,
                          algo == GPU_ALGO_AUTO && !r->tf32, rnn_trial, &p, gpu_sticky_error);
    probe_free(&p);
    return rc;
}

