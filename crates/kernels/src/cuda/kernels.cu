// Fused BatchNorm(+ReLU) and SGD kernels for mixbench (f32, NCHW viewed as [N, C, P]).
//
// The arithmetic mirrors the CPU kernels in src/cpu/batch_norm.rs and src/sgd.rs operation by
// operation. Element-wise results use explicit round-to-nearest intrinsics (__fmul_rn, ...)
// because nvcc would otherwise contract a*b+c into one FMA and the CPU code rounds twice; with
// them the SGD update is bit-identical to the CPU one and the BN forward differs from CPU only
// through the statistics (whose summation order necessarily differs).
//
// Reductions are per channel over a 2-D grid (channel x chunk of images), accumulated in f64: each
// block reduces its chunk with a fixed tree, and a second pass adds the chunks in chunk order, so
// results are deterministic run to run (no atomics).

#include <stddef.h>
#include <stdint.h>

#define MAX_THREADS 1024

// Sum of `v` over the block, in a fixed order; every thread gets the result.
__device__ double block_sum(double v, double *sh) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  __syncthreads();  // sh may still be read from a previous call
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? sh[lane] : 0.0;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) sh[32] = v;
  }
  __syncthreads();
  return sh[32];
}

__device__ __forceinline__ float inv_std_of(float var, double eps) {
  // CPU: 1.0 / ((v as f64 + eps).sqrt() as f32)
  return __fdiv_rn(1.0f, (float)sqrt((double)var + eps));
}

__device__ __forceinline__ float scale_of(float w, float var, double eps) {
  // CPU: w / ((v as f64 + eps).sqrt() as f32)
  return __fdiv_rn(w, (float)sqrt((double)var + eps));
}

// A strided walk over the values of one channel of a [N, C, P] tensor, in the flat per-channel
// index j = img * P + q, that tracks (img, q) without a division per step: the stride is split
// once into whole images and positions, and a position past the plane carries into the image.
struct ChannelWalk {
  int img, q, step_img, step_q, p;
  // Starts at image img0 plus flat index `start`, advancing by `stride` values per step.
  __device__ __forceinline__ ChannelWalk(int img0, int start, int stride, int p_)
      : img(img0 + start / p_), q(start % p_), step_img(stride / p_), step_q(stride % p_), p(p_) {}
  __device__ __forceinline__ void next() {
    img += step_img;
    q += step_q;
    if (q >= p) {
      q -= p;
      ++img;
    }
  }
  // Offset of the current value of channel ch.
  __device__ __forceinline__ long offset(int c, int ch) const { return ((long)img * c + ch) * p + q; }
};

// Index of the (channel, chunk) partial sums: part[2 * slot] and part[2 * slot + 1].
__device__ __forceinline__ long partial_slot(int ch, int chunk, int chunks) { return (long)ch * chunks + chunk; }

// Batch statistics, pass 1: grid = (chunks, C); block (k, ch) sums x and x*x (in f64) over images
// [k * ipc, min(n, (k + 1) * ipc)) of channel ch into part[2 * slot], part[2 * slot + 1].
extern "C" __global__ void mixbench_bn_stats_partial_f32(const float *__restrict__ x, double *__restrict__ part,
                                                       int n, int c, int p, int ipc) {
  __shared__ double sh[33];
  const int ch = blockIdx.y, k = blockIdx.x;
  if (ch >= c || p <= 0) return;  // whole block: no barrier is skipped by part of it
  const int img1 = min(n, (k + 1) * ipc);
  double s = 0.0, sq = 0.0;
  for (ChannelWalk it(k * ipc, threadIdx.x, blockDim.x, p); it.img < img1; it.next()) {
    const double v = (double)x[it.offset(c, ch)];
    s += v;
    sq += v * v;
  }
  s = block_sum(s, sh);
  sq = block_sum(sq, sh);
  if (threadIdx.x == 0) {
    const long slot = partial_slot(ch, k, gridDim.x);
    part[2 * slot] = s;
    part[2 * slot + 1] = sq;
  }
}

// Batch statistics, pass 2: one thread per channel adds its chunks' partial sums in chunk order
// (so the result does not depend on scheduling), then stats = [mean (C), biased var (C)] with
// var = E[x^2] - mean^2 in f64. With `update`, also the running statistics in place, rounded as
// the CPU's running_update(): running = (running*keep + 0) + (batch*take + 0), the variance
// first unbiased as var*unbias + 0.
extern "C" __global__ void mixbench_bn_stats_final_f32(const double *__restrict__ part, float *__restrict__ stats,
                                                     int c, int chunks, double count, float *__restrict__ run_mean,
                                                     float *__restrict__ run_var, float keep, float take,
                                                     float unbias, int update) {
  const int ch = blockIdx.x * blockDim.x + threadIdx.x;
  if (ch >= c) return;
  double s = 0.0, sq = 0.0;
  for (int k = 0; k < chunks; ++k) {
    const long slot = partial_slot(ch, k, chunks);
    s += part[2 * slot];
    sq += part[2 * slot + 1];
  }
  const double m = s / count;
  const float mean = (float)m;
  const float var = (float)fmax(sq / count - m * m, 0.0);
  stats[ch] = mean;
  stats[c + ch] = var;
  if (update) {
    run_mean[ch] = __fadd_rn(__fadd_rn(__fmul_rn(run_mean[ch], keep), 0.0f),
                             __fadd_rn(__fmul_rn(mean, take), 0.0f));
    const float unb = __fadd_rn(__fmul_rn(var, unbias), 0.0f);
    run_var[ch] = __fadd_rn(__fadd_rn(__fmul_rn(run_var[ch], keep), 0.0f),
                            __fadd_rn(__fmul_rn(unb, take), 0.0f));
  }
}

// y = x * scale + shift (+ReLU); w, b (C), stats = [mean, var] (2C). grid = (blocks, C): the
// blocks of channel ch stride over its n * p values (a grid-stride loop per channel, so small
// planes keep every lane busy). Nothing runs for an empty channel.
extern "C" __global__ void mixbench_bn_fwd_f32(const float *__restrict__ x, const float *__restrict__ w,
                                             const float *__restrict__ bias, const float *__restrict__ st,
                                             float *__restrict__ y, int n, int c, int p, double eps, int relu) {
  const int ch = blockIdx.y;
  if (ch >= c || p <= 0) return;
  const float s = scale_of(w[ch], st[c + ch], eps);
  const float t = __fsub_rn(bias[ch], __fmul_rn(st[ch], s));
  for (ChannelWalk it(0, blockIdx.x * blockDim.x + threadIdx.x, gridDim.x * blockDim.x, p); it.img < n;
       it.next()) {
    const long o = it.offset(c, ch);
    const float v = __fadd_rn(__fmul_rn(x[o], s), t);
    y[o] = relu ? fmaxf(v, 0.0f) : v;
  }
}

__device__ __forceinline__ float masked_grad(float xv, float dy, float s, float t, int relu) {
  return (relu && __fadd_rn(__fmul_rn(xv, s), t) <= 0.0f) ? 0.0f : dy;
}

// Backward, pass 1: grid = (chunks, C) as the statistics' pass 1; part[2 * slot] = sum(dy),
// part[2 * slot + 1] = sum(dy * xhat) over the block's images (dy masked by the ReLU).
extern "C" __global__ void mixbench_bn_bwd_partial_f32(const float *__restrict__ x, const float *__restrict__ w,
                                                     const float *__restrict__ bias, const float *__restrict__ st,
                                                     const float *__restrict__ dy, double *__restrict__ part, int n,
                                                     int c, int p, int ipc, double eps, int relu) {
  __shared__ double sh[33];
  const int ch = blockIdx.y, k = blockIdx.x;
  if (ch >= c || p <= 0) return;
  const float s = scale_of(w[ch], st[c + ch], eps);
  const float t = __fsub_rn(bias[ch], __fmul_rn(st[ch], s));
  const float m = st[ch];
  const float is = inv_std_of(st[c + ch], eps);
  const int img1 = min(n, (k + 1) * ipc);
  double a = 0.0, b = 0.0;
  for (ChannelWalk it(k * ipc, threadIdx.x, blockDim.x, p); it.img < img1; it.next()) {
    const long o = it.offset(c, ch);
    const float xv = x[o];
    const float d = masked_grad(xv, dy[o], s, t, relu);
    a += (double)d;
    b += (double)__fmul_rn(__fmul_rn(d, __fsub_rn(xv, m)), is);
  }
  a = block_sum(a, sh);
  b = block_sum(b, sh);
  if (threadIdx.x == 0) {
    const long slot = partial_slot(ch, k, gridDim.x);
    part[2 * slot] = a;
    part[2 * slot + 1] = b;
  }
}

// Backward, pass 2: dx = w*inv_std * (d - mean(d) - xhat * mean(d*xhat)); grid = (blocks, C) as
// the forward. Every block first adds its channel's `chunks` partial sums in chunk order (the
// same values in every block, deterministic); blocks with blockIdx.x == 0 also write
// gp = [d weight = sum(dy*xhat) (C), d bias = sum(dy) (C)].
extern "C" __global__ void mixbench_bn_bwd_dx_f32(const float *__restrict__ x, const float *__restrict__ w,
                                                const float *__restrict__ bias, const float *__restrict__ st,
                                                const float *__restrict__ dy, const double *__restrict__ part,
                                                int chunks, float *__restrict__ gp, float *__restrict__ dx, int n,
                                                int c, int p, double eps, int relu) {
  const int ch = blockIdx.y;
  if (ch >= c || p <= 0) return;
  double sum_dy = 0.0, sum_dy_xhat = 0.0;
  for (int j = 0; j < chunks; ++j) {
    const long slot = partial_slot(ch, j, chunks);
    sum_dy += part[2 * slot];
    sum_dy_xhat += part[2 * slot + 1];
  }
  const float gw = (float)sum_dy_xhat, gb = (float)sum_dy;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    gp[ch] = gw;
    gp[c + ch] = gb;
  }
  const float cnt = (float)((long)n * p);
  const float s = scale_of(w[ch], st[c + ch], eps);
  const float t = __fsub_rn(bias[ch], __fmul_rn(st[ch], s));
  const float m = st[ch];
  const float is = inv_std_of(st[c + ch], eps);
  const float k = __fmul_rn(w[ch], is);
  const float mdy = __fdiv_rn(gb, cnt);
  const float mdyx = __fdiv_rn(gw, cnt);
  for (ChannelWalk it(0, blockIdx.x * blockDim.x + threadIdx.x, gridDim.x * blockDim.x, p); it.img < n;
       it.next()) {
    const long o = it.offset(c, ch);
    const float xv = x[o];
    const float d = masked_grad(xv, dy[o], s, t, relu);
    const float xhat = __fmul_rn(__fsub_rn(xv, m), is);
    dx[o] = __fmul_rn(k, __fsub_rn(__fsub_rn(d, mdy), __fmul_rn(xhat, mdyx)));
  }
}

// One SGD update (see mixbench_sgd_f32), shared by the single and multi-tensor kernels.
__device__ __forceinline__ void sgd_elem(float *__restrict__ theta, const float *__restrict__ grad,
                                         float *__restrict__ buf, uint64_t i, float wd, float mu, float lr,
                                         int flags) {
  const float th = theta[i];
  float g = grad[i];
  if (flags & 1) g = __fadd_rn(g, __fadd_rn(__fmul_rn(th, wd), 0.0f));
  float d = g;
  if (flags & 2) {
    const float b = (flags & 4) ? g : __fadd_rn(__fadd_rn(__fmul_rn(buf[i], mu), 0.0f), g);
    buf[i] = b;
    d = (flags & 8) ? __fadd_rn(g, __fadd_rn(__fmul_rn(b, mu), 0.0f)) : b;
  }
  theta[i] = __fsub_rn(th, __fadd_rn(__fmul_rn(d, lr), 0.0f));
}

// Tensors per multi-tensor launch: build.rs passes -DSGD_MULTI_MAX from the one definition that
// the Rust side uses too (src/sgd_multi_max.in).
#ifndef SGD_MULTI_MAX
#error "SGD_MULTI_MAX is defined by build.rs (nvcc -DSGD_MULTI_MAX=...)"
#endif

// Argument block of the multi-tensor update, passed by value; mirrors SgdMultiArgs in
// src/cuda/sgd.rs, which asserts the same size and offsets.
struct SgdMultiArgs {
  float *theta[SGD_MULTI_MAX];
  const float *grad[SGD_MULTI_MAX];
  float *buf[SGD_MULTI_MAX];
  uint64_t n[SGD_MULTI_MAX];
  unsigned int count;
  unsigned int pad;
};
static_assert(sizeof(SgdMultiArgs) == 32 * SGD_MULTI_MAX + 8, "SgdMultiArgs layout differs from src/cuda/sgd.rs");
static_assert(offsetof(SgdMultiArgs, n) == 24 * SGD_MULTI_MAX, "SgdMultiArgs.n offset differs from src/cuda/sgd.rs");
static_assert(offsetof(SgdMultiArgs, count) == 32 * SGD_MULTI_MAX, "SgdMultiArgs.count offset differs from src/cuda/sgd.rs");
// With the kernel's four 4-byte scalars, under the 4 KiB parameter limit of every CUDA version.
static_assert(sizeof(SgdMultiArgs) + 16 <= 4096, "SgdMultiArgs exceeds the 4 KiB kernel-parameter limit");

// Multi-tensor SGD: blockIdx.y selects the tensor, blocks along x stride over its elements.
extern "C" __global__ void mixbench_sgd_multi_f32(const SgdMultiArgs args, float wd, float mu, float lr,
                                                int flags) {
  const unsigned int t = blockIdx.y;
  if (t >= args.count) return;
  float *theta = args.theta[t];
  const float *grad = args.grad[t];
  float *buf = args.buf[t];
  const uint64_t n = args.n[t];
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    sgd_elem(theta, grad, buf, i, wd, mu, lr, flags);
  }
}

// SGD with momentum and weight decay, PyTorch order, in place on theta and buf.
// flags: 1 = weight decay, 2 = momentum, 4 = first step (buf = g), 8 = Nesterov.
// Each `x.affine(a, 0.0)` of the reference is `x * a + 0.0`; the `+ 0.0` is kept so that even
// the sign of zero matches.
extern "C" __global__ void mixbench_sgd_f32(float *__restrict__ theta, const float *__restrict__ grad,
                                          float *__restrict__ buf, uint64_t n, float wd, float mu, float lr,
                                          int flags) {
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    const float th = theta[i];
    float g = grad[i];
    if (flags & 1) g = __fadd_rn(g, __fadd_rn(__fmul_rn(th, wd), 0.0f));
    float d = g;
    if (flags & 2) {
      const float b = (flags & 4) ? g : __fadd_rn(__fadd_rn(__fmul_rn(buf[i], mu), 0.0f), g);
      buf[i] = b;
      d = (flags & 8) ? __fadd_rn(g, __fadd_rn(__fmul_rn(b, mu), 0.0f)) : b;
    }
    theta[i] = __fsub_rn(th, __fadd_rn(__fmul_rn(d, lr), 0.0f));
  }
}

// Residual y = max(a + b, 0), as candle's (a + b).relu().
extern "C" __global__ void mixbench_add_relu_f32(const float *__restrict__ a, const float *__restrict__ b,
                                               float *__restrict__ y, uint64_t n) {
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    y[i] = fmaxf(__fadd_rn(a[i], b[i]), 0.0f);
  }
}

// Its backward: g = dy * (a + b >= 0 ? 1 : 0), candle's ReLU-gradient convention (passes at 0).
extern "C" __global__ void mixbench_add_relu_bwd_f32(const float *__restrict__ a, const float *__restrict__ b,
                                                   const float *__restrict__ dy, float *__restrict__ g,
                                                   uint64_t n) {
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    g[i] = __fmul_rn(dy[i], __fadd_rn(a[i], b[i]) >= 0.0f ? 1.0f : 0.0f);
  }
}

// Soft-target cross-entropy, loss = (1/rows) sum_i sum_c t_ic (lse_i - z_ic), terms with t = 0
// skipped; as cpu::loss, in f64. One block of a power-of-two number of threads: rows strided
// over the threads, then a fixed-order tree reduction (deterministic).
extern "C" __global__ void mixbench_soft_ce_f32(const float *__restrict__ z, const float *__restrict__ t,
                                              float *__restrict__ out, uint32_t rows, uint32_t classes) {
  __shared__ double part[256];
  double acc = 0.0;
  for (uint32_t i = threadIdx.x; i < rows; i += blockDim.x) {
    const float *zr = z + (size_t)i * classes;
    const float *tr = t + (size_t)i * classes;
    double m = (double)zr[0];
    for (uint32_t c = 1; c < classes; ++c) m = fmax(m, (double)zr[c]);
    double s = 0.0;
    for (uint32_t c = 0; c < classes; ++c) s += exp((double)zr[c] - m);
    const double lse = m + log(s);
    for (uint32_t c = 0; c < classes; ++c) {
      if (tr[c] != 0.0f) acc += (double)tr[c] * (lse - (double)zr[c]);
    }
  }
  part[threadIdx.x] = acc;
  __syncthreads();
  for (uint32_t w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = (float)(part[0] / (double)(rows > 0 ? rows : 1));
}

// Its backward: dz_ic = g / rows * (softmax(z_i)_c * sum_c t_ic - t_ic), one thread per row.
extern "C" __global__ void mixbench_soft_ce_bwd_f32(const float *__restrict__ z, const float *__restrict__ t,
                                                  const float *__restrict__ g, float *__restrict__ dz,
                                                  uint32_t rows, uint32_t classes) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  const float *zr = z + (size_t)i * classes;
  const float *tr = t + (size_t)i * classes;
  double m = (double)zr[0], mass = 0.0;
  for (uint32_t c = 0; c < classes; ++c) {
    m = fmax(m, (double)zr[c]);
    mass += (double)tr[c];
  }
  double s = 0.0;
  for (uint32_t c = 0; c < classes; ++c) s += exp((double)zr[c] - m);
  const double lse = m + log(s);
  const double scale = (double)g[0] / (double)rows;
  for (uint32_t c = 0; c < classes; ++c) {
    dz[(size_t)i * classes + c] = (float)(scale * (exp((double)zr[c] - lse) * mass - (double)tr[c]));
  }
}
