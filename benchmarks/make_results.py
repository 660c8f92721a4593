"""Join benchmarks/results/*.md into benchmarks/RESULTS.md (run by each benchmark, or by hand)."""

from __future__ import annotations

from pathlib import Path

from tleg_deploy.files.fileio import write_text_atomic

HERE = Path(__file__).resolve().parent
ORDER = ["paper_claims", "predictor_accuracy", "export_family", "export_speed", "solver", "noise_ceiling",
         "kit_prediction", "ssh_retime", "ssh_loop", "expansion_speed", "estimate_vs_published", "test_suite_time"]


def build() -> Path:
    sections = sorted((HERE / "results").glob("*.md"), key=lambda p: (
        ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem))
    parts = ["# Benchmark results",
             "",
             "Generated from `benchmarks/results/*.md` by `benchmarks/make_results.py`; every figure comes "
             "from a run of the script named in its section, on the machine stated under it.",
             ""]
    for p in sections:
        parts += [p.read_text().rstrip(), ""]
    out = HERE / "RESULTS.md"
    write_text_atomic(out, "\n".join(parts))  # whole or not at all
    return out


if __name__ == "__main__":
    print(build())
