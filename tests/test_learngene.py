from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tleg_deploy.errors import FormatError
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.model.vit import BLOCK_PARAMS


def test_init_follows_the_paper(tiny_spec: ViTSpec) -> None:
    lg = Learngene.init(tiny_spec, aux_depth=6, seed=3)
    assert set(lg.base) == set(lg.slope) == set(BLOCK_PARAMS)
    assert torch.equal(lg.base["norm1.weight"], torch.ones(16))
    for t in (lg.slope["norm1.weight"], lg.base["norm2.bias"], lg.slope["norm2.bias"], lg.base["attn.qkv.bias"],
              lg.slope["mlp.fc1.bias"]):
        assert not t.any()
    big = Learngene.init(ViTSpec.preset("deit-small"), 12, seed=0)
    for part in (big.base, big.slope):
        std = float(part["mlp.fc1.weight"].std())
        assert 0.018 < std < 0.022
    assert torch.equal(Learngene.init(tiny_spec, 6, seed=3).base["attn.qkv.weight"], lg.base["attn.qkv.weight"])
    assert lg.provenance["trained"] is False


def test_save_load_bit_exact(tiny_lg: Learngene, tmp_path: Path) -> None:
    tiny_lg.provenance = {"data": "digits", "epochs": 3}
    path = tmp_path / "lg.safetensors"
    tiny_lg.save(path)
    back = Learngene.load(path)
    assert back.spec == tiny_lg.spec and back.aux_depth == tiny_lg.aux_depth
    assert back.provenance == tiny_lg.provenance
    for k, v in tiny_lg.tensors().items():
        assert torch.equal(back.tensors()[k], v), k
    assert back.sha256() == tiny_lg.sha256()
    assert not list(tmp_path.glob("*.tmp")), "temporary file left behind"


def _rewrite(path: Path, tensors: dict | None = None, **meta_changes: str | None) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path)) if tensors is None else tensors
    for k, v in meta_changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "tleg-descendant"}, "format"),
        ({"schema_version": "99"}, "schema_version"),
        ({"aux_depth": None}, "aux_depth"),
        ({"colour": "blue"}, "colour"),
        ({"spec": "{not json"}, "spec"),
    ],
)
def test_load_rejects_bad_metadata(tiny_lg: Learngene, tmp_path: Path, change: dict, message: str) -> None:
    path = tmp_path / "lg.safetensors"
    tiny_lg.save(path)
    _rewrite(path, **change)
    with pytest.raises(FormatError, match=message):
        Learngene.load(path)


def test_load_rejects_bad_tensors(tiny_lg: Learngene, tmp_path: Path) -> None:
    path = tmp_path / "lg.safetensors"
    tiny_lg.save(path)
    full = load_file(str(path))
    missing = {k: v for k, v in full.items() if k != "slope.mlp.fc2.bias"}
    _rewrite(path, missing)
    with pytest.raises(FormatError, match="slope.mlp.fc2.bias"):
        Learngene.load(path)
    _rewrite(path, {**full, "base.extra": torch.zeros(2)})
    with pytest.raises(FormatError, match="base.extra"):
        Learngene.load(path)
    _rewrite(path, {**full, "base.attn.proj.weight": torch.zeros(3, 3)})
    with pytest.raises(FormatError, match="shape"):
        Learngene.load(path)


def test_load_rejects_truncated_and_text_files(tiny_lg: Learngene, tmp_path: Path) -> None:
    path = tmp_path / "lg.safetensors"
    tiny_lg.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError):
        Learngene.load(path)
    path.write_text("hello, I am a text file\n")
    with pytest.raises(FormatError):
        Learngene.load(path)
    with pytest.raises(FileNotFoundError):
        Learngene.load(tmp_path / "nope.safetensors")


def test_provenance_and_describe(tiny_lg: Learngene) -> None:
    facts = tiny_lg.describe()
    assert facts["params"] == tiny_lg.num_params()
    assert facts["params_per_block"] == sum(t.numel() for t in tiny_lg.base.values())
    json.dumps(facts)
