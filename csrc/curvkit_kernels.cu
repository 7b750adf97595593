// curvkit's fused CUDA kernels: the CUDA implementations of the ops that curvkit_kernels.cpp defines.
//
// Multi-tensor launches: one launch covers every tensor of a list. The host packs one TensorMeta per
// tensor (pointers, sizes, per-tensor scalars, index of its first CUDA block) into a pinned buffer that
// is copied to the device asynchronously; each CUDA block finds its tensor by binary search over the
// first-block indices and processes one chunk of kChunk elements of it. The per-element arithmetic
// (elementwise.h) and the Philox probes (philox.h) are the same code as on the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <vector>

#include "common.h"
#include "elementwise.h"
#include "philox.h"

namespace curvkit {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;  // elements per CUDA block
constexpr int kProbeGroup = 4;    // consecutive probes per thread, sharing one Philox call

struct TensorMeta {
  void* ptr[6];         // the op's buffers for this tensor, in argument order (null where absent)
  int64_t numel;
  int64_t window;       // the curvature estimate is averaged over runs of `window` consecutive elements
  int64_t base;         // flat index of element 0 in a probe draw
  double scalar[2];     // per-tensor scalars (AdaHessian: -lr / bc1, bc2)
  int64_t first_block;  // index of the first CUDA block working on this tensor
};

// One TensorMeta per tensor of `lists` (all of equal length); returns the metadata on `device` and the
// number of CUDA blocks. The pinned host buffer is released only once the asynchronous copy is done.
at::Tensor upload_meta(const std::vector<at::TensorList>& lists, const std::vector<int64_t>& windows,
                       const std::vector<std::array<double, 2>>& scalars, const at::Device& device,
                       int64_t* blocks) {
  const size_t n = lists.front().size();
  const auto bases = flat_bases(lists.front());
  std::vector<TensorMeta> meta(n);
  int64_t first = 0;
  for (size_t j = 0; j < n; ++j) {
    TensorMeta& t = meta[j];
    for (size_t k = 0; k < 6; ++k)
      t.ptr[k] = k < lists.size() && !lists[k].empty() ? lists[k][j].data_ptr() : nullptr;
    t.numel = lists.front()[j].numel();
    t.window = windows.empty() ? 1 : windows[j];
    t.base = bases[j];
    t.scalar[0] = scalars.empty() ? 0.0 : scalars[j][0];
    t.scalar[1] = scalars.empty() ? 0.0 : scalars[j][1];
    t.first_block = first;
    first += (t.numel + kChunk - 1) / kChunk;
  }
  *blocks = first;
  auto host = at::empty({static_cast<int64_t>(n * sizeof(TensorMeta))},
                        at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), meta.data(), n * sizeof(TensorMeta));
  return host.to(device, /*non_blocking=*/true);
}

// The tensor that CUDA block `block` works on: the last one whose first_block <= block.
__device__ __forceinline__ int find_tensor(const TensorMeta* meta, int n, int64_t block) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (meta[mid].first_block <= block) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

struct ChunkRange {
  int tensor;
  int64_t begin, end;
};

__device__ __forceinline__ ChunkRange my_chunk(const TensorMeta* meta, int n) {
  const int j = find_tensor(meta, n, blockIdx.x);
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) - meta[j].first_block) * kChunk;
  const int64_t end = begin + kChunk < meta[j].numel ? begin + kChunk : meta[j].numel;
  return {j, begin, end};
}

void rademacher_inplace_cuda(at::TensorList out, int64_t seed, int64_t offset);

// ------------------------------------------------------------------------------------ updates
// ptr = {params, grads, exp_avg, second state (exp_hess_sq or hessian), curvature, probes}. The curvature
// estimate d_i is c[i], or z[i] * c[i] with probes z (c = Hz), averaged over the run of `window`
// consecutive elements that holds i (each thread sums its own run: windows are a conv kernel's few taps).
template <typename scalar_t, typename Element>
__device__ __forceinline__ void update_chunk(const TensorMeta& t, const ChunkRange& c, const Element& element) {
  using T = at::opmath_type<scalar_t>;
  scalar_t* p = static_cast<scalar_t*>(t.ptr[0]);
  const scalar_t* g = static_cast<const scalar_t*>(t.ptr[1]);
  scalar_t* m = static_cast<scalar_t*>(t.ptr[2]);
  scalar_t* s = static_cast<scalar_t*>(t.ptr[3]);
  const scalar_t* cv = static_cast<const scalar_t*>(t.ptr[4]);
  const scalar_t* z = static_cast<const scalar_t*>(t.ptr[5]);
  const int64_t window = t.window;
  auto estimate = [&](int64_t k) -> T {
    return static_cast<T>(z == nullptr ? cv[k] : static_cast<scalar_t>(z[k] * cv[k]));
  };
#pragma unroll 4
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x) {
    T mi = m[i], si = s[i];
    T di = T(0);
    if (cv != nullptr) {
      if (window == 1) {
        di = estimate(i);
      } else {
        const int64_t first = i / window * window;
        for (int64_t k = first; k < first + window; ++k) di += estimate(k);
        di /= static_cast<T>(window);
      }
    }
    p[i] = element(cv != nullptr, static_cast<T>(p[i]), static_cast<T>(g[i]), di, mi, si);
    m[i] = mi;
    if (cv != nullptr) s[i] = si;
  }
}

template <typename scalar_t, bool kSqrt>
__global__ void adahessian_kernel(const TensorMeta* meta, int n, AdaHessianScalars<at::opmath_type<scalar_t>> shared) {
  using T = at::opmath_type<scalar_t>;
  const ChunkRange c = my_chunk(meta, n);
  const TensorMeta& t = meta[c.tensor];
  AdaHessianScalars<T> s = shared;
  s.step = static_cast<T>(t.scalar[0]);
  s.bc2 = static_cast<T>(t.scalar[1]);
  update_chunk<scalar_t>(t, c, [&](bool has_d, T p, T g, T d, T& m, T& v) {
    return has_d ? adahessian_element<T, kSqrt, true>(p, g, d, m, v, s)
                 : adahessian_element<T, kSqrt, false>(p, g, d, m, v, s);
  });
}

template <typename scalar_t>
__global__ void sophia_kernel(const TensorMeta* meta, int n, SophiaScalars<at::opmath_type<scalar_t>> s) {
  using T = at::opmath_type<scalar_t>;
  const ChunkRange c = my_chunk(meta, n);
  update_chunk<scalar_t>(meta[c.tensor], c, [&](bool has_d, T p, T g, T d, T& m, T& h) {
    return has_d ? sophia_element<T, true>(p, g, d, m, h, s) : sophia_element<T, false>(p, g, d, m, h, s);
  });
}

void adahessian_step_cuda(at::TensorList params, at::TensorList grads_in, at::TensorList exp_avg,
                          at::TensorList exp_hess_sq, at::TensorList curvature_in, at::TensorList probes_in,
                          at::IntArrayRef windows_arg, at::TensorList next_probes, int64_t probe_seed,
                          int64_t next_offset, double lr, double beta1, double beta2, double eps, double weight_decay,
                          double hessian_power, at::ArrayRef<double> bias_correction1,
                          at::ArrayRef<double> bias_correction2) {
  constexpr const char* op = "adahessian_step_";
  const auto [grads, curvature, probes, windows] =
      prepare_update(op, c10::DeviceType::CUDA, params, grads_in, "exp_avg", exp_avg, "exp_hess_sq", exp_hess_sq,
                     curvature_in, probes_in, windows_arg, next_probes);
  TORCH_CHECK(bias_correction1.size() == params.size() && bias_correction2.size() == params.size(),
              "curvkit::adahessian_step_: needs one bias correction of each kind per tensor");
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<std::array<double, 2>> scalars(params.size());
  for (size_t j = 0; j < params.size(); ++j) scalars[j] = {-lr / bias_correction1[j], bias_correction2[j]};
  int64_t blocks = 0;
  const at::Tensor meta = upload_meta({params, grads, exp_avg, exp_hess_sq, curvature, probes}, windows, scalars,
                                      params[0].device(), &blocks);
  if (blocks > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const auto* m = reinterpret_cast<const TensorMeta*>(meta.const_data_ptr());
    const int n = static_cast<int>(params.size());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), op, [&] {
      using T = at::opmath_type<scalar_t>;
      const auto s = adahessian_scalars<T>(lr, beta1, beta2, eps, weight_decay, hessian_power);
      if (hessian_power == 1.0) adahessian_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(m, n, s);
      else adahessian_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(m, n, s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  finish_update(params, exp_avg, exp_hess_sq, next_probes, probe_seed, next_offset, &rademacher_inplace_cuda);
}

void sophia_step_cuda(at::TensorList params, at::TensorList grads_in, at::TensorList exp_avg, at::TensorList hessian,
                      at::TensorList curvature_in, at::TensorList probes_in, at::TensorList next_probes,
                      int64_t probe_seed, int64_t next_offset, double lr, double beta1, double beta2, double rho,
                      double eps, double weight_decay) {
  constexpr const char* op = "sophia_step_";
  const auto [grads, curvature, probes, windows] =
      prepare_update(op, c10::DeviceType::CUDA, params, grads_in, "exp_avg", exp_avg, "hessian", hessian, curvature_in,
                     probes_in, {}, next_probes);
  const c10::cuda::CUDAGuard guard(params[0].device());
  int64_t blocks = 0;
  const at::Tensor meta = upload_meta({params, grads, exp_avg, hessian, curvature, probes}, windows, {},
                                      params[0].device(), &blocks);
  if (blocks > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const auto* m = reinterpret_cast<const TensorMeta*>(meta.const_data_ptr());
    const int n = static_cast<int>(params.size());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), op, [&] {
      using T = at::opmath_type<scalar_t>;
      sophia_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(m, n,
                                                               sophia_scalars<T>(lr, beta1, beta2, rho, eps,
                                                                                 weight_decay));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  finish_update(params, exp_avg, hessian, next_probes, probe_seed, next_offset, &rademacher_inplace_cuda);
}

// ------------------------------------------------------------------------------------ probes
// Calls f(i, z) for the local elements i of thread group `group` of a chunk (kProbeGroup consecutive
// elements), z their probes: one Philox call per group unless it straddles a 128-probe block.
template <typename T, typename F>
__device__ __forceinline__ void for_group_probes(uint64_t seed, uint64_t offset, int64_t base, int64_t i0,
                                                 int64_t end, const F& f) {
  int64_t block = (base + i0) / kProbesPerBlock;
  Philox4 bits = probe_bits(seed, offset, static_cast<uint64_t>(block));
#pragma unroll
  for (int k = 0; k < kProbeGroup; ++k) {
    const int64_t i = i0 + k;
    if (i >= end) break;
    const int64_t g = base + i;
    if (g / kProbesPerBlock != block) {
      block = g / kProbesPerBlock;
      bits = probe_bits(seed, offset, static_cast<uint64_t>(block));
    }
    f(i, probe_sign<T>(bits, g));
  }
}

template <typename scalar_t>
__global__ void rademacher_kernel(const TensorMeta* meta, int n, uint64_t seed, uint64_t offset) {
  using T = at::opmath_type<scalar_t>;
  const ChunkRange c = my_chunk(meta, n);
  const TensorMeta& t = meta[c.tensor];
  scalar_t* out = static_cast<scalar_t*>(t.ptr[0]);
  for (int64_t i0 = c.begin + threadIdx.x * kProbeGroup; i0 < c.end; i0 += blockDim.x * kProbeGroup)
    for_group_probes<T>(seed, offset, t.base, i0, c.end, [&](int64_t i, T z) { out[i] = static_cast<scalar_t>(z); });
}

// Sum over the block (any blockDim that is a multiple of 32, at most 1024); the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double value) {
  __shared__ double warp_sums[32];
  for (int delta = 16; delta > 0; delta /= 2) value += __shfl_down_sync(0xffffffffu, value, delta);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  value = threadIdx.x < blockDim.x / 32 ? warp_sums[lane] : 0.0;
  if (warp == 0)
    for (int delta = 16; delta > 0; delta /= 2) value += __shfl_down_sync(0xffffffffu, value, delta);
  return value;
}

// ptr = {acc, hz}; acc may alias hz (each element is read before it is written by the same thread).
template <typename scalar_t>
__global__ void accumulate_zhz_kernel(const TensorMeta* meta, int n, uint64_t seed, uint64_t offset,
                                      at::opmath_type<scalar_t> alpha, bool accumulate, double* dots) {
  using T = at::opmath_type<scalar_t>;
  const ChunkRange c = my_chunk(meta, n);
  const TensorMeta& t = meta[c.tensor];
  scalar_t* acc = static_cast<scalar_t*>(t.ptr[0]);
  const scalar_t* hz = static_cast<const scalar_t*>(t.ptr[1]);
  T dot = 0;
  for (int64_t i0 = c.begin + threadIdx.x * kProbeGroup; i0 < c.end; i0 += blockDim.x * kProbeGroup)
    for_group_probes<T>(seed, offset, t.base, i0, c.end, [&](int64_t i, T z) {
      const T zh = z * static_cast<T>(hz[i]);
      dot += zh;
      acc[i] = static_cast<scalar_t>(accumulate ? static_cast<T>(acc[i]) + alpha * zh : alpha * zh);
    });
  const double total = block_sum(static_cast<double>(dot));
  if (threadIdx.x == 0) atomicAdd(dots + c.tensor, total);
}

void rademacher_inplace_cuda(at::TensorList out, int64_t seed, int64_t offset) {
  constexpr const char* op = "rademacher_";
  check_lists(op, {{"out", out}}, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(out[0].device());
  int64_t blocks = 0;
  const at::Tensor meta = upload_meta({out}, {}, {}, out[0].device(), &blocks);
  if (blocks > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const auto* m = reinterpret_cast<const TensorMeta*>(meta.const_data_ptr());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out[0].scalar_type(), op, [&] {
      rademacher_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(m, static_cast<int>(out.size()),
                                                                   static_cast<uint64_t>(seed),
                                                                   static_cast<uint64_t>(offset));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  bump_versions(out);
}

std::vector<at::Tensor> rademacher_cuda(at::TensorList like, int64_t seed, int64_t offset) {
  auto out = empty_like_contiguous(like);
  rademacher_inplace_cuda(out, seed, offset);
  return out;
}

at::Tensor accumulate_zhz_cuda(at::TensorList acc, at::TensorList hz_in, int64_t seed, int64_t offset, double alpha,
                               bool accumulate) {
  const auto hz = contiguous(hz_in);
  constexpr const char* op = "accumulate_zhz_";
  check_lists(op, {{"acc", acc}, {"hz", hz}}, c10::DeviceType::CUDA);
  check_same_numel(op, acc, "hz", hz);
  const c10::cuda::CUDAGuard guard(acc[0].device());
  auto dots = at::zeros({static_cast<int64_t>(acc.size())}, acc[0].options().dtype(at::kDouble));
  int64_t blocks = 0;
  const at::Tensor meta = upload_meta({acc, hz}, {}, {}, acc[0].device(), &blocks);
  if (blocks > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const auto* m = reinterpret_cast<const TensorMeta*>(meta.const_data_ptr());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acc[0].scalar_type(), op, [&] {
      using T = at::opmath_type<scalar_t>;
      accumulate_zhz_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          m, static_cast<int>(acc.size()), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
          static_cast<T>(alpha), accumulate, dots.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  bump_versions(acc);
  return dots;
}

// ------------------------------------------------------------------------------------ GGN
// One warp per row: max, then sum exp(z - max) and sum exp(z - max) u, then the output, in the opmath type.
template <typename scalar_t>
__global__ void softmax_ce_hessian_product_kernel(const scalar_t* logits, const scalar_t* u, scalar_t* out,
                                                  int64_t rows, int64_t classes, at::opmath_type<scalar_t> scale) {
  using T = at::opmath_type<scalar_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const scalar_t* z = logits + row * classes;
  const scalar_t* ur = u + row * classes;
  T mx = -INFINITY;
  for (int64_t k = lane; k < classes; k += 32) {
    const T v = static_cast<T>(z[k]);
    mx = v > mx ? v : mx;
  }
  for (int delta = 16; delta > 0; delta /= 2) {
    const T v = __shfl_xor_sync(0xffffffffu, mx, delta);
    mx = v > mx ? v : mx;
  }
  T total = 0, weighted = 0;
  for (int64_t k = lane; k < classes; k += 32) {
    const T e = exp(static_cast<T>(z[k]) - mx);
    total += e;
    weighted += e * static_cast<T>(ur[k]);
  }
  for (int delta = 16; delta > 0; delta /= 2) {
    total += __shfl_xor_sync(0xffffffffu, total, delta);
    weighted += __shfl_xor_sync(0xffffffffu, weighted, delta);
  }
  const T inv = T(1) / total;
  const T dot = weighted * inv;
  for (int64_t k = lane; k < classes; k += 32) {
    const T p = exp(static_cast<T>(z[k]) - mx) * inv;
    const T uk = static_cast<T>(ur[k]);
    out[row * classes + k] = static_cast<scalar_t>(scale * (p * uk - p * dot));
  }
}

at::Tensor softmax_ce_hessian_product_cuda(const at::Tensor& logits, const at::Tensor& u, double scale) {
  TORCH_CHECK(logits.dim() == 2, "curvkit::softmax_ce_hessian_product: logits must be (rows, classes), got ",
              logits.sizes());
  TORCH_CHECK(u.sizes() == logits.sizes() && u.scalar_type() == logits.scalar_type() && u.device() == logits.device(),
              "curvkit::softmax_ce_hessian_product: u must match logits in shape, dtype and device");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "curvkit::softmax_ce_hessian_product: needs floating logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = logits.contiguous(), uc = u.contiguous();
  at::Tensor out = at::empty_like(z);
  const int64_t rows = z.size(0), classes = z.size(1);
  if (z.numel() == 0) return out;
  constexpr int kRowsPerBlock = kThreads / 32;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "softmax_ce_hessian_product", [&] {
    using T = at::opmath_type<scalar_t>;
    softmax_ce_hessian_product_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), uc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, classes,
        static_cast<T>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace curvkit

TORCH_LIBRARY_IMPL(curvkit, CUDA, m) {
  m.impl("adahessian_step_", &curvkit::adahessian_step_cuda);
  m.impl("sophia_step_", &curvkit::sophia_step_cuda);
  m.impl("rademacher_", &curvkit::rademacher_inplace_cuda);
  m.impl("rademacher", &curvkit::rademacher_cuda);
  m.impl("accumulate_zhz_", &curvkit::accumulate_zhz_cuda);
  m.impl("softmax_ce_hessian_product", &curvkit::softmax_ce_hessian_product_cuda);
}
