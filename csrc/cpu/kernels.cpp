// CPU kernels (see ovit_cpu.h). One block at a time per thread, in a scratch that stays in cache.
//
// Symmetric blocks are kept as their upper triangle in a B×B row-major scratch (entry (i, j) with
// i ≤ j at U[i·B + j]); a rank-one update then costs n²/2 multiply-adds on n active rows, the
// inner loop runs over contiguous memory and vectorises. The greedy elimination also keeps its
// active set compact: the pivot is swapped to the last active position, so the active block is
// always the leading n×n one and every step touches (B − t)²/2 entries: B³/6 in all per block
// instead of the B³ of a fixed layout; those updates are applied kPending steps at a time, so
// the triangle (L2-resident) is streamed once per kPending steps. The dense kernels (the Gram,
// the Gauss–Jordan sweep) run one register-tiled micro-kernel over operands packed in panels.

#include "ovit_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"

namespace ovit::cpu {

namespace {

void check_block(int B) {
  if (B < 1 || B > kMaxBlock)
    throw std::invalid_argument("block size " + std::to_string(B) + " is outside 1.." + std::to_string(kMaxBlock));
}

// Upper-triangle accessor of a symmetric B×B scratch.
template <typename T>
inline T& up(T* U, int B, int i, int j) {
  return i <= j ? U[(int64_t)i * B + j] : U[(int64_t)j * B + i];
}

// Vectors of T (GCC vector extension) of a given byte width, element-aligned so that they load
// and store unaligned. A class trait: attributes on a dependent type in an alias template are
// dropped. Each section picks its width: Vec<T> (32 bytes) for the small-matrix reconstruction,
// Vec<T, 64> for the elimination, the dense kernels one register of kW doubles.
constexpr int kVecBytes = 32;

template <typename T, int Bytes>
struct VecOf;
template <int Bytes>
struct VecOf<float, Bytes> {
  typedef float type __attribute__((vector_size(Bytes), aligned(sizeof(float))));
};
template <int Bytes>
struct VecOf<double, Bytes> {
  typedef double type __attribute__((vector_size(Bytes), aligned(sizeof(double))));
};
template <typename T, int Bytes = kVecBytes>
using Vec = typename VecOf<T, Bytes>::type;

// ---------------------------------------------------------------------------------------------
// The one micro-kernel: C (upper triangle, n×n, row stride ldc) += Aᵀ B for A, B (k × n) given as
// panels: kW consecutive columns of a k-row matrix, stored row after row (entry (l, j) at
// panel j/kW, offset l·kW + j%kW), zero past n and up to a whole column tile. A tile is kW rows
// (one panel of A, broadcast) × kNV·kW columns (kNV panels of B, one vector register each); its
// operands are read sequentially from panels small enough to stay in L1 while a column tile's
// row tiles pass over the same panels of B. Vectors of kW doubles: 8 (one 512-bit register) with
// AVX-512, 4 otherwise.
// ---------------------------------------------------------------------------------------------

// Scratch aligned to cache lines, so that vector loads and stores never straddle two lines.
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const LineAligned&) const { return true; }
  bool operator!=(const LineAligned&) const { return false; }
};
using Scratch64 = std::vector<double, LineAligned<double>>;

#if defined(__AVX512F__)
constexpr int kW = 8;
#else
constexpr int kW = 4;
#endif
constexpr int kNV = 3;             // vectors per tile row: 24 (12) columns, 24 (12) accumulators
constexpr int kTile = kNV * kW;    // a column tile's width
using vec = Vec<double, kW * sizeof(double)>;

// Panels that hold n columns, rounded up to whole column tiles.
inline int panels(int n) { return (n + kTile - 1) / kTile * kNV; }

// Panel storage of a k-row matrix with n columns, zeroed when its size changes: the callers
// write only columns below n, so the padding stays 0 (it reaches only outputs that are dropped).
inline void panel_storage(Scratch64& out, int64_t k, int n) {
  const size_t size = (size_t)panels(n) * k * kW;
  if (out.size() != size) out.assign(size, 0.0);
}

inline double& panel_at(double* P, int64_t k, int64_t l, int j) { return P[(j / kW) * k * kW + l * kW + j % kW]; }

// With store, C = Aᵀ B instead (its upper triangle; C is not read).
void syrk_upper(double* __restrict C, int ldc, const double* __restrict A, const double* __restrict Bm, int n,
                int64_t k, bool store = false) {
  const int64_t ps = k * kW;  // one panel
  for (int c0 = 0; c0 < n; c0 += kTile) {
    const double* b = Bm + (c0 / kW) * ps;
    for (int r0 = 0; r0 < n && r0 < c0 + kTile; r0 += kW) {
      vec acc[kW][kNV] = {};
      const double* a = A + (r0 / kW) * ps;
      for (int r = 0; r < kW && r0 + r < n; ++r)  // the tile of C, on its way to L1 while the sums run
        for (int v = 0; v < kNV; ++v) __builtin_prefetch(C + (int64_t)(r0 + r) * ldc + c0 + v * kW, 1);
      for (int64_t l = 0; l < k; ++l) {
        const double* bl = b + l * kW;
        vec bv[kNV];
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) bv[v] = *reinterpret_cast<const vec*>(bl + v * ps);
        const double* al = a + l * kW;
#pragma GCC unroll 8
        for (int r = 0; r < kW; ++r) {
          const double av = al[r];
#pragma GCC unroll 4
          for (int v = 0; v < kNV; ++v) acc[r][v] += av * bv[v];
        }
      }
      if (r0 + kW <= n && c0 + kTile <= n) {  // a whole tile (entries below the diagonal included)
#pragma GCC unroll 8
        for (int r = 0; r < kW; ++r) {
          double* c = C + (int64_t)(r0 + r) * ldc + c0;
#pragma GCC unroll 4
          for (int v = 0; v < kNV; ++v) {
            vec* cv = reinterpret_cast<vec*>(c + v * kW);
            *cv = store ? acc[r][v] : *cv + acc[r][v];
          }
        }
        continue;
      }
      for (int r = 0; r < kW && r0 + r < n; ++r)
        for (int v = 0; v < kNV; ++v)
          for (int e = 0; e < kW && c0 + v * kW + e < n; ++e) {
            double& c = C[(int64_t)(r0 + r) * ldc + c0 + v * kW + e];
            c = store ? acc[r][v][e] : c + acc[r][v][e];
          }
    }
  }
}

// Mirrors the upper triangle of a B×B row-major matrix into its lower one.
void mirror_upper(double* g, int B) {
  for (int r = 1; r < B; ++r)
    for (int c = 0; c < r; ++c) g[(int64_t)r * B + c] = g[(int64_t)c * B + r];
}

// Returns the number of NaN/Inf gradient entries of the block (accumulated all the same).
template <typename G>
int64_t gram_block(double* g, const G* grads, int B, int64_t k, int64_t N, int64_t col0, Scratch64& x,
                   bool overwrite) {
  panel_storage(x, k, B);
  int64_t nonfinite = 0;
  using mask = decltype(vec{} < vec{});
  mask bad = mask{};
  for (int64_t i = 0; i < k; ++i) {  // each gradient's slice read once, in order, into the panels
    const G* src = grads + i * N + col0;
    for (int j0 = 0; j0 < B; j0 += kW) {
      double* dst = x.data() + (j0 / kW) * k * kW + i * kW;
      if (j0 + kW <= B) {  // one vector: converted, stored, and checked by an integer OR
        typedef G gv __attribute__((vector_size(kW * sizeof(G)), aligned(sizeof(G))));
        const vec v = __builtin_convertvector(*reinterpret_cast<const gv*>(src + j0), vec);
        *reinterpret_cast<vec*>(dst) = v;
        vec a = v < 0 ? -v : v;
        bad |= !(a <= std::numeric_limits<double>::max());  // NaN or ±Inf lanes
        continue;
      }
      for (int c = 0; j0 + c < B; ++c) {
        dst[c] = static_cast<double>(src[j0 + c]);
        nonfinite += !std::isfinite(dst[c]);
      }
    }
  }
  bool any = false;
  for (int c = 0; c < kW; ++c) any |= bad[c] != 0;
  if (any)  // rare: count them (the caller reports how many)
    for (int64_t i = 0; i < k; ++i)
      for (int j = 0; j + kW <= B; j += kW)
        for (int c = 0; c < kW; ++c) nonfinite += !std::isfinite(static_cast<double>(grads[i * N + col0 + j + c]));
  syrk_upper(g, B, x.data(), x.data(), B, k, overwrite);  // a fresh state is written, never read
  mirror_upper(g, B);
  return nonfinite;
}

// ---------------------------------------------------------------------------------------------
// Symmetric Gauss–Jordan sweep of every pivot, kPanel pivots at a time: A ← −A⁻¹ for SPD A.
// Sweeping a set P of pivots at once gives A_PP ← −A_PP⁻¹, A_PR ← A_PP⁻¹ A_PR and
// A_RR ← A_RR − A_RP A_PP⁻¹ A_PR: the last is the micro-kernel's rank-kPanel update.
// ---------------------------------------------------------------------------------------------

constexpr int kPanel = 16;
static_assert(kPanel % kW == 0, "a panel of pivots starts on a vector boundary");

// Unblocked sweep of a small symmetric matrix (full storage, n×n): X ← −X⁻¹; false if a pivot
// was not positive (then X is not positive definite). Each pivot is one rank-one update of the
// whole matrix (a vector loop over every row), after which the pivot's row and column are set.
bool sweep_small(double* X, int n, double* rk) {
  bool ok = true;
  for (int k = 0; k < n; ++k) {
    const double d = X[k * n + k];
    if (!(d > 0.0) || !std::isfinite(d)) ok = false;
    const double inv = 1.0 / d;
    for (int j = 0; j < n; ++j) rk[j] = X[k * n + j];
    for (int i = 0; i < n; ++i) {
      const double a = rk[i] * inv;  // X(i, k) / d (X symmetric)
      double* xi = X + i * n;
      for (int j = 0; j < n; ++j) xi[j] -= a * rk[j];
    }
    for (int j = 0; j < n; ++j) {
      X[k * n + j] = rk[j] * inv;
      X[j * n + k] = rk[j] * inv;
    }
    X[k * n + k] = -inv;
  }
  return ok;
}

struct SweepScratch {
  Scratch64 pan, y, x, rk;
};

// U: B×B, upper triangle (row stride B). Returns false if F was not positive definite.
bool sweep_all(double* U, int B, SweepScratch& s) {
  bool ok = true;
  const int nq = (B + kW - 1) / kW;  // panels holding the B columns
  for (int p0 = 0; p0 < B; p0 += kPanel) {
    const int pw = std::min(kPanel, B - p0);
    panel_storage(s.pan, pw, B);  // rows P of the symmetric matrix (pw × B), as panels
    panel_storage(s.y, pw, B);    // −A_PP⁻¹ A_P·, as panels
    s.x.resize((size_t)pw * pw);
    s.rk.resize(pw);
    double* pan = s.pan.data();
    double* y = s.y.data();
    // rows P of the symmetric matrix, read along the upper triangle's rows: columns P of rows
    // j < p0 (contiguous runs of pw), then rows P from the diagonal on
    for (int j = 0; j < p0; ++j) {
      const double* src = U + (int64_t)j * B + p0;
      for (int r = 0; r < pw; ++r) panel_at(pan, pw, r, j) = src[r];
    }
    for (int r = 0; r < pw; ++r) {  // (p0 is a multiple of kW: whole vectors from the row, then
      const double* src = U + (int64_t)(p0 + r) * B;  // the entries left of the diagonal from above it)
      int j = p0;
      for (; j + kW <= B; j += kW)
        *reinterpret_cast<vec*>(&panel_at(pan, pw, r, j)) = *reinterpret_cast<const vec*>(src + j);
      for (; j < B; ++j) panel_at(pan, pw, r, j) = src[j];
      for (j = p0; j < p0 + r; ++j) panel_at(pan, pw, r, j) = U[(int64_t)j * B + p0 + r];
    }
    double* X = s.x.data();
    for (int r = 0; r < pw; ++r)
      for (int c = 0; c < pw; ++c) X[r * pw + c] = panel_at(pan, pw, r, p0 + c);
    ok = sweep_small(X, pw, s.rk.data()) && ok;  // X = −A_PP⁻¹
    for (int q = 0; q < nq; ++q) {  // y = X · (rows P), a panel at a time, 8 rows of y at once
      const double* pq = pan + (int64_t)q * pw * kW;  // (independent sums: the FMA latency hidden)
      double* yq = y + (int64_t)q * pw * kW;
      int r = 0;
      for (; r + 8 <= pw; r += 8) {
        vec acc[8] = {};
        for (int c = 0; c < pw; ++c) {
          const vec pv = *reinterpret_cast<const vec*>(pq + c * kW);
#pragma GCC unroll 8
          for (int i = 0; i < 8; ++i) acc[i] += X[(r + i) * pw + c] * pv;
        }
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) *reinterpret_cast<vec*>(yq + (r + i) * kW) = acc[i];
      }
      for (; r < pw; ++r) {
        vec acc = {};
        for (int c = 0; c < pw; ++c) acc += X[r * pw + c] * *reinterpret_cast<const vec*>(pq + c * kW);
        *reinterpret_cast<vec*>(yq + r * kW) = acc;
      }
    }
    syrk_upper(U, B, pan, y, B, pw);  // A_RR += A_RP (−A_PP⁻¹) A_PR (rows/cols in P are rewritten below)
    for (int j = 0; j < p0; ++j) {  // A_PR ← A_PP⁻¹ A_PR, written along the same rows
      double* dst = U + (int64_t)j * B + p0;
      for (int r = 0; r < pw; ++r) dst[r] = -panel_at(y, pw, r, j);
    }
    for (int r = 0; r < pw; ++r) {  // (p0 + pw is a multiple of kW, or B)
      double* dst = U + (int64_t)(p0 + r) * B;
      int j = p0 + pw;
      for (; j + kW <= B; j += kW)
        *reinterpret_cast<vec*>(dst + j) = -*reinterpret_cast<const vec*>(&panel_at(y, pw, r, j));
      for (; j < B; ++j) dst[j] = -panel_at(y, pw, r, j);
    }
    for (int r = 0; r < pw; ++r)
      for (int c = r; c < pw; ++c) U[(int64_t)(p0 + r) * B + p0 + c] = X[r * pw + c];
  }
  return ok;
}

// ---------------------------------------------------------------------------------------------
// Greedy elimination of one block: lower triangle (row i holds (i, j), j ≤ i), so
// the pivot's column is a contiguous row once the pivot sits at the last active position; the
// diagonal, the weights and the N:M penalties are kept in arrays beside it, so that scoring,
// the weight update and the argmin are vector loops.
// ---------------------------------------------------------------------------------------------

// The trailing updates are delayed: each step's column h_t and multipliers c_t = h_t / d_t join a
// pending set, the stored triangle lags behind by the pending steps (true entry (i, j) = stored
// − Σ_pending c(i) h(j)), a pivot's column is corrected when it is read (n·K multiply-adds), and
// every kPending steps the whole set is applied in one pass over the triangle: the triangle,
// which does not fit in L1, is read and written once per kPending steps instead of once per step.
// The diagonal and the weights, which the scores need at every step, are updated at once.
constexpr int kPending = 16;

// dst = src − Σ_k coef[k] h_k over vectors [v0, v1) of a row (dst may be src), 4 independent
// vectors at a time; always inlined (as a call it cost the elimination ~5%).
template <typename T>
__attribute__((always_inline)) inline void row_less_pending(T* dst, const T* src, const T* coef,
                                                            const T* __restrict Hk, int np, int ldp, int v0, int v1) {
  constexpr int V = 64 / sizeof(T);
  using vt = Vec<T, 64>;
  static_assert(sizeof(vt) == 64, "one 64-byte vector");
  int v = v0;
  for (; v + 4 <= v1; v += 4) {
    vt a[4];
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) a[u] = *reinterpret_cast<const vt*>(src + (v + u) * V);
    for (int k = 0; k < np; ++k) {
      const T* hk = Hk + (int64_t)k * ldp + v * V;
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) a[u] -= coef[k] * *reinterpret_cast<const vt*>(hk + u * V);
    }
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) *reinterpret_cast<vt*>(dst + (v + u) * V) = a[u];
  }
  for (; v < v1; ++v) {
    vt a = *reinterpret_cast<const vt*>(src + v * V);
    for (int k = 0; k < np; ++k) a -= coef[k] * *reinterpret_cast<const vt*>(Hk + (int64_t)k * ldp + v * V);
    *reinterpret_cast<vt*>(dst + v * V) = a;
  }
}

// rows[i][j] −= Σ_k c_k(i) h_k(j) for i < n, j < i, in whole vectors (rows padded to ld; the
// entries from the diagonal on are never read). Two rows at a time, 4 vectors of each: 8
// independent sums hide the FMA latency, and each h_k vector loaded serves both rows.
template <typename T>
void apply_pending(T* __restrict L, int ld, int n, const T* __restrict C, const T* __restrict Hk, int np, int ldp) {
  constexpr int V = 64 / sizeof(T);
  using vt = Vec<T, 64>;
  int i = 1;
  for (; i + 1 < n; i += 2) {
    T* r0 = L + (int64_t)i * ld;
    T* r1 = r0 + ld;
    T c0[kPending], c1[kPending];
    for (int k = 0; k < np; ++k) {
      c0[k] = C[(int64_t)k * ldp + i];
      c1[k] = C[(int64_t)k * ldp + i + 1];
    }
    const int nv0 = (i + V - 1) / V, nv1 = (i + V) / V;  // row i + 1 has at most one vector more
    int v = 0;
    for (; v + 4 <= nv0; v += 4) {
      vt a[4], b[4];
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        a[u] = *reinterpret_cast<const vt*>(r0 + (v + u) * V);
        b[u] = *reinterpret_cast<const vt*>(r1 + (v + u) * V);
      }
      for (int k = 0; k < np; ++k) {
        const T* hk = Hk + (int64_t)k * ldp + v * V;
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          const vt h = *reinterpret_cast<const vt*>(hk + u * V);
          a[u] -= c0[k] * h;
          b[u] -= c1[k] * h;
        }
      }
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        *reinterpret_cast<vt*>(r0 + (v + u) * V) = a[u];
        *reinterpret_cast<vt*>(r1 + (v + u) * V) = b[u];
      }
    }
    row_less_pending(r0, r0, c0, Hk, np, ldp, v, nv0);
    row_less_pending(r1, r1, c1, Hk, np, ldp, v, nv1);
  }
  if (i < n) {
    T ci[kPending];
    for (int k = 0; k < np; ++k) ci[k] = C[(int64_t)k * ldp + i];
    T* row = L + (int64_t)i * ld;
    row_less_pending(row, row, ci, Hk, np, ldp, 0, (i + V - 1) / V);
  }
}

template <typename T>
struct ElimScratch {
  std::vector<T> L, w, diag, pen, F;
  std::vector<T, LineAligned<T>> pc, ph;  // pending multipliers and columns (kPending × ld each)
  std::vector<int> orig, pos, lost, pending;
};

// Swap active positions a < b = n − 1 (rows and columns of the symmetric matrix, every array).
template <typename T>
void swap_positions(ElimScratch<T>& s, int ld, int a, int b) {
  if (a == b) return;
  T* L = s.L.data();
  T* __restrict ra = L + (int64_t)a * ld;
  T* __restrict rb = L + (int64_t)b * ld;
  for (int i = 0; i < a; ++i) std::swap(ra[i], rb[i]);  // (a, i) ↔ (b, i): two row prefixes
  for (int i = a + 1; i < b; ++i) std::swap(L[(int64_t)i * ld + a], rb[i]);  // (i, a) ↔ (b, i)
  std::swap(ra[a], rb[b]);
  std::swap(s.w[a], s.w[b]);
  std::swap(s.diag[a], s.diag[b]);
  std::swap(s.pen[a], s.pen[b]);
  std::swap(s.orig[a], s.orig[b]);
  s.pos[s.orig[a]] = a;
  s.pos[s.orig[b]] = b;
}

// Integer lanes beside a 64-byte vector of T: the compare masks' type, and 32-bit ints with as
// many lanes (the original indices are stored as int).
template <typename T>
struct LanesOf {
  using vt = Vec<T, 64>;
  using mask = decltype(vt{} < vt{});
  typedef int32_t i32 __attribute__((vector_size(64 / sizeof(T) * 4), aligned(4)));
};

// argmin of w²/diag + pen over positions [0, n): the lowest score, ties to the lowest original
// index; NaN scores never win. Returns -1 when every score is NaN. One pass of 64-byte vectors
// keeping each lane's best score and its original index (the arrays are padded to whole
// vectors; lanes from n on count as NaN), then a reduction over the lanes.
template <typename T>
int argmin_score(ElimScratch<T>& s, int n) {
  constexpr int V = 64 / sizeof(T);
  using vt = typename LanesOf<T>::vt;
  using mt = typename LanesOf<T>::mask;
  using i32 = typename LanesOf<T>::i32;
  const T inf = std::numeric_limits<T>::infinity();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T* __restrict w = s.w.data();
  const T* __restrict d = s.diag.data();
  const T* __restrict pen = s.pen.data();
  const int* __restrict orig = s.orig.data();
  vt lane;
  for (int c = 0; c < V; ++c) lane[c] = T(c);
  vt best = vt{} + inf;
  mt best_orig = mt{} + std::numeric_limits<int>::max();
  mt any = mt{};
  for (int j0 = 0; j0 < n; j0 += V) {
    const vt wv = *reinterpret_cast<const vt*>(w + j0);
    vt v = wv * wv / *reinterpret_cast<const vt*>(d + j0) + *reinterpret_cast<const vt*>(pen + j0);
    v = lane + T(j0) < T(n) ? v : vt{} + nan;
    const mt ov = __builtin_convertvector(*reinterpret_cast<const i32*>(orig + j0), mt);
    any |= v == v;
    const mt take = (v < best) | ((v == best) & (ov < best_orig));  // NaN compares false: never taken
    best = take ? v : best;
    best_orig = take ? ov : best_orig;
  }
  bool found = false;
  T b = inf;
  for (int c = 0; c < V; ++c) {
    found |= any[c] != 0;
    b = best[c] < b ? best[c] : b;
  }
  if (!found) return -1;
  int64_t q_orig = std::numeric_limits<int>::max();
  for (int c = 0; c < V; ++c)
    if (best[c] == b && best_orig[c] < q_orig) q_orig = best_orig[c];
  return s.pos[q_orig];
}

template <typename T>
void eliminate_block(const T* w0, const T* H0, const uint8_t* mask, int B, int nsteps, int nm_n, int nm_m,
                     int64_t* order_out, T* loss_out, uint8_t* bad_out, T* factor_out, ElimScratch<T>& s) {
  constexpr int V = 64 / sizeof(T);
  const int ld = (B + V - 1) / V * V;  // padded rows: the update runs in whole vectors
  s.L.assign((size_t)B * ld, T(0));
  for (auto* v : {&s.w, &s.diag, &s.pen}) v->assign(ld, T(0));  // padded: argmin's vectors
  s.pc.assign((size_t)kPending * ld, T(0));
  s.ph.assign((size_t)kPending * ld, T(0));
  int np = 0;
  s.orig.assign(ld, 0);
  s.pos.resize(B);
  T* L = s.L.data();
  bool bad = false;  // NaN/Inf in the inputs (read once here) or a failed pivot later
  int nonfinite = 0;  // an integer OR: a vector reduction, unlike a floating-point sum
  for (int i = 0; i < B; ++i) {
    const T* src = H0 + (int64_t)i * B;
    T* dst = L + (int64_t)i * ld;
    for (int j = 0; j <= i; ++j) {
      dst[j] = src[j];
      nonfinite |= !(std::fabs(src[j]) <= std::numeric_limits<T>::max());  // NaN or ±Inf
    }
    nonfinite |= !(std::fabs(w0[i]) <= std::numeric_limits<T>::max());
  }
  bad |= nonfinite != 0;
  s.pending.clear();
  for (int j = 0; j < B; ++j) {
    const bool pre = mask != nullptr && mask[j];
    s.w[j] = pre ? T(0) : w0[j];
    s.diag[j] = H0[(int64_t)j * B + j];
    s.pen[j] = T(0);
    s.orig[j] = j;
    s.pos[j] = j;
    if (pre) s.pending.push_back(j);
  }
  if (nm_m > 0) s.lost.assign(B / nm_m + 1, 0);
  // The factor (see prune_order), built in its own layout in the scratch — step t writes column
  // t, one entry per row, and the rows' lines stay in L1 for 64 bytes' worth of steps; entries
  // after a position's elimination are never written and stay 0 — and copied out once the
  // block succeeded.
  T* F = nullptr;
  const int ldf = ld / V % 2 == 0 ? ld + V : ld;  // an odd number of lines: the rows' lines spread
  if (factor_out != nullptr) {                     // over every L1 set instead of a sixteenth
    s.F.assign((size_t)B * ldf, T(0));
    F = s.F.data();
  }
  const T inf = std::numeric_limits<T>::infinity();
  size_t next_pending = 0;
  int n = B;
  T cum = T(0);
  for (int t = 0; t < nsteps; ++t) {
    int q;
    T sq = T(0);
    if (next_pending < s.pending.size()) {
      q = s.pos[s.pending[next_pending++]];
    } else {
      q = argmin_score(s, n);
      if (q < 0) {  // every score NaN: take the first eligible position, flagged
        q = 0;
        while (q < n - 1 && s.pen[q] == inf) ++q;
        bad = true;
      }
      sq = s.w[q] * s.w[q] / s.diag[q];
    }
    const T d = s.diag[q];
    if (!(d > T(0)) || !std::isfinite(d) || !std::isfinite(sq)) bad = true;
    cum += sq / T(2);
    order_out[t] = s.orig[q];
    loss_out[t] = cum;
    const int p = n - 1;
    swap_positions(s, ld, q, p);
    for (int k = 0; k < np; ++k) {  // the pending vectors follow the swap
      std::swap(s.pc[(size_t)k * ld + q], s.pc[(size_t)k * ld + p]);
      std::swap(s.ph[(size_t)k * ld + q], s.ph[(size_t)k * ld + p]);
    }
    T* __restrict h = s.ph.data() + (size_t)np * ld;  // this step's column joins the pending set
    T* __restrict c = s.pc.data() + (size_t)np * ld;
    T* __restrict w = s.w.data();
    T* __restrict dg = s.diag.data();
    const T* __restrict rowp = L + (int64_t)p * ld;
    T cp[kPending];
    for (int k = 0; k < np; ++k) cp[k] = s.pc[(size_t)k * ld + p];
    row_less_pending(h, rowp, cp, s.ph.data(), np, ld, 0, (p + V - 1) / V);  // the pivot's column
    const T rd = T(1) / d;
    for (int i = 0; i < p; ++i) c[i] = h[i] * rd;
    if (F != nullptr) {  // step t: the multipliers H(i, q)/H_qq of the survivors, and w_q at q
      T* __restrict col = F + t;
      const int* __restrict orig = s.orig.data();
      for (int i = 0; i < p; ++i) col[(int64_t)orig[i] * ldf] = c[i];
      col[(int64_t)orig[p] * ldf] = w[p];
    }
    const T coef = w[p] * rd;
    for (int i = 0; i < p; ++i) {
      w[i] -= h[i] * coef;
      dg[i] -= c[i] * h[i];
    }
    w[p] = T(0);
    if (++np == kPending && t + 1 < nsteps) {  // the triangle catches up with the pending steps
      apply_pending(L, ld, p, s.pc.data(), s.ph.data(), np, ld);
      np = 0;
    }
    if (nm_m > 0) {
      const int g = s.orig[p] / nm_m;
      if (++s.lost[g] >= nm_m - nm_n)
        for (int x = g * nm_m; x < (g + 1) * nm_m; ++x)
          if (s.pos[x] < p) s.pen[s.pos[x]] = inf;
    }
    n = p;
  }
  *bad_out = bad ? 1 : 0;
  // Every read of H0 happened before the first step, so factor_out may be H0 itself (in place); a
  // failed block keeps its input for the caller's float64 retry.
  if (F != nullptr && !bad)
    for (int x = 0; x < B; ++x) std::memcpy(factor_out + (int64_t)x * B, F + (int64_t)x * ldf, sizeof(T) * B);
}


// ---------------------------------------------------------------------------------------------
// Reconstruction of one block without replaying the elimination: with S the first k positions
// of the order, the final weights are the joint OBS solution w − H[:, S] v, v = H[S,S]⁻¹ w_S
// (SPEC §3; the solution does not depend on the order within S). H[S,S] is gathered with S in
// decreasing index order, so that each row of its upper form is a run of one row of H's lower
// triangle read backwards (no scattered reads), and factored by a blocked Cholesky: k³/6
// multiply-adds, mostly in rank-kChol updates of kRows rows at a time, against the
// ≈ (B³ − (B − k)³)/6 of a replay, whose rank-one steps also update the rows of the survivors.
// ---------------------------------------------------------------------------------------------

// Vec<T> here: 32 bytes, loaded and stored unaligned. On the AVX-512 machine measured, 64-byte
// vectors ran these small-matrix loops slower (block 62 → 45 µs at k = 144).

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// Sum of a vector's lanes by halving (log₂ V dependent adds instead of V).
template <typename T>
inline T hsum(Vec<T> v) {
  constexpr int V = kVecBytes / sizeof(T);
  T t[V];
  std::memcpy(t, &v, sizeof(v));
  for (int w = V / 2; w >= 1; w /= 2)
    for (int c = 0; c < w; ++c) t[c] += t[c + w];
  return t[0];
}

constexpr int kChol = 8;  // panel width of the blocked Cholesky
constexpr int kRows = 4;  // rows per register tile of its trailing update
constexpr int kCols = 2;  // vectors per row of that tile

template <typename T>
struct RecScratch {
  std::vector<T> A, z, vfull, delta;
  std::vector<int> seen, idx;
};

// Cholesky A = UᵀU in place, upper form: A (k×k, row stride ld ≥ n rounded up to V, plus
// kCols·V; k + kChol rows, zero past row k) holds A(i, j) at row i, column j ≥ i, and ends holding
// U (= Lᵀ). Columns k..n−1 are right-hand sides b carried along: they end holding U⁻ᵀb (the
// forward substitution, done by the same updates). Right-looking in panels of kChol rows; every
// loop runs along contiguous rows: the panel's rows are scaled and updated by axpys, and the
// trailing rows by a rank-kChol update in kRows × kCols-vector register tiles whose vectors run
// left of the diagonal and past n into scratch columns. Returns false at a pivot that is not
// positive and finite.
template <typename T>
bool cholesky_upper(T* A, int ld, int k, int n) {
  constexpr int V = kVecBytes / sizeof(T);
  for (int j0 = 0; j0 < k; j0 += kChol) {
    const int pe = std::min(j0 + kChol, k);
    for (int c = j0; c < pe; ++c) {  // the panel's rows
      T* rc = A + (int64_t)c * ld;
      T d = rc[c];
      if (!(d > T(0)) || !std::isfinite(d)) return false;
      d = std::sqrt(d);
      rc[c] = d;
      const T inv = T(1) / d;  // whole vectors: the rows are padded, zero past n
      for (int j = c + 1; j < n; j += V) store<T>(rc + j, load<T>(rc + j) * inv);
      for (int p = c + 1; p < pe; ++p) {
        T* rp = A + (int64_t)p * ld;
        const T a = rc[p];
        for (int j = p; j < n; j += V) store<T>(rp + j, load<T>(rp + j) - a * load<T>(rc + j));
      }
    }
    // trailing rows: A(i, c) −= Σ_p U(p, i) U(p, c) for pe ≤ i ≤ c, in register tiles of kRows
    // rows × kCols vectors (kRows·kCols independent accumulators, enough to hide the FMA latency);
    // the coefficients U(p, i) are broadcast from the panel's rows (zero past k); the vectors run
    // left of the diagonal and past k into scratch columns
    for (int i0 = pe; i0 < k; i0 += kRows) {
      for (int c0 = i0; c0 < n; c0 += kCols * V) {
        Vec<T> acc[kRows][kCols];
        for (int r = 0; r < kRows; ++r)
          for (int q = 0; q < kCols; ++q) acc[r][q] = load<T>(A + (int64_t)(i0 + r) * ld + c0 + q * V);
        for (int p = 0; p < kChol; ++p) {
          const T* prow = A + (int64_t)(j0 + p) * ld + c0;
          const T* coef = A + (int64_t)(j0 + p) * ld + i0;
          Vec<T> b[kCols];
          for (int q = 0; q < kCols; ++q) b[q] = load<T>(prow + q * V);
          for (int r = 0; r < kRows; ++r) {
            const T cr = coef[r];
            for (int q = 0; q < kCols; ++q) acc[r][q] -= cr * b[q];
          }
        }
        for (int r = 0; r < kRows; ++r)
          for (int q = 0; q < kCols; ++q) store<T>(A + (int64_t)(i0 + r) * ld + c0 + q * V, acc[r][q]);
      }
    }
  }
  return true;
}

// Dot product of n entries in vector partial sums (a vector loop without -ffast-math).
template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int n) {
  constexpr int V = kVecBytes / sizeof(T);
  Vec<T> part = {};
  int j = 0;
  for (; j + V <= n; j += V) part += load<T>(a + j) * load<T>(b + j);
  T s = hsum<T>(part);
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// δ += H v for symmetric H (B×B) from its lower triangle: row x gives its dot with v to δ_x and
// v_x times itself to δ before x. Returns Σ H(x, j)·0 over the triangle: NaN iff an entry read is
// NaN or infinite (the reads double as the kernel's input scan).
template <typename T>
T sym_lower_matvec(const T* __restrict H, const T* __restrict v, T* __restrict delta, int B) {
  constexpr int V = kVecBytes / sizeof(T);
  Vec<T> pz = {};
  T probe = T(0);
  for (int x = 0; x < B; ++x) {
    const T* __restrict row = H + (int64_t)x * B;
    const T vx = v[x];
    const Vec<T> vxv = Vec<T>{} + vx;
    Vec<T> part = {};
    int j = 0;
    for (; j + V <= x; j += V) {
      const Vec<T> h = load<T>(row + j);
      part += h * load<T>(v + j);
      pz += h * T(0);
      store<T>(delta + j, load<T>(delta + j) + h * vxv);
    }
    T sum = row[x] * vx;
    for (; j < x; ++j) {
      const T h = row[j];
      sum += h * v[j];
      probe += h * T(0);
      delta[j] += h * vx;
    }
    probe += row[x] * T(0);
    delta[x] += sum + hsum<T>(part);
  }
  probe += hsum<T>(pz);
  return probe;
}

// 0 if the first `steps` entries of ord are distinct positions in [0, B); else 2 (one outside) or
// 3 (one repeated), the codes of the reconstruction kernels.
inline uint8_t order_code(const int64_t* ord, int steps, int B, std::vector<int>& seen) {
  seen.assign(B, 0);
  for (int t = 0; t < steps; ++t) {
    const int64_t o = ord[t];
    if (o < 0 || o >= B) return 2;
    if (seen[o]++) return 3;
  }
  return 0;
}

// Codes of bad_out: 1 a pivot or a diagonal entry that was not positive, or NaN/Inf among what the
// block reads (H's lower triangle, w);
// 2 a position outside [0, B) in order; 3 a position repeated in order.
template <typename T>
void reconstruct_block(const T* w0, const T* H, const int64_t* ord, int steps, int k, int B, T* w_out,
                       uint8_t* pruned_out, uint8_t* bad_out, RecScratch<T>& s) {
  constexpr int V = kVecBytes / sizeof(T);
  if (const uint8_t code = order_code(ord, steps, B, s.seen)) {
    *bad_out = code;
    return;
  }
  for (int x = 0; x < B; ++x) pruned_out[x] = 0;
  for (int i = 0; i < k; ++i) pruned_out[ord[i]] = 1;
  s.idx.clear();  // S in decreasing index order
  for (int x = B - 1; x >= 0; --x)
    if (pruned_out[x]) s.idx.push_back(x);
  const int* idx = s.idx.data();
  bool bad = false;
  s.vfull.assign(B, T(0));
  T* vfull = s.vfull.data();
  if (k > 0) {
    const int ld = (k + 1 + V - 1) / V * V + kCols * V;  // w_S rides along in column k
    const int rows = k + std::max(kRows, kChol);
    if (s.A.size() < (size_t)rows * ld) s.A.resize((size_t)rows * ld);
    s.z.resize(k);
    T* A = s.A.data();
    T* z = s.z.data();
    for (int i = 0; i < k; ++i) {  // row i of the upper form: H(idx_i, idx_j), idx_j ≤ idx_i, zero elsewhere
      const T* hrow = H + (int64_t)idx[i] * B;
      T* row = A + (int64_t)i * ld;
      std::fill(row, row + i, T(0));
      for (int j = i; j < k; ++j) row[j] = hrow[idx[j]];
      row[k] = w0[idx[i]];
      std::fill(row + k + 1, row + ld, T(0));
    }
    std::fill(A + (int64_t)k * ld, A + (int64_t)rows * ld, T(0));
    bad = !cholesky_upper(A, ld, k, k + 1);  // column k: y = U⁻ᵀ w_S
    if (!bad) {
      for (int i = 0; i < k; ++i) z[i] = A[(int64_t)i * ld + k];
      for (int i = k - 1; i >= 0; --i) {  // U v = y
        const T* row = A + (int64_t)i * ld;
        z[i] = (z[i] - dot(row + i + 1, z + i + 1, k - i - 1)) / row[i];
      }
      for (int i = 0; i < k; ++i) vfull[idx[i]] = z[i];
    }
  }
  s.delta.assign(B, T(0));
  T probe = sym_lower_matvec(H, vfull, s.delta.data(), B);
  for (int x = 0; x < B; ++x) {
    probe += w0[x] * T(0);
    bad |= !(H[(int64_t)x * B + x] > T(0));  // every diagonal entry, as the other backends' callers check
  }
  bad |= probe != T(0);
  for (int x = 0; x < B; ++x) w_out[x] = pruned_out[x] ? T(0) : w0[x] - s.delta[x];
  *bad_out = bad ? 1 : 0;
}

// Final weights from the factor prune_order left (see ovit_cpu.h): a_t = F(order_t, t) for t < k,
// then w0_x − Σ_{t<k} F(x, t)·a_t for every survivor x — a dot product over a contiguous row
// prefix, (B − k)·k multiply-adds per block. Codes as reconstruct_block's (1: NaN/Inf among what
// the block reads or produces).
template <typename T>
void reconstruct_factored_block(const T* w0, const T* F, const int64_t* ord, int steps, int k, int B, T* w_out,
                                uint8_t* pruned_out, uint8_t* bad_out, RecScratch<T>& s) {
  if (const uint8_t code = order_code(ord, steps, B, s.seen)) {
    *bad_out = code;
    return;
  }
  s.z.resize(std::max(k, 1));
  T* a = s.z.data();
  T probe = T(0);
  for (int x = 0; x < B; ++x) pruned_out[x] = 0;
  for (int t = 0; t < k; ++t) {
    pruned_out[ord[t]] = 1;
    a[t] = F[ord[t] * B + t];
    probe += a[t] * T(0);
  }
  for (int x = 0; x < B; ++x) {
    if (pruned_out[x]) {
      w_out[x] = T(0);
      continue;
    }
    const T v = w0[x] - dot(F + (int64_t)x * B, a, k);
    probe += v * T(0);  // NaN iff a weight, a multiplier or the result is NaN or infinite
    w_out[x] = v;
  }
  *bad_out = probe != T(0) ? 1 : 0;
}

}  // namespace

template <typename G>
int64_t gram_update(double* gram, const G* grads, int64_t nb, int B, int64_t k, int64_t N, int threads,
                    bool overwrite) {
  check_block(B);
  if (N != nb * B) throw std::invalid_argument("grads must have nb*B columns");
  const int t = std::max(1, threads);
  std::vector<Scratch64> scratch(t);
  std::vector<int64_t> nonfinite(t, 0);
  parallel_for(nb, threads, [&](int64_t b, int tid) {
    nonfinite[tid] +=
        gram_block(gram + b * (int64_t)B * B, grads, B, k, N, b * (int64_t)B, scratch[tid], overwrite);
  });
  int64_t total = 0;
  for (int64_t v : nonfinite) total += v;
  return total;
}

template <typename T>
void damped_inverse(const double* gram, int64_t nb, int B, double inv_m, double damp, bool relative, T* out,
                    uint8_t* ok, int threads) {
  check_block(B);
  struct Scratch {
    Scratch64 U;
    SweepScratch sweep;
  };
  std::vector<Scratch> scratch(std::max(1, threads));
  parallel_for(nb, threads, [&](int64_t b, int tid) {
    Scratch& s = scratch[tid];
    s.U.resize((size_t)B * B);
    const double* g = gram + b * (int64_t)B * B;
    double* U = s.U.data();
    double mean = 0.0;
    for (int i = 0; i < B; ++i) mean += g[(int64_t)i * B + i] * inv_m;
    mean /= B;
    const double lam = relative && mean > 0.0 ? damp * mean : damp;
    for (int i = 0; i < B; ++i) {
      const double* src = g + (int64_t)i * B;
      double* dst = U + (int64_t)i * B;
      for (int j = i; j < B; ++j) dst[j] = src[j] * inv_m;
      dst[i] += lam;
    }
    bool good = sweep_all(U, B, s.sweep);
    T* o = out + b * (int64_t)B * B;
    int nonfinite = 0;  // an integer OR: a vector reduction, unlike a floating-point sum
    for (int i = 0; i < B; ++i) {  // the upper triangle, then the lower one by 8×8 tiles
      const double* src = U + (int64_t)i * B;
      T* dst = o + (int64_t)i * B;
      for (int j = i; j < B; ++j) {
        const T v = static_cast<T>(-src[j]);
        dst[j] = v;
        nonfinite |= !(std::fabs(v) <= std::numeric_limits<T>::max());  // NaN or ±Inf, also past T's range
      }
    }
    for (int i0 = 0; i0 < B; i0 += 8)
      for (int j0 = 0; j0 <= i0; j0 += 8) {
        if (j0 + 8 <= i0 && i0 + 8 <= B) {  // a whole tile below the diagonal: fixed-size loops
#pragma GCC unroll 8
          for (int i = 0; i < 8; ++i)
#pragma GCC unroll 8
            for (int j = 0; j < 8; ++j) o[(int64_t)(i0 + i) * B + j0 + j] = o[(int64_t)(j0 + j) * B + i0 + i];
          continue;
        }
        for (int i = i0; i < std::min(B, i0 + 8); ++i)
          for (int j = j0; j < std::min(i, j0 + 8); ++j) o[(int64_t)i * B + j] = o[(int64_t)j * B + i];
      }
    ok[b] = good && !nonfinite ? 1 : 0;
  });
}

template <typename T, typename G>
int64_t woodbury_update(T* finv, const G* grads, int64_t nb, int B, int64_t k, int64_t N, double num_grads, int rank,
                        int threads) {
  check_block(B);
  if (N != nb * B) throw std::invalid_argument("grads must have nb*B columns");
  if (rank < 1) throw std::invalid_argument("rank must be positive");
  struct Scratch {
    std::vector<double> H, g, u, vt, s;
    int64_t nonfinite = 0;
  };
  std::vector<Scratch> scratch(std::max(1, threads));
  parallel_for(nb, threads, [&](int64_t b, int tid) {
    Scratch& sc = scratch[tid];
    sc.H.resize((size_t)B * B);
    double* H = sc.H.data();
    T* hb = finv + b * (int64_t)B * B;
    for (int64_t i = 0; i < (int64_t)B * B; ++i) H[i] = static_cast<double>(hb[i]);
    bool failed = false;
    for (int64_t i0 = 0; i0 < k && !failed; i0 += rank) {
      const int kk = static_cast<int>(std::min<int64_t>(rank, k - i0));
      sc.g.assign((size_t)B * kk, 0.0);   // G (B × kk)
      sc.u.assign((size_t)B * kk, 0.0);   // U = H G (B × kk)
      sc.vt.assign((size_t)kk * B, 0.0);  // Vᵀ (kk × B)
      sc.s.assign((size_t)kk * kk, 0.0);  // S = m I + Gᵀ U, then its Cholesky factor L (lower)
      double* g = sc.g.data();
      double* u = sc.u.data();
      double* vt = sc.vt.data();
      double* S = sc.s.data();
      for (int c = 0; c < kk; ++c) {
        const G* src = grads + (i0 + c) * N + b * (int64_t)B;
        for (int r = 0; r < B; ++r) {
          g[(int64_t)r * kk + c] = static_cast<double>(src[r]);
          sc.nonfinite += !std::isfinite(g[(int64_t)r * kk + c]);
        }
      }
      for (int i = 0; i < B; ++i) {
        double* ui = u + (int64_t)i * kk;
        const double* hi = H + (int64_t)i * B;
        for (int j = 0; j < B; ++j) {
          const double a = hi[j];
          const double* gj = g + (int64_t)j * kk;
          for (int c = 0; c < kk; ++c) ui[c] += a * gj[c];
        }
      }
      for (int r = 0; r < B; ++r) {
        const double* gr = g + (int64_t)r * kk;
        const double* ur = u + (int64_t)r * kk;
        for (int a = 0; a < kk; ++a)
          for (int c = 0; c <= a; ++c) S[(int64_t)a * kk + c] += gr[a] * ur[c];
      }
      for (int a = 0; a < kk; ++a) S[(int64_t)a * kk + a] += num_grads;
      for (int j = 0; j < kk && !failed; ++j) {  // Cholesky, lower
        double d = S[(int64_t)j * kk + j];
        for (int c = 0; c < j; ++c) d -= S[(int64_t)j * kk + c] * S[(int64_t)j * kk + c];
        if (!(d > 0.0) || !std::isfinite(d)) {
          failed = true;
          break;
        }
        d = std::sqrt(d);
        S[(int64_t)j * kk + j] = d;
        for (int a = j + 1; a < kk; ++a) {
          double v = S[(int64_t)a * kk + j];
          for (int c = 0; c < j; ++c) v -= S[(int64_t)a * kk + c] * S[(int64_t)j * kk + c];
          S[(int64_t)a * kk + j] = v / d;
        }
      }
      if (failed) break;
      for (int r = 0; r < B; ++r) {  // row r of V solves L vᵀ = u_rᵀ
        const double* ur = u + (int64_t)r * kk;
        for (int a = 0; a < kk; ++a) {
          double v = ur[a];
          for (int c = 0; c < a; ++c) v -= S[(int64_t)a * kk + c] * vt[(int64_t)c * B + r];
          vt[(int64_t)a * B + r] = v / S[(int64_t)a * kk + a];
        }
      }
      for (int i = 0; i < B; ++i) {  // H -= V Vᵀ (upper), mirrored below
        double* hi = H + (int64_t)i * B;
        for (int c = 0; c < kk; ++c) {
          const double a = vt[(int64_t)c * B + i];
          const double* vc = vt + (int64_t)c * B;
          for (int j = i; j < B; ++j) hi[j] -= a * vc[j];
        }
      }
      for (int i = 1; i < B; ++i)
        for (int j = 0; j < i; ++j) H[(int64_t)i * B + j] = H[(int64_t)j * B + i];
    }
    const T nan = std::numeric_limits<T>::quiet_NaN();
    for (int64_t i = 0; i < (int64_t)B * B; ++i) hb[i] = failed ? nan : static_cast<T>(H[i]);
  });
  int64_t total = 0;
  for (const Scratch& sc : scratch) total += sc.nonfinite;
  return total;
}

template <typename T>
void prune_order(const T* w, const T* finv, const uint8_t* mask, int64_t nb, int B, int steps, int nm_n, int nm_m,
                 int64_t* order, T* loss, uint8_t* bad, T* factor, int threads) {
  check_block(B);
  if (steps < 0 || steps > B) throw std::invalid_argument("steps must lie in [0, B]");
  if (nm_m > 0 && (B % nm_m != 0 || nm_n < 0 || nm_n >= nm_m)) throw std::invalid_argument("bad N:M pattern");
  std::vector<ElimScratch<T>> scratch(std::max(1, threads));
  parallel_for(nb, threads, [&](int64_t b, int tid) {
    eliminate_block<T>(w + b * B, finv + b * (int64_t)B * B, mask == nullptr ? nullptr : mask + b * B, B, steps,
                       nm_n, nm_m, order + b * steps, loss + b * steps, bad + b,
                       factor == nullptr ? nullptr : factor + b * (int64_t)B * B, scratch[tid]);
  });
}

template <typename T>
void reconstruct(const T* w, const T* finv, const int64_t* order, const int64_t* counts, int64_t nb, int B,
                 int steps, T* w_out, uint8_t* pruned, uint8_t* bad, int threads) {
  check_block(B);
  if (steps < 0 || steps > B) throw std::invalid_argument("steps must lie in [0, B]");
  std::vector<RecScratch<T>> scratch(std::max(1, threads));
  parallel_for(nb, threads, [&](int64_t b, int tid) {
    const int64_t c = counts[b];
    if (c < 0 || c > steps) throw std::invalid_argument("counts must lie in [0, steps]");
    reconstruct_block<T>(w + b * B, finv + b * (int64_t)B * B, order + b * steps, steps, (int)c, B, w_out + b * B,
                         pruned + b * B, bad + b, scratch[tid]);
  });
}

template <typename T>
void reconstruct_factored(const T* w, const T* factor, const int64_t* order, const int64_t* counts, int64_t nb,
                          int B, int steps, T* w_out, uint8_t* pruned, uint8_t* bad, int threads) {
  check_block(B);
  if (steps < 0 || steps > B) throw std::invalid_argument("steps must lie in [0, B]");
  std::vector<RecScratch<T>> scratch(std::max(1, threads));
  parallel_for(nb, threads, [&](int64_t b, int tid) {
    const int64_t c = counts[b];
    if (c < 0 || c > steps) throw std::invalid_argument("counts must lie in [0, steps]");
    reconstruct_factored_block<T>(w + b * B, factor + b * (int64_t)B * B, order + b * steps, steps, (int)c, B,
                                  w_out + b * B, pruned + b * B, bad + b, scratch[tid]);
  });
}

template <typename T>
void scores(const T* w, const T* finv, int64_t nb, int B, T* out, int threads) {
  check_block(B);
  parallel_for(nb, threads, [&](int64_t b, int) {
    for (int j = 0; j < B; ++j) {
      const T x = w[b * B + j];
      out[b * B + j] = x * x / (T(2) * finv[b * (int64_t)B * B + (int64_t)j * B + j]);
    }
  });
}

template <typename T>
void update_independent(const T* w, const T* finv, const uint8_t* prune, int64_t nb, int B, T* out, uint8_t* bad,
                        int threads) {
  check_block(B);
  parallel_for(nb, threads, [&](int64_t b, int) {
    // out = w − Σ_{j ∈ S} (w_j / H_jj) H[:, j], as axpys over the rows of the symmetric H (column j = row j),
    // which vectorise; every row is also read for NaN/Inf (x − x ≠ 0 exactly when x is not finite).
    const T* H = finv + b * (int64_t)B * B;
    const T* wb = w + b * B;
    const uint8_t* pb = prune + b * B;
    T* ob = out + b * B;
    for (int i = 0; i < B; ++i) ob[i] = wb[i];
    bool failed = false;
    for (int j = 0; j < B; ++j) {
      const T* hj = H + (int64_t)j * B;
      uint8_t nonfinite = 0;
      for (int i = 0; i < B; ++i) nonfinite |= (hj[i] - hj[i]) != T(0);
      failed |= nonfinite != 0;
      if (!pb[j]) continue;
      const T d = hj[j];
      if (!(d > T(0))) {
        failed = true;
        continue;
      }
      const T x = wb[j] / d;
      for (int i = 0; i < B; ++i) ob[i] -= x * hj[i];
    }
    for (int i = 0; i < B; ++i)
      if (pb[i]) ob[i] = T(0);
    bad[b] = failed ? 1 : 0;
  });
}

// Global selection (SPEC §3) over the layers' cumulative losses: keys are the running maximum of
// each block's losses past its excluded leading entries, in (layer, block, step) order; the K-th
// smallest key is found by a selection (O(N)) on a copy, then each block takes its keys below it
// and, in that same order, the first of the keys equal to it until exactly K are taken.
int64_t prune_counts(const LossLayer* layers, int nlayers, double sparsity, int64_t* counts) {
  int64_t total = 0;
  for (int l = 0; l < nlayers; ++l) {
    const LossLayer& L = layers[l];
    for (int64_t b = 0; b < L.nb; ++b) {
      const int64_t e = L.exclude == nullptr ? 0 : L.exclude[b];
      if (e < 0 || e > L.steps) throw std::invalid_argument("exclude must lie in [0, steps]");
      total += L.steps - e;
    }
  }
  std::vector<double> keys((size_t)total);
  int64_t n = 0;
  for (int l = 0; l < nlayers; ++l) {
    const LossLayer& L = layers[l];
    bool finite = true;
    for (int64_t b = 0; b < L.nb; ++b) {
      const int64_t e = L.exclude == nullptr ? 0 : L.exclude[b];
      double run = -std::numeric_limits<double>::infinity();
      for (int64_t t = 0; t < L.steps; ++t) {
        const int64_t at = b * L.steps + t;
        const double x = L.fp64 ? static_cast<const double*>(L.loss)[at] : static_cast<const float*>(L.loss)[at];
        finite &= std::isfinite(x);
        run = x > run ? x : run;
        if (t >= e) keys[(size_t)n++] = run;
      }
    }
    if (!finite) return l;  // the caller names the layer
  }
  const int64_t K = (int64_t)std::floor(sparsity * (double)total + 0.5);
  int64_t need = K;
  double thr = 0.0;
  if (K > 0) {
    std::vector<double> sel(keys);
    std::nth_element(sel.begin(), sel.begin() + (K - 1), sel.end());
    thr = sel[(size_t)(K - 1)];
    for (double x : keys) need -= x < thr;
  }
  n = 0;
  int64_t out = 0;
  for (int l = 0; l < nlayers; ++l) {
    const LossLayer& L = layers[l];
    for (int64_t b = 0; b < L.nb; ++b, ++out) {
      const int64_t e = L.exclude == nullptr ? 0 : L.exclude[b];
      const double* kb = keys.data() + n;
      const int64_t len = L.steps - e;
      n += len;
      int64_t c = 0;
      if (K > 0) {
        while (c < len && kb[c] < thr) ++c;  // non-decreasing: the keys below form a prefix
        while (c < len && need > 0 && kb[c] == thr) {
          ++c;
          --need;
        }
      }
      counts[out] = c + e;
    }
  }
  return -1;
}

#define OVIT_CPU_INSTANTIATE(T)                                                                                   \
  template void damped_inverse<T>(const double*, int64_t, int, double, double, bool, T*, uint8_t*, int);         \
  template int64_t woodbury_update<T, T>(T*, const T*, int64_t, int, int64_t, int64_t, double, int, int);        \
  template void prune_order<T>(const T*, const T*, const uint8_t*, int64_t, int, int, int, int, int64_t*, T*,    \
                               uint8_t*, T*, int);                                                                \
  template void reconstruct_factored<T>(const T*, const T*, const int64_t*, const int64_t*, int64_t, int, int,  \
                                        T*, uint8_t*, uint8_t*, int);                                             \
  template void reconstruct<T>(const T*, const T*, const int64_t*, const int64_t*, int64_t, int, int, T*,       \
                               uint8_t*, uint8_t*, int);                                                          \
  template void scores<T>(const T*, const T*, int64_t, int, T*, int);                                            \
  template void update_independent<T>(const T*, const T*, const uint8_t*, int64_t, int, T*, uint8_t*, int);      \
  template int64_t gram_update<T>(double*, const T*, int64_t, int, int64_t, int64_t, int, bool);

OVIT_CPU_INSTANTIATE(float)
OVIT_CPU_INSTANTIATE(double)
template int64_t woodbury_update<double, float>(double*, const float*, int64_t, int, int64_t, int64_t, double, int,
                                                int);

}  // namespace ovit::cpu
