"""``validate_onnx``: prove that an exported file computes what the PyTorch model computes.

Following optimum-onnx's ``validate_model_outputs``: the ONNX checker first, then ONNX Runtime
against PyTorch on fresh random inputs at two batch sizes (so the dynamic batch axis is exercised),
with the max difference per output compared to an explicit tolerance per precision: absolute for
fp32, relative to the logit scale for fp16 (``max_rel_diff``; ``max_abs_diff`` is always absolute).
Quantized variants change the numbers by design, so they are judged by top-1 agreement with the
fp32 PyTorch model on real images (``images``). A failed check raises ``ExportError``; the report
is saved next to the model either way (``<name>.validation.json``).

``validate_member`` is the cheaper proof for the members of a depth family built from one
``DepthTemplate`` after one of them passed ``validate_onnx``: structure identical to the
template's expansion, weights bitwise equal to the model's, ORT vs PyTorch at batch 1. The
report's ``mode`` says which proof a file got ("full" or "template").
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tleg_deploy.errors import ExportError
from tleg_deploy.export.onnx import INPUT_NAME, OUTPUT_NAME
from tleg_deploy.files.fileio import write_json_atomic
from tleg_deploy.model.vit import ViT
from tleg_deploy.plan.precisions import ONNX_KINDS

REPORT_FORMAT = "tleg-validation"
REPORT_VERSION = "2"  # 2: fp16's relative difference moved from max_abs_diff to max_rel_diff
# Max logit difference vs PyTorch on random inputs (absolute, or relative to the logit scale where the
# kind says so: fp16) and the minimum top-1 agreement with fp32 PyTorch on real images, per ONNX kind
# (tleg_deploy.plan.precisions).
TOLERANCES = {k.name: k.tolerance for k in ONNX_KINDS.values()}
MIN_AGREEMENT = {k.name: k.min_agreement for k in ONNX_KINDS.values()}
PRECISIONS = tuple(ONNX_KINDS)


@dataclass
class ValidationReport:
    file: str
    precision: str
    passed: bool
    batch_sizes: list[int]
    max_abs_diff: dict[str, float]     # per output, worst absolute difference over the batch sizes
    tolerance: dict[str, float]        # on max_rel_diff where there is one (fp16), else on max_abs_diff
    agreement: float | None = None     # top-1 agreement with fp32 PyTorch on real images
    min_agreement: float | None = None
    images: int = 0
    data: str | None = None
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    onnxruntime: str = ""
    # "full": checker + ORT vs PyTorch at both batch sizes. "template" (``validate_member``): the
    # graph is the depth template's expansion, the weights are bitwise the model's, and ORT matches
    # PyTorch at batch 1; ``template`` then holds the counts and the fully validated member.
    mode: str = "full"
    template: dict[str, Any] | None = None
    # fp16: per output, worst |ORT - PyTorch| / max(1, max |PyTorch|) over the batch sizes; None otherwise
    max_rel_diff: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tolerance"] = {k: (v if np.isfinite(v) else None) for k, v in self.tolerance.items()}
        d["max_abs_diff"] = {k: (v if np.isfinite(v) else None) for k, v in self.max_abs_diff.items()}  # not run
        if self.max_rel_diff is not None:
            d["max_rel_diff"] = {k: (v if np.isfinite(v) else None) for k, v in self.max_rel_diff.items()}
        return {"format": REPORT_FORMAT, "schema_version": REPORT_VERSION, **d}

    def save(self, path: str | os.PathLike[str]) -> Path:
        target = Path(path)
        write_json_atomic(target, self.to_dict())
        return target


def report_path(onnx_path: str | os.PathLike[str]) -> Path:
    p = Path(onnx_path)
    return p.with_name(p.stem + ".validation.json")


def make_session(onnx_path: str | os.PathLike[str], threads: int = 1) -> Any:
    """An ONNX Runtime CPU session (``threads`` intra-op threads, no spinning)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        from tleg_deploy.errors import BackendError

        raise BackendError("onnxruntime is not installed", hint="pip install onnxruntime") from e
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"ONNX Runtime cannot load {onnx_path}: {str(e).splitlines()[0][:300]}") from e


def validate_onnx(
    onnx_path: str | os.PathLike[str],
    model: ViT,
    *,
    precision: str = "fp32",
    batch_sizes: tuple[int, int] = (1, 3),
    tolerance: float | None = None,
    images: torch.Tensor | None = None,
    data: str | None = None,
    min_agreement: float | None = None,
    seed: int = 0,
    threads: int = 1,
    save: bool = True,
    check: bool = True,
) -> ValidationReport:
    """Check ``onnx_path`` against ``model``; raise ``ExportError`` if it fails.

    ``images`` (N, C, H, W), when given, adds the top-1 agreement check (required for int8);
    ``data`` names where they came from, for the report. ``check=False`` skips the (slow on big
    graphs) ``onnx.checker`` pass for files this package just derived from a checked one.
    """
    import onnx
    import onnxruntime as ort

    if precision not in TOLERANCES:
        raise ExportError(f"unknown precision {precision!r}", hint=f"choose one of {', '.join(PRECISIONS)}")
    if ONNX_KINDS[precision].needs_images and images is None:
        raise ExportError(f"{precision} validation needs real images for the top-1 agreement check",
                          hint="pass images=load_data('digits', spec, 'test')[0] or your own")
    start = time.perf_counter()
    path = Path(onnx_path)
    tol = TOLERANCES[precision] if tolerance is None else tolerance
    failures: list[str] = []
    if check:
        try:
            onnx.checker.check_model(str(path))
        except Exception as e:  # onnx raises ValidationError and friends
            failures.append(f"onnx.checker: {str(e).splitlines()[0][:300]}")
    session = make_session(path, threads)
    spec = model.spec
    model = model.eval()
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size, generator=g) for batch in batch_sizes]
    with torch.inference_mode():  # one PyTorch pass over all inputs; ONNX Runtime sees each batch size
        refs = model(torch.cat(xs)).numpy()
    worst = worst_rel = 0.0
    start_row = 0
    for batch, x in zip(batch_sizes, xs, strict=True):
        ref = refs[start_row : start_row + batch]
        start_row += batch
        got = _run(session, x)
        if got.shape != ref.shape:
            failures.append(f"{OUTPUT_NAME} has shape {got.shape} at batch {batch}, expected {ref.shape}")
            continue
        if not np.all(np.isfinite(got)):
            failures.append(f"{OUTPUT_NAME} has non-finite values at batch {batch}")
            continue
        diff = float(np.abs(got - ref).max())
        worst = max(worst, diff)
        worst_rel = max(worst_rel, diff / max(1.0, float(np.abs(ref).max())))
    relative = ONNX_KINDS[precision].relative  # fp16 keeps ~3 significant digits: judge it at the logits' scale
    judged = worst_rel if relative else worst
    if judged > tol:
        failures.append(f"max {'rel' if relative else 'abs'} diff of {OUTPUT_NAME} {judged:.3g} exceeds the "
                        f"{precision} tolerance {tol:g}")
    agreement = None
    need = None
    if images is not None:
        need = MIN_AGREEMENT[precision] if min_agreement is None else min_agreement
        agreement = top1_agreement(session, model, images)
        if agreement < need:
            failures.append(f"top-1 agreement with fp32 PyTorch {agreement:.2%} is below {need:.0%}")
    report = ValidationReport(
        file=path.name, precision=precision, passed=not failures, batch_sizes=list(batch_sizes),
        max_abs_diff={OUTPUT_NAME: worst}, max_rel_diff={OUTPUT_NAME: worst_rel} if relative else None,
        tolerance={OUTPUT_NAME: tol}, agreement=agreement,
        min_agreement=need, images=0 if images is None else len(images), data=data, failures=failures,
        seconds=round(time.perf_counter() - start, 4), onnxruntime=ort.__version__,
    )
    return _finish(report, path, save)


def validate_member(
    onnx_path: str | os.PathLike[str],
    model: ViT,
    template: Any,
    *,
    proven_by: str,
    seed: int = 0,
    threads: int = 1,
    save: bool = True,
) -> ValidationReport:
    """Validate an fp32 file built by ``template`` (a ``DepthTemplate``) whose structure another
    member of the same template, ``proven_by``, passed the full ``validate_onnx`` for.

    Reads the file back and proves (1) its graph is the template's expansion for ``model.depth``
    (nodes, wiring, attributes, inputs/outputs, opsets), (2) every initializer is bitwise equal
    to ``model``'s parameter it stands for, (3) ONNX Runtime matches PyTorch at batch 1 within the
    fp32 tolerance. Raises ``ExportError`` on the first failure; the report (mode "template") is
    saved next to the file either way.
    """
    import onnx
    import onnxruntime as ort

    start = time.perf_counter()
    path = Path(onnx_path)
    tol = TOLERANCES["fp32"]
    failures: list[str] = []
    counts: dict[str, Any] = {"proven_by": proven_by}
    try:
        counts.update(template.verify(onnx.load(str(path), load_external_data=False), model))
    except ExportError as e:
        failures.append(str(e))
    except Exception as e:  # unreadable file
        failures.append(f"cannot read {path.name}: {str(e).splitlines()[0][:300]}")
    worst = float("nan")
    if not failures:
        g = torch.Generator().manual_seed(seed)
        spec = model.spec
        x = torch.randn(1, spec.in_chans, spec.img_size, spec.img_size, generator=g)
        with torch.inference_mode():
            ref = model.eval()(x).numpy()
        got = _run(make_session(path, threads), x)
        if got.shape != ref.shape or not np.all(np.isfinite(got)):
            failures.append(f"{OUTPUT_NAME} has shape {got.shape} or non-finite values at batch 1")
        else:
            worst = float(np.abs(got - ref).max())
            if worst > tol:
                failures.append(f"max abs diff of {OUTPUT_NAME} {worst:.3g} exceeds the fp32 tolerance {tol:g}")
    report = ValidationReport(
        file=path.name, precision="fp32", passed=not failures, batch_sizes=[1], max_abs_diff={OUTPUT_NAME: worst},
        tolerance={OUTPUT_NAME: tol}, failures=failures, seconds=round(time.perf_counter() - start, 4),
        onnxruntime=ort.__version__, mode="template", template=counts,
    )
    return _finish(report, path, save)


def _finish(report: ValidationReport, path: Path, save: bool) -> ValidationReport:
    """Save the report next to the file (passed or not), then raise on the first failure."""
    if save:
        report.save(report_path(path))
    if report.failures:
        raise ExportError(f"{path.name} failed validation: {report.failures[0]}",
                          hint=f"details in {report_path(path).name}" if save else None)
    return report


def top1_agreement(session: Any, model: ViT, images: torch.Tensor, batch: int = 256) -> float:
    """Fraction of ``images`` on which the session's and ``model``'s top-1 classes agree."""
    agree = 0
    for i in range(0, len(images), batch):
        x = images[i : i + batch].float()
        with torch.inference_mode():
            ref = model(x).argmax(-1).numpy()
        agree += int((_run(session, x).argmax(-1) == ref).sum())
    return agree / max(1, len(images))


def _run(session: Any, x: torch.Tensor) -> np.ndarray:
    return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy().astype(np.float32)})[0], dtype=np.float32)

