// kernels.cuh: our own kernels, everything on the device that is not cuDNN or cuBLAS: the
// embedding (forward, and its gradient in a fixed order), dropout before the head, bias + softmax
// cross-entropy, the loss mean, the global gradient norm and clip factor, AdamW, the copies between
// our flat parameters and cuDNN's weight space, and fills. Every reduction has a fixed shape and
// order, so the same inputs give the same bits run after run.
#pragma once
#include "../c/common.h"   // mix64 and RNG_GAMMA (HOST_DEVICE under nvcc), as the CPU's generator

#include <cuda_runtime.h>

#define WARP 32
#define ROWS_PER_BLOCK 8            // softmax: one warp per row
#define REDUCE_THREADS 256          // deterministic reductions: fixed block size ...
#define NORM_BLOCKS 512             // ... and a fixed number of partial sums
#define EMB_CHUNK 32                // embedding gradient: rows summed per block, in order

static int threads_for(int n) { return n >= 256 ? 256 : ((n + WARP - 1) / WARP) * WARP; }
// blocks of 256 threads for n elements, at least 1 and at most cap (the kernels stride over the rest)
static unsigned blocks_for(size_t n, size_t cap) {
    size_t b = (n + 255) / 256;
    return (unsigned)(b < 1 ? 1 : b > cap ? cap : b);
}

// x[(t*B + b)*E + e] = table[inputs[b*T + t]*E + e]; one block per (t, b) row
__global__ void embedding_forward_kernel(float* x, const float* table, const int* inputs, int B, int T,
                                         int E) {
    int row = blockIdx.x, t = row / B, b = row % B;
    const float* src = table + (size_t)inputs[(size_t)b * T + t] * E;
    float* dst = x + (size_t)row * E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) dst[e] = src[e];
}

// The embedding gradient in a fixed order (no atomics): the host lists the rows of each token in
// row order, cut into chunks of at most EMB_CHUNK rows (gpu_upload_tokens). Block k sums chunk k's
// rows of dx; then block j adds token j's chunk sums, in order, to its row of the table's gradient.
__global__ void embedding_chunk_sums_kernel(float* sums, const float* dx, const int* rows, const int* chunk_start,
                                            int E) {
    int k = blockIdx.x, lo = chunk_start[k], hi = chunk_start[k + 1];
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        float s = 0.0f;
        for (int i = lo; i < hi; i++) s += dx[(size_t)rows[i] * E + e];
        sums[(size_t)k * E + e] = s;
    }
}

__global__ void embedding_add_kernel(float* dtable, const float* sums, const int* token, const int* token_chunk,
                                     int E) {
    int j = blockIdx.x, lo = token_chunk[j], hi = token_chunk[j + 1];
    float* dst = dtable + (size_t)token[j] * E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        float s = 0.0f;
        for (int k = lo; k < hi; k++) s += sums[(size_t)k * E + e];
        dst[e] += s;
    }
}

// out = in * mask, mask[i] = 0 with probability p, else 1/(1-p), drawn from (seed, i) alone: the
// backward pass calls it again with the same seed on the gradient. In place is fine.
__global__ void dropout_kernel(float* out, const float* in, size_t n, float p, float scale, uint64_t seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float u = (float)(mix64(seed + (i + 1) * RNG_GAMMA) >> 40) * (1.0f / 16777216.0f);
        out[i] = u < p ? 0.0f : in[i] * scale;
    }
}

__device__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One warp per row r = t*B + b of the logits (T*B, V): adds the head bias in place, then the
// row's cross-entropy against targets (B, T) and, if dlogits is given, d(mean loss)/d(logits)
// = (softmax - onehot) * scale, computed as on the CPU. targets may be NULL (bias only).
__global__ void softmax_xent_kernel(float* logits, float* dlogits, float* row_loss, const float* bias,
                                    const int* targets, int B, int T, int V, float scale) {
    int lane = threadIdx.x % WARP;
    long row = (long)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
    if (row >= (long)B * T) return;   // whole warps leave together: the row is per warp
    float* z = logits + row * V;
    float mx = -FLT_MAX;
    for (int v = lane; v < V; v += WARP) {
        float zv = z[v] + bias[v];
        z[v] = zv;
        mx = fmaxf(mx, zv);
    }
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int v = lane; v < V; v += WARP) sum += expf(z[v] - mx);
    sum = warp_sum(sum);
    if (!targets) return;
    float lse = mx + logf(sum);
    __syncwarp();   // z[y] below was written by another lane
    int t = (int)(row / B), b = (int)(row % B);
    int y = targets[(size_t)b * T + t];
    if (lane == 0) row_loss[row] = lse - z[y];
    if (dlogits) {
        float* d = dlogits + row * V;
        for (int v = lane; v < V; v += WARP) {
            float p = expf(z[v] - lse) * scale;
            d[v] = v == y ? p - scale : p;
        }
    }
}

// sum of v over the block, in a fixed order (same answer every run); all threads get it
__device__ double block_sum(double v, double* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) sh[threadIdx.x] += sh[threadIdx.x + k];
        __syncthreads();
    }
    double total = sh[0];
    __syncthreads();
    return total;
}

// scalars[0] = mean of row_loss[0..n); one block of REDUCE_THREADS
__global__ void loss_mean_kernel(float* scalars, const float* row_loss, long n) {
    __shared__ double sh[REDUCE_THREADS];
    double s = 0.0;
    for (long i = threadIdx.x; i < n; i += blockDim.x) s += row_loss[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) scalars[0] = (float)(s / (double)n);
}

// partials[block] = sum of g^2 over a fixed grid-stride slice; NORM_BLOCKS x REDUCE_THREADS
__global__ void sumsq_partials_kernel(double* partials, const float* g, size_t n) {
    __shared__ double sh[REDUCE_THREADS];
    double s = 0.0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        double v = g[i];
        s += v * v;
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// scalars[1] = global norm, scalars[2] = clip factor (torch clip_grad_norm_), scalars[3] = 1 if the
// norm is finite (else the update is skipped, as on the CPU); one block
__global__ void grad_norm_finalize_kernel(float* scalars, const double* partials, int n_partials, float max_norm) {
    __shared__ double sh[REDUCE_THREADS];
    double s = 0.0;
    for (int i = threadIdx.x; i < n_partials; i += blockDim.x) s += partials[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) {
        float norm = (float)sqrt(s);
        float clip = 1.0f;
        if (max_norm > 0.0f) { clip = max_norm / (norm + 1e-6f); if (clip > 1.0f) clip = 1.0f; }
        scalars[1] = norm;
        scalars[2] = clip;
        scalars[3] = isfinite(norm) ? 1.0f : 0.0f;
    }
}

// clip (factor from the device, no host round trip) + AdamW, exactly as model_step on the CPU;
// nothing at all when the norm is not finite: a NaN gradient must never reach the parameters
__global__ void adamw_kernel(float* params, float* m, float* v, const float* grads, size_t n, const float* scalars,
                             float beta1, float beta2, float eps, float decay, float step_size, float bc2_sqrt) {
    if (scalars[3] == 0.0f) return;
    float clip = scalars[2];
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float g = grads[i] * clip;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        params[i] = params[i] * decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

// one piece of the recurrent weights: n floats at flat[flat_off] <-> weight space [ws_off]
typedef struct { size_t flat_off, ws_off, n; } WeightSeg;

// blockIdx.y picks the segment; ws <- flat
__global__ void segments_to_ws_kernel(float* ws, const float* flat, const WeightSeg* segs) {
    WeightSeg s = segs[blockIdx.y];
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < s.n; i += (size_t)gridDim.x * blockDim.x)
        ws[s.ws_off + i] = flat[s.flat_off + i];
}

// flat += ws (gradients accumulate, as every backward here does)
__global__ void segments_add_kernel(float* flat, const float* ws, const WeightSeg* segs) {
    WeightSeg s = segs[blockIdx.y];
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < s.n; i += (size_t)gridDim.x * blockDim.x)
        flat[s.flat_off + i] += ws[s.ws_off + i];
}

__global__ void fill_kernel(float* x, float value, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] = value;
}

// x[i] uniform in [-scale, scale), from (seed, i) alone: test data for the algorithm check
__global__ void uniform_fill_kernel(float* x, size_t n, float scale, uint64_t seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float u = (float)(mix64(seed + (i + 1) * RNG_GAMMA) >> 40) * (1.0f / 16777216.0f);
        x[i] = (2.0f * u - 1.0f) * scale;
    }
}
