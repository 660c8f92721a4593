"""What the report reads: the benchmark results (``benchmarks/results/<name>.json``, written by
``benchmarks/_results.py``), device profiles, the learngene and an optional export manifest.

A missing or unreadable results file is not an error: the report says which command produces it.
Nothing here makes up a number. Torch-free except ``learngene_facts`` (it loads the learngene).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tleg_deploy.model.spec import ViTSpec

# benchmark name -> what it measures; the order is the one `make bench` runs them in.
BENCHMARKS: dict[str, str] = {
    "paper_claims": "accuracy by depth per initialization, storage and training cost (TLEG's claims)",
    "predictor_accuracy": "how well a 3-depth profile predicts every depth on this machine",
    "export_family": "exporting a whole depth family vs its deepest member",
    "solver": "does the solver's pick meet the budget when measured",
}
# paper_claims fine-tunes the digits architecture (its learngene comes from make_demo_learngene.py).
PAPER_CLAIMS_SPEC = "digits"


def bench_command(name: str) -> str:
    """The command that produces ``results/<name>.json``."""
    return f".venv/bin/python benchmarks/{name}.py"


def missing_text(name: str, results_dir: Path, why: str = "") -> str:
    """What a section says instead of a figure when a results file is missing or unusable."""
    reason = why or f"`{results_dir / (name + '.json')}` does not exist yet"
    return (f"_No data: {reason}. Produce it with `{bench_command(name)}` (or `make bench`, which runs every "
            "benchmark), then rebuild this report._")


@dataclass(frozen=True)
class Results:
    """Benchmark payloads by name, and why the others could not be used."""

    directory: Path
    data: Mapping[str, dict[str, Any]]
    problems: Mapping[str, str]

    def get(self, name: str) -> dict[str, Any] | None:
        return self.data.get(name)

    def missing(self, name: str, why: str = "") -> str:
        return missing_text(name, self.directory, why or self.problems.get(name, ""))


def load_results(directory: Path) -> Results:
    """Read every known ``<name>.json`` in ``directory``; unreadable ones are listed, not raised."""
    data: dict[str, dict[str, Any]] = {}
    problems: dict[str, str] = {}
    for name in BENCHMARKS:
        path = directory / f"{name}.json"
        if not path.is_file():
            continue
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            problems[name] = f"`{path}` could not be read ({str(e).splitlines()[0][:100]})"
            continue
        if not isinstance(payload, dict) or payload.get("benchmark") != name:
            problems[name] = f"`{path}` is not a {name} results file (its 'benchmark' key differs)"
            continue
        data[name] = payload
    return Results(directory, data, problems)


def machine_line(payload: Mapping[str, Any]) -> str:
    """``AMD EPYC, 2 cores, 2026-11-27 11:16 UTC at 62e8b9b`` from a payload's ``machine`` key."""
    m = payload.get("machine")
    if not isinstance(m, dict):
        return "machine not recorded"
    return f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, run {m.get('date', '?')} at {m.get('commit', '?')}"


def accuracy_table(payload: Mapping[str, Any]) -> dict[str, dict[int, tuple[float, float]]]:
    """``paper_claims['accuracy']`` as {init: {depth: (mean, std)}}; ``ValueError`` naming a bad key."""
    acc = payload.get("accuracy")
    if not isinstance(acc, dict) or not acc:
        raise ValueError("it has no 'accuracy' table")
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for init, by_depth in acc.items():
        if not isinstance(by_depth, dict):
            raise ValueError(f"'accuracy.{init}' is not an object")
        rows: dict[int, tuple[float, float]] = {}
        for depth, cell in by_depth.items():
            try:
                mean, std = float(cell["mean"]), float(cell["std"])
                d = int(depth)
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"'accuracy.{init}.{depth}' needs a depth key and mean/std numbers") from None
            if not (math.isfinite(mean) and math.isfinite(std)):
                raise ValueError(f"'accuracy.{init}.{depth}' is not finite")
            rows[d] = (mean, std)
        if rows:
            out[str(init)] = rows
    if not out:
        raise ValueError("its 'accuracy' table is empty")
    return out


@dataclass(frozen=True)
class LearngeneFacts:
    label: str
    spec: ViTSpec
    aux_depth: int
    params: int
    tensor_bytes: int
    file_bytes: int | None
    sha256: str


def learngene_facts(name_or_path: str) -> LearngeneFacts:
    """Spec, size and hash of a learngene (loads it, so imports torch)."""
    from tleg_deploy.model.resources import learngene_path, load_learngene

    lg = load_learngene(name_or_path)
    path = learngene_path(name_or_path)
    label = "demo (bundled)" if str(name_or_path) == "demo" else str(path)
    return LearngeneFacts(label=label, spec=lg.spec, aux_depth=lg.aux_depth, params=lg.num_params(),
                          tensor_bytes=lg.nbytes(), file_bytes=path.stat().st_size if path.is_file() else None,
                          sha256=lg.sha256())


def spec_label(spec: ViTSpec) -> str:
    name = spec.preset_name()
    shape = f"{spec.embed_dim}d/{spec.num_heads}h, {spec.img_size}px/{spec.patch_size}"
    return f"{name} ({shape})" if name else f"custom spec ({shape})"
