from __future__ import annotations

import subprocess
import sys

import pytest

from tleg_deploy.errors import DepthError, SpecError, UnitError
from tleg_deploy.model.spec import ViTSpec, check_depth
from tleg_deploy.plan.units import parse_count, parse_latency_ms, parse_size_mb


def test_presets_match_deit() -> None:
    for name, dim, heads in [("deit-tiny", 192, 3), ("deit-small", 384, 6), ("deit-base", 768, 12)]:
        s = ViTSpec.preset(name)
        assert (s.img_size, s.patch_size, s.embed_dim, s.num_heads, s.mlp_ratio) == (224, 16, dim, heads, 4.0)
        assert s.num_patches == 196 and s.preset_name() == name
    assert ViTSpec.preset("digits").num_classes == 10


def test_spec_validation_names_the_problem() -> None:
    with pytest.raises(SpecError, match="not divisible by num_heads"):
        ViTSpec(img_size=8, patch_size=2, in_chans=1, embed_dim=10, num_heads=3, mlp_ratio=4, num_classes=2)
    with pytest.raises(SpecError, match="patch_size"):
        ViTSpec(img_size=9, patch_size=2, in_chans=1, embed_dim=8, num_heads=2, mlp_ratio=4, num_classes=2)
    with pytest.raises(SpecError, match="unknown spec preset"):
        ViTSpec.preset("deit-huge")
    with pytest.raises(SpecError, match="unknown key"):
        ViTSpec.from_dict({**ViTSpec.preset("digits").to_dict(), "depth": 3})


def test_spec_json_round_trip() -> None:
    s = ViTSpec.preset("deit-small")
    assert ViTSpec.from_json(s.to_json()) == s


@pytest.mark.parametrize("bad", [0, -3, 100000, "abc", 2.5, True])
def test_check_depth_rejects(bad: object) -> None:
    with pytest.raises(DepthError):
        check_depth(bad)


def test_units() -> None:
    assert parse_latency_ms("5ms") == 5.0
    assert parse_latency_ms("0.5s") == 500.0
    assert parse_latency_ms("800us") == pytest.approx(0.8)
    assert parse_size_mb("256MB") == 256.0
    assert parse_size_mb("1.5GiB") == pytest.approx(1.5 * 1024**3 / 1e6)
    assert parse_count("20M") == 20_000_000


@pytest.mark.parametrize("bad", ["5parsecs", "-1ms", "0ms", "inf", "nan", "", "ms", "5 m s"])
def test_units_reject_nonsense(bad: str) -> None:
    with pytest.raises(UnitError):
        parse_latency_ms(bad)


def test_torch_free_modules_do_not_import_torch() -> None:
    code = (
        "import sys; import tleg_deploy, tleg_deploy.plan.units, tleg_deploy.model.spec, tleg_deploy.errors, "
        "tleg_deploy.files.fileio, tleg_deploy.plan.costs, tleg_deploy.plan.budget, tleg_deploy.plan.solve, "
        "tleg_deploy.profile.table, tleg_deploy.plan.precisions, tleg_deploy.files.schema, "
        "tleg_deploy.model.resources; print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_costs_match_the_real_model() -> None:
    from tleg_deploy.model.vit import ViT
    from tleg_deploy.plan.costs import params

    for spec in (ViTSpec.preset("digits"), ViTSpec(img_size=8, patch_size=4, in_chans=3, embed_dim=16,
                                                    num_heads=2, mlp_ratio=2.0, num_classes=5, qkv_bias=False,
                                                    class_token=True)):
        for depth in (0, 1, 5):
            assert params(spec, depth) == sum(p.numel() for p in ViT(spec, depth).parameters())


def test_deit_tiny_macs_match_published_figure() -> None:
    from tleg_deploy.plan.costs import macs

    # DeiT-Ti is commonly quoted at 1.3 GMACs (fvcore) with a class token: 197 tokens.
    spec = ViTSpec.preset("deit-tiny")
    assert 1.2e9 < macs(spec, 12) < 1.3e9


def test_key_mismatch_names_the_first_difference() -> None:
    from tleg_deploy.errors import key_mismatch

    assert key_mismatch({"a", "b"}, {"a", "b"}) is None
    assert key_mismatch({"a"}, {"a", "c", "b"}) == "is missing key 'b' (2 missing)"
    assert key_mismatch({"a", "z", "c"}, {"a", "c"}, "tensor") == "has unexpected tensor 'z'"
    assert key_mismatch({"z"}, {"a"}).startswith("is missing")  # missing is reported first
