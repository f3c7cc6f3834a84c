"""Pruned checkpoints (safetensors): exact round trip with bit-packed masks and metadata; a
corrupt, truncated or mismatched file is refused whole; the per-layer report."""

import pytest
import torch
from conftest import image_folder

import ovit
from ovit.checkpoint import pack_bits, read_pruned, report, unpack_bits
from ovit.models import TinyViT


def pruned_model(pattern="unstructured"):
    torch.manual_seed(0)
    model = TinyViT(dim=32, depth=1, heads=2)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(6)]
    rep = ovit.one_shot_prune(model, data, 0.6 if pattern == "unstructured" else None, pattern=pattern,
                              block_size=16, num_grads=6, damp=1e-2, damp_mode="relative", progress=False)  # fmt: skip
    return model, rep


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_bit_packing_round_trip(n):
    m = torch.rand(n) < 0.4
    packed = pack_bits(m)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, (n,)), m)


def test_round_trip_is_exact_and_carries_masks_and_report(tmp_path):
    model, rep = pruned_model()
    masks = {lr.name: dict(model.named_modules())[lr.name].weight.detach() != 0 for lr in rep.layers}
    path = str(tmp_path / "p.safetensors")
    ovit.save_pruned(model, path, masks, report=rep, settings={"block_size": 16})
    fresh = TinyViT(dim=32, depth=1, heads=2)
    got = ovit.load_pruned(fresh, path)
    for (k, v), (_, u) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(v, u), k
    assert set(got) == set(masks) and all(torch.equal(got[n], masks[n]) for n in masks)
    _, _, info = read_pruned(path)
    assert info["report"]["total_pruned"] == rep.total_pruned and info["settings"] == {"block_size": 16}
    pruner = ovit.Pruner(fresh, layers=list(masks))  # the masks go straight into a pruner
    pruner.load_state_dict({"masks": got, "step_count": 1})
    assert abs(pruner.sparsity - 0.6) < 1e-3


def test_bad_files_are_refused_whole(tmp_path):
    model, rep = pruned_model()
    path = tmp_path / "p.safetensors"
    ovit.save_pruned(model, str(path), report=rep)
    data = path.read_bytes()
    other = TinyViT(dim=32, depth=1, heads=2)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint" * 10)
    for bad in ("cut", "junk"):
        with pytest.raises(ValueError, match="corrupt or truncated"):
            ovit.load_pruned(other, str(tmp_path / f"{bad}.safetensors"))
    with pytest.raises(ValueError, match="another architecture"):
        ovit.load_pruned(TinyViT(dim=32, depth=2, heads=2), str(path))
    with pytest.raises(ValueError, match="does not match"):
        ovit.save_pruned(
            model, str(tmp_path / "x.safetensors"), {"blocks.0.mlp.fc1": torch.ones(3, 3, dtype=torch.bool)}
        )
    # a mask that claims a non-zero weight is pruned
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.startswith("__ovit_mask__."))
    tensors[name] = torch.zeros_like(tensors[name])  # prunes everything
    save_file(tensors, str(tmp_path / "lie.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="non-zero weights where its mask prunes"):
        ovit.load_pruned(other, str(tmp_path / "lie.safetensors"))
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_report_table_and_chart(tmp_path, capsys):
    model, rep = pruned_model("2:4")
    path = str(tmp_path / "p24.safetensors")
    ovit.save_pruned(model, path, report=rep)
    rows = report(path, str(tmp_path / "s.png"))
    assert rows and all(r["pattern"] == "2:4" and abs(r["sparsity"] - 0.5) < 1e-9 for r in rows)
    assert all(r["nm_fp16_bytes"] <= 0.6 * r["dense_fp16_bytes"] for r in rows)  # ≈ 56% of dense fp16
    assert (tmp_path / "s.png").stat().st_size > 1000
    from ovit.cli import main

    assert main(["report", path]) == 0
    assert "2:4" in capsys.readouterr().out


def test_cli_prune_writes_a_checkpoint_with_masks(tmp_path):
    pytest.importorskip("timm")
    import json

    from ovit.cli import main

    image_folder(tmp_path, ("a", "b"), 4, 32)
    out = tmp_path / "pruned.safetensors"
    assert main(["prune", "--model", "vit_tiny_patch16_224", "--model-kwargs",
                 json.dumps({"img_size": 32, "depth": 1, "num_classes": 2}), "--data", str(tmp_path / "data"),
                 "--sparsity", "0.5", "--block-size", "32", "--num-grads", "4", "--grad-batch-size", "2",
                 "--damp", "1e-3", "--damp-mode", "relative", "--workers", "0", "--out", str(out)]) == 0  # fmt: skip
    _, masks, info = read_pruned(str(out))
    assert len(masks) == 4 and info["settings"]["sparsity"] == 0.5
    assert abs(info["report"]["total_pruned"] / info["report"]["total_params"] - 0.5) < 1e-3


@pytest.mark.parametrize("fmt", ["nm", "bitmap"])
def test_compressed_checkpoint_loads_into_sparse_linear(fmt, tmp_path):
    import ovit_kernels as ok
    from ovit.checkpoint import load_compressed, save_compressed

    model, rep = pruned_model("2:4" if fmt == "nm" else "unstructured")
    dense_path, comp_path = tmp_path / "dense.safetensors", tmp_path / "comp.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(dense_path))
    chosen = save_compressed(model, str(comp_path), fmt)
    assert {n for n, f in chosen.items() if f == fmt} == {lr.name for lr in rep.layers}
    assert chosen["head"].startswith("dense")
    if fmt == "nm":  # the pruned layers take 56% of their dense fp16 bytes (the tiny model's file is
        # mostly headers, embeddings and the head)
        from safetensors import safe_open

        with safe_open(str(comp_path), framework="pt") as f:
            comp = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys() if "__" in k)
        dense = sum(2 * dict(model.named_modules())[lr.name].weight.numel() for lr in rep.layers)
        assert comp == pytest.approx(0.5625 * dense, rel=0.01) and comp <= 0.6 * dense
        assert comp_path.stat().st_size < dense_path.stat().st_size
    fresh = TinyViT(dim=32, depth=1, heads=2)
    got = load_compressed(fresh, str(comp_path))
    assert got == {n: fmt for n, f in chosen.items() if f == fmt}
    mods = dict(fresh.named_modules())
    for name in got:
        assert isinstance(mods[name], ok.SparseLinear)
        w = ok.unpack(mods[name].packed)
        assert torch.equal(w, dict(model.named_modules())[name].weight.detach().half()), name
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x.half()).float(), model.half()(x.half()).float(), rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="another architecture"):
        load_compressed(TinyViT(dim=48, depth=1, heads=2), str(comp_path))
