// The per-element arithmetic of the fused optimizer updates, shared by the CPU loops and the CUDA
// kernels (host and device functions under nvcc). T is the opmath type (float for half/bfloat16).
// Each function follows the foreach reference in curvkit/kernels/reference.py operation by operation.
#pragma once

#include <cmath>

#include "philox.h"

namespace curvkit {

template <typename T>
CURVKIT_HD T sqrt_(T x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

template <typename T>
CURVKIT_HD T pow_(T x, T y) {
#if defined(__CUDA_ARCH__)
  return ::pow(x, y);
#else
  return std::pow(x, y);
#endif
}

// torch.lerp's formula for a scalar weight (exp_avg.lerp_(grad, 1 - beta1)).
template <typename T>
CURVKIT_HD T lerp(T self, T end, T weight, bool small_weight) {
  return small_weight ? self + weight * (end - self) : end - (end - self) * (T(1) - weight);
}

// What both updates share: the EMA weights of the gradient (w1 = 1 - b1) and of the curvature (b2, w2 = 1 - b2),
// eps, and decoupled weight decay (decay = 1 - lr wd).
template <typename T>
struct EmaScalars {
  T w1, b2, w2, eps, decay;
  bool small_w1, apply_decay;
};

template <typename T>
void set_ema_scalars(EmaScalars<T>& s, double lr, double beta1, double beta2, double eps, double weight_decay) {
  s.w1 = static_cast<T>(1.0 - beta1);
  s.small_w1 = (1.0 - beta1) < 0.5 && (1.0 - beta1) > -0.5;
  s.b2 = static_cast<T>(beta2);
  s.w2 = static_cast<T>(1.0 - beta2);
  s.eps = static_cast<T>(eps);
  s.decay = static_cast<T>(1.0 - lr * weight_decay);
  s.apply_decay = weight_decay != 0.0;
}

template <typename T>
struct AdaHessianScalars : EmaScalars<T> {
  T half_power;
  T step, bc2;  // per tensor: -lr / bias_correction1, bias_correction2
};

// m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) d^2 (when kHasD); returns
// p (1 - lr wd) - lr / bc1 * m / ((v / bc2)^(k/2) + eps), with sqrt for k = 1.
template <typename T, bool kSqrt, bool kHasD>
CURVKIT_HD T adahessian_element(T p, T g, T d, T& m, T& v, const AdaHessianScalars<T>& s) {
  m = lerp(m, g, s.w1, s.small_w1);
  if (kHasD) v = v * s.b2 + s.w2 * d * d;
  T denom = v / s.bc2;
  denom = kSqrt ? sqrt_(denom) : pow_(denom, s.half_power);
  denom += s.eps;
  if (s.apply_decay) p *= s.decay;
  return p + s.step * (m / denom);
}

template <typename T>
struct SophiaScalars : EmaScalars<T> {
  T rho, neg_lr;
};

// m = lerp(m, g, 1 - b1); h = b2 h + (1 - b2) d (when kHasD); returns p (1 - lr wd) - lr clip(m / max(rho h, eps), 1).
// The clamps are selects on comparisons made unconditionally, so loops vectorise; NaN stays NaN as in torch.
template <typename T, bool kHasD>
CURVKIT_HD T sophia_element(T p, T g, T d, T& m, T& h, const SophiaScalars<T>& s) {
  m = lerp(m, g, s.w1, s.small_w1);
  if (kHasD) h = h * s.b2 + s.w2 * d;
  T denom = s.rho * h;
  denom = denom < s.eps ? s.eps : denom;
  T ratio = m / denom;
  const bool below = ratio < T(-1), above = ratio > T(1);
  ratio = below ? T(-1) : ratio;
  ratio = above ? T(1) : ratio;
  if (s.apply_decay) p *= s.decay;
  return p + s.neg_lr * ratio;
}

template <typename T>
AdaHessianScalars<T> adahessian_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                                        double hessian_power) {
  AdaHessianScalars<T> s;
  set_ema_scalars(s, lr, beta1, beta2, eps, weight_decay);
  s.half_power = static_cast<T>(hessian_power / 2.0);
  s.step = T(0);
  s.bc2 = T(1);
  return s;
}

template <typename T>
SophiaScalars<T> sophia_scalars(double lr, double beta1, double beta2, double rho, double eps, double weight_decay) {
  SophiaScalars<T> s;
  set_ema_scalars(s, lr, beta1, beta2, eps, weight_decay);
  s.rho = static_cast<T>(rho);
  s.neg_lr = static_cast<T>(-lr);
  return s;
}

}  // namespace curvkit
