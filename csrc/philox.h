// Counter-based Philox4x32-10 (Salmon et al., SC 2011) and curvkit's Rademacher probe layout.
// Shared by the CPU (.cpp) and CUDA (.cu) kernels so that probes are bit-identical on every device;
// curvkit/kernels/reference.py emulates the same arithmetic in PyTorch.
//
// Probe layout: the tensors of one draw are numbered as one flat vector (tensor 0 first). Element g of a
// draw keyed by (seed, offset) takes bit (g % 32) of word (g / 32) % 4 of
//   philox4x32_10(counter = (lo32(g / 128), hi32(g / 128), lo32(offset), hi32(offset)), key = (lo32(seed), hi32(seed)))
// and is +1 where that bit is 0 and -1 where it is 1: one Philox call serves 128 consecutive probes.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define CURVKIT_HD __host__ __device__ __forceinline__
#else
#define CURVKIT_HD inline
#endif

namespace curvkit {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int64_t kProbesPerBlock = 128;

struct Philox4 {
  uint32_t x[4];
};

CURVKIT_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Ten rounds of Philox4x32 on counter (c0, c1, c2, c3) with key (k0, k1).
CURVKIT_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(kPhiloxM0, c0, &hi0);
    const uint32_t lo1 = mulhilo(kPhiloxM1, c2, &hi1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The 128 probe bits of block `block` (probes 128 * block ... 128 * block + 127) of draw (seed, offset).
CURVKIT_HD Philox4 probe_bits(uint64_t seed, uint64_t offset, uint64_t block) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                       static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Probe value (+1 or -1) of element g of a draw, given the bits of its block.
template <typename T>
CURVKIT_HD T probe_sign(const Philox4& bits, int64_t g) {
  const uint32_t bit = (bits.x[(g >> 5) & 3] >> (g & 31)) & 1u;
  return bit ? T(-1) : T(1);
}

}  // namespace curvkit
