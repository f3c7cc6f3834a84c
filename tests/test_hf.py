"""Hugging Face transformers image classifiers (tiny random configs, nothing downloaded): the
default layer selection finds their attention and MLP Linears, the pruner takes their outputs,
and `ovit prune --model <save_pretrained folder>` works."""

import json
import math

import pytest
import torch
from conftest import image_folder

import ovit

transformers = pytest.importorskip("transformers")


def tiny(kind: str):
    if kind == "vit":
        cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, num_labels=3)  # fmt: skip
        return transformers.ViTForImageClassification(cfg), 2
    if kind == "deit":
        cfg = transformers.DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, num_labels=3)  # fmt: skip
        return transformers.DeiTForImageClassification(cfg), 2
    cfg = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                  window_size=4, num_labels=3)  # fmt: skip
    return transformers.SwinForImageClassification(cfg), 2


def data_of(n=6):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("kind", ["vit", "deit", "swin"])
def test_default_selection_and_pruning(kind):
    torch.manual_seed(0)
    model, blocks = tiny(kind)
    names = [n for n, _ in ovit.select_layers(model)]
    assert len(names) == 6 * blocks, names  # q, k, v, o, fc1, fc2 per block
    assert not any("classifier" in n or "downsample" in n or "patch" in n for n in names)
    rep = ovit.one_shot_prune(model, data_of(), 0.5, block_size=16, num_grads=6, damp=1e-2, damp_mode="relative",
                              progress=False)  # fmt: skip
    assert rep.total_pruned == math.floor(0.5 * rep.total_params + 0.5)


def test_cli_prunes_a_save_pretrained_folder(tmp_path):
    from ovit.cli import main

    model, _ = tiny("vit")
    model.save_pretrained(tmp_path / "vit")
    image_folder(tmp_path, ("a", "b", "c"), 3, 40)
    out = tmp_path / "p.safetensors"
    assert main(["prune", "--model", str(tmp_path / "vit"), "--data", str(tmp_path / "data"), "--sparsity", "0.5",
                 "--block-size", "16", "--num-grads", "4", "--grad-batch-size", "2", "--damp", "1e-2",
                 "--damp-mode", "relative", "--workers", "0", "--out", str(out)]) == 0  # fmt: skip
    rep = json.loads((tmp_path / "p.json").read_text())
    assert abs(rep["achieved_sparsity"] - 0.5) < 1e-3 and len(rep["layers"]) == 12


def test_cli_prunes_a_hub_id_from_the_local_hub_cache(tmp_path):
    """`ovit prune --model org/name`: the hub id goes to transformers, which resolves it here from
    a Hugging Face cache laid out as a download leaves it (offline: nothing is fetched), in a
    fresh process so that the cache location and offline mode take effect."""
    import os
    import subprocess
    import sys

    model, _ = tiny("deit")
    snap = tmp_path / "hf" / "hub" / "models--ovit-test--tiny-deit" / "snapshots" / ("0" * 40)
    model.save_pretrained(snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    image_folder(tmp_path, ("a", "b", "c"), 3, 40)
    out = tmp_path / "p.safetensors"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    argv = ["prune", "--model", "ovit-test/tiny-deit", "--data", str(tmp_path / "data"), "--sparsity", "0.5",
            "--block-size", "16", "--num-grads", "4", "--grad-batch-size", "2", "--damp", "1e-2",
            "--damp-mode", "relative", "--workers", "0", "--out", str(out)]  # fmt: skip
    res = subprocess.run([sys.executable, "-m", "ovit", *argv], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads((tmp_path / "p.json").read_text())
    assert abs(rep["achieved_sparsity"] - 0.5) < 1e-3 and len(rep["layers"]) == 12
    missing = subprocess.run([sys.executable, "-m", "ovit", *argv[:2], "ovit-test/absent", *argv[3:]], env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert missing.returncode != 0 and "cannot load the transformers model 'ovit-test/absent'" in missing.stderr
    assert "Traceback" not in missing.stderr
