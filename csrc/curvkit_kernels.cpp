// curvkit's fused CPU kernels, registered as torch operators in the `curvkit` namespace.
//
// Every op works on lists of contiguous tensors of one floating dtype (one call per parameter group):
// the lists are cut into chunks of at most kChunk elements that never straddle two tensors, and
// at::parallel_for hands out chunks (a group of small tensors stays on one thread). Inner loops run
// over raw pointers in the tensors' opmath type (float for half/bfloat16), so the compiler vectorises
// them. The pure-PyTorch references with the same arithmetic live in curvkit/kernels/reference.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "elementwise.h"
#include "philox.h"

namespace curvkit {
namespace {

constexpr int64_t kChunk = 1 << 14;   // elements per work item
constexpr int64_t kGrain = 1 << 15;   // elements a thread should get before another one is woken

struct Chunk {
  int64_t tensor, begin, end;
};

// Chunks of at most about kChunk elements per tensor, each a whole number of `windows[j]` runs (no windows:
// runs of 1), so a run never straddles two chunks.
std::vector<Chunk> plan_chunks(at::TensorList tensors, const std::vector<int64_t>& windows = {}) {
  std::vector<Chunk> chunks;
  for (int64_t j = 0; j < static_cast<int64_t>(tensors.size()); ++j) {
    const int64_t n = tensors[j].numel();
    const int64_t window = windows.empty() ? 1 : windows[j];
    const int64_t step = std::max<int64_t>(window, kChunk / window * window);
    for (int64_t b = 0; b < n; b += step) chunks.push_back({j, b, std::min(n, b + step)});
  }
  return chunks;
}

// Runs f(chunk, chunk_index) over all chunks, in parallel once there is enough work.
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, int64_t total, const F& f) {
  if (chunks.empty()) return;
  const int64_t n = static_cast<int64_t>(chunks.size());
  const int64_t grain = std::max<int64_t>(1, (kGrain * n + total - 1) / std::max<int64_t>(total, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) f(chunks[c], c);
  });
}

// How an update loop gets the curvature d_i of element i: none, c[i], z[i] * c[i] (probes z, c = Hz), or
// one value for the whole run (a window mean).
enum CurvatureKind { kNone, kElementwise, kProbed, kConstant };

// p[i] = element(has_d, p[i], g[i], d_i, m[i], s[i]) over [i0, i1), in the opmath type, with m[i], s[i]
// (the two state buffers) updated in place. A function of its own so that the no-overlap (restrict)
// promise on the buffers reaches the loop, which then vectorises; `element` is taken by value so that
// its scalars stay in registers.
template <int kKind, typename scalar_t, typename Element>
void update_run(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, scalar_t* __restrict__ m,
                scalar_t* __restrict__ s, const scalar_t* __restrict__ c, const scalar_t* __restrict__ z, int64_t i0,
                int64_t i1, at::opmath_type<scalar_t> d_const, const Element element) {
  using T = at::opmath_type<scalar_t>;
  for (int64_t i = i0; i < i1; ++i) {
    T mi = m[i], si = s[i];
    T di = d_const;
    if constexpr (kKind == kElementwise) di = static_cast<T>(c[i]);
    if constexpr (kKind == kProbed) di = static_cast<T>(static_cast<scalar_t>(z[i] * c[i]));
    p[i] = element(std::bool_constant<kKind != kNone>{}, static_cast<T>(p[i]), static_cast<T>(g[i]), di, mi, si);
    m[i] = mi;
    if constexpr (kKind != kNone) s[i] = si;
  }
}

// One optimizer's element update over [begin, end) of one tensor. The curvature d_i is c[i], or
// z[i] * c[i] with probes z (c = Hz), averaged over each run of `window` consecutive elements (a conv
// weight's kernel window; chunks hold whole windows); there is none when c is null.
template <typename scalar_t, typename Element>
void update_chunk(scalar_t* p, const scalar_t* g, scalar_t* m, scalar_t* s, const scalar_t* c, const scalar_t* z,
                  int64_t window, int64_t begin, int64_t end, const Element element) {
  using T = at::opmath_type<scalar_t>;
  if (c == nullptr) {
    update_run<kNone>(p, g, m, s, c, z, begin, end, T(0), element);
  } else if (window == 1) {
    if (z == nullptr) update_run<kElementwise>(p, g, m, s, c, z, begin, end, T(0), element);
    else update_run<kProbed>(p, g, m, s, c, z, begin, end, T(0), element);
  } else {
    for (int64_t i = begin; i < end; i += window) {
      T sum = 0;
      for (int64_t k = i; k < i + window; ++k)
        sum += static_cast<T>(z == nullptr ? c[k] : static_cast<scalar_t>(z[k] * c[k]));
      update_run<kConstant>(p, g, m, s, c, z, i, i + window, sum / static_cast<T>(window), element);
    }
  }
}

// ------------------------------------------------------------------------------------ probes
// Calls f(z, i0, count): z[k] is the probe of local element i0 + k, for consecutive runs that cover
// [begin, end) of a tensor whose first element has flat index `base`. One Philox call per run.
template <typename T, typename F>
void for_probe_runs(uint64_t seed, uint64_t offset, int64_t base, int64_t begin, int64_t end, const F& f) {
  static constexpr uint32_t kMask[32] = {
      1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,
      1u << 8,  1u << 9,  1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15,
      1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21, 1u << 22, 1u << 23,
      1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31};
  T z[kProbesPerBlock];
  for (int64_t i = begin; i < end;) {
    const int64_t g = base + i;
    const int64_t within = g & (kProbesPerBlock - 1);
    const int64_t count = std::min(kProbesPerBlock - within, end - i);
    const Philox4 bits = probe_bits(seed, offset, static_cast<uint64_t>(g) / kProbesPerBlock);
    for (int w = 0; w < 4; ++w) {
      const uint32_t word = bits.x[w];
      for (int b = 0; b < 32; ++b) z[32 * w + b] = (word & kMask[b]) ? T(-1) : T(1);
    }
    f(z + within, i, count);
    i += count;
  }
}

void rademacher_inplace_cpu(at::TensorList out, int64_t seed, int64_t offset) {
  check_lists("rademacher_", {{"out", out}}, c10::DeviceType::CPU);
  const auto bases = flat_bases(out);
  const auto chunks = plan_chunks(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out[0].scalar_type(), "rademacher_", [&] {
    for_each_chunk(chunks, total_numel(out), [&](const Chunk& c, int64_t) {
      scalar_t* o = out[c.tensor].mutable_data_ptr<scalar_t>();
      for_probe_runs<scalar_t>(seed, offset, bases[c.tensor], c.begin, c.end,
                               [&](const scalar_t* z, int64_t i0, int64_t count) {
                                 std::copy(z, z + count, o + i0);
                               });
    });
  });
  bump_versions(out);
}

std::vector<at::Tensor> rademacher_cpu(at::TensorList like, int64_t seed, int64_t offset) {
  auto out = empty_like_contiguous(like);
  rademacher_inplace_cpu(out, seed, offset);
  return out;
}

// ------------------------------------------------------------------------------------ AdaHessian
void adahessian_step_cpu(at::TensorList params, at::TensorList grads_in, at::TensorList exp_avg,
                         at::TensorList exp_hess_sq, at::TensorList curvature_in, at::TensorList probes_in,
                         at::IntArrayRef windows_arg, at::TensorList next_probes, int64_t probe_seed,
                         int64_t next_offset, double lr, double beta1, double beta2, double eps, double weight_decay,
                         double hessian_power, at::ArrayRef<double> bias_correction1,
                         at::ArrayRef<double> bias_correction2) {
  constexpr const char* op = "adahessian_step_";
  const auto [grads, curvature, probes, windows] =
      prepare_update(op, c10::DeviceType::CPU, params, grads_in, "exp_avg", exp_avg, "exp_hess_sq", exp_hess_sq,
                     curvature_in, probes_in, windows_arg, next_probes);
  TORCH_CHECK(bias_correction1.size() == params.size() && bias_correction2.size() == params.size(),
              "curvkit::adahessian_step_: needs one bias correction of each kind per tensor");
  const auto chunks = plan_chunks(params, windows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), op, [&] {
    using T = at::opmath_type<scalar_t>;
    const auto shared = adahessian_scalars<T>(lr, beta1, beta2, eps, weight_decay, hessian_power);
    for_each_chunk(chunks, total_numel(params), [&](const Chunk& c, int64_t) {
      const int64_t j = c.tensor;
      auto s = shared;
      s.step = static_cast<T>(-lr / bias_correction1[j]);
      s.bc2 = static_cast<T>(bias_correction2[j]);
      auto chunk = [&](auto sqrt_power) {
        update_chunk(params[j].mutable_data_ptr<scalar_t>(), grads[j].const_data_ptr<scalar_t>(),
                     exp_avg[j].mutable_data_ptr<scalar_t>(), exp_hess_sq[j].mutable_data_ptr<scalar_t>(),
                     curvature.empty() ? nullptr : curvature[j].const_data_ptr<scalar_t>(),
                     probes.empty() ? nullptr : probes[j].const_data_ptr<scalar_t>(), windows[j], c.begin, c.end,
                     [s](auto has_d, T p, T g, T d, T& m, T& v) {
                       return adahessian_element<T, decltype(sqrt_power)::value, decltype(has_d)::value>(p, g, d, m,
                                                                                                         v, s);
                     });
      };
      if (hessian_power == 1.0) chunk(std::true_type{});
      else chunk(std::false_type{});
    });
  });
  finish_update(params, exp_avg, exp_hess_sq, next_probes, probe_seed, next_offset, &rademacher_inplace_cpu);
}

// ------------------------------------------------------------------------------------ Sophia
void sophia_step_cpu(at::TensorList params, at::TensorList grads_in, at::TensorList exp_avg, at::TensorList hessian,
                     at::TensorList curvature_in, at::TensorList probes_in, at::TensorList next_probes,
                     int64_t probe_seed, int64_t next_offset, double lr, double beta1, double beta2, double rho,
                     double eps, double weight_decay) {
  constexpr const char* op = "sophia_step_";
  const auto [grads, curvature, probes, windows] =
      prepare_update(op, c10::DeviceType::CPU, params, grads_in, "exp_avg", exp_avg, "hessian", hessian, curvature_in,
                     probes_in, {}, next_probes);
  const auto chunks = plan_chunks(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), op, [&] {
    using T = at::opmath_type<scalar_t>;
    const auto s = sophia_scalars<T>(lr, beta1, beta2, rho, eps, weight_decay);
    for_each_chunk(chunks, total_numel(params), [&](const Chunk& c, int64_t) {
      const int64_t j = c.tensor;
      update_chunk(params[j].mutable_data_ptr<scalar_t>(), grads[j].const_data_ptr<scalar_t>(),
                   exp_avg[j].mutable_data_ptr<scalar_t>(), hessian[j].mutable_data_ptr<scalar_t>(),
                   curvature.empty() ? nullptr : curvature[j].const_data_ptr<scalar_t>(),
                   probes.empty() ? nullptr : probes[j].const_data_ptr<scalar_t>(), windows[j], c.begin, c.end,
                   [s](auto has_d, T p, T g, T d, T& m, T& h) {
                     return sophia_element<T, decltype(has_d)::value>(p, g, d, m, h, s);
                   });
    });
  });
  finish_update(params, exp_avg, hessian, next_probes, probe_seed, next_offset, &rademacher_inplace_cpu);
}

// acc[i] = (accumulate ? acc[i] : 0) + alpha * z[k] * hz[i] over one run; returns the run's sum of z * hz.
// `acc` may alias `hz` (each element is read before it is written), hence no __restrict__.
template <typename scalar_t, typename opmath_t>
opmath_t zhz_run(scalar_t* acc, const scalar_t* hz, const opmath_t* z, int64_t count, opmath_t alpha,
                 bool accumulate) {
  opmath_t dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t k = 0; k < count; ++k) {
    const opmath_t zh = z[k] * static_cast<opmath_t>(hz[k]);
    dot += zh;
    acc[k] = accumulate ? static_cast<opmath_t>(acc[k]) + alpha * zh : alpha * zh;
  }
  return dot;
}

at::Tensor accumulate_zhz_cpu(at::TensorList acc, at::TensorList hz_in, int64_t seed, int64_t offset, double alpha,
                              bool accumulate) {
  const auto hz = contiguous(hz_in);
  constexpr const char* op = "accumulate_zhz_";
  check_lists(op, {{"acc", acc}, {"hz", hz}}, c10::DeviceType::CPU);
  check_same_numel(op, acc, "hz", hz);
  const auto bases = flat_bases(acc);
  const auto chunks = plan_chunks(acc);
  std::vector<double> partial(chunks.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acc[0].scalar_type(), op, [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t a = static_cast<opmath_t>(alpha);
    for_each_chunk(chunks, total_numel(acc), [&](const Chunk& c, int64_t index) {
      scalar_t* out = acc[c.tensor].mutable_data_ptr<scalar_t>();
      const scalar_t* h = hz[c.tensor].const_data_ptr<scalar_t>();
      double dot = 0.0;
      for_probe_runs<opmath_t>(seed, offset, bases[c.tensor], c.begin, c.end,
                               [&](const opmath_t* z, int64_t i0, int64_t count) {
                                 dot += zhz_run(out + i0, h + i0, z, count, a, accumulate);
                               });
      partial[index] = dot;
    });
  });
  bump_versions(acc);
  auto dots = at::zeros({static_cast<int64_t>(acc.size())}, at::TensorOptions().dtype(at::kDouble));
  double* dp = dots.mutable_data_ptr<double>();
  for (size_t c = 0; c < chunks.size(); ++c) dp[chunks[c].tensor] += partial[c];
  return dots;
}

// ------------------------------------------------------------------------------------ GGN
at::Tensor softmax_ce_hessian_product_cpu(const at::Tensor& logits, const at::Tensor& u, double scale) {
  TORCH_CHECK(logits.dim() == 2, "curvkit::softmax_ce_hessian_product: logits must be (rows, classes), got ",
              logits.sizes());
  TORCH_CHECK(u.sizes() == logits.sizes() && u.scalar_type() == logits.scalar_type() && u.device() == logits.device(),
              "curvkit::softmax_ce_hessian_product: u must match logits in shape, dtype and device");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "curvkit::softmax_ce_hessian_product: needs floating logits");
  const at::Tensor z = logits.contiguous(), uc = u.contiguous();
  at::Tensor out = at::empty_like(z);
  const int64_t rows = z.size(0), classes = z.size(1);
  if (z.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "softmax_ce_hessian_product", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* up = uc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const opmath_t s = static_cast<opmath_t>(scale);
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(classes, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> p(classes);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* zr = zp + r * classes;
        const scalar_t* ur = up + r * classes;
        opmath_t mx = -std::numeric_limits<opmath_t>::infinity();
        for (int64_t k = 0; k < classes; ++k) mx = std::max<opmath_t>(mx, zr[k]);
        opmath_t total = 0;
        for (int64_t k = 0; k < classes; ++k) {
          p[k] = std::exp(static_cast<opmath_t>(zr[k]) - mx);
          total += p[k];
        }
        const opmath_t inv = opmath_t(1) / total;
        opmath_t dot = 0;
        for (int64_t k = 0; k < classes; ++k) {
          p[k] *= inv;
          dot += p[k] * static_cast<opmath_t>(ur[k]);
        }
        scalar_t* orow = op + r * classes;
        for (int64_t k = 0; k < classes; ++k)
          orow[k] = s * (p[k] * static_cast<opmath_t>(ur[k]) - p[k] * dot);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace curvkit

TORCH_LIBRARY(curvkit, m) {
  m.def("adahessian_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_hess_sq, "
        "Tensor[] curvature, Tensor[] probes, int[] windows, Tensor(d!)[] next_probes, int probe_seed, "
        "int next_offset, float lr, float beta1, float beta2, float eps, float weight_decay, float hessian_power, "
        "float[] bias_correction1, float[] bias_correction2) -> ()");
  m.def("sophia_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] hessian, "
        "Tensor[] curvature, Tensor[] probes, Tensor(d!)[] next_probes, int probe_seed, int next_offset, "
        "float lr, float beta1, float beta2, float rho, float eps, float weight_decay) -> ()");
  m.def("rademacher_(Tensor(a!)[] out, int seed, int offset) -> ()");
  m.def("rademacher(Tensor[] like, int seed, int offset) -> Tensor[]");
  m.def("accumulate_zhz_(Tensor(a!)[] acc, Tensor[] hz, int seed, int offset, float alpha=1., "
        "bool accumulate=True) -> Tensor");
  m.def("softmax_ce_hessian_product(Tensor logits, Tensor u, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(curvkit, CPU, m) {
  m.impl("adahessian_step_", &curvkit::adahessian_step_cpu);
  m.impl("sophia_step_", &curvkit::sophia_step_cpu);
  m.impl("rademacher_", &curvkit::rademacher_inplace_cpu);
  m.impl("rademacher", &curvkit::rademacher_cpu);
  m.impl("accumulate_zhz_", &curvkit::accumulate_zhz_cpu);
  m.impl("softmax_ce_hessian_product", &curvkit::softmax_ce_hessian_product_cpu);
}

// No derivatives: the ops run inside optimizer steps and probes, under torch.no_grad(); with grad mode
// on, autograd refuses them on inputs that need a gradient.
TORCH_LIBRARY_IMPL(curvkit, Autograd, m) {
  for (const char* name : {"adahessian_step_", "sophia_step_", "rademacher_", "rademacher", "accumulate_zhz_",
                           "softmax_ce_hessian_product"})
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
}
