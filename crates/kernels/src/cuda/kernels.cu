// Fused BatchNorm(+ReLU) and SGD kernels for mixbench (f32, NCHW viewed as [N, C, P]).
//
// The arithmetic mirrors the CPU kernels in src/cpu/batch_norm.rs and src/sgd.rs operation by
// operation. Element-wise results use explicit round-to-nearest intrinsics (__fmul_rn, ...)
// because nvcc would otherwise contract a*b+c into one FMA and the CPU code rounds twice; with
// them the SGD update is bit-identical to the CPU one and the BN forward differs from CPU only
// through the statistics (whose summation order necessarily differs).
//
// Reductions are per-channel, one block per channel, accumulated in f64 with a fixed tree order,
// so they are deterministic run to run (no atomics).

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

// stats = [mean (C), biased var (C)]; grid = C blocks. With `update`, thread 0 also applies the
// running-statistics update in place, rounded as the CPU's running_update():
// running = (running*keep + 0) + (batch*take + 0), the variance first unbiased as var*unbias + 0.
extern "C" __global__ void mixbench_bn_stats_f32(const float *__restrict__ x, float *__restrict__ stats,
                                               int n, int c, int p, float *__restrict__ run_mean,
                                               float *__restrict__ run_var, float keep, float take,
                                               float unbias, int update) {
  __shared__ double sh[33];
  const int ch = blockIdx.x;
  const long count = (long)n * p;
  double s = 0.0;
  for (long i = threadIdx.x; i < count; i += blockDim.x) {
    const long img = i / p, q = i - img * p;
    s += (double)x[(img * c + ch) * p + q];
  }
  const double total = block_sum(s, sh);
  const float mean = (float)(total / (double)count);
  double sq = 0.0;
  for (long i = threadIdx.x; i < count; i += blockDim.x) {
    const long img = i / p, q = i - img * p;
    const float d = __fsub_rn(x[(img * c + ch) * p + q], mean);
    sq += (double)__fmul_rn(d, d);
  }
  const double sq_total = block_sum(sq, sh);
  if (threadIdx.x == 0) {
    const float var = (float)(sq_total / (double)count);
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
}

// y = x * scale + shift (+ReLU); w, b (C), stats = [mean, var] (2C); grid = N*C blocks
// (one per plane), threads stride over the plane.
extern "C" __global__ void mixbench_bn_fwd_f32(const float *__restrict__ x, const float *__restrict__ w,
                                             const float *__restrict__ bias, const float *__restrict__ st,
                                             float *__restrict__ y, int c, int p, double eps, int relu) {
  const long plane = blockIdx.x;
  const int ch = (int)(plane % c);
  const float s = scale_of(w[ch], st[c + ch], eps);
  const float t = __fsub_rn(bias[ch], __fmul_rn(st[ch], s));
  const float *xp = x + plane * p;
  float *yp = y + plane * p;
  for (int q = threadIdx.x; q < p; q += blockDim.x) {
    float v = __fadd_rn(__fmul_rn(xp[q], s), t);
    yp[q] = relu ? fmaxf(v, 0.0f) : v;
  }
}

__device__ __forceinline__ float masked_grad(float xv, float dy, float s, float t, int relu) {
  return (relu && __fadd_rn(__fmul_rn(xv, s), t) <= 0.0f) ? 0.0f : dy;
}

// Backward, pass 1: gp = [d weight = sum(dy*xhat), d bias = sum(dy)] (2C); grid = C.
extern "C" __global__ void mixbench_bn_bwd_reduce_f32(const float *__restrict__ x, const float *__restrict__ w,
                                                    const float *__restrict__ bias, const float *__restrict__ st,
                                                    const float *__restrict__ dy, float *__restrict__ gp,
                                                    int n, int c, int p, double eps, int relu) {
  __shared__ double sh[33];
  const int ch = blockIdx.x;
  const long count = (long)n * p;
  const float s = scale_of(w[ch], st[c + ch], eps);
  const float t = __fsub_rn(bias[ch], __fmul_rn(st[ch], s));
  const float m = st[ch];
  const float is = inv_std_of(st[c + ch], eps);
  double a = 0.0, b = 0.0;
  for (long i = threadIdx.x; i < count; i += blockDim.x) {
    const long img = i / p, q = i - img * p;
    const long off = (img * c + ch) * p + q;
    const float xv = x[off];
    const float d = masked_grad(xv, dy[off], s, t, relu);
    a += (double)d;
    b += (double)__fmul_rn(__fmul_rn(d, __fsub_rn(xv, m)), is);
  }
  const double sum_dy = block_sum(a, sh);
  const double sum_dy_xhat = block_sum(b, sh);
  if (threadIdx.x == 0) {
    gp[ch] = (float)sum_dy_xhat;
    gp[c + ch] = (float)sum_dy;
  }
}

// Backward, pass 2: dx = w*inv_std * (d - mean(d) - xhat * mean(d*xhat)); grid = N*C planes.
extern "C" __global__ void mixbench_bn_bwd_dx_f32(const float *__restrict__ x, const float *__restrict__ w,
                                                const float *__restrict__ bias, const float *__restrict__ st,
                                                const float *__restrict__ dy, const float *__restrict__ gp,
                                                float *__restrict__ dx, int n, int c, int p, double eps,
                                                int relu) {
  const long plane = blockIdx.x;
  const int ch = (int)(plane % c);
  const float cnt = (float)((long)n * p);
  const float s = scale_of(w[ch], st[c + ch], eps);
  const float t = __fsub_rn(bias[ch], __fmul_rn(st[ch], s));
  const float m = st[ch];
  const float is = inv_std_of(st[c + ch], eps);
  const float k = __fmul_rn(w[ch], is);
  const float mdy = __fdiv_rn(gp[c + ch], cnt);
  const float mdyx = __fdiv_rn(gp[ch], cnt);
  const float *xp = x + plane * p;
  const float *dp = dy + plane * p;
  float *op = dx + plane * p;
  for (int q = threadIdx.x; q < p; q += blockDim.x) {
    const float xv = xp[q];
    const float d = masked_grad(xv, dp[q], s, t, relu);
    const float xhat = __fmul_rn(__fsub_rn(xv, m), is);
    op[q] = __fmul_rn(k, __fsub_rn(__fsub_rn(d, mdy), __fmul_rn(xhat, mdyx)));
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
