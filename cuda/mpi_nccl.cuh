// mpi_nccl.cuh: data-parallel GPU training (./train_gpu_mpi, built with -DUSE_MPI and NCCL). One GPU
// per rank (its index among the ranks of its machine), one NCCL communicator over all ranks,
// bootstrapped over MPI as llm.c does: rank 0 creates the ncclUniqueId and broadcasts it. The step's
// loss and gradients are averaged on the device by ncclAllReduce, the counterpart of dist_step_mean
// (c/dist.h) for device buffers; everything else (agreement on failures, eval, checkpoints) is the
// driver's host-side MPI. Without USE_MPI (./train_gpu) these are no-ops for one process. The
// step's all-reduce time goes into dist.comm_ms, as dist_step_mean's does (train_gpu_mpi logs it).
#pragma once
#include "../c/dist.h"     // dist, dist_agree, MPI_CHECK
#include "gpu_check.cuh"   // CUDA_CHECK

#include <cuda_runtime.h>

#ifdef USE_MPI
#include <nccl.h>

static ncclComm_t nccl_comm = NULL;

// a failed NCCL call leaves the other ranks inside a collective: like a failed MPI call, it aborts the job
static cudaEvent_t nccl_events[2];   // around the step's all-reduce, on the step's stream
static int nccl_timing = 0;          // nccl_step_mean recorded them: nccl_step_timed reads them

__attribute__((noreturn)) static void nccl_abort(const char* call, ncclResult_t r, const char* file, int line) {
    fprintf(stderr, "error: rank %d: %s failed: %s (%s:%d); stopping every rank\n", dist.rank, call,
            ncclGetErrorString(r), file, line);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}
#define NCCL_CHECK(call) do { ncclResult_t r_ = (call); \
    if (r_ != ncclSuccess) nccl_abort(#call, r_, __FILE__, __LINE__); } while (0)

// selects this rank's GPU and joins the communicator; every rank calls it once, before allocating
// anything on the device. A rank that cannot (too few GPUs) fails on every rank, agreed, before the
// collective NCCL setup that would otherwise wait for it.
static int nccl_init(void) {
    if (dist.size == 1 || nccl_comm) return 0;
    int n_dev = 0, status = 0;
    cudaError_t e = cudaGetDeviceCount(&n_dev);
    if (e != cudaSuccess) status = fail("cudaGetDeviceCount: %s", cudaGetErrorString(e));
    else if (dist.local_ranks > n_dev)
        status = fail("%d ranks share a machine with %d GPUs: NCCL needs a GPU of its own for each rank",
                      dist.local_ranks, n_dev);
    else if ((e = cudaSetDevice(dist.local_rank)) != cudaSuccess)
        status = fail("cudaSetDevice(%d): %s", dist.local_rank, cudaGetErrorString(e));
    if (dist_agree(status)) return -1;
    ncclUniqueId id;
    if (dist.rank == 0) NCCL_CHECK(ncclGetUniqueId(&id));
    MPI_CHECK(MPI_Bcast(&id, (int)sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD));
    NCCL_CHECK(ncclCommInitRank(&nccl_comm, dist.size, id, dist.rank));
    CUDA_CHECK(cudaEventCreate(&nccl_events[0]));
    CUDA_CHECK(cudaEventCreate(&nccl_events[1]));
    return 0;
}

static void nccl_free(void) {
    ncclResult_t r = nccl_comm ? ncclCommDestroy(nccl_comm) : ncclSuccess;
    if (r != ncclSuccess) fprintf(stderr, "warning: rank %d: ncclCommDestroy: %s\n", dist.rank, ncclGetErrorString(r));
    for (int i = 0; i < 2; i++) if (nccl_events[i]) CUDA_RELEASE(cudaEventDestroy(nccl_events[i]));
    nccl_comm = NULL;
    nccl_events[0] = nccl_events[1] = NULL;
}

// a backend's train_step calls this between its backward pass and its update, on every rank, with
// the outcome so far (0 or -1): the ranks agree on the step (host MPI), then the device's loss (one
// float) and gradients (n floats) become their means over the ranks, in one NCCL group on stream.
// The agreement's time counts at once; the all-reduce's, which runs on the device, once the step
// has been waited for (nccl_step_timed).
static int nccl_step_mean(int status, float* d_loss, float* d_grads, size_t n, cudaStream_t stream) {
    dist.step_averaged = 1;
    nccl_timing = 0;
    double t0 = dist_now_ms();
    if (dist_agree(status)) return -1;
    dist.comm_ms += dist_now_ms() - t0;
    if (dist.size == 1) return 0;
    CUDA_CHECK(cudaEventRecord(nccl_events[0], stream));
    NCCL_CHECK(ncclGroupStart());
    NCCL_CHECK(ncclAllReduce(d_grads, d_grads, n, ncclFloat, ncclAvg, nccl_comm, stream));
    NCCL_CHECK(ncclAllReduce(d_loss, d_loss, 1, ncclFloat, ncclAvg, nccl_comm, stream));
    NCCL_CHECK(ncclGroupEnd());
    CUDA_CHECK(cudaEventRecord(nccl_events[1], stream));
    nccl_timing = 1;
    return 0;
}

// after the step's wait: the all-reduce's time on the device (waiting for the slowest rank included)
static int nccl_step_timed(void) {
    if (!nccl_timing) return 0;
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, nccl_events[0], nccl_events[1]));
    dist.comm_ms += ms;
    nccl_timing = 0;
    return 0;
}

#else   // one process

static int nccl_init(void) { return 0; }
static void nccl_free(void) {}
static int nccl_step_mean(int status, float* d_loss, float* d_grads, size_t n, cudaStream_t stream) {
    (void)d_loss; (void)d_grads; (void)n; (void)stream;
    dist.step_averaged = 1;
    return status;
}
static int nccl_step_timed(void) { return 0; }

#endif
