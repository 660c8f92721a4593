"""Self-describing files: class names (in label order) and preprocessing in learngene, descendant and
ONNX metadata and ``labels.json``; the preprocessing recorded is the one ``load_data`` applies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tleg_deploy.errors import FormatError
from tleg_deploy.files.datacard import DataCard, Preprocessing, run_snippet
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.train.data import data_card, load_data

RGB = ViTSpec(img_size=8, patch_size=4, in_chans=3, embed_dim=16, num_heads=2, mlp_ratio=2.0, num_classes=3)


def make_folder(root: Path, names: tuple[str, ...] = ("zero", "one", "two"), per_class: int = 6,
                size: int = 12) -> Path:
    """A tiny class-per-folder PNG data set: class ``i`` is a solid colour, brighter with ``i``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            a = np.full((size, size, 3), 40 + 80 * i, np.uint8) + rng.integers(0, 10, (size, size, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / name / f"{j}.png")
    return root


def test_folder_card_records_the_alphabetical_label_order_and_the_preprocessing(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs")
    card = data_card(f"folder:{root}", RGB)
    assert card.classes == ("one", "two", "zero")  # label i is classes[i]: the folder names, sorted
    p = card.preprocessing
    assert (p.img_size, p.mode, p.channels, p.resize, p.mean, p.std) == (8, "RGB", 3, "bilinear", (0.5,) * 3,
                                                                           (0.5,) * 3)
    assert p.scale == pytest.approx(1 / 255) and card.source == f"folder:{root}"
    # The card's preprocessing, applied with PIL + numpy, reproduces load_data's tensor for one image.
    from PIL import Image

    parts = [load_data(f"folder:{root}", RGB, split) for split in ("train", "val", "test")]
    x, y = torch.cat([xs for xs, _ in parts]), torch.cat([ys for _, ys in parts])
    first = sorted((root / "one").iterdir())
    im = Image.open(first[0]).convert(p.mode).resize((p.img_size, p.img_size), Image.Resampling.BILINEAR)
    a = (np.asarray(im, np.float32) * p.scale).transpose(2, 0, 1)
    a = (a - np.array(p.mean, np.float32)[:, None, None]) / np.array(p.std, np.float32)[:, None, None]
    assert any(torch.allclose(torch.from_numpy(a), xi, atol=1e-6) for xi in x[y == 0])


def test_digits_and_npz_cards(tmp_path: Path) -> None:
    digits = data_card("digits", ViTSpec.preset("digits"))
    assert digits.classes == tuple(str(i) for i in range(10))
    assert digits.preprocessing.resize == "bilinear" and digits.preprocessing.scale == 1 / 255
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((40, 8, 8, 3), np.uint8), y=np.arange(40) % 2)
    card = data_card(f"npz:{path}", RGB)
    assert card.classes == ("0", "1", "2") and card.preprocessing.resize == "none"
    assert card.preprocessing.scale == pytest.approx(1 / 255)


def test_card_json_round_trip_and_bad_cards() -> None:
    card = DataCard(("cat", "dog"), Preprocessing.for_channels(32, 3), "folder:x")
    assert DataCard.from_json(card.to_json()) == card
    assert card.labels_json()["format"] == "tleg-labels" and card.labels_json()["classes"] == ["cat", "dog"]
    with pytest.raises(FormatError):
        DataCard.from_json('{"classes": ["a"]}')
    with pytest.raises(FormatError):
        Preprocessing(8, "CMYK")


def test_learngene_and_descendant_carry_the_card_and_old_files_still_load(tmp_path: Path) -> None:
    from tleg_deploy.files.tensorfile import read_metadata
    from tleg_deploy.model.expansion import descendant_card, expand, load_descendant, save_descendant
    from tleg_deploy.model.learngene import Learngene
    from tleg_deploy.model.resources import DEMO_LEARNGENE, load_learngene

    old = Learngene.load(DEMO_LEARNGENE)  # written before cards: loads, without one
    assert old.data is None and "data" not in read_metadata(DEMO_LEARNGENE)
    assert load_learngene("demo").data == data_card("digits", old.spec)  # the demo is known to be digits
    card = DataCard(tuple("abcdefghij"), Preprocessing.for_channels(8, 1), "folder:somewhere")
    old.data = card
    old.save(tmp_path / "lg.safetensors")
    lg = Learngene.load(tmp_path / "lg.safetensors")
    assert lg.data == card and lg.sha256() == old.sha256()  # the card is metadata, not content
    assert lg.describe()["data"]["classes"] == list("abcdefghij")
    save_descendant(expand(lg, 2), tmp_path / "d.safetensors", lg.sha256(), data=lg.data)
    _, meta = load_descendant(tmp_path / "d.safetensors")
    assert descendant_card(meta) == card
    save_descendant(expand(lg, 2), tmp_path / "plain.safetensors")
    assert descendant_card(load_descendant(tmp_path / "plain.safetensors")[1]) is None


def test_a_corrupt_card_is_a_format_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from tleg_deploy.files.tensorfile import read_metadata
    from tleg_deploy.model.learngene import Learngene
    from tleg_deploy.model.resources import DEMO_LEARNGENE

    meta = read_metadata(DEMO_LEARNGENE) | {"data": "{not json"}
    save_file(load_file(DEMO_LEARNGENE), tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(FormatError, match="data card"):
        Learngene.load(tmp_path / "bad.safetensors")


def test_export_writes_the_card_into_every_onnx_file_and_labels_json(tmp_path: Path) -> None:
    from tleg_deploy.export.family import export_family
    from tleg_deploy.export.onnx import read_metadata
    from tleg_deploy.model.resources import load_learngene

    lg = load_learngene("demo")
    card = DataCard(tuple("abcdefghij"), lg.data.preprocessing if lg.data else Preprocessing(8, "L"), "custom")
    manifest = export_family(lg, [1], tmp_path / "out", "onnx,int8", card=card)
    for a in manifest["artifacts"]:
        assert DataCard.from_json(read_metadata(tmp_path / "out" / a["file"])["data"]) == card
    labels = json.loads((tmp_path / "out" / "labels.json").read_text())
    assert labels["classes"] == list("abcdefghij") and labels["preprocessing"]["mode"] == "L"


def test_the_run_snippet_is_short_and_classifies_an_image(tmp_path: Path) -> None:
    """The REPORT snippet, run as a script next to an exported model, prints a class name."""
    import subprocess
    import sys

    from PIL import Image

    from tleg_deploy.export.family import export_family
    from tleg_deploy.model.resources import load_learngene

    lg = load_learngene("demo")
    export_family(lg, [1], tmp_path, "onnx")
    code = run_snippet(json.loads((tmp_path / "labels.json").read_text()), "depth_01/model.onnx")
    assert len(code.splitlines()) == 10
    (tmp_path / "run.py").write_text(code)
    Image.fromarray(np.eye(8, dtype=np.uint8) * 16).save(tmp_path / "x.png")
    res = subprocess.run([sys.executable, "run.py", "x.png"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() in {str(i) for i in range(10)}
