"""NaN and infinity never pass a weight boundary: learngene and descendant files, expansion,
checkpoint import, extraction, training (loss, weights, data, teacher) and resumed checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tleg_deploy.errors import DataError, DivergedError, FormatError, NonFiniteError
from tleg_deploy.files.tensorfile import write_tensor_file
from tleg_deploy.model.expansion import expand, load_descendant, save_descendant
from tleg_deploy.model.extract import extract_learngene
from tleg_deploy.model.finite import check_finite, first_non_finite
from tleg_deploy.model.learngene import FORMAT, Learngene
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.model.tleg_import import import_tleg_checkpoint, official_key
from tleg_deploy.model.vit import BLOCK_PARAMS, ViT, init_vit_
from tleg_deploy.train.checkpoint import load_checkpoint
from tleg_deploy.train.learngene import DistillConfig, train_learngene
from tleg_deploy.train.loop import CHECKPOINT, RunOptions, Split, TrainConfig, run_training
from tleg_deploy.train.losses import CrossEntropy


def _poison(t: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = value
    return t


def test_helper_names_the_first_bad_tensor() -> None:
    good, bad = torch.zeros(3), _poison(torch.zeros(4), float("inf"))
    assert first_non_finite({"a": good, "i": torch.arange(3)}) is None
    assert first_non_finite({"a": good, "b": bad}) == "b"
    with pytest.raises(NonFiniteError, match=r"thing tensor 'b' is not finite \(1 inf of 4 values\)"):
        check_finite("thing", {"a": good, "b": bad})
    assert issubclass(NonFiniteError, FormatError) and issubclass(DivergedError, NonFiniteError)


def test_learngene_init_save_and_load_refuse_nan(tiny_lg: Learngene, tmp_path: Path) -> None:
    tensors = tiny_lg.tensors()
    with pytest.raises(NonFiniteError, match="base.attn.qkv.weight"):
        Learngene(tiny_lg.spec, 4, tiny_lg.shared, {**tiny_lg.base, "attn.qkv.weight":
                                                     _poison(tiny_lg.base["attn.qkv.weight"])}, tiny_lg.slope)
    tiny_lg.slope["mlp.fc2.bias"] = _poison(tiny_lg.slope["mlp.fc2.bias"])  # corrupted after construction
    with pytest.raises(NonFiniteError, match="slope.mlp.fc2.bias"):
        tiny_lg.save(tmp_path / "lg.safetensors")
    assert not (tmp_path / "lg.safetensors").exists()
    # A file written by someone else: the loader names the file and the tensor.
    meta = {"spec": tiny_lg.spec.to_json(), "aux_depth": "4", "rule": "i/L", "provenance": "{}"}
    poisoned = {**tensors, "shared.pos_embed": _poison(tensors["shared.pos_embed"])}
    write_tensor_file(tmp_path / "nan.safetensors", poisoned, FORMAT, meta)
    with pytest.raises(NonFiniteError, match=r"nan.safetensors tensor 'shared.pos_embed' is not finite \(1 NaN"):
        Learngene.load(tmp_path / "nan.safetensors")


def test_float64_learngene_is_refused_on_load_and_save(tiny_lg: Learngene, tmp_path: Path) -> None:
    meta = {"spec": tiny_lg.spec.to_json(), "aux_depth": "4", "rule": "i/L", "provenance": "{}"}
    write_tensor_file(tmp_path / "f64.safetensors", {k: v.double() for k, v in tiny_lg.tensors().items()},
                      FORMAT, meta)
    with pytest.raises(FormatError, match="dtype float64, expected float32"):
        Learngene.load(tmp_path / "f64.safetensors")
    doubled = Learngene(tiny_lg.spec, 4, {k: v.double() for k, v in tiny_lg.shared.items()}, tiny_lg.base,
                        tiny_lg.slope)
    with pytest.raises(FormatError, match="float32"):
        doubled.save(tmp_path / "out.safetensors")


def test_expand_and_descendant_files_refuse_non_finite(tiny_lg: Learngene, tmp_path: Path) -> None:
    huge = Learngene(tiny_lg.spec, 4, tiny_lg.shared, tiny_lg.base,
                     {k: torch.full_like(v, 3e38) for k, v in tiny_lg.slope.items()})
    base = {k: torch.full_like(v, 3e38) for k, v in tiny_lg.base.items()}
    huge = Learngene(tiny_lg.spec, 4, tiny_lg.shared, base, huge.slope)  # finite, but base + slope overflows
    with pytest.raises(NonFiniteError, match=r"depth-4 expansion tensor 'blocks\.\d\.\S+' is not finite"):
        expand(huge, 4)
    model = expand(tiny_lg, 3)
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="blocks.1.mlp.fc1.weight"):
        save_descendant(model, tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()
    state = dict(expand(tiny_lg, 3).state_dict())
    state["norm.weight"] = _poison(state["norm.weight"], float("-inf"))
    meta = {"spec": tiny_lg.spec.to_json(), "depth": "3", "learngene_sha256": "", "provenance": "{}"}
    write_tensor_file(tmp_path / "bad.safetensors", state, "tleg-descendant", meta)
    with pytest.raises(NonFiniteError, match="'norm.weight' is not finite"):
        load_descendant(tmp_path / "bad.safetensors")


def test_extract_refuses_an_all_nan_model(tiny_lg: Learngene) -> None:
    state = {k: torch.full_like(v, float("nan")) for k, v in expand(tiny_lg, 4).state_dict().items()}
    with pytest.raises(NonFiniteError, match="model tensor .* is not finite"):
        extract_learngene(state, tiny_lg.spec)


def test_import_refuses_nan_and_float32_overflow(tiny_lg: Learngene, tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in tiny_lg.shared.items()}
    for name in BLOCK_PARAMS:
        state[official_key(name, "base")] = tiny_lg.base[name].clone()
        state[official_key(name, "ilayer")] = tiny_lg.slope[name].clone()
    key = official_key("attn.proj.weight", "ilayer")
    torch.save({"model": {**state, key: _poison(state[key])}}, tmp_path / "nan.pth")
    with pytest.raises(NonFiniteError, match="instances.0.weight_ilayer"):
        import_tleg_checkpoint(tmp_path / "nan.pth", aux_depth=4, num_heads=2)
    big = state["head.weight"].double()
    big.view(-1)[0] = 1e300  # finite in float64, inf once cast to our float32
    torch.save({"model": {**state, "head.weight": big}}, tmp_path / "big.pth")
    with pytest.raises(NonFiniteError, match="'head.weight' is not finite"):
        import_tleg_checkpoint(tmp_path / "big.pth", aux_depth=4, num_heads=2)


def _tiny_split(spec: ViTSpec, n: int = 16, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, spec.in_chans, spec.img_size, spec.img_size, generator=g),
                 torch.randint(0, spec.num_classes, (n,), generator=g))


def test_training_stops_on_a_nan_loss_and_keeps_the_last_checkpoint(tiny_spec: ViTSpec, tmp_path: Path) -> None:
    model = init_vit_(ViT(tiny_spec, 2), torch.Generator().manual_seed(0))
    train, val = _tiny_split(tiny_spec), _tiny_split(tiny_spec, 8, 1)
    run = tmp_path / "run"
    run_training(model, CrossEntropy(), train, val, TrainConfig(epochs=1, batch_size=8), RunOptions(run_dir=run))
    saved = (run / CHECKPOINT).read_bytes()

    class NaNAfter(CrossEntropy):  # a loss that blows up on the 2nd step of epoch 2
        calls = 0

        def forward(self, x: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            NaNAfter.calls += 1
            loss = super().forward(x, out, y)
            return loss * float("nan") if NaNAfter.calls == 2 else loss

    with pytest.raises(DivergedError, match=r"loss is nan at epoch 2, step 2; .*checkpoint.safetensors still holds"):
        run_training(model, NaNAfter(), train, val, TrainConfig(epochs=2, batch_size=8),
                     RunOptions(run_dir=run, resume=True))
    assert (run / CHECKPOINT).read_bytes() == saved
    assert load_checkpoint(run / CHECKPOINT).epoch == 1


def test_training_stops_when_a_step_makes_weights_non_finite(tiny_spec: ViTSpec, tmp_path: Path) -> None:
    model = init_vit_(ViT(tiny_spec, 1), torch.Generator().manual_seed(0))

    class Poison(CrossEntropy):  # adds 0 to the loss, but an infinite gradient (d sqrt(x)/dx at 0)
        def forward(self, x: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return super().forward(x, out, y) + (model.head.bias - model.head.bias.detach()).sqrt().sum()

    with pytest.raises(DivergedError, match="not finite after epoch 1"):
        run_training(model, Poison(), _tiny_split(tiny_spec), _tiny_split(tiny_spec, 8, 1),
            TrainConfig(epochs=1, batch_size=16), RunOptions(run_dir=tmp_path / "run"))  # one step per epoch
    assert not (tmp_path / "run" / CHECKPOINT).exists()


def test_training_refuses_nan_images_and_a_nan_teacher(tiny_spec: ViTSpec, tmp_path: Path) -> None:
    model = ViT(tiny_spec, 1)
    train = _tiny_split(tiny_spec)
    train.x[3, 0, 1, 1] = float("nan")
    with pytest.raises(DataError, match="train split tensor 'images' is not finite"):
        run_training(model, CrossEntropy(), train, _tiny_split(tiny_spec, 8, 1), TrainConfig(epochs=1))
    grey = ViTSpec(img_size=8, patch_size=4, in_chans=1, embed_dim=16, num_heads=2, mlp_ratio=2.0, num_classes=10)
    teacher = init_vit_(ViT(grey, 1), torch.Generator().manual_seed(0))
    with torch.no_grad():
        teacher.head.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="teacher tensor 'head.bias'"):
        train_learngene("digits", teacher, TrainConfig(epochs=1), DistillConfig(aux_depth=2))


def test_npz_with_nan_pixels_is_refused(tmp_path: Path) -> None:
    from tleg_deploy.train.data import load_data

    spec = ViTSpec(img_size=8, patch_size=4, in_chans=1, embed_dim=16, num_heads=2, mlp_ratio=2.0, num_classes=3)
    x = np.random.default_rng(0).random((30, 8, 8))
    x[7, 2, 2] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=np.repeat(np.arange(3), 10))
    with pytest.raises(DataError, match=r"NaN or infinite values in 1 of 30 images \(first: sample 7\)"):
        load_data(f"npz:{tmp_path / 'd.npz'}", spec, "train")


def test_resuming_from_a_non_finite_checkpoint_is_refused(tiny_spec: ViTSpec, tmp_path: Path) -> None:
    from tleg_deploy.train.checkpoint import save_checkpoint

    model = ViT(tiny_spec, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    with torch.no_grad():
        model.pos_embed.fill_(float("nan"))
    save_checkpoint(tmp_path / "ckpt.safetensors", model, optimizer, 1, [], {})
    with pytest.raises(NonFiniteError, match="ckpt.safetensors tensor 'pos_embed' is not finite"):
        load_checkpoint(tmp_path / "ckpt.safetensors")
