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

inline void check_same_numel(const char* op, at::TensorList a, const char* name, at::TensorList b) {
  for (size_t j = 0; j < a.size(); ++j)
    TORCH_CHECK(a[j].numel() == b[j].numel(), "curvkit::", op, ": ", name, "[", j, "] has ", b[j].numel(),
                " elements, expected ", a[j].numel());
}

// Curvature entries may be fewer than parameter entries: each curvature entry then covers `window`
// consecutive parameter entries (a conv kernel window averaged beforehand). Returns the windows.
// The argument checks shared by the fused optimizer updates (AdaHessian, Sophia; CPU and CUDA).
inline void check_update_lists(const char* op, c10::DeviceType device, at::TensorList params, at::TensorList grads,
                               const char* name1, at::TensorList state1, const char* name2, at::TensorList state2,
                               at::TensorList curvature) {
  std::vector<std::pair<const char*, at::TensorList>> lists = {
      {"params", params}, {"grads", grads}, {name1, state1}, {name2, state2}};
  if (!curvature.empty()) lists.push_back({"curvature", curvature});
  check_lists(op, lists, device);
  check_same_numel(op, params, "grads", grads);
  check_same_numel(op, params, name1, state1);
  check_same_numel(op, params, name2, state2);
}

inline std::vector<int64_t> curvature_windows(const char* op, at::TensorList params, at::TensorList curvature) {
  std::vector<int64_t> windows(params.size(), 1);
  for (size_t j = 0; j < curvature.size(); ++j) {
    const int64_t n = params[j].numel(), k = curvature[j].numel();
    TORCH_CHECK(k > 0 ? n % k == 0 : n == 0, "curvkit::", op, ": curvature[", j, "] has ", k,
                " elements, which does not divide the ", n, " of params[", j, "]");
    windows[j] = k > 0 ? n / k : 1;
  }
  return windows;
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

}  // namespace curvkit
