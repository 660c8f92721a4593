"""Training, validation and test data as tensors: ``load_data(source, spec, split)``.

Sources (DESIGN.md §5): ``digits`` (scikit-learn's bundled 8x8 handwritten digits, no download),
``folder:PATH`` (ImageFolder layout: one sub-folder per class, read with PIL; or ``PATH/train``,
``PATH/val``, ``PATH/test`` each in that layout) and ``npz:PATH`` (arrays ``x`` of shape
``(N, H, W)`` or ``(N, H, W, C)`` and integer ``y`` of shape ``(N,)``).

Splits are a fixed, stratified 70/10/20 train/val/test partition drawn with ``SPLIT_SEED`` so that
every run, seed and helper sees the same test set. Images come
back as float ``(N, C, H, W)`` scaled to [-1, 1] (``(x - 0.5) / 0.5`` of the [0, 1] image), labels as
int64. Anything unusable raises ``DataError`` naming the file, class or value.
``data_card(source, spec)`` records the class names (label order: the bundled digits "0".."9",
folder class names sorted alphabetically, npz integer labels) and this preprocessing
(``files.datacard``), for the metadata of every file trained on the data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tleg_deploy.errors import DataError
from tleg_deploy.files.datacard import DataCard, Preprocessing
from tleg_deploy.model.spec import ViTSpec

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"val": 0.1, "test": 0.2}  # the rest is train
SPLIT_SEED = 0
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def load_data(source: str, spec: ViTSpec, split: str) -> tuple[Tensor, Tensor]:
    """Images ``(N, C, H, W)`` normalised for ``spec`` and int64 labels ``(N,)`` of one split.
    The training loop augments every batch afresh with :func:`augment_batch`."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}", hint=f"choose one of {', '.join(SPLITS)}")
    kind, _, arg = source.partition(":")
    if kind == "digits" and not arg:
        x, y = _digits_split(split, spec)
    elif kind == "folder" and arg:
        x, y = _folder(Path(arg), spec, split)
    elif kind == "npz" and arg:
        x, y = _npz(Path(arg), spec, split)
    else:
        raise DataError(f"unknown data source {source!r}", hint="use digits, folder:PATH or npz:PATH")
    return x, y


def data_card(source: str, spec: ViTSpec) -> DataCard:
    """The class names (in label order) and preprocessing ``load_data(source, spec, ...)`` uses."""
    kind, _, arg = source.partition(":")
    resize, scale = "bilinear", 1 / 255
    if kind == "digits" and not arg:
        # For an image file of a digit (8-bit, white ink on black): the bundled arrays hold 0..16 and are
        # divided by 16 to the same [0, 1] range.
        names = [str(i) for i in range(10)]
    elif kind == "folder" and arg:
        root = Path(arg)
        if not root.is_dir():
            raise DataError(f"no such data folder: {root}")
        names = _classes(root / "train" if all((root / s).is_dir() for s in SPLITS) else root)
    elif kind == "npz" and arg:
        raw, _ = _read_npz(Path(arg))  # the raw range decides the scale, as when the data is loaded
        names, resize = [str(i) for i in range(spec.num_classes)], "none"
        scale = 1 / _npz_scale(raw)
    else:
        raise DataError(f"unknown data source {source!r}", hint="use digits, folder:PATH or npz:PATH")
    names += [f"unused {i}" for i in range(len(names), spec.num_classes)]  # labels the data never uses
    return DataCard(tuple(names), Preprocessing.for_channels(spec.img_size, spec.in_chans, resize=resize, scale=scale),
                    source)


def augment_batch(x: Tensor, generator: torch.Generator) -> Tensor:
    """Light augmentation: a random translation of up to 1/8 of the image (at least one pixel)
    in each direction, filling with the background value. No flips: digits are not symmetric."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    bg = float(x.min()) if x.numel() else -1.0
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=bg)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)  # (N, C, H, W + 2 pad)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


# -- splitting -----------------------------------------------------------------------------------
def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Stratified fixed split: per class, shuffle with ``SPLIT_SEED``, then test, val, train."""
    rng = np.random.default_rng(SPLIT_SEED)
    picked: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(SPLIT_FRACTIONS["test"] * len(idx)))
        n_val = int(round(SPLIT_FRACTIONS["val"] * len(idx)))
        parts = {"test": idx[:n_test], "val": idx[n_test:n_test + n_val], "train": idx[n_test + n_val:]}
        picked.append(parts[split])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def min_class_size(split: str) -> int:
    """The fewest samples one class needs for ``split`` to get at least one of them."""
    return next(n for n in range(1, 1000) if len(split_indices(np.zeros(n, dtype=np.int64), split)))


def _nonempty(idx: np.ndarray, labels: np.ndarray, split: str, origin: str) -> np.ndarray:
    """``idx``, or a ``DataError`` saying how much data a non-empty ``split`` needs."""
    if len(idx):
        return idx
    need = max(min_class_size(s) for s in SPLITS)
    shares = f"train {1 - sum(SPLIT_FRACTIONS.values()):.0%}, " + ", ".join(
        f"{k} {v:.0%}" for k, v in SPLIT_FRACTIONS.items())
    raise DataError(
        f"{origin} has {len(labels)} samples in {len(np.unique(labels))} classes: too few for a non-empty "
        f"{split} split ({shares}, drawn per class)",
        hint=f"at least {need} samples of one class are needed for train, val and test to be non-empty",
    )


def _check_npz_magic(path: Path) -> None:
    """An .npz is a zip archive; say what the file is instead of numpy's guess ("pickled data")."""
    with path.open("rb") as f:
        head = f.read(6)
    if head.startswith(b"PK"):
        return
    if not head:
        problem = "is empty"
    elif head.startswith(b"\x93NUMPY"):
        problem = "is a single .npy array, not an .npz archive"
    else:
        problem = f"is not an .npz archive (a zip file; this one starts with {head!r})"
    raise DataError(f"{path} {problem}", hint="save images and labels with numpy.savez(path, x=images, y=labels)")


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _finish(x: np.ndarray, y: np.ndarray, spec: ViTSpec, origin: str) -> tuple[Tensor, Tensor]:
    """``x`` in [0, 1] as (N, C, H, W) float32 → normalised tensor; labels checked against spec."""
    y = np.asarray(y)
    if y.size and (y.min() < 0 or y.max() >= spec.num_classes):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise DataError(
            f"{origin} has label {bad} outside 0..{spec.num_classes - 1}",
            hint=f"the spec has {spec.num_classes} classes",
        )
    images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return (images - 0.5) / 0.5, torch.from_numpy(y.astype(np.int64))


# -- digits ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) images in [0, 1] and labels. Read from the CSV scikit-learn ships (what
    ``load_digits`` parses: 64 pixel columns 0-16 and the label) without importing scikit-learn, which
    takes ~1.1 s per process here; ``load_digits`` itself where the file is not where it has always been."""
    import gzip
    import importlib.util

    found = importlib.util.find_spec("sklearn")
    csv = Path(found.origin).parent / "datasets" / "data" / "digits.csv.gz" if found and found.origin else None
    table = None
    if csv is not None and csv.is_file():
        with gzip.open(csv, "rt") as f:
            table = np.loadtxt(f, delimiter=",")
    if table is not None and table.ndim == 2 and table.shape[1] == 65:  # the layout load_digits reads
        pixels, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        pixels, target = d.images, d.target
    return (pixels / 16.0).astype(np.float32), target.astype(np.int64)


def _digits_split(split: str, spec: ViTSpec) -> tuple[Tensor, Tensor]:
    images, labels = _digits_raw()
    idx = split_indices(labels, split)
    x = torch.from_numpy(images[idx]).unsqueeze(1)  # (N, 1, 8, 8)
    if spec.img_size != 8:
        x = torch.nn.functional.interpolate(x, size=(spec.img_size, spec.img_size), mode="bilinear",
                                            align_corners=False)
    x = x.expand(-1, spec.in_chans, -1, -1)
    return _finish(x.numpy(), labels[idx], spec, "digits")


# -- npz ---------------------------------------------------------------------------------------------
def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The arrays ``x`` and ``y`` of an npz file (no pickles), or a ``DataError`` saying why not."""
    if not path.is_file():
        raise DataError(f"no such npz file: {path}")
    _check_npz_magic(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise DataError(f"{path} must hold arrays 'x' and 'y', found {sorted(f.files)}")
            return np.asarray(f["x"]), np.asarray(f["y"])
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path} is not a readable .npz file: {_first_line(e)}") from None


def _npz_scale(x: np.ndarray) -> float:
    """What npz pixels are divided by to reach [0, 1]: 255 for integers or values above 1, else 1."""
    return 255.0 if np.issubdtype(x.dtype, np.integer) or x.max(initial=0) > 1.0 else 1.0


def _npz(path: Path, spec: ViTSpec, split: str) -> tuple[Tensor, Tensor]:
    x, y = _read_npz(path)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{path}: x must be (N, H, W[, C]) and y (N,), got {x.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y must hold integer labels, got dtype {y.dtype}")
    h, w, c = x.shape[1:]
    if (h, w) != (spec.img_size, spec.img_size):
        raise DataError(
            f"{path}: images are {h}x{w}, the spec expects {spec.img_size}x{spec.img_size}",
            hint="resize the arrays or use folder:PATH, which resizes",
        )
    if c != spec.in_chans:
        raise DataError(f"{path}: images have {c} channel(s), the spec expects {spec.in_chans}")
    if not np.issubdtype(x.dtype, np.integer) and not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: x must hold numbers, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not (finite := np.isfinite(x)).all():
        bad = np.flatnonzero(~finite.reshape(len(x), -1).all(1))
        raise DataError(f"{path}: x holds NaN or infinite values in {len(bad)} of {len(x)} images "
                        f"(first: sample {int(bad[0])})", hint="clean or drop those images")
    scale = _npz_scale(x)
    idx = _nonempty(split_indices(y, split), y, split, f"npz:{path}")
    return _finish(x[idx].transpose(0, 3, 1, 2) / scale, y[idx], spec, str(path))


# -- folder --------------------------------------------------------------------------------------------
def _folder(root: Path, spec: ViTSpec, split: str) -> tuple[Tensor, Tensor]:
    if not root.is_dir():
        raise DataError(f"no such data folder: {root}")
    if all((root / s).is_dir() for s in SPLITS):  # pre-split layout
        classes = _classes(root / "train")
        files, labels = _scan(root / split, classes)
        idx = np.arange(len(labels))
    else:
        classes = _classes(root)
        files, labels = _scan(root, classes)
        idx = _nonempty(split_indices(labels, split), labels, split, f"folder:{root}")
    if len(classes) > spec.num_classes:
        raise DataError(
            f"{root} has {len(classes)} classes, the spec has {spec.num_classes}",
            hint=f"label {len(classes) - 1} ({classes[-1]}) is out of range",
        )
    x = np.stack([_read_image(files[i], spec) for i in idx]) if len(idx) else np.zeros(
        (0, spec.in_chans, spec.img_size, spec.img_size), np.float32)
    return _finish(x, labels[idx], spec, str(root))


def _classes(root: Path) -> list[str]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders", hint="use one sub-folder per class")
    return classes


def _scan(root: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    if not root.is_dir():
        raise DataError(f"no such data folder: {root}")
    extra = sorted(set(_classes(root)) - set(classes))
    if extra:
        raise DataError(f"{root} has class folder {extra[0]!r} that the training split lacks")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"class folder {root / name} holds no images",
                            hint=f"image files end in {', '.join(sorted(IMAGE_SUFFIXES))}")
        files += found
        labels += [label] * len(found)
    return files, np.asarray(labels, dtype=np.int64)


def _read_image(path: Path, spec: ViTSpec) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as raw:
            im = raw.convert("L" if spec.in_chans == 1 else "RGB")
            im = im.resize((spec.img_size, spec.img_size), Image.Resampling.BILINEAR)
            a = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, H, W)
    if a.shape[0] != spec.in_chans:
        raise DataError(f"{path} has {a.shape[0]} channels, the spec expects {spec.in_chans}")
    return a


# -- what the data is (spec inference and checks) ------------------------------------------------------
_GREY_MODES = {"1", "L", "LA", "I", "F"}


@dataclass(frozen=True)
class DataShape:
    """What a data source holds: the most common image size, the channels a model needs (1 if every
    image is greyscale, else 3), the class count, and whether every image has that size."""

    height: int
    width: int
    in_chans: int
    num_classes: int
    uniform: bool = True

    @property
    def img_size(self) -> int:
        """The square size a spec inferred from this data uses: the shorter side."""
        return min(self.height, self.width)

    @property
    def size_text(self) -> str:
        return f"{self.height}x{self.width}" + ("" if self.uniform else " (the most common size; sizes vary)")

    def describe(self) -> str:
        return f"{self.size_text} {'greyscale' if self.in_chans == 1 else 'RGB'}, {self.num_classes} classes"


def describe_data(source: str) -> DataShape:
    """The shape of ``source`` (``digits``, ``folder:PATH``, ``npz:PATH``), from image headers and array
    shapes only; ``DataError`` as ``load_data`` would raise it."""
    kind, _, arg = source.partition(":")
    if kind == "digits" and not arg:
        return DataShape(8, 8, 1, 10)
    if kind == "npz" and arg:
        return _npz_shape(Path(arg))
    if kind == "folder" and arg:
        return _folder_shape(Path(arg))
    raise DataError(f"unknown data source {source!r}", hint="use digits, folder:PATH or npz:PATH")


def check_data(source: str, spec: ViTSpec) -> list[str]:
    """Refuse ``source`` for ``spec`` if their channels or class counts differ (``DataError`` naming
    both); otherwise the notes a user must see, e.g. that images are resized to the spec's size."""
    shape = describe_data(source)
    kind = source.partition(":")[0]
    notes = []
    if kind != "digits":
        for what, have, want in (("channel(s)", shape.in_chans, spec.in_chans),
                                 ("classes", shape.num_classes, spec.num_classes)):
            if have != want:
                field = "in_chans" if what.startswith("channel") else "num_classes"
                raise DataError(f"{source} has {have} {what}, the spec has {field}={want}",
                                hint=f"leave out --spec to infer it from the data, or add {field}={have} to it")
    elif spec.in_chans != 1:
        notes.append(f"digits images are greyscale: copied to {spec.in_chans} channels")
    if not shape.uniform or (shape.height, shape.width) != (spec.img_size, spec.img_size):
        notes.append(f"{source} images are {shape.size_text}: resized to "
                     f"{spec.img_size}x{spec.img_size} (bilinear) for the spec's img_size={spec.img_size}")
    return notes


def _npz_shape(path: Path) -> DataShape:
    x, y = _read_npz(path)
    x_shape = x.shape
    if len(x_shape) not in (3, 4) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or not y.size:
        raise DataError(f"{path}: x must be (N, H, W[, C]) and y (N,) integer labels, got {x_shape} and {y.shape}")
    return DataShape(int(x_shape[1]), int(x_shape[2]), int(x_shape[3]) if len(x_shape) == 4 else 1,
                     int(y.max()) + 1)


def _folder_shape(root: Path) -> DataShape:
    from collections import Counter

    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise DataError(f"no such data folder: {root}")
    top = root / "train" if all((root / s).is_dir() for s in SPLITS) else root
    classes = _classes(top)
    files, _ = _scan(top, classes)
    sizes: Counter[tuple[int, int]] = Counter()
    colour = False
    for path in files:
        try:
            with Image.open(path) as im:  # reads the header only
                sizes[(im.height, im.width)] += 1
                colour = colour or im.mode not in _GREY_MODES and not im.mode.startswith("I;")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"cannot read image {path}: {e}") from None
    (h, w), _ = sizes.most_common(1)[0]
    return DataShape(h, w, 3 if colour else 1, len(classes), uniform=len(sizes) == 1)
