"""``DataCard``: what a model's inputs and outputs mean — the class names in label order and the
preprocessing that turns an image into the ``pixel_values`` tensor (``Preprocessing``).

Every learngene, descendant and ONNX file carries one in its metadata (key ``data``, a JSON
string; optional, so files written before it still load), and every output directory holds it as
``labels.json``. ``train.data.data_card(source, spec)`` makes one from a data source; the
preprocessing mirrors what ``train.data.load_data`` does. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tleg_deploy.errors import FormatError

LABELS_FORMAT = "tleg-labels"
LABELS_SCHEMA_VERSION = 1
LABELS_NAME = "labels.json"
META_KEY = "data"  # the metadata key of learngene, descendant and ONNX files
RESIZE_MODES = ("bilinear", "none")


@dataclass(frozen=True)
class Preprocessing:
    """Image → ``pixel_values`` (1, C, H, W): convert to ``mode`` (``L`` greyscale, ``RGB``), resize to
    ``img_size`` x ``img_size`` with ``resize`` (``none``: must already be that size), multiply by
    ``scale`` (raw values → [0, 1]), then ``(x - mean[c]) / std[c]`` per channel."""

    img_size: int
    mode: str
    resize: str = "bilinear"
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.mode not in ("L", "RGB"):
            raise FormatError(f"preprocessing mode {self.mode!r} is not L or RGB")
        if self.resize not in RESIZE_MODES:
            raise FormatError(f"preprocessing resize {self.resize!r} is not one of {', '.join(RESIZE_MODES)}")
        if not (isinstance(self.img_size, int) and self.img_size > 0 and self.scale > 0):
            raise FormatError(f"preprocessing img_size {self.img_size!r} / scale {self.scale!r} must be positive")
        if len(self.mean) != self.channels or len(self.std) != self.channels or min(self.std) <= 0:
            raise FormatError(f"preprocessing mean/std need {self.channels} value(s) each, std > 0")

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    @classmethod
    def for_channels(cls, img_size: int, channels: int, *, resize: str = "bilinear",
                     scale: float = 1 / 255) -> Preprocessing:
        """``load_data``'s normalisation: [0, 1] → (x − 0.5) / 0.5 on every channel."""
        return cls(img_size, "L" if channels == 1 else "RGB", resize, scale, (0.5,) * channels, (0.5,) * channels)

    def describe(self) -> str:
        return (f"{self.img_size}x{self.img_size} {'greyscale' if self.mode == 'L' else 'RGB'}, resize "
                f"{self.resize}, x {self.scale:.6g}, (x - {_one(self.mean)}) / {_one(self.std)}")


@dataclass(frozen=True)
class DataCard:
    """Class names in label order (index ``i`` is ``classes[i]``), the preprocessing, and the data
    source they were read from (``digits``, ``folder:PATH``, ``npz:PATH``)."""

    classes: tuple[str, ...]
    preprocessing: Preprocessing
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if not self.classes:
            raise FormatError("a data card needs at least one class name")

    def to_dict(self) -> dict[str, Any]:
        p = self.preprocessing
        return {"classes": list(self.classes), "source": self.source, "preprocessing": {
            "img_size": p.img_size, "channels": p.channels, "mode": p.mode, "resize": p.resize,
            "scale": p.scale, "mean": list(p.mean), "std": list(p.std)}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any) -> DataCard:
        try:
            p = d["preprocessing"]
            pre = Preprocessing(int(p["img_size"]), str(p["mode"]), str(p["resize"]), float(p["scale"]),
                                tuple(p["mean"]), tuple(p["std"]))
            return cls(tuple(d["classes"]), pre, str(d.get("source", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"invalid data card (class names and preprocessing): {e!r}") from None

    @classmethod
    def from_json(cls, text: str) -> DataCard:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise FormatError(f"invalid data card JSON: {e}") from None

    def labels_json(self, **extra: Any) -> dict[str, Any]:
        """The ``labels.json`` document every output directory holds."""
        return {"format": LABELS_FORMAT, "schema_version": LABELS_SCHEMA_VERSION, **self.to_dict(), **extra}


def card_from_metadata(meta: dict[str, str], origin: object = "file") -> DataCard | None:
    """The card in a file's metadata (key ``data``), None for files written before cards existed."""
    text = meta.get(META_KEY)
    if not text:
        return None
    try:
        return DataCard.from_json(text)
    except FormatError as e:
        raise FormatError(f"{origin} has an invalid data card: {e}") from None


def unknown_labels_json(num_classes: int, img_size: int, channels: int) -> dict[str, Any]:
    """``labels.json`` for a model whose files record no card: indices as names, the loader's usual
    preprocessing, and a note saying both are assumed."""
    card = DataCard(tuple(str(i) for i in range(num_classes)), Preprocessing.for_channels(img_size, channels))
    return card.labels_json(note="the model's files record no class names or preprocessing: indices as names, "
                                 "tleg-deploy's usual preprocessing assumed")


def run_snippet(labels: dict[str, Any], onnx_file: str) -> str:
    """Ten lines that classify one image with ONNX Runtime, numpy and PIL, with the preprocessing of
    ``labels`` (a ``labels.json`` document); paths relative to the directory that holds both files."""
    p = labels["preprocessing"]
    size = p["img_size"]
    resize = (f".resize(({size}, {size}), Image.Resampling.BILINEAR)" if p["resize"] == "bilinear" else "")
    return "\n".join([
        "import json, sys, numpy as np, onnxruntime as ort",
        "from PIL import Image",
        "classes = json.load(open('labels.json'))['classes']  # index i is classes[i]",
        f"im = Image.open(sys.argv[1]).convert('{p['mode']}'){resize}",
        f"x = np.asarray(im, np.float32) * {p['scale']!r}  # [0, 1]",
        "x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)  # (C, H, W)",
        f"x = (x - np.array({p['mean']!r}, np.float32)[:, None, None]) / np.array({p['std']!r}, "
        "np.float32)[:, None, None]",
        f"session = ort.InferenceSession('{onnx_file}', providers=['CPUExecutionProvider'])",
        "logits = session.run(None, {'pixel_values': x[None].astype(np.float32)})[0]",
        "print(classes[int(logits[0].argmax())])",
    ])


def _one(values: tuple[float, ...]) -> str:
    return f"{values[0]:g}" if len(set(values)) == 1 else "(" + ", ".join(f"{v:g}" for v in values) + ")"
