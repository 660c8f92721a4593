from __future__ import annotations

import pytest
import torch

from tleg_deploy.errors import DepthError
from tleg_deploy.model.auxnet import AuxNet
from tleg_deploy.model.expansion import expand, load_descendant, save_descendant
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.model.vit import BLOCK_PARAMS, ViT


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 7, 16])
def test_block_i_is_base_plus_i_over_L_slope_exactly(tiny_lg: Learngene, depth: int) -> None:
    state = expand(tiny_lg, depth).state_dict()
    assert sum(k.startswith("blocks.") for k in state) == depth * len(BLOCK_PARAMS)
    for i in range(depth):
        for name in BLOCK_PARAMS:
            want = tiny_lg.base[name] + (i / depth) * tiny_lg.slope[name]
            assert torch.equal(state[f"blocks.{i}.{name}"], want), (i, name)
    for name, t in tiny_lg.shared.items():
        assert torch.equal(state[name], t)


def test_rule_is_i_over_L_not_L_minus_1(tiny_lg: Learngene) -> None:
    state = expand(tiny_lg, 4).state_dict()
    last = tiny_lg.base["mlp.fc1.weight"] + tiny_lg.slope["mlp.fc1.weight"]  # would be i/(L-1) at i=3
    assert not torch.allclose(state["blocks.3.mlp.fc1.weight"], last)


def test_expand_at_aux_depth_matches_auxnet(tiny_lg: Learngene) -> None:
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    aux, plain = AuxNet(tiny_lg).eval(), expand(tiny_lg, tiny_lg.aux_depth).eval()
    with torch.no_grad():
        torch.testing.assert_close(aux(x), plain(x), atol=1e-5, rtol=0)


def test_auxnet_parameters_are_the_learngene(tiny_lg: Learngene) -> None:
    aux = AuxNet(tiny_lg)
    n_aux = sum(p.numel() for p in aux.parameters())
    assert n_aux == tiny_lg.num_params()
    opt = torch.optim.SGD(aux.parameters(), lr=0.1)
    aux(torch.randn(2, 3, 8, 8)).square().mean().backward()
    opt.step()
    trained = aux.to_learngene()
    assert not torch.equal(trained.slope["attn.qkv.weight"], Learngene.init(tiny_lg.spec, 4).slope["attn.qkv.weight"])
    # to_learngene is a snapshot of the trained parameters, detached from the module
    assert torch.equal(trained.base["attn.qkv.weight"], aux.base["attn__qkv__weight"].detach())


def test_auxnet_drop_path_only_in_training(tiny_lg: Learngene) -> None:
    aux = AuxNet(tiny_lg, drop_path_rate=0.5)
    x = torch.randn(8, 3, 8, 8)
    aux.eval()
    with torch.no_grad():
        torch.testing.assert_close(aux(x), expand(tiny_lg, tiny_lg.aux_depth).eval()(x), atol=1e-5, rtol=0)
        aux.train()
        torch.manual_seed(0)
        assert not torch.allclose(aux(x), aux.eval()(x))


def test_expand_range(tiny_lg: Learngene) -> None:
    assert expand(tiny_lg, 4 * tiny_lg.aux_depth).depth == 16
    for bad in (0, -3, 100000):
        with pytest.raises(DepthError):
            expand(tiny_lg, bad)


def test_descendant_round_trip(tiny_lg: Learngene, tmp_path) -> None:
    model = expand(tiny_lg, 3)
    save_descendant(model, tmp_path / "m.safetensors", tiny_lg.sha256())
    loaded, meta = load_descendant(tmp_path / "m.safetensors")
    assert meta["learngene_sha256"] == tiny_lg.sha256()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_timm_key_layout(tiny_spec: ViTSpec) -> None:
    keys = set(ViT(tiny_spec, 2).state_dict())
    assert {"patch_embed.proj.weight", "pos_embed", "blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.bias",
            "norm.weight", "head.bias"} <= keys
    assert "cls_token" not in keys


def test_blocks_on_token_rows_compute_what_they_compute_on_tokens(tiny_lg: Learngene) -> None:
    """ViT runs its blocks on token rows (B·N, D), for the exported graph's sake; the numbers are those of
    the same blocks on (B, N, D), in eval and in training (drop path: one draw per sample, all its tokens)."""
    model = expand(tiny_lg, 3)
    for block in model.blocks:
        block.drop_path.rate = 0.5
    x = torch.randn(6, 3, 8, 8)
    n, d = tiny_lg.spec.num_tokens, tiny_lg.spec.embed_dim
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            tokens = model.embed(x)
            torch.manual_seed(0)
            on_rows = model.blocks_on_rows(tokens)
            torch.manual_seed(0)
            on_tokens = model.blocks(tokens)
        assert on_rows.shape == on_tokens.shape == (6, n, d)
        torch.testing.assert_close(on_rows, on_tokens, atol=1e-6, rtol=0)
    # dropped in training: whole samples' branches, never some tokens of a sample
    drop = model.blocks[0].drop_path
    rows = torch.ones(6 * n, d)
    torch.manual_seed(1)
    kept = drop(rows).reshape(6, n, d)
    assert ((kept == 0).all(dim=(1, 2)) | (kept == 2.0).all(dim=(1, 2))).all()
    assert 0 < int((kept == 0).all(dim=(1, 2)).sum()) < 6
