from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tleg_deploy.errors import DataError
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.train.data import augment_batch, load_data


@pytest.fixture
def grey_spec() -> ViTSpec:
    return ViTSpec(img_size=8, patch_size=4, in_chans=1, embed_dim=16, num_heads=2, mlp_ratio=2.0, num_classes=3)


def test_digits_splits_are_disjoint_stratified_and_normalised() -> None:
    spec = ViTSpec.preset("digits")
    parts = {s: load_data("digits", spec, s) for s in ("train", "val", "test")}
    sizes = {s: len(y) for s, (_, y) in parts.items()}
    assert sum(sizes.values()) == 1797
    assert 0.15 < sizes["test"] / 1797 < 0.25 and 0.05 < sizes["val"] / 1797 < 0.15
    x, y = parts["train"]
    assert x.shape == (sizes["train"], 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0  # pixels 0..16 map onto exactly -1..1
    assert set(parts["test"][1].tolist()) == set(range(10))  # every class in the test split
    # disjoint: no test image is also a train image row (digits has a few duplicates; compare counts loosely)
    flat = {tuple(r.tolist()) for r in parts["train"][0].flatten(1)}
    overlap = sum(tuple(r.tolist()) in flat for r in parts["test"][0].flatten(1))
    assert overlap < 0.05 * sizes["test"]
    # the same split every call, whatever the global random state
    torch.manual_seed(5)
    np.random.seed(5)
    assert torch.equal(load_data("digits", spec, "test")[1], parts["test"][1])


def test_digits_follow_spec_channels_and_size() -> None:
    spec = ViTSpec(img_size=16, patch_size=4, in_chans=3, embed_dim=16, num_heads=2, mlp_ratio=2.0, num_classes=10)
    x, _ = load_data("digits", spec, "val")
    assert x.shape[1:] == (3, 16, 16)


def test_augment_shifts_but_keeps_values(grey_spec: ViTSpec) -> None:
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    a = augment_batch(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and not torch.equal(a, x)
    assert float(a.min()) >= float(x.min()) and float(a.max()) <= float(x.max())


def _npz(tmp_path: Path, x: np.ndarray, y: np.ndarray) -> str:
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y)
    return f"npz:{p}"


def test_npz_roundtrip_and_errors(tmp_path: Path, grey_spec: ViTSpec) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    src = _npz(tmp_path, rng.integers(0, 256, (30, 8, 8), dtype=np.uint8), y)
    x, yy = load_data(src, grey_spec, "train")
    assert x.shape[1:] == (1, 8, 8) and len(yy) == 21
    with pytest.raises(DataError, match="outside 0..2"):
        load_data(_npz(tmp_path, np.zeros((4, 8, 8)), np.array([0, 1, 2, 3])), grey_spec, "train")
    with pytest.raises(DataError, match="12x12"):
        load_data(_npz(tmp_path, np.zeros((4, 12, 12)), np.array([0, 1, 2, 0])), grey_spec, "train")
    with pytest.raises(DataError, match="no such npz"):
        load_data("npz:/nonexistent/d.npz", grey_spec, "train")
    with pytest.raises(DataError, match="unknown data source"):
        load_data("mnist", grey_spec, "train")
    with pytest.raises(DataError, match="unknown split"):
        load_data("digits", grey_spec, "dev")


def _folder(tmp_path: Path, classes: dict[str, int]) -> Path:
    from PIL import Image

    root = tmp_path / "imgs"
    for c, n in classes.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((12, 10), 40 * i, dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_folder_reads_resizes_and_labels(tmp_path: Path, grey_spec: ViTSpec) -> None:
    root = _folder(tmp_path, {"a": 5, "b": 5})
    x, y = load_data(f"folder:{root}", grey_spec, "train")
    assert x.shape[1:] == (1, 8, 8) and set(y.tolist()) == {0, 1}


def test_folder_errors_name_the_problem(tmp_path: Path, grey_spec: ViTSpec) -> None:
    with pytest.raises(DataError, match="no such data folder"):
        load_data(f"folder:{tmp_path / 'missing'}", grey_spec, "train")
    root = _folder(tmp_path, {"a": 3, "b": 0})
    with pytest.raises(DataError, match="holds no images"):
        load_data(f"folder:{root}", grey_spec, "train")
    (root / "b" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png"):
        load_data(f"folder:{root}", grey_spec, "train")
    root2 = _folder(tmp_path / "many", {c: 2 for c in "abcd"})  # 4 classes, spec has 3
    with pytest.raises(DataError, match="4 classes"):
        load_data(f"folder:{root2}", grey_spec, "train")


def test_too_small_npz_is_refused_with_the_size_needed(tmp_path: Path, grey_spec: ViTSpec) -> None:
    from tleg_deploy.train.data import min_class_size

    assert [min_class_size(s) for s in ("train", "val", "test")] == [1, 6, 3]
    tiny = _npz(tmp_path, np.zeros((3, 8, 8), np.uint8), np.array([0, 1, 2]))
    load_data(tiny, grey_spec, "train")  # one sample per class: train gets them all
    for split in ("val", "test"):
        with pytest.raises(DataError, match=rf"3 samples in 3 classes: too few for a non-empty {split} split"
                                            r".*at least 6 samples of one class"):
            load_data(tiny, grey_spec, split)
    ok = _npz(tmp_path, np.zeros((6, 8, 8), np.uint8), np.zeros(6, np.int64))
    assert [len(load_data(ok, grey_spec, s)[1]) for s in ("train", "val", "test")] == [4, 1, 1]


def test_files_that_are_not_npz_say_what_they_are(tmp_path: Path, grey_spec: ViTSpec) -> None:
    (tmp_path / "text.npz").write_text("x,y\n1,2\n")
    with pytest.raises(DataError, match=r"is not an .npz archive \(a zip file; this one starts with b.x,y") as e:
        load_data(f"npz:{tmp_path / 'text.npz'}", grey_spec, "train")
    assert "pickle" not in str(e.value)
    np.save(tmp_path / "one.npy", np.zeros((4, 8, 8)))
    with pytest.raises(DataError, match="a single .npy array"):
        load_data(f"npz:{tmp_path / 'one.npy'}", grey_spec, "train")
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        load_data(f"npz:{tmp_path / 'empty.npz'}", grey_spec, "train")


def test_digits_read_without_importing_sklearn_are_load_digits() -> None:
    """The loader reads scikit-learn's shipped CSV directly (no 1 s sklearn import); the arrays are the same."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from tleg_deploy.train import data

    images, labels = data._digits_raw()
    d = load_digits()
    np.testing.assert_array_equal(images, (d.images / 16.0).astype(np.float32))
    np.testing.assert_array_equal(labels, d.target)
    code = "import sys; from tleg_deploy.train import data; data._digits_raw(); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
