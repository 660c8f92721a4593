"""The final-LayerNorm option ``ViTSpec.fc_norm``: before pooling on all tokens (default, the Aux-Net's
computation, ``norm.*``) or after pooling (the official TLEG descendants, timm's ``fc_norm.*``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tleg_deploy.errors import FormatError, SpecError
from tleg_deploy.export.onnx import export_onnx, save_proto
from tleg_deploy.export.template import DepthTemplate
from tleg_deploy.export.validate import validate_onnx
from tleg_deploy.files.fileio import safetensors_metadata
from tleg_deploy.files.tensorfile import write_tensor_file
from tleg_deploy.model.auxnet import AuxNet
from tleg_deploy.model.expansion import DESCENDANT_FORMAT, expand, load_descendant, save_descendant
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.model.vit import ViT, init_vit_


@pytest.fixture
def fc_lg(tiny_lg: Learngene) -> Learngene:
    """``tiny_lg`` with its final norm moved after pooling (same tensors, renamed)."""
    spec = dataclasses.replace(tiny_lg.spec, fc_norm=True)
    shared = {k.replace("norm.", "fc_norm.") if k.startswith("norm.") else k: v for k, v in tiny_lg.shared.items()}
    return Learngene(spec, tiny_lg.aux_depth, shared, dict(tiny_lg.base), dict(tiny_lg.slope))


def test_default_is_omitted_from_spec_json_so_old_files_keep_their_hash(tiny_spec: ViTSpec) -> None:
    assert "fc_norm" not in json.loads(tiny_spec.to_json())
    old = json.dumps({k: v for k, v in dataclasses.asdict(tiny_spec).items() if k != "fc_norm"})
    assert ViTSpec.from_json(old) == tiny_spec and tiny_spec.fc_norm is False
    fc = dataclasses.replace(tiny_spec, fc_norm=True)
    assert json.loads(fc.to_json())["fc_norm"] is True and ViTSpec.from_json(fc.to_json()) == fc
    with pytest.raises(SpecError, match="fc_norm"):
        dataclasses.replace(tiny_spec, fc_norm="yes")


def test_keys_follow_timm(tiny_spec: ViTSpec) -> None:
    plain = set(ViT(tiny_spec, 1).state_dict())
    fc = set(ViT(dataclasses.replace(tiny_spec, fc_norm=True), 1).state_dict())
    assert {"norm.weight", "norm.bias"} <= plain and not any(k.startswith("fc_norm") for k in plain)
    assert fc == (plain - {"norm.weight", "norm.bias"}) | {"fc_norm.weight", "fc_norm.bias"}


def test_where_the_norm_sits(tiny_lg: Learngene, fc_lg: Learngene) -> None:
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain, fc = expand(tiny_lg, 3).eval(), expand(fc_lg, 3).eval()
    w, b, eps = tiny_lg.shared["norm.weight"], tiny_lg.shared["norm.bias"], tiny_lg.spec.norm_eps
    head = lambda z: F.linear(z, tiny_lg.shared["head.weight"], tiny_lg.shared["head.bias"])  # noqa: E731
    with torch.no_grad():
        tokens = plain.blocks(plain.embed(x))  # (B, N, D): the same in both layouts
        torch.testing.assert_close(plain(x), head(F.layer_norm(tokens, (16,), w, b, eps).mean(1)), rtol=0, atol=1e-6)
        torch.testing.assert_close(fc(x), head(F.layer_norm(tokens.mean(1), (16,), w, b, eps)), rtol=0, atol=1e-6)
        assert (plain(x) - fc(x)).abs().max() > 1e-3  # really two different computations


def test_init_auxnet_and_expansion_follow_the_layout(fc_lg: Learngene) -> None:
    lg = Learngene.init(fc_lg.spec, 3, seed=0)
    assert torch.equal(lg.shared["fc_norm.weight"], torch.ones(16)) and "norm.weight" not in lg.shared
    scratch = init_vit_(ViT(fc_lg.spec, 2), torch.Generator().manual_seed(0))
    assert torch.equal(scratch.fc_norm.weight.detach(), torch.ones(16))
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(AuxNet(fc_lg).eval()(x), expand(fc_lg, fc_lg.aux_depth).eval()(x),
                                   atol=1e-5, rtol=0)
    assert set(AuxNet(fc_lg).to_learngene().shared) == set(fc_lg.shared)


def test_learngene_and_descendant_files_keep_the_layout(fc_lg: Learngene, tiny_lg: Learngene, tmp_path: Path) -> None:
    fc_lg.save(tmp_path / "lg.safetensors")
    assert Learngene.load(tmp_path / "lg.safetensors").sha256() == fc_lg.sha256() != tiny_lg.sha256()
    model = expand(fc_lg, 2)
    save_descendant(model, tmp_path / "m.safetensors", fc_lg.sha256())
    assert json.loads(safetensors_metadata(tmp_path / "m.safetensors")["spec"])["fc_norm"] is True
    loaded, _ = load_descendant(tmp_path / "m.safetensors")
    assert loaded.spec.fc_norm and loaded.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # a file whose spec says one layout and whose tensors the other is refused, naming the key
    meta = {"spec": fc_lg.spec.to_json(), "depth": "2", "learngene_sha256": "", "provenance": "{}"}
    write_tensor_file(tmp_path / "mixed.safetensors", dict(expand(tiny_lg, 2).state_dict()), DESCENDANT_FORMAT, meta)
    with pytest.raises(FormatError, match="fc_norm"):
        load_descendant(tmp_path / "mixed.safetensors")


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_export_parity_in_both_layouts(fc_lg: Learngene, tmp_path: Path, exporter: str) -> None:
    model = expand(fc_lg, 3).eval()
    if exporter == "torchscript":  # dynamo: the template's probe below is a direct dynamo export (seconds each)
        report = validate_onnx(export_onnx(model, tmp_path / "m.onnx", exporter=exporter), model)
        assert report.passed and report.max_abs_diff["logits"] < 1e-4
    # The pooled head's mean reads no parameter: the template must still end block 1 where block 0 ends.
    template = DepthTemplate(fc_lg.spec, exporter=exporter)
    path = save_proto(template.proto(model), tmp_path / "t.onnx")
    assert validate_onnx(path, model).passed


def test_expand_can_move_the_final_norm_like_the_official_gene_transfer(tiny_lg: Learngene, fc_lg: Learngene) -> None:
    moved = expand(tiny_lg, 3, fc_norm=True)
    assert moved.spec == fc_lg.spec and torch.equal(moved.fc_norm.weight.detach(), tiny_lg.shared["norm.weight"])
    for k, v in expand(fc_lg, 3).state_dict().items():
        assert torch.equal(moved.state_dict()[k], v), k
    back = expand(fc_lg, 3, fc_norm=False)
    assert back.spec == tiny_lg.spec and back.state_dict().keys() == expand(tiny_lg, 3).state_dict().keys()
    assert expand(tiny_lg, 3, fc_norm=False).spec == expand(tiny_lg, 3).spec == tiny_lg.spec
