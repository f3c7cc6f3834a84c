// CPU kernels of ovit-kernels: torch-free, float32 and float64, threads over Fisher blocks
// (parallel.h). Every kernel works on one block at a time in a per-thread scratch that stays in
// the core's cache for the whole of that block's work (all B elimination steps, a chunk of
// gradients, the inverse), which is the structure of the GPU kernels; the reference backend
// instead streams every block's state through memory at every step.
//
// Layouts are those of the public API: finv / gram (nb, B, B) row-major, w (nb, B), gradients
// (k, N) with N = nb·B, order / loss (nb, steps). Sizes outside what a kernel takes raise
// std::invalid_argument naming the argument.
#pragma once

#include <cstdint>

namespace ovit::cpu {

// Largest block size the CPU kernels take (scratch of a few B² per thread).
constexpr int kMaxBlock = 4096;

// gram[b] += Σ_i g_i,b g_i,bᵀ in float64 for the k rows of grads. Returns how many gradient
// entries were NaN/Inf (the caller rejects the chunk: the state has taken part of it). With overwrite,
// gram[b] = Σ ... instead (a fresh state, never read).
template <typename G>
int64_t gram_update(double* gram, const G* grads, int64_t nb, int B, int64_t k, int64_t N, int threads,
                    bool overwrite = false);

// out[b] = (λ'I + gram[b]/m)⁻¹ (λ' = λ, or λ·mean(diag(gram[b]/m)) when relative, λ where that
// mean is 0) by a symmetric Gauss–Jordan sweep in float64; ok[b] = 1 iff every pivot was
// positive and the result finite.
template <typename T>
void damped_inverse(const double* gram, int64_t nb, int B, double inv_m, double damp, bool relative, T* out,
                    uint8_t* ok, int threads);

// Woodbury updates of finv (in place) by the k rows of grads, as rank-k steps of up to `rank`
// gradients computed in float64 (the block is rounded to T once per call); a block whose k×k
// system is not positive definite becomes NaN. Returns how many gradient entries were NaN/Inf.
template <typename T, typename G>
int64_t woodbury_update(T* finv, const G* grads, int64_t nb, int B, int64_t k, int64_t N, double num_grads, int rank,
                     int threads);

// Greedy OBS elimination (SPEC §3): order (nb, steps), loss (nb, steps), bad (nb): a pivot that
// was not positive, a non-finite score, or NaN/Inf among the block's inputs (read once, while
// copied). mask (nb, B) or null; nm_m = 0 for unstructured.
// factor (nb, B, B) or null — it may be finv itself (in place): for each block that succeeded, the
// elimination's factor, F(x, t) = H_t(x, q_t) / H_t(q_t, q_t) for a position x still present at
// step t (H_t the downdated inverse before step t, q_t = order_t), F(q_t, t) = the weight at q_t
// just before step t (0 for a masked one), 0 elsewhere; a failed block is left as it was.
template <typename T>
void prune_order(const T* w, const T* finv, const uint8_t* mask, int64_t nb, int B, int steps, int nm_n, int nm_m,
                 int64_t* order, T* loss, uint8_t* bad, T* factor, int threads);

// Final weights for the first counts[b] entries of order from prune_order's factor: the weights
// after k steps are w − Σ_{t<k} a_t F(·, t), a_t = F(q_t, t), so each survivor costs one dot
// product of a row prefix ((B − k)·k multiply-adds per block, no factorisation). w is the
// elimination's input with its masked entries zero. Outputs and codes as reconstruct's
// (1: NaN/Inf among what the block reads or produces).
template <typename T>
void reconstruct_factored(const T* w, const T* factor, const int64_t* order, const int64_t* counts, int64_t nb,
                          int B, int steps, T* w_out, uint8_t* pruned, uint8_t* bad, int threads);

// Final weights for the first counts[b] entries of order (nb, steps): the joint OBS solution by a
// Cholesky of H[S,S] (no replay). w_out (nb, B), pruned (nb, B), bad (nb): 1 a pivot that was not
// positive or NaN/Inf among the block's inputs, 2 a position of order outside [0, B), 3 a repeated one.
template <typename T>
void reconstruct(const T* w, const T* finv, const int64_t* order, const int64_t* counts, int64_t nb, int B,
                 int steps, T* w_out, uint8_t* pruned, uint8_t* bad, int threads);

// One layer's input to the global selection: loss (nb, steps), float32 or float64; exclude (nb) or
// null: leading entries of each block's order pruned anyway, outside N_total and K.
struct LossLayer {
  const void* loss;
  bool fp64;
  int64_t nb, steps;
  const int64_t* exclude;
};

// Global selection (SPEC §3): counts (Σ nb) int64, k_b + exclude_b per block, exactly
// K = ⌊s·N_total + ½⌋ taken, ties broken by (loss, layer, block, step). Returns -1, or the index
// of the first layer holding a NaN/Inf loss (counts then unwritten).
int64_t prune_counts(const LossLayer* layers, int nlayers, double sparsity, int64_t* counts);

// ρ = w² / (2 diag H) (nb, B).
template <typename T>
void scores(const T* w, const T* finv, int64_t nb, int B, T* out, int threads);

// WoodFisher update: out = w − H (w ⊙ 1_S / diag H), out_S = 0 (H symmetric, as every inverse here). bad[b] = 1 where block b holds a NaN/Inf
// entry of H, or a pruned entry's diagonal is not positive (read once, as the update reads them).
template <typename T>
void update_independent(const T* w, const T* finv, const uint8_t* prune, int64_t nb, int B, T* out, uint8_t* bad,
                        int threads);

}  // namespace ovit::cpu
