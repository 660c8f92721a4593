from __future__ import annotations

import dataclasses

import pytest
import torch

from tleg_deploy.errors import SpecError, TlegError
from tleg_deploy.model.expansion import expand
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.model.vit import BLOCK_PARAMS, ViT, init_vit_
from tleg_deploy.train.inits import INITS, init_model, selected_layers, weight_selection


@pytest.fixture
def teacher(tiny_spec: ViTSpec) -> ViT:
    wide = dataclasses.replace(tiny_spec, embed_dim=24, num_heads=3)  # same head dim (8), 1.5x wider
    return init_vit_(ViT(wide, 6), torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", INITS)
@pytest.mark.parametrize("depth", [1, 3])
def test_every_init_gives_a_working_vit_of_the_depth(
    name: str, depth: int, tiny_lg: Learngene, teacher: ViT, tiny_spec: ViTSpec
) -> None:
    model = init_model(name, depth, learngene=tiny_lg, teacher=teacher, seed=0)
    assert isinstance(model, ViT) and model.depth == depth and model.spec == tiny_spec
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, tiny_spec.num_classes)
    assert all(p.device.type == "cpu" and p.is_floating_point() for p in model.parameters())


def test_tleg_is_the_expansion(tiny_lg: Learngene) -> None:
    a, b = init_model("tleg", 5, learngene=tiny_lg).state_dict(), expand(tiny_lg, 5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_base_only_repeats_the_intercept(tiny_lg: Learngene) -> None:
    state = init_model("base-only", 4, learngene=tiny_lg).state_dict()
    for i in range(4):
        for name in BLOCK_PARAMS:
            assert torch.equal(state[f"blocks.{i}.{name}"], tiny_lg.base[name])
    assert torch.equal(state["head.weight"], tiny_lg.shared["head.weight"])
    # and differs from the expansion wherever the slope is non-zero
    assert not torch.equal(state["blocks.3.mlp.fc1.weight"], expand(tiny_lg, 4).state_dict()["blocks.3.mlp.fc1.weight"])


def test_scratch_depends_on_seed_and_follows_deit_init(tiny_lg: Learngene) -> None:
    a = init_model("scratch", 2, learngene=tiny_lg, seed=0).state_dict()
    b = init_model("scratch", 2, learngene=tiny_lg, seed=1).state_dict()
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], b["blocks.0.attn.qkv.weight"])
    assert torch.equal(a["blocks.1.norm1.weight"], torch.ones(16))
    assert float(a["blocks.0.mlp.fc1.weight"].std()) == pytest.approx(0.02, rel=0.2)


def test_selected_layers_are_evenly_spaced() -> None:
    assert selected_layers(12, 1) == [0]
    assert selected_layers(12, 4) == [0, 4, 7, 11]
    assert selected_layers(12, 12) == list(range(12))
    assert selected_layers(12, 3, "first") == [0, 1, 2]
    with pytest.raises(SpecError):
        selected_layers(4, 5)


def test_weight_selection_copies_leading_slices(teacher: ViT, tiny_spec: ViTSpec) -> None:
    src, d, td = teacher.state_dict(), tiny_spec.embed_dim, teacher.spec.embed_dim
    state = weight_selection(teacher, tiny_spec, 3).state_dict()
    for i, j in enumerate([0, 2, 5]):  # evenly spaced in a depth-6 teacher (2.5 rounds to 2)
        assert torch.equal(state[f"blocks.{i}.mlp.fc1.weight"], src[f"blocks.{j}.mlp.fc1.weight"][:32, :d])
        assert torch.equal(state[f"blocks.{i}.norm2.bias"], src[f"blocks.{j}.norm2.bias"][:d])
        qkv = src[f"blocks.{j}.attn.qkv.weight"]
        for part in range(3):  # q, k and v sliced separately: the first heads of each
            got = state[f"blocks.{i}.attn.qkv.weight"][part * d:(part + 1) * d]
            assert torch.equal(got, qkv[part * td:part * td + d, :d])
    assert torch.equal(state["pos_embed"], src["pos_embed"][:, :, :d])
    assert torch.equal(state["head.weight"], src["head.weight"][:, :d])


def test_init_errors(tiny_lg: Learngene, tiny_spec: ViTSpec) -> None:
    with pytest.raises(TlegError, match="unknown initialization"):
        init_model("magic", 2, learngene=tiny_lg)
    with pytest.raises(TlegError, match="needs a teacher"):
        init_model("weight-selection", 2, learngene=tiny_lg)
    with pytest.raises(TlegError, match="needs a learngene"):
        init_model("tleg", 2, spec=tiny_spec)
    narrow = init_vit_(ViT(dataclasses.replace(tiny_spec, embed_dim=8), 4))
    with pytest.raises(SpecError):
        weight_selection(narrow, tiny_spec, 2)


def test_mimetic_attention_mimics_identity(tiny_spec: ViTSpec) -> None:
    big = dataclasses.replace(tiny_spec, embed_dim=64, num_heads=2)  # head dim 32: a clear low-rank picture
    model = init_model("mimetic", 2, spec=big, seed=0)
    d, k = 64, 32
    qkv, proj = model.blocks[1].attn.qkv.weight.detach(), model.blocks[1].attn.proj.weight.detach()
    qk = qkv[:k].T @ qkv[d:d + k]  # head 0: W_qᵀ W_k
    vo = proj[:, :k] @ qkv[2 * d:2 * d + k]  # head 0: W_proj W_v
    off = ~torch.eye(d, dtype=torch.bool)
    assert float(qk.diagonal().mean()) > 0.2 > float(qk[off].abs().mean())
    assert float(vo.diagonal().mean()) < -0.1
    scratch = init_model("scratch", 2, spec=big, seed=0).blocks[1].attn.qkv.weight.detach()
    assert abs(float((scratch[:k].T @ scratch[d:d + k]).diagonal().mean())) < 0.01
