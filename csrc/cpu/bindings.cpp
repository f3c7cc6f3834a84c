// pybind11 module ovit_kernels._cpu: the CPU kernels (kernels.cpp), torch-free. Tensors arrive as
// raw addresses with their sizes; the Python side (ovit_kernels/cpu_backend.py) has checked
// shapes, dtypes, devices and contiguity and allocated the outputs. The GIL is released while
// the kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "ovit_cpu.h"

namespace py = pybind11;
using ovit::cpu::kMaxBlock;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void need_fp(int fp64) {
  if (fp64 != 0 && fp64 != 1) throw std::invalid_argument("fp64 must be 0 (float32) or 1 (float64)");
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "ovit-kernels CPU kernels: Gram, damped inverse, Woodbury, greedy elimination, global selection, reconstruction, scores";
  m.attr("max_block_size") = kMaxBlock;
  m.def(
      "gram_update",
      [](uintptr_t gram, uintptr_t grads, int grads_fp64, int64_t nb, int B, int64_t k, int64_t N, int threads,
         bool overwrite) {
        need_fp(grads_fp64);
        py::gil_scoped_release nogil;
        if (grads_fp64)
          return ovit::cpu::gram_update<double>(ptr<double>(gram), ptr<const double>(grads), nb, B, k, N, threads,
                                                overwrite);
        return ovit::cpu::gram_update<float>(ptr<double>(gram), ptr<const float>(grads), nb, B, k, N, threads,
                                             overwrite);
      },
      "gram[b] += Σ g gᵀ (float64) for a (k, N) chunk (= with overwrite: the state's old contents are never "
      "read); returns the number of NaN/Inf gradient entries");
  m.def(
      "damped_inverse",
      [](uintptr_t gram, int64_t nb, int B, double inv_m, double damp, bool relative, uintptr_t out, int out_fp64,
         uintptr_t ok, int threads) {
        need_fp(out_fp64);
        py::gil_scoped_release nogil;
        if (out_fp64)
          ovit::cpu::damped_inverse<double>(ptr<const double>(gram), nb, B, inv_m, damp, relative, ptr<double>(out),
                                            ptr<uint8_t>(ok), threads);
        else
          ovit::cpu::damped_inverse<float>(ptr<const double>(gram), nb, B, inv_m, damp, relative, ptr<float>(out),
                                           ptr<uint8_t>(ok), threads);
      },
      "out = (λ'I + gram/m)^-1 per block into out, ok");
  m.def(
      "woodbury_update",
      [](uintptr_t finv, int fp64, uintptr_t grads, int grads_fp64, int64_t nb, int B, int64_t k, int64_t N,
         double num_grads, int rank, int threads) {
        need_fp(fp64);
        need_fp(grads_fp64);
        py::gil_scoped_release nogil;
        if (fp64 && grads_fp64)
          return ovit::cpu::woodbury_update<double, double>(ptr<double>(finv), ptr<const double>(grads), nb, B, k, N,
                                                            num_grads, rank, threads);
        if (fp64)
          return ovit::cpu::woodbury_update<double, float>(ptr<double>(finv), ptr<const float>(grads), nb, B, k, N,
                                                           num_grads, rank, threads);
        if (!grads_fp64)
          return ovit::cpu::woodbury_update<float, float>(ptr<float>(finv), ptr<const float>(grads), nb, B, k, N,
                                                          num_grads, rank, threads);
        throw std::invalid_argument("a float32 finv takes float32 gradients");
      },
      "Woodbury updates of finv in place (rank-k steps in float64); returns the number of NaN/Inf gradient entries");
  m.def(
      "prune_order",
      [](uintptr_t w, uintptr_t finv, int fp64, uintptr_t mask, int64_t nb, int B, int steps, int nm_n, int nm_m,
         uintptr_t order, uintptr_t loss, uintptr_t bad, uintptr_t factor, int threads) {
        need_fp(fp64);
        py::gil_scoped_release nogil;
        const uint8_t* mk = mask ? ptr<const uint8_t>(mask) : nullptr;
        if (fp64)
          ovit::cpu::prune_order<double>(ptr<const double>(w), ptr<const double>(finv), mk, nb, B, steps, nm_n, nm_m,
                                         ptr<int64_t>(order), ptr<double>(loss), ptr<uint8_t>(bad),
                                         factor ? ptr<double>(factor) : nullptr, threads);
        else
          ovit::cpu::prune_order<float>(ptr<const float>(w), ptr<const float>(finv), mk, nb, B, steps, nm_n, nm_m,
                                        ptr<int64_t>(order), ptr<float>(loss), ptr<uint8_t>(bad),
                                        factor ? ptr<float>(factor) : nullptr, threads);
      },
      "greedy OBS elimination into order, loss, bad, and the elimination's factor when factor is not 0 (it may "
      "be finv: in place)");
  m.def(
      "reconstruct_factored",
      [](uintptr_t w, uintptr_t factor, int fp64, uintptr_t order, uintptr_t counts, int64_t nb, int B, int steps,
         uintptr_t w_out, uintptr_t pruned, uintptr_t bad, int threads) {
        need_fp(fp64);
        py::gil_scoped_release nogil;
        if (fp64)
          ovit::cpu::reconstruct_factored<double>(ptr<const double>(w), ptr<const double>(factor),
                                                  ptr<const int64_t>(order), ptr<const int64_t>(counts), nb, B, steps,
                                                  ptr<double>(w_out), ptr<uint8_t>(pruned), ptr<uint8_t>(bad), threads);
        else
          ovit::cpu::reconstruct_factored<float>(ptr<const float>(w), ptr<const float>(factor),
                                                 ptr<const int64_t>(order), ptr<const int64_t>(counts), nb, B, steps,
                                                 ptr<float>(w_out), ptr<uint8_t>(pruned), ptr<uint8_t>(bad), threads);
      },
      "final weights of a prefix of each block's order from the elimination's factor into w_out, pruned, bad codes");
  m.def(
      "reconstruct",
      [](uintptr_t w, uintptr_t finv, int fp64, uintptr_t order, uintptr_t counts, int64_t nb, int B, int steps,
         uintptr_t w_out, uintptr_t pruned, uintptr_t bad, int threads) {
        need_fp(fp64);
        py::gil_scoped_release nogil;
        if (fp64)
          ovit::cpu::reconstruct<double>(ptr<const double>(w), ptr<const double>(finv), ptr<const int64_t>(order),
                                         ptr<const int64_t>(counts), nb, B, steps, ptr<double>(w_out),
                                         ptr<uint8_t>(pruned), ptr<uint8_t>(bad), threads);
        else
          ovit::cpu::reconstruct<float>(ptr<const float>(w), ptr<const float>(finv), ptr<const int64_t>(order),
                                        ptr<const int64_t>(counts), nb, B, steps, ptr<float>(w_out),
                                        ptr<uint8_t>(pruned), ptr<uint8_t>(bad), threads);
      },
      "final weights of a prefix of each block's order (Cholesky of H[S,S]) into w_out, pruned, bad codes");
  m.def(
      "prune_counts",
      [](const std::vector<uintptr_t>& loss, const std::vector<int>& fp64, const std::vector<int64_t>& nb,
         const std::vector<int64_t>& steps, const std::vector<uintptr_t>& exclude, double sparsity,
         uintptr_t counts) {
        const size_t n = loss.size();
        if (fp64.size() != n || nb.size() != n || steps.size() != n || exclude.size() != n)
          throw std::invalid_argument("loss, fp64, nb, steps and exclude must have one entry per layer");
        std::vector<ovit::cpu::LossLayer> layers(n);
        for (size_t l = 0; l < n; ++l) {
          need_fp(fp64[l]);
          layers[l] = {ptr<const void>(loss[l]), fp64[l] == 1, nb[l], steps[l], ptr<const int64_t>(exclude[l])};
        }
        py::gil_scoped_release nogil;
        return ovit::cpu::prune_counts(layers.data(), (int)n, sparsity, ptr<int64_t>(counts));
      },
      "global selection into counts (sum of nb); returns -1 or the first layer with a NaN/Inf loss");
  m.def(
      "scores",
      [](uintptr_t w, uintptr_t finv, int fp64, int64_t nb, int B, uintptr_t out, int threads) {
        need_fp(fp64);
        py::gil_scoped_release nogil;
        if (fp64)
          ovit::cpu::scores<double>(ptr<const double>(w), ptr<const double>(finv), nb, B, ptr<double>(out), threads);
        else
          ovit::cpu::scores<float>(ptr<const float>(w), ptr<const float>(finv), nb, B, ptr<float>(out), threads);
      },
      "saliencies w² / (2 diag H)");
  m.def(
      "update_independent",
      [](uintptr_t w, uintptr_t finv, int fp64, uintptr_t prune, int64_t nb, int B, uintptr_t out, uintptr_t bad,
         int threads) {
        need_fp(fp64);
        py::gil_scoped_release nogil;
        if (fp64)
          ovit::cpu::update_independent<double>(ptr<const double>(w), ptr<const double>(finv),
                                                ptr<const uint8_t>(prune), nb, B, ptr<double>(out),
                                                ptr<uint8_t>(bad), threads);
        else
          ovit::cpu::update_independent<float>(ptr<const float>(w), ptr<const float>(finv), ptr<const uint8_t>(prune),
                                               nb, B, ptr<float>(out), ptr<uint8_t>(bad), threads);
      },
      "the WoodFisher update; bad blocks (NaN/Inf inputs, non-positive pivots) flagged");
}
