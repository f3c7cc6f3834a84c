"""Compressed formats, the sparse × dense product, SparseLinear and sparsify."""

import pytest
import torch
from conftest import linear_ref, nm_mask, spmm_inputs
from torch import nn

import ovit_kernels as ok
from ovit_kernels.sparse_formats import CHUNK


def block_mask(out: int, k: int, bm: int, bn: int, density: float, gen) -> torch.Tensor:
    occ = torch.rand(out // bm, k // bn, generator=gen) < density
    inner = torch.rand(out, k, generator=gen) < 0.8  # stored blocks may hold zeros too
    return occ.repeat_interleave(bm, 0).repeat_interleave(bn, 1) & inner


def cases(gen, dtype):
    w = torch.randn(24, 72, generator=gen).to(dtype)  # in = 72: not a multiple of the 32-chunk
    wn = torch.randn(20, 64, generator=gen).to(dtype)
    mn = nm_mask(wn)
    mn[3, :4] = False  # an under-full group
    wb = torch.randn(32, 64, generator=gen).to(dtype)
    mb = block_mask(32, 64, 16, 16, 0.5, gen)
    mu = torch.rand(24, 72, generator=gen) < 0.2
    w1 = torch.randn(16, 32, generator=gen).to(dtype)  # one chunk: the single-chunk k-step
    m1 = torch.rand(16, 32, generator=gen) < 0.3
    return [
        ("nm", ok.pack_nm(wn, mn), torch.where(mn, wn, 0)),
        ("bitmap", ok.pack_bitmap(w, mu), torch.where(mu, w, 0)),
        ("bitmap-1chunk", ok.pack_bitmap(w1, m1), torch.where(m1, w1, 0)),
        ("bsr", ok.pack_bsr(wb, mb, (16, 16)), torch.where(mb, wb, 0)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_packing_round_trips_exactly(dtype, gen):
    for name, packed, dense in cases(gen, dtype):
        assert torch.equal(ok.unpack(packed), dense), name
        assert packed.dtype == dtype
    # nothing kept / everything kept
    w = torch.randn(8, 32, generator=gen)
    assert torch.equal(ok.unpack(ok.pack_bitmap(w, torch.zeros(8, 32, dtype=torch.bool))), torch.zeros(8, 32))
    assert torch.equal(ok.unpack(ok.pack_bitmap(w, torch.ones(8, 32, dtype=torch.bool))), w)
    # compressed sizes
    p = ok.pack_bitmap(torch.randn(64, 256, generator=gen), torch.rand(64, 256, generator=gen) < 0.1)
    assert p.nbytes() < 64 * 256 * 4 * 0.25
    assert p.a.shape == (64, 256 // CHUNK)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # triton: compiled on a GPU, interpreted on CPU
CUDA_READY = torch.cuda.is_available() and ok.available_backends()["cuda"].available
BACKENDS = [
    "reference",
    "triton",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_READY, reason="needs a GPU and ovit_kernels._C")),
    pytest.param("cuda-emulated", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
]


def test_nm_tensor_core_metadata(gen):
    """2:4 packing also writes the positions in the sparse-tensor-core layout: 2 bits each,
    8 per 16-bit word, lowest first, ascending within every group (ordered metadata)."""
    w = torch.randn(8, 64, generator=gen)
    mask = nm_mask(w)
    mask[2, 4:8] = torch.tensor([False, False, True, False])  # one kept: topped up with a zero
    p = ok.pack_nm(w, mask)
    assert p.c.dtype == torch.int16 and p.c.shape == (8, 64 // 16)
    words = p.c.to(torch.int32) & 0xFFFF
    decoded = torch.stack([(words >> (2 * i)) & 3 for i in range(8)], -1).view(8, -1)
    assert torch.equal(decoded.to(torch.uint8), p.b)
    pairs = p.b.view(8, -1, 2)
    assert (pairs[..., 0] < pairs[..., 1]).all()
    assert torch.equal(ok.unpack(p), torch.where(mask, w, 0))
    w48 = torch.randn(8, 48, generator=gen)
    assert ok.pack_nm(w48 * nm_mask(w48)).c.numel() == 0  # in % 32 != 0: no tensor-core layout


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_spmm_equals_dense_product(backend, dtype, activation, request, gen):
    """Every backend's product, or its refusal (an explicit backend never hands a format it has
    no kernel for to other code)."""
    if dtype == torch.bfloat16 and backend == "triton" and DEVICE == "cpu":
        pytest.skip("the Triton interpreter has no bfloat16 dot")
    if backend == "cuda-emulated":
        request.getfixturevalue("emulated_cuda")
        backend = "cuda"
    for name, packed, dense in cases(gen, dtype):
        x = torch.randn(3, 5, dense.shape[1], generator=gen).to(dtype)  # leading dims, 15 rows
        bias = torch.randn(dense.shape[0], generator=gen).to(dtype)
        want = linear_ref(x, dense, bias, activation == "gelu")
        dev = DEVICE if backend != "reference" else "cpu"
        if backend == "cuda" and (dtype == torch.float32 or name != "nm"):  # the bitmap cases: in % 64 != 0
            with pytest.raises(ok.BackendUnavailableError):
                ok.spmm(x.to(dev), packed.to(dev), bias.to(dev), activation, backend=backend)
            continue
        got = ok.spmm(x.to(dev), packed.to(dev), bias.to(dev), activation, backend=backend)
        assert got.shape == (3, 5, dense.shape[0]) and got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2 if dtype == torch.float16 else 1e-1
        torch.testing.assert_close(got.float().cpu(), want, rtol=tol, atol=tol, msg=name)


@pytest.mark.skipif(not CUDA_READY, reason="needs a GPU and ovit_kernels._C")
@pytest.mark.parametrize("variant", ["simple", "pipelined", "wide", "auto"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "tokens,out,inp",
    [(1, 24, 64), (130, 200, 192), (300, 100, 128), (257, 136, 96)],  # partial tiles, out % 8 != 0, in % 64 != 0
)
def test_spmm24_kernels_equal_dense_product(variant, dtype, tokens, out, inp, monkeypatch, gen):
    """Both 2:4 tensor-core kernels, at sizes that leave partial tiles on every side."""
    if variant in ("pipelined", "wide") and inp % 64:
        pytest.skip("the pipelined kernel needs in_features % 64 == 0")
    monkeypatch.setenv("OVIT_SPMM24", variant)
    w = torch.randn(out, inp, generator=gen)
    mask = nm_mask(w)
    p = ok.pack_nm(w.to(dtype), mask).to("cuda")
    dense, x, bias = spmm_inputs(w, mask, dtype, tokens, gen)
    for act in (None, "gelu"):
        want = linear_ref(x, dense, bias, act == "gelu")
        got = ok.spmm(x.cuda(), p, bias.cuda(), act, backend="cuda")
        tol = 2e-2 if dtype == torch.float16 else 1e-1
        torch.testing.assert_close(got.float().cpu(), want, rtol=tol, atol=tol)
    # a contiguous view that starts 2 bytes into its storage: auto falls back, pipelined refuses
    xs = torch.randn(tokens * inp + 1, generator=gen).to(dtype).cuda()[1:].view(tokens, inp)
    if variant in ("pipelined", "wide"):
        with pytest.raises(ok.BackendUnavailableError, match="pipelined"):
            ok.spmm(xs, p, None, None, backend="cuda")
    else:
        got = ok.spmm(xs, p, None, None, backend="cuda")
        torch.testing.assert_close(got.float().cpu(), xs.float().cpu() @ dense.T, rtol=tol, atol=tol)


@pytest.mark.skipif(not CUDA_READY, reason="needs a GPU and ovit_kernels._C")
@pytest.mark.parametrize("kernel", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,out,inp", [(1, 24, 64), (197, 100, 768), (70, 40, 1600), (9, 16, 3072)])
def test_spmm_bitmap_kernels_equal_dense_product(kernel, dtype, tokens, out, inp, monkeypatch, gen):
    """The CUDA bitmap kernel (output tiles of 64, 32 and 16 rows) and the Triton one."""
    monkeypatch.setenv("OVIT_SPMM_BITMAP", kernel)  # which kernel auto picks; an explicit backend runs its own
    w = torch.randn(out, inp, generator=gen)
    mask = torch.rand(out, inp, generator=gen) < 0.2
    p = ok.pack_bitmap(w.to(dtype), mask).to("cuda")
    dense, x, bias = spmm_inputs(w, mask, dtype, tokens, gen)
    for act in (None, "gelu"):
        want = linear_ref(x, dense, bias, act == "gelu")
        got = ok.spmm(x.cuda(), p, bias.cuda(), act, backend=kernel)
        tol = 2e-2 if dtype == torch.float16 else 1e-1
        torch.testing.assert_close(got.float().cpu(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item() / 10))
    if kernel == "triton":  # with OVIT_SPMM_BITMAP=triton the cuda backend declines the bitmap product
        with pytest.raises(ok.BackendUnavailableError, match="OVIT_SPMM_BITMAP"):
            ok.spmm(x.cuda(), p, bias.cuda(), None, backend="cuda")


def test_bad_masks_and_inputs_are_refused(gen):
    w = torch.randn(8, 16, generator=gen)
    with pytest.raises(ValueError, match="not 2:4"):
        ok.pack_nm(w, torch.ones(8, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of m"):
        ok.pack_nm(torch.randn(8, 18), None)
    with pytest.raises(ValueError, match="shape"):
        ok.pack_bitmap(w, torch.ones(8, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        ok.pack_bitmap(w, torch.ones(8, 16))
    with pytest.raises(ValueError, match="tile"):
        ok.pack_bsr(w, None, (3, 4))
    with pytest.raises(ValueError, match="format"):
        ok.pack(w, "csr")
    p = ok.pack_bitmap(w)
    with pytest.raises(ValueError, match="in_features"):
        ok.spmm(torch.randn(2, 15), p)
    with pytest.raises(TypeError, match="dtype"):
        ok.spmm(torch.randn(2, 16, dtype=torch.float64), p)
    with pytest.raises(ValueError, match="activation"):
        ok.spmm(torch.randn(2, 16), p, activation="relu")


@pytest.mark.parametrize("fmt", ["nm", "bitmap", "bsr"])
def test_sparse_linear_matches_dense_and_compiles(fmt, gen):
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        if fmt == "nm":
            lin.weight.mul_(nm_mask(lin.weight))
        elif fmt == "bsr":
            lin.weight.mul_(block_mask(32, 64, 16, 16, 0.5, gen))
        else:
            lin.weight.mul_(torch.rand(32, 64, generator=gen) < 0.25)
    kw = {"block": (16, 16)} if fmt == "bsr" else {}
    sl = ok.SparseLinear.from_linear(lin, fmt, **kw)
    x = torch.randn(7, 64, generator=gen)
    torch.testing.assert_close(sl(x), lin(x), rtol=1e-5, atol=1e-5)
    compiled = torch.compile(sl, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), lin(x), rtol=1e-5, atol=1e-5)
    state = sl.state_dict()
    assert set(state) >= {"a", "b", "c", "bias"}


def test_sparsify_never_picks_a_slower_format(gen):
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.mul_(nm_mask(model[0].weight))
        model[2].weight.mul_(torch.rand(64, 64, generator=gen) < 0.2)
    x = torch.randn(4, 64, generator=gen)
    want = model(x)
    # nothing measured: everything stays dense
    chosen = ok.sparsify(model, table=[])
    assert all(v.startswith("dense") for v in chosen.values())
    assert isinstance(model[0], nn.Linear)
    # a measured table: only formats measured faster than dense are used
    table = [
        {"device": "cpu", "out": 64, "in": 64, "tokens": 16, "format": "nm", "sparsity": 0.5, "speedup": 1.3},
        {"device": "cpu", "out": 64, "in": 64, "tokens": 16, "format": "bitmap", "sparsity": 0.5, "speedup": 0.7},
        {"device": "cpu", "out": 64, "in": 64, "tokens": 16, "format": "bitmap", "sparsity": 0.75, "speedup": 1.1},
    ]
    chosen = ok.sparsify(model, tokens=16, table=table)
    assert chosen == {"0": "nm", "2": "bitmap"}
    assert isinstance(model[0], ok.SparseLinear) and model[0].format == "nm"
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not pruned"):
        ok.sparsify(nn.Sequential(nn.Linear(8, 8)), format="nm", layers=["0"])  # named: it must fit
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight[:, :3] = 0  # pruned, but not 2:4
    with pytest.raises(ValueError, match="not 2:4"):
        ok.sparsify(nn.Sequential(lin), format="nm", layers=["0"])
    assert ok.sparsify(nn.Sequential(lin), format="nm") == {"0": "dense (its zeros are not 2:4)"}


def _pruned_mlp(gen, nm: bool = False) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32), nn.Linear(32, 10))
    with torch.no_grad():
        for lin in (model[0], model[2]):
            lin.weight.mul_(nm_mask(lin.weight) if nm else torch.rand(lin.weight.shape, generator=gen) < 0.3)
    return model  # model[3] (the "head") stays dense


def test_sparsify_skips_what_does_not_fit_and_says_which(gen):
    for fmt in ("nm", "bitmap", "bsr"):
        model = _pruned_mlp(gen, nm=fmt == "nm")
        x = torch.randn(5, 64, generator=gen)
        want = model(x)
        chosen = ok.sparsify(model, format=fmt, bsr_block=(16, 16))
        assert chosen["3"] == "dense (not pruned)" and isinstance(model[3], nn.Linear), chosen
        assert chosen["0"] == fmt and isinstance(model[0], ok.SparseLinear)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_timm_model_pruned_by_default_sparsifies(gen):
    """The default layer selection prunes the blocks, not the head: sparsify leaves the head."""
    timm = pytest.importorskip("timm")
    import ovit

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=10)
    data = [(torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 10, (2,), generator=gen))]
    ovit.one_shot_prune(model, data, method="magnitude", pattern="2:4", progress=False)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    want = model(x)
    chosen = ok.sparsify(model, format="nm")
    assert chosen["head"] == "dense (not pruned)"
    assert all(chosen[n] == "nm" for n in chosen if n.startswith("blocks."))
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_sparse_linear_backward_and_compile_with_autograd_on(activation, gen):
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(32, 64, generator=gen) < 0.3)
    act = nn.GELU() if activation else nn.Identity()
    sl = ok.SparseLinear.from_linear(lin, "bitmap", activation=activation)
    x = torch.randn(3, 7, 64, generator=gen, requires_grad=True)
    act(lin(x)).square().sum().backward()
    want = x.grad.clone()
    for module in (sl, torch.compile(sl, backend="aot_eager", fullgraph=True)):
        x.grad = None
        module(x).square().sum().backward()
        torch.testing.assert_close(x.grad, want, rtol=1e-4, atol=1e-4)
    sl.bias.requires_grad_(True)  # a trainable bias gets its gradient too
    sl(x).sum().backward()
    assert sl.bias.grad is not None and sl.bias.grad.shape == (32,)


def test_sparse_state_dict_loads_into_a_freshly_sparsified_model(gen):
    model = _pruned_mlp(gen)
    ok.sparsify(model, format="bitmap", layers=["0", "2"])
    x = torch.randn(4, 64, generator=gen)
    want = model(x)
    state = model.state_dict()
    fresh = _pruned_mlp(gen, nm=True)  # other weights, another pattern and format
    ok.sparsify(fresh, format="nm", layers=["0", "2"])
    fresh.load_state_dict(state)
    assert fresh[0].format == "bitmap"
    torch.testing.assert_close(fresh(x), want)
    other = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 32), nn.Linear(32, 10))
    with torch.no_grad():
        other[0].weight[:, 0] = 0
    ok.sparsify(other, format="bitmap", layers=["0"])
    with pytest.raises((ValueError, RuntimeError), match="another architecture|size mismatch"):
        other.load_state_dict(state)
