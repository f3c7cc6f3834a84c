// Runs every emulated CUDA kernel once on small random inputs, for ThreadSanitizer: built with
// -fsanitize=thread against the emulator, any access to shared memory that no barrier orders
// against another thread's write is reported. Results are not checked here (the ctypes tests
// compare them with the reference); the exit status is the OR of the launchers' errors.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include <cuda_fp16.h>

#include "ovit_kernels.h"
#include "packed.cuh"

namespace {

std::mt19937 rng(7);
std::normal_distribution<double> normal;

template <typename T>
int fisher_and_obs(int nb, int B) {
  std::vector<T> h(nb * B * B, T(0)), g(5 * nb * B), w(nb * B), loss(nb * B), wo(nb * B), out(nb * B * B);
  for (int b = 0; b < nb; ++b)
    for (int i = 0; i < B; ++i) h[(b * B + i) * B + i] = T(10);
  for (auto& v : g) v = T(normal(rng));
  for (auto& v : w) v = T(normal(rng));
  std::vector<int64_t> order(nb * B), counts(nb, B / 2);
  std::vector<int32_t> bad(nb), ok(nb);
  std::vector<uint8_t> mask(nb * B, 0), pruned(nb * B);
  mask[1] = 1;
  std::vector<double> gram(nb * B * B, 0.0);
  for (int b = 0; b < nb; ++b)
    for (int i = 0; i < B; ++i) gram[(b * B + i) * B + i] = 2.0 + i;
  const int nm = B % 4 == 0 ? 4 : 0;
  const int steps = nm ? B / 2 : B;
  int rc = 0;
  for (int packed = 0; packed < 2; ++packed) {
    rc |= packed ? ovit::launch_woodbury_packed<T, T>(h.data(), g.data(), nb, B, 5, nb * B, 5.0, nullptr)
                 : ovit::launch_woodbury_update<T, T>(h.data(), g.data(), nb, B, 5, nb * B, 5.0, nullptr);
    rc |= packed ? ovit::launch_eliminate_packed<T, false>(w.data(), h.data(), mask.data(), nullptr, nullptr, nb, B,
                                                           steps, nm ? 2 : 0, nm, order.data(), loss.data(), nullptr,
                                                           nullptr, bad.data(), nullptr)
                 : ovit::launch_obs_prune_order<T>(w.data(), h.data(), mask.data(), nb, B, steps, nm ? 2 : 0, nm,
                                                   order.data(), loss.data(), bad.data(), nullptr);
    rc |= packed ? ovit::launch_eliminate_packed<T, true>(w.data(), h.data(), nullptr, order.data(), counts.data(), nb,
                                                          B, steps, 0, 0, nullptr, nullptr, wo.data(), pruned.data(),
                                                          bad.data(), nullptr)
                 : ovit::launch_obs_reconstruct<T>(w.data(), h.data(), order.data(), counts.data(), nb, B, steps,
                                                   wo.data(), pruned.data(), bad.data(), nullptr);
    rc |= packed ? ovit::launch_damped_inverse_packed<T>(gram.data(), nb, B, 1.0, 0.1, 1, out.data(), ok.data(), nullptr)
                 : ovit::launch_damped_inverse<T>(gram.data(), nb, B, 1.0, 0.1, 1, out.data(), ok.data(), nullptr);
  }
  return rc;
}

__half half_of(double v) { return __float2half_rn(static_cast<float>(v)); }

int sparse(int tokens, int n_out, int K) {
  std::vector<__half> x(tokens * K), vals24(n_out * K / 2), bias(n_out), out(tokens * n_out);
  std::vector<uint16_t> meta(n_out * K / 16, 0x4444u);  // positions (0, 1) in every group
  for (auto& v : x) v = half_of(normal(rng));
  for (auto& v : vals24) v = half_of(normal(rng));
  for (auto& v : bias) v = half_of(normal(rng));
  int rc = 0;
  for (int variant = 1; variant <= 3; ++variant)
    rc |= ovit::launch_spmm_24(x.data(), vals24.data(), meta.data(), bias.data(), out.data(), tokens, n_out, K, 1, 0,
                               variant, nullptr);
  const int kc = K / 32;
  std::vector<int32_t> bits(n_out * kc), offs(n_out * kc);
  std::vector<__half> vals;
  for (int i = 0; i < n_out * kc; ++i) {
    bits[i] = static_cast<int32_t>(rng());
    offs[i] = static_cast<int32_t>(vals.size());
    for (int j = 0; j < __builtin_popcount(static_cast<uint32_t>(bits[i])); ++j) vals.push_back(half_of(normal(rng)));
  }
  rc |= ovit::launch_spmm_bitmap(x.data(), bits.data(), offs.data(), vals.data(), bias.data(), out.data(), tokens,
                                 n_out, K, 1, 0, nullptr);
  return rc;
}

}  // namespace

int main() {
  int rc = 0;
  rc |= fisher_and_obs<double>(2, 24);
  rc |= fisher_and_obs<float>(2, 12);
  rc |= fisher_and_obs<float>(1, 9);
  rc |= sparse(70, 136, 128);
  std::printf("launch status %d\n", rc);
  return rc;
}
