from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from tleg_deploy.errors import CheckpointError, FormatError
from tleg_deploy.model.expansion import expand
from tleg_deploy.model.extract import extract_learngene
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.model.tleg_import import import_tleg_checkpoint, official_key
from tleg_deploy.model.vit import BLOCK_PARAMS


@pytest.mark.parametrize("depth", [2, 4, 9])
def test_extract_recovers_the_learngene(tiny_lg: Learngene, depth: int) -> None:
    lg, report = extract_learngene(expand(tiny_lg, depth), tiny_lg.spec, aux_depth=tiny_lg.aux_depth)
    for k, v in tiny_lg.tensors().items():
        torch.testing.assert_close(lg.tensors()[k], v, atol=1e-5, rtol=1e-5)
    assert report.depth == depth
    assert min(report.r2.values()) > 0.9999


def test_extract_reports_nonlinearity(tiny_lg: Learngene) -> None:
    state = expand(tiny_lg, 6).state_dict()
    state["blocks.3.mlp.fc1.weight"] = torch.randn_like(state["blocks.3.mlp.fc1.weight"])
    _, report = extract_learngene(state, tiny_lg.spec)
    assert report.r2["mlp.fc1.weight"] < 0.9
    assert report.r2["attn.qkv.weight"] > 0.9999
    assert report.min_r2[0] == "mlp.fc1.weight"


def test_extract_from_file_and_errors(tiny_lg: Learngene, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = expand(tiny_lg, 3).state_dict()
    save_file(dict(state), str(tmp_path / "m.safetensors"))
    lg, _ = extract_learngene(tmp_path / "m.safetensors", tiny_lg.spec)
    assert lg.aux_depth == 3
    with pytest.raises(FormatError, match="at least 2 blocks"):
        extract_learngene(expand(tiny_lg, 1), tiny_lg.spec)
    with pytest.raises(FormatError, match="missing"):
        extract_learngene({k: v for k, v in state.items() if k != "blocks.1.norm1.bias"}, tiny_lg.spec)
    with pytest.raises(FormatError, match="shape"):
        extract_learngene(state, ViTSpec.preset("digits"))


# The official Aux-Net's state dict (github.com/AlphaXia/TLEG: TLEG_vit.py's VisionTransformer with one
# RepeatedLEBlock; modules_with_LE.py's LELinear/LELayerNorm hold ``{weight,bias}_{base,ilayer}``), written
# out by hand for a DeiT-like spec: img 32, patch 16, 3 channels, width 128, MLP 512, 7 classes, 4 tokens.
# Columns: official key, shape, the learngene tensor it must become. Literal on purpose: it must not share
# key-naming code with the importer it checks.
OFFICIAL_TABLE: tuple[tuple[str, tuple[int, ...], str], ...] = (
    ("pos_embed", (1, 4, 128), "shared.pos_embed"),
    ("patch_embed.proj.weight", (128, 3, 16, 16), "shared.patch_embed.proj.weight"),
    ("patch_embed.proj.bias", (128,), "shared.patch_embed.proj.bias"),
    ("norm.weight", (128,), "shared.norm.weight"),
    ("norm.bias", (128,), "shared.norm.bias"),
    ("head.weight", (7, 128), "shared.head.weight"),
    ("head.bias", (7,), "shared.head.bias"),
    ("blocks.block.norm1.instances.0.weight_base", (128,), "base.norm1.weight"),
    ("blocks.block.norm1.instances.0.weight_ilayer", (128,), "slope.norm1.weight"),
    ("blocks.block.norm1.instances.0.bias_base", (128,), "base.norm1.bias"),
    ("blocks.block.norm1.instances.0.bias_ilayer", (128,), "slope.norm1.bias"),
    ("blocks.block.attn.qkv.instances.0.weight_base", (384, 128), "base.attn.qkv.weight"),
    ("blocks.block.attn.qkv.instances.0.weight_ilayer", (384, 128), "slope.attn.qkv.weight"),
    ("blocks.block.attn.qkv.instances.0.bias_base", (384,), "base.attn.qkv.bias"),
    ("blocks.block.attn.qkv.instances.0.bias_ilayer", (384,), "slope.attn.qkv.bias"),
    ("blocks.block.attn.proj.instances.0.weight_base", (128, 128), "base.attn.proj.weight"),
    ("blocks.block.attn.proj.instances.0.weight_ilayer", (128, 128), "slope.attn.proj.weight"),
    ("blocks.block.attn.proj.instances.0.bias_base", (128,), "base.attn.proj.bias"),
    ("blocks.block.attn.proj.instances.0.bias_ilayer", (128,), "slope.attn.proj.bias"),
    ("blocks.block.norm2.instances.0.weight_base", (128,), "base.norm2.weight"),
    ("blocks.block.norm2.instances.0.weight_ilayer", (128,), "slope.norm2.weight"),
    ("blocks.block.norm2.instances.0.bias_base", (128,), "base.norm2.bias"),
    ("blocks.block.norm2.instances.0.bias_ilayer", (128,), "slope.norm2.bias"),
    ("blocks.block.mlp.fc1.instances.0.weight_base", (512, 128), "base.mlp.fc1.weight"),
    ("blocks.block.mlp.fc1.instances.0.weight_ilayer", (512, 128), "slope.mlp.fc1.weight"),
    ("blocks.block.mlp.fc1.instances.0.bias_base", (512,), "base.mlp.fc1.bias"),
    ("blocks.block.mlp.fc1.instances.0.bias_ilayer", (512,), "slope.mlp.fc1.bias"),
    ("blocks.block.mlp.fc2.instances.0.weight_base", (128, 512), "base.mlp.fc2.weight"),
    ("blocks.block.mlp.fc2.instances.0.weight_ilayer", (128, 512), "slope.mlp.fc2.weight"),
    ("blocks.block.mlp.fc2.instances.0.bias_base", (128,), "base.mlp.fc2.bias"),
    ("blocks.block.mlp.fc2.instances.0.bias_ilayer", (128,), "slope.mlp.fc2.bias"),
)
OFFICIAL_SPEC = ViTSpec(img_size=32, patch_size=16, in_chans=3, embed_dim=128, num_heads=2, mlp_ratio=4.0,
                        num_classes=7)  # the importer's default head count is 128 // 64 = 2, as in DeiT


@pytest.fixture
def official_state() -> dict[str, torch.Tensor]:
    """Distinct random values for every tensor, so a mix-up of any two (or of base and slope) shows."""
    g = torch.Generator().manual_seed(5)
    return {key: torch.randn(shape, generator=g) for key, shape, _ in OFFICIAL_TABLE}


def _assert_imported(lg: Learngene, state: dict[str, torch.Tensor]) -> None:
    assert lg.spec == OFFICIAL_SPEC and lg.aux_depth == 12
    ours = lg.tensors()
    assert len(ours) == len(OFFICIAL_TABLE)
    for key, _, name in OFFICIAL_TABLE:
        assert torch.equal(ours[name], state[key]), (key, name)


def test_official_key_names() -> None:
    assert official_key("attn.qkv.weight", "base") == "blocks.block.attn.qkv.instances.0.weight_base"
    assert official_key("norm2.bias", "ilayer") == "blocks.block.norm2.instances.0.bias_ilayer"
    assert len(OFFICIAL_TABLE) == 7 + 2 * len(BLOCK_PARAMS)


def test_import_full_checkpoint_dict(official_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    ema_state = {k: v * 2 for k, v in official_state.items()}
    ckpt = {"model": official_state, "model_ema": ema_state, "epoch": 99,
            "optimizer": {"state": {}, "param_groups": []}, "args": argparse.Namespace(lr=1e-3)}
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    _assert_imported(import_tleg_checkpoint(tmp_path / "checkpoint.pth"), official_state)
    _assert_imported(import_tleg_checkpoint(tmp_path / "checkpoint.pth", use_ema=True), ema_state)


def test_import_bare_state_dict(official_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    torch.save(official_state, tmp_path / "gene.pth")
    lg = import_tleg_checkpoint(tmp_path / "gene.pth")
    _assert_imported(lg, official_state)
    # layer i of the expansion is base + (i/12)·ilayer, as the Aux-Net computes it
    want = official_state["blocks.block.mlp.fc1.instances.0.weight_base"] + (
        5 / 12) * official_state["blocks.block.mlp.fc1.instances.0.weight_ilayer"]
    torch.testing.assert_close(expand(lg, 12).state_dict()["blocks.5.mlp.fc1.weight"], want, rtol=0, atol=1e-6)


def test_import_refuses_mismatched_keys(official_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    state = official_state
    extra = {**state, "dist_token": torch.zeros(1, 1, 128)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="dist_token"):
        import_tleg_checkpoint(tmp_path / "extra.pth")
    missing = {k: v for k, v in state.items() if "mlp.fc2.instances.0.bias_ilayer" not in k}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="bias_ilayer"):
        import_tleg_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        import_tleg_checkpoint(tmp_path / "junk.pth")


def test_import_refuses_pickled_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"contains Python objects \(\S*print\) that tleg-deploy does "
                                              r"not load, for safety \(re-save it as a plain state dict") as e:
        import_tleg_checkpoint(tmp_path / "evil.pth")
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def test_import_of_an_empty_file_is_a_format_error(tmp_path: Path) -> None:
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(FormatError, match="empty.pth is empty"):
        import_tleg_checkpoint(tmp_path / "empty.pth")
    (tmp_path / "cut.pth").write_bytes(b"\x80\x02")  # a pickle that stops after its header
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        import_tleg_checkpoint(tmp_path / "cut.pth")


def test_extract_leaves_constant_tensors_out_of_the_mean(tiny_lg: Learngene) -> None:
    # LayerNorm weights and the fc2 bias identical in every layer (as if never trained away from init).
    for name in ("norm1.weight", "norm2.weight", "mlp.fc2.bias"):
        tiny_lg.slope[name] = torch.zeros_like(tiny_lg.slope[name])
    state = expand(tiny_lg, 6).state_dict()
    state["blocks.3.mlp.fc1.weight"] = torch.randn_like(state["blocks.3.mlp.fc1.weight"])
    lg, report = extract_learngene(state, tiny_lg.spec)
    assert report.constant == ("norm1.weight", "norm2.weight", "mlp.fc2.bias")
    assert set(report.r2).isdisjoint(report.constant) and len(report.r2) == len(BLOCK_PARAMS) - 3
    assert report.mean_r2 == pytest.approx(sum(report.r2.values()) / len(report.r2))
    assert report.mean_r2 < sum([*report.r2.values(), 1.0, 1.0, 1.0]) / len(BLOCK_PARAMS)  # the old, inflated mean
    assert "3 constant across layers (R² undefined, not counted): norm1.weight" in report.summary()
    assert report.to_dict()["constant"] == ["norm1.weight", "norm2.weight", "mlp.fc2.bias"]
    torch.testing.assert_close(lg.base["norm1.weight"], tiny_lg.base["norm1.weight"])
    everything_constant = {k: v for k, v in expand(tiny_lg, 3).state_dict().items()}
    for i in range(3):
        for name in BLOCK_PARAMS:
            everything_constant[f"blocks.{i}.{name}"] = tiny_lg.base[name]
    report = extract_learngene(everything_constant, tiny_lg.spec)[1]
    assert report.mean_r2 is None and report.min_r2 is None and "mean R² n/a over 0 tensors" in report.summary()
