// Host-side helpers shared by the CPU (.cpp) and CUDA (.cu) kernels: argument checks, the flat
// numbering of a tensor list, and version-counter bumps for the tensors an op mutates.
#pragma once

#include <ATen/ATen.h>

#include <utility>
#include <vector>

namespace curvkit {

// Equal list lengths and defined contiguous tensors of the first tensor's floating dtype and device.
inline void check_lists(const char* op, const std::vector<std::pair<const char*, at::TensorList>>& lists,
                        c10::DeviceType device) {
  const at::TensorList first = lists.front().second;
  TORCH_CHECK(!first.empty(), "curvkit::", op, ": got no tensors");
  const auto dtype = first[0].scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), "curvkit::", op, ": needs floating tensors, got ", dtype);
  for (const auto& [name, list] : lists) {
    TORCH_CHECK(list.size() == first.size(), "curvkit::", op, ": ", name, " has ", list.size(),
                " tensors, expected ", first.size());
    for (size_t j = 0; j < list.size(); ++j) {
      const auto& t = list[j];
      TORCH_CHECK(t.defined() && t.scalar_type() == dtype && t.device().type() == device &&
                      t.device() == first[0].device() && t.is_contiguous(),
                  "curvkit::", op, ": ", name, "[", j, "] must be a contiguous ", dtype, " tensor on ",
                  first[0].device(), " like ", lists.front().first, "[0]");
    }
  }
}

// Read-only inputs as contiguous tensors: autograd may hand back strided gradients, copied only then.
inline std::vector<at::Tensor> contiguous(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(t.defined() ? t.contiguous() : t);
  return out;
}

inline void check_same_numel(const char* op, at::TensorList a, const char* name, at::TensorList b) {
  for (size_t j = 0; j < a.size(); ++j)
    TORCH_CHECK(a[j].numel() == b[j].numel(), "curvkit::", op, ": ", name, "[", j, "] has ", b[j].numel(),
                " elements, expected ", a[j].numel());
}

// The argument checks shared by the fused optimizer updates (AdaHessian, Sophia; CPU and CUDA). The
// curvature (empty on steps that do not refresh it) has one entry per parameter entry; with probes z it
// is Hz and the estimate is z * Hz. Returns the curvature windows: the estimate is averaged over runs of
// windows[j] consecutive entries of tensor j (all 1 when `windows` is empty).
inline std::vector<int64_t> check_update_lists(const char* op, c10::DeviceType device, at::TensorList params,
                                               at::TensorList grads, const char* name1, at::TensorList state1,
                                               const char* name2, at::TensorList state2, at::TensorList curvature,
                                               at::TensorList probes, at::IntArrayRef windows = {}) {
  std::vector<std::pair<const char*, at::TensorList>> lists = {
      {"params", params}, {"grads", grads}, {name1, state1}, {name2, state2}};
  if (!curvature.empty()) lists.push_back({"curvature", curvature});
  if (!probes.empty()) lists.push_back({"probes", probes});
  check_lists(op, lists, device);
  TORCH_CHECK(probes.empty() || !curvature.empty(), "curvkit::", op, ": probes need a curvature (their Hz)");
  for (size_t k = 1; k < lists.size(); ++k) check_same_numel(op, params, lists[k].first, lists[k].second);
  TORCH_CHECK(windows.empty() || windows.size() == params.size(), "curvkit::", op, ": windows has ", windows.size(),
              " entries, expected ", params.size());
  std::vector<int64_t> out(params.size(), 1);
  for (size_t j = 0; j < windows.size(); ++j) {
    const int64_t n = params[j].numel();
    TORCH_CHECK(windows[j] >= 1 && n % windows[j] == 0, "curvkit::", op, ": windows[", j, "] = ", windows[j],
                " does not divide the ", n, " entries of params[", j, "]");
    out[j] = windows[j];
  }
  return out;
}

// Buffers for the next probe draw, which an update writes after its own work: one per parameter.
inline void check_next_probes(const char* op, c10::DeviceType device, at::TensorList params,
                              at::TensorList next_probes) {
  if (next_probes.empty()) return;
  check_lists(op, {{"params", params}, {"next_probes", next_probes}}, device);
  check_same_numel(op, params, "next_probes", next_probes);
}

// The read-only inputs of a fused optimizer update, made contiguous, and the curvature windows.
struct UpdateInputs {
  std::vector<at::Tensor> grads, curvature, probes;
  std::vector<int64_t> windows;
};

// Everything an AdaHessian or Sophia update checks before it touches any data (CPU and CUDA alike).
inline UpdateInputs prepare_update(const char* op, c10::DeviceType device, at::TensorList params, at::TensorList grads,
                                   const char* name1, at::TensorList state1, const char* name2, at::TensorList state2,
                                   at::TensorList curvature, at::TensorList probes, at::IntArrayRef windows,
                                   at::TensorList next_probes) {
  UpdateInputs in{contiguous(grads), contiguous(curvature), contiguous(probes), {}};
  in.windows = check_update_lists(op, device, params, in.grads, name1, state1, name2, state2, in.curvature, in.probes,
                                  windows);
  check_next_probes(op, device, params, next_probes);
  return in;
}

// Flat index of the first element of every tensor: a probe draw numbers its tensors as one vector.
inline std::vector<int64_t> flat_bases(at::TensorList tensors) {
  std::vector<int64_t> bases(tensors.size());
  int64_t total = 0;
  for (size_t j = 0; j < tensors.size(); ++j) {
    bases[j] = total;
    total += tensors[j].numel();
  }
  return bases;
}

inline int64_t total_numel(at::TensorList tensors) {
  int64_t total = 0;
  for (const auto& t : tensors) total += t.numel();
  return total;
}

// Uninitialised contiguous tensors with the sizes, dtypes and devices of `like`.
inline std::vector<at::Tensor> empty_like_contiguous(at::TensorList like) {
  std::vector<at::Tensor> out;
  out.reserve(like.size());
  for (const auto& t : like) out.push_back(at::empty(t.sizes(), t.options()));
  return out;
}

// What torch's own in-place ops do, so autograd notices a mutated tensor that a graph saved.
inline void bump_versions(at::TensorList tensors) {
  for (const auto& t : tensors) t.unsafeGetTensorImpl()->bump_version();
}

// The epilogue of every fused update: bump the version counters of the tensors it wrote, then write the
// next draw into next_probes with the device's fill, after every read of the probes (they may alias).
inline void finish_update(at::TensorList params, at::TensorList first, at::TensorList second,
                          at::TensorList next_probes, int64_t probe_seed, int64_t next_offset,
                          void (*fill)(at::TensorList, int64_t, int64_t)) {
  bump_versions(params);
  bump_versions(first);
  bump_versions(second);
  if (!next_probes.empty()) fill(next_probes, probe_seed, next_offset);
}

}  // namespace curvkit
