from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tleg_deploy.cli.app import app
from tleg_deploy.model.learngene import Learngene

runner = CliRunner()


def invoke(*args: str):
    env = {k: v for k, v in os.environ.items() if k != "TLEG_DEBUG"}
    return runner.invoke(app, list(args), env=env)


def test_help_has_examples() -> None:
    for cmd in ("expand", "extract", "import-tleg", "info", "demo"):
        result = invoke(cmd, "--help")
        assert result.exit_code == 0, result.output
        assert "Example" in result.output, cmd


def test_expand_and_info(tmp_path: Path) -> None:
    out = tmp_path / "m6.safetensors"
    result = invoke("expand", "--learngene", "demo", "--depth", "6", "-o", str(out))
    assert result.exit_code == 0, result.output
    info = invoke("info", str(out), "--json")
    assert info.exit_code == 0, info.output
    facts = json.loads(info.stdout)
    assert facts["kind"] == "descendant" and facts["depth"] == 6
    lg_facts = json.loads(invoke("info", "demo", "--json").stdout)
    assert lg_facts["kind"] == "learngene" and lg_facts["spec_preset"] == "digits"


def test_extract_and_import_commands(tiny_lg: Learngene, tmp_path: Path) -> None:
    tiny_lg.save(tmp_path / "lg.safetensors")
    out = tmp_path / "m.safetensors"
    assert invoke("expand", "-l", str(tmp_path / "lg.safetensors"), "-d", "5", "-o", str(out)).exit_code == 0
    # extract needs a preset spec; the digits demo is one
    assert invoke("expand", "-d", "4", "-o", str(tmp_path / "d4.safetensors")).exit_code == 0
    result = invoke("extract", str(tmp_path / "d4.safetensors"), "--spec", "digits", "-o",
                    str(tmp_path / "x.safetensors"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["mean_r2"] > 0.999


@pytest.mark.parametrize(
    "args",
    [
        ("info", "missing.safetensors"),
        ("expand", "-l", "missing.safetensors", "-d", "3", "-o", "x.safetensors"),
        ("expand", "-d", "0", "-o", "x.safetensors"),
        ("expand", "-d", "-3", "-o", "x.safetensors"),
        ("expand", "-d", "abc", "-o", "x.safetensors"),
        ("expand", "-d", "100000", "-o", "x.safetensors"),
        ("import-tleg", "missing.pth", "-o", "x.safetensors"),
        ("extract", "missing.safetensors", "--spec", "digits", "-o", "x.safetensors"),
    ],
)
def test_bad_input_is_one_line_nonzero_no_traceback(
    args: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.safetensors").exists()


def test_text_file_and_truncated_file(tiny_lg: Learngene, tmp_path: Path) -> None:
    text = tmp_path / "notes.safetensors"
    text.write_text("just some notes\n")
    result = invoke("info", str(text))
    assert result.exit_code == 2 and "error" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 2
    tiny_lg.save(tmp_path / "lg.safetensors")
    data = (tmp_path / "lg.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:1000])
    result = invoke("expand", "-l", str(tmp_path / "cut.safetensors"), "-d", "2", "-o", str(tmp_path / "o.st"))
    assert result.exit_code == 2 and not (tmp_path / "o.st").exists()


def test_debug_shows_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", str(tmp_path / "missing.safetensors")], env={"TLEG_DEBUG": "1"})
    assert isinstance(result.exception, FileNotFoundError)


@pytest.mark.parametrize("args", [("expand", "-d", "abc", "-o", "x.st"), ("expand", "--bogus"), ("nosuch",)])
def test_usage_errors_are_one_line_from_the_entry_point(args: tuple[str, ...], tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "tleg_deploy", *args], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "COLUMNS": "300"}, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--help" in lines[0], result.stderr
    assert not list(tmp_path.iterdir())


def test_error_text_in_square_brackets_is_printed_verbatim(monkeypatch: pytest.MonkeyPatch) -> None:
    from tleg_deploy.errors import BackendError

    def boom(*_a: object, **_k: object) -> None:
        raise BackendError("tensorrt is missing", hint="pip install 'tleg-deploy[tensorrt]'")

    monkeypatch.setattr("tleg_deploy.deploy.inspect.describe_file", boom)
    result = invoke("info", "demo")
    assert result.exit_code == 2 and "tleg-deploy[tensorrt]" in result.output
