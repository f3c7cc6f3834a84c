// Per-block cost of the CPU kernels, one thread, torch-free: the Gram update (k gradients), the
// damped inverse, the greedy elimination with and without its factor, and the final weights at
// sparsity 3/4 (from the factor, and by a Cholesky of H[S,S] from the inverse), at one block
// size, with the blocks' data in cache (a few blocks, repeated) and streamed from memory (many).
//
//   make bench-cpu-blocks            # B = 192, k = 128
//   build/cpu_blocks 64 256          # B = 64, k = 256
//
// Each figure is the minimum over repetitions of (call time / blocks); the GFLOP/s count the
// multiply-adds a block needs (the Gram's upper triangle, B³ for the inverse, B³/6 for the
// elimination) twice, so they compare with the core's FMA rate.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "ovit_cpu.h"

using namespace ovit::cpu;

namespace {

template <typename F>
double best_us_per_block(F&& fn, int64_t nb, int reps) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, s / nb * 1e6);
  }
  return best;
}

void run(int B, int64_t k, int64_t nb, int reps) {
  const int64_t N = nb * B;
  std::mt19937 gen(1);
  std::normal_distribution<float> normal;
  std::vector<float> grads(k * N);
  for (auto& v : grads) v = 0.1f * normal(gen);
  std::vector<double> gram(nb * B * B);
  std::vector<float> finv(nb * B * B), factor(nb * B * B), w(nb * B), loss(nb * B);
  std::vector<int64_t> order(nb * B);
  std::vector<uint8_t> ok(nb), bad(nb);
  for (auto& v : w) v = normal(gen);
  gram_update<float>(gram.data(), grads.data(), nb, B, k, N, 1, true);
  const double t_gram = best_us_per_block(
      [&] { gram_update<float>(gram.data(), grads.data(), nb, B, k, N, 1, false); }, nb, reps);
  const double t_inv = best_us_per_block(
      [&] { damped_inverse<float>(gram.data(), nb, B, 1.0 / k, 1e-3, false, finv.data(), ok.data(), 1); }, nb, reps);
  const double t_elim = best_us_per_block(
      [&] {
        prune_order<float>(w.data(), finv.data(), nullptr, nb, B, B, 0, 0, order.data(), loss.data(), bad.data(),
                           nullptr, 1);
      },
      nb, reps);
  const double t_fac = best_us_per_block(
      [&] {
        prune_order<float>(w.data(), finv.data(), nullptr, nb, B, B, 0, 0, order.data(), loss.data(), bad.data(),
                           factor.data(), 1);
      },
      nb, reps);
  std::vector<int64_t> counts(nb, (3 * B) / 4);
  std::vector<float> w_out(nb * B);
  std::vector<uint8_t> pruned(nb * B);
  const double t_rec = best_us_per_block(
      [&] {
        reconstruct<float>(w.data(), finv.data(), order.data(), counts.data(), nb, B, B, w_out.data(), pruned.data(),
                           bad.data(), 1);
      },
      nb, reps);
  const double t_recf = best_us_per_block(
      [&] {
        reconstruct_factored<float>(w.data(), factor.data(), order.data(), counts.data(), nb, B, B, w_out.data(),
                                    pruned.data(), bad.data(), 1);
      },
      nb, reps);
  const double b = B;
  const double f_gram = b * (b + 1) * k, f_inv = b * b * b, f_elim = b * b * b / 3;  // flops = 2 · multiply-adds
  std::printf("B=%d k=%lld nb=%lld (%s): Gram %.1f us (%.1f GFLOP/s)  inverse %.1f us (%.1f)  "
              "elimination %.1f us (%.1f), with its factor %.1f us\n"
              "  final weights at s = 3/4: by a Cholesky of H[S,S] %.1f us, from the factor %.1f us\n",
              B, (long long)k, (long long)nb, nb <= 4 ? "in cache" : "from memory", t_gram, f_gram / t_gram / 1e3,
              t_inv, f_inv / t_inv / 1e3, t_elim, f_elim / t_elim / 1e3, t_fac, t_rec, t_recf);
}

}  // namespace

int main(int argc, char** argv) {
  const int B = argc > 1 ? std::atoi(argv[1]) : 192;
  const int64_t k = argc > 2 ? std::atoll(argv[2]) : 128;
  if (B < 1 || B > kMaxBlock || k < 1) {
    std::fprintf(stderr, "usage: cpu_blocks [B in 1..%d] [k >= 1]\n", kMaxBlock);
    return 2;
  }
  run(B, k, 4, 60);
  run(B, k, 256, 5);
  return 0;
}
