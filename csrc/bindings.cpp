// pybind11 module ovit_kernels._C: the only translation unit that includes torch. It checks
// every tensor (naming the argument and what was expected), then calls the torch-free
// launchers on the current CUDA stream. Outputs are allocated by the caller (so tests can
// poison them) and written completely by the kernels. The Python side registers these functions as
// torch.library custom ops with fake kernels (ovit_kernels/cuda_backend.py).

#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "ovit_kernels.h"

namespace {

void check_cuda_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

void check_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " is on ", a.device(), " but ", bn, " is on ", b.device());
}

void check_block(int64_t B, bool fp64) {
  int lim = ovit::max_block_size(fp64);
  TORCH_CHECK(B >= 1 && B <= lim, "block size ", B, " is outside what the CUDA kernels hold on chip (1..", lim,
              fp64 ? " in float64)" : " in float32)");
}

void woodbury_update(at::Tensor finv, const at::Tensor& grads, double num_grads) {
  check_tensor(finv, "finv", 3);
  check_tensor(grads, "grads", 2);
  check_same_device(finv, grads, "finv", "grads");
  const int64_t nb = finv.size(0), B = finv.size(1);
  TORCH_CHECK(finv.size(2) == B, "finv must be (nb, B, B), got ", finv.sizes());
  TORCH_CHECK(grads.size(1) == nb * B, "grads must have nb*B = ", nb * B, " columns, got ", grads.size(1));
  TORCH_CHECK(num_grads > 0, "num_grads must be positive, got ", num_grads);
  check_block(B, finv.scalar_type() == at::kDouble);
  c10::cuda::CUDAGuard guard(finv.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (finv.scalar_type() == at::kFloat) {
    TORCH_CHECK(grads.scalar_type() == at::kFloat, "grads must be float32 for a float32 finv, got ",
                grads.scalar_type());
    err = ovit::launch_woodbury_update<float, float>(finv.data_ptr<float>(), grads.data_ptr<float>(), nb, (int)B,
                                                     grads.size(0), grads.size(1), num_grads, stream);
  } else if (finv.scalar_type() == at::kDouble) {
    if (grads.scalar_type() == at::kDouble)
      err = ovit::launch_woodbury_update<double, double>(finv.data_ptr<double>(), grads.data_ptr<double>(), nb,
                                                         (int)B, grads.size(0), grads.size(1), num_grads, stream);
    else {
      TORCH_CHECK(grads.scalar_type() == at::kFloat, "grads must be float32 or float64, got ", grads.scalar_type());
      err = ovit::launch_woodbury_update<double, float>(finv.data_ptr<double>(), grads.data_ptr<float>(), nb,
                                                        (int)B, grads.size(0), grads.size(1), num_grads, stream);
    }
  } else {
    TORCH_CHECK(false, "finv must be float32 or float64, got ", finv.scalar_type());
  }
  check_cuda_launch(err, "woodbury_update_");
}

void check_out(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
               const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  check_same_device(like, t, "the inputs", name);
}

void obs_prune_order(const at::Tensor& w, const at::Tensor& finv, const c10::optional<at::Tensor>& mask,
                     int64_t nm_n, int64_t nm_m, at::Tensor order, at::Tensor loss, at::Tensor bad) {
  check_tensor(w, "w_blocks", 2);
  check_tensor(finv, "finv", 3);
  check_same_device(w, finv, "w_blocks", "finv");
  const int64_t nb = w.size(0), B = w.size(1);
  TORCH_CHECK(finv.size(0) == nb && finv.size(1) == B && finv.size(2) == B, "finv must be (", nb, ", ", B, ", ", B,
              "), got ", finv.sizes());
  TORCH_CHECK(w.scalar_type() == finv.scalar_type(), "w_blocks must have finv's dtype ", finv.scalar_type(),
              ", got ", w.scalar_type());
  check_tensor(order, "order", 2);
  const int64_t steps = order.size(1);
  TORCH_CHECK(steps <= B, "order must have at most B = ", B, " steps, got ", steps);
  check_out(order, "order", {nb, steps}, at::kLong, w);
  check_out(loss, "loss", {nb, steps}, finv.scalar_type(), w);
  check_out(bad, "bad", {nb}, at::kInt, w);
  const uint8_t* mptr = nullptr;
  if (mask.has_value()) {
    check_tensor(*mask, "mask", 2);
    TORCH_CHECK(mask->scalar_type() == at::kByte || mask->scalar_type() == at::kBool, "mask must be bool or uint8");
    TORCH_CHECK(mask->size(0) == nb && mask->size(1) == B, "mask must be (", nb, ", ", B, "), got ", mask->sizes());
    check_same_device(w, *mask, "w_blocks", "mask");
    mptr = static_cast<const uint8_t*>(mask->data_ptr());
  }
  check_block(B, finv.scalar_type() == at::kDouble);
  c10::cuda::CUDAGuard guard(w.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (finv.scalar_type() == at::kFloat)
    err = ovit::launch_obs_prune_order<float>(w.data_ptr<float>(), finv.data_ptr<float>(), mptr, nb, (int)B,
                                              (int)steps, (int)nm_n, (int)nm_m, order.data_ptr<int64_t>(),
                                              loss.data_ptr<float>(), bad.data_ptr<int32_t>(), stream);
  else if (finv.scalar_type() == at::kDouble)
    err = ovit::launch_obs_prune_order<double>(w.data_ptr<double>(), finv.data_ptr<double>(), mptr, nb, (int)B,
                                               (int)steps, (int)nm_n, (int)nm_m, order.data_ptr<int64_t>(),
                                               loss.data_ptr<double>(), bad.data_ptr<int32_t>(), stream);
  else
    TORCH_CHECK(false, "finv must be float32 or float64, got ", finv.scalar_type());
  check_cuda_launch(err, "obs_prune_order");
}

void obs_reconstruct(const at::Tensor& w, const at::Tensor& finv, const at::Tensor& order, const at::Tensor& counts,
                     at::Tensor w_out, at::Tensor pruned, at::Tensor bad) {
  check_tensor(w, "w_blocks", 2);
  check_tensor(finv, "finv", 3);
  check_tensor(order, "order", 2);
  check_tensor(counts, "counts", 1);
  check_same_device(w, finv, "w_blocks", "finv");
  check_same_device(w, order, "w_blocks", "order");
  check_same_device(w, counts, "w_blocks", "counts");
  const int64_t nb = w.size(0), B = w.size(1);
  TORCH_CHECK(finv.size(0) == nb && finv.size(1) == B && finv.size(2) == B, "finv must be (", nb, ", ", B, ", ", B,
              "), got ", finv.sizes());
  TORCH_CHECK(w.scalar_type() == finv.scalar_type(), "w_blocks must have finv's dtype");
  TORCH_CHECK(order.scalar_type() == at::kLong && order.size(0) == nb && order.size(1) <= B,
              "order must be int64 (", nb, ", steps <= ", B, "), got ", order.scalar_type(), " ", order.sizes());
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.size(0) == nb, "counts must be int64 (", nb, "), got ",
              counts.scalar_type(), " ", counts.sizes());
  check_out(w_out, "w_out", {nb, B}, finv.scalar_type(), w);
  check_out(pruned, "pruned", {nb, B}, at::kByte, w);
  check_out(bad, "bad", {nb}, at::kInt, w);
  check_block(B, finv.scalar_type() == at::kDouble);
  c10::cuda::CUDAGuard guard(w.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  cudaError_t err;
  const int steps = (int)order.size(1);
  if (finv.scalar_type() == at::kFloat)
    err = ovit::launch_obs_reconstruct<float>(w.data_ptr<float>(), finv.data_ptr<float>(), order.data_ptr<int64_t>(),
                                              counts.data_ptr<int64_t>(), nb, (int)B, steps, w_out.data_ptr<float>(),
                                              pruned.data_ptr<uint8_t>(), bad.data_ptr<int32_t>(), stream);
  else if (finv.scalar_type() == at::kDouble)
    err = ovit::launch_obs_reconstruct<double>(w.data_ptr<double>(), finv.data_ptr<double>(),
                                               order.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), nb, (int)B,
                                               steps, w_out.data_ptr<double>(), pruned.data_ptr<uint8_t>(),
                                               bad.data_ptr<int32_t>(), stream);
  else
    TORCH_CHECK(false, "finv must be float32 or float64, got ", finv.scalar_type());
  check_cuda_launch(err, "obs_reconstruct");
}

void damped_inverse(const at::Tensor& gram, double inv_m, double damp, bool relative, at::Tensor out,
                    at::Tensor ok) {
  check_tensor(gram, "gram", 3);
  TORCH_CHECK(gram.scalar_type() == at::kDouble, "gram must be float64, got ", gram.scalar_type());
  const int64_t nb = gram.size(0), B = gram.size(1);
  TORCH_CHECK(gram.size(2) == B, "gram must be (nb, B, B), got ", gram.sizes());
  TORCH_CHECK(damp > 0, "damp must be positive, got ", damp);
  const bool out_fp64 = out.scalar_type() == at::kDouble;
  TORCH_CHECK(out_fp64 || out.scalar_type() == at::kFloat, "out must be float32 or float64, got ", out.scalar_type());
  check_out(out, "out", {nb, B, B}, out.scalar_type(), gram);
  check_out(ok, "ok", {nb}, at::kInt, gram);
  check_block(B, true);
  c10::cuda::CUDAGuard guard(gram.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (out_fp64)
    err = ovit::launch_damped_inverse<double>(gram.data_ptr<double>(), nb, (int)B, inv_m, damp, relative ? 1 : 0,
                                              out.data_ptr<double>(), ok.data_ptr<int32_t>(), stream);
  else
    err = ovit::launch_damped_inverse<float>(gram.data_ptr<double>(), nb, (int)B, inv_m, damp, relative ? 1 : 0,
                                             out.data_ptr<float>(), ok.data_ptr<int32_t>(), stream);
  check_cuda_launch(err, "damped_inverse");
}

// The checks both sparse kernels share: x (tokens, K) fp16/bf16, values of x's dtype, out
// (tokens, n_out), an optional bias (n_out) of x's dtype. Returns the bias pointer (or null).
const void* check_spmm_common(const at::Tensor& x, const at::Tensor& vals, const c10::optional<at::Tensor>& bias,
                              const at::Tensor& out, int64_t n_out) {
  check_tensor(x, "x", 2);
  check_tensor(out, "out", 2);
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "x must be float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(vals.scalar_type() == x.scalar_type(), "values must have x's dtype ", x.scalar_type());
  check_same_device(x, vals, "x", "values");
  check_out(out, "out", {x.size(0), n_out}, x.scalar_type(), x);
  if (!bias.has_value()) return nullptr;
  check_tensor(*bias, "bias", 1);
  TORCH_CHECK(bias->size(0) == n_out && bias->scalar_type() == x.scalar_type(), "bias must be (", n_out,
              ") of x's dtype");
  check_same_device(x, *bias, "x", "bias");
  return bias->data_ptr();
}

void spmm_24(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& meta, const c10::optional<at::Tensor>& bias,
             at::Tensor out, bool gelu, int64_t variant) {
  check_tensor(vals, "values", 2);
  check_tensor(meta, "meta", 2);
  const int64_t n_out = vals.size(0);
  const void* bptr = check_spmm_common(x, vals, bias, out, n_out);
  const int64_t tokens = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 32 == 0, "in_features must be a multiple of 32 for the 2:4 kernel, got ", K);
  TORCH_CHECK(vals.size(1) == K / 2, "values must be (n_out, K/2) = (", n_out, ", ", K / 2, "), got ", vals.sizes());
  TORCH_CHECK(meta.scalar_type() == at::kShort && meta.size(0) == n_out && meta.size(1) == K / 16,
              "meta must be int16 (", n_out, ", ", K / 16, "), got ", meta.scalar_type(), " ", meta.sizes());
  check_same_device(x, meta, "x", "meta");
  TORCH_CHECK(variant >= 0 && variant <= 3,
              "variant must be 0 (auto), 1 (simple), 2 (pipelined) or 3 (pipelined, 256-token tiles), got ", variant);
  const auto* mptr = static_cast<const uint16_t*>(meta.data_ptr());
  TORCH_CHECK(variant < 2 || ovit::spmm_24_pipelined_ok(x.data_ptr(), vals.data_ptr(), mptr, (int)K),
              "the pipelined 2:4 kernel needs in_features % 64 == 0 (got ", K,
              "), 16-byte aligned x and values and 8-byte aligned meta");
  c10::cuda::CUDAGuard guard(x.device());
  cudaError_t err = ovit::launch_spmm_24(x.data_ptr(), vals.data_ptr(), mptr, bptr, out.data_ptr(), (int)tokens,
                                         (int)n_out, (int)K, gelu ? 1 : 0, x.scalar_type() == at::kBFloat16 ? 1 : 0,
                                         (int)variant, at::cuda::getCurrentCUDAStream());
  check_cuda_launch(err, "spmm_24");
}

void spmm_bitmap(const at::Tensor& x, const at::Tensor& bits, const at::Tensor& offsets, const at::Tensor& vals,
                 const c10::optional<at::Tensor>& bias, at::Tensor out, bool gelu) {
  check_tensor(bits, "bits", 2);
  check_tensor(offsets, "offsets", 2);
  check_tensor(vals, "values", 1);
  const int64_t n_out = bits.size(0);
  const void* bptr = check_spmm_common(x, vals, bias, out, n_out);
  const int64_t tokens = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 64 == 0, "in_features must be a multiple of 64 for the bitmap kernel, got ", K);
  TORCH_CHECK(bits.scalar_type() == at::kInt && bits.size(1) == K / 32, "bits must be int32 (", n_out, ", ", K / 32,
              "), got ", bits.scalar_type(), " ", bits.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.sizes() == bits.sizes(), "offsets must be int32 ",
              bits.sizes(), ", got ", offsets.scalar_type(), " ", offsets.sizes());
  check_same_device(x, bits, "x", "bits");
  check_same_device(x, offsets, "x", "offsets");
  for (const at::Tensor* t : {&x, &bits, &offsets})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0,
                "x, bits and offsets must be 16-byte aligned for the bitmap kernel");
  c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(ovit::spmm_bitmap_tile((int)K) > 0, "a weight tile of in_features = ", K,
              " does not fit this card's shared memory: use the Triton bitmap kernel");
  cudaError_t err = ovit::launch_spmm_bitmap(
      x.data_ptr(), bits.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), vals.data_ptr(), bptr, out.data_ptr(),
      (int)tokens, (int)n_out, (int)K, gelu ? 1 : 0, x.scalar_type() == at::kBFloat16 ? 1 : 0,
      at::cuda::getCurrentCUDAStream());
  check_cuda_launch(err, "spmm_bitmap");
}

int spmm_bitmap_tile(int64_t K, int64_t device) {
  c10::cuda::CUDAGuard guard((c10::DeviceIndex)device);
  return ovit::spmm_bitmap_tile((int)K);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ovit-kernels CUDA kernels (fused Woodbury, greedy OBS elimination, replay, damped inverse)";
  m.def("max_block_size", &ovit::max_block_size, "largest block size held on chip", py::arg("fp64"));
  m.def(
      "block_layout",
      [](int B, bool fp64) {
        int threads = 0;
        int c = ovit::block_layout(B, fp64, &threads);
        return std::make_pair(c, threads);
      },
      "(columns per lane of the register tile, 0 = packed shared memory, -1 = too large; threads per block)",
      py::arg("B"), py::arg("fp64"));
  m.def("woodbury_update_", &woodbury_update, "fused streaming Sherman-Morrison updates, in place",
        py::arg("finv"), py::arg("grads"), py::arg("num_grads"));
  m.def("obs_prune_order", &obs_prune_order, "greedy OBS elimination into (order, loss, bad)", py::arg("w"),
        py::arg("finv"), py::arg("mask"), py::arg("nm_n"), py::arg("nm_m"), py::arg("order"), py::arg("loss"),
        py::arg("bad"));
  m.def("obs_reconstruct", &obs_reconstruct, "replay of a prefix into (w_out, pruned, bad)", py::arg("w"),
        py::arg("finv"), py::arg("order"), py::arg("counts"), py::arg("w_out"), py::arg("pruned"), py::arg("bad"));
  m.def("damped_inverse", &damped_inverse, "(λ'I + G/m)^-1 per block into (out, ok)", py::arg("gram"),
        py::arg("inv_m"), py::arg("damp"), py::arg("relative"), py::arg("out"), py::arg("ok"));
  m.def("spmm_24", &spmm_24, "2:4 sparse x dense on sparse tensor cores into out", py::arg("x"), py::arg("values"),
        py::arg("meta"), py::arg("bias"), py::arg("out"), py::arg("gelu"), py::arg("variant") = 0);
  m.def("spmm_bitmap", &spmm_bitmap, "unstructured (bitmap) sparse x dense, weight tile decompressed on chip, into out",
        py::arg("x"), py::arg("bits"), py::arg("offsets"), py::arg("values"), py::arg("bias"), py::arg("out"),
        py::arg("gelu"));
  m.def("spmm_bitmap_tile", &spmm_bitmap_tile, "output rows per CTA of the bitmap kernel for in_features K (0: no fit)",
        py::arg("K"), py::arg("device"));
}
