"""DepthTemplate on graphs of both exporters: members equal direct exports; the cut ignores names."""

from __future__ import annotations

import functools
import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from tleg_deploy.errors import ExportError
from tleg_deploy.export import template as template_mod
from tleg_deploy.export.family import export_family
from tleg_deploy.export.onnx import INPUT_NAME, export_proto
from tleg_deploy.export.template import DepthTemplate
from tleg_deploy.export.validate import TOLERANCES
from tleg_deploy.model.expansion import expand
from tleg_deploy.model.spec import ViTSpec

# dynamo exports take seconds each (TorchScript: a tenth of that), hence "slow"
EXPORTERS = ("torchscript", pytest.param("dynamo", marks=pytest.mark.slow))


@functools.cache
def _template(spec: ViTSpec, exporter: str) -> DepthTemplate:
    """One template per exporter for the whole module (a dynamo export takes seconds)."""
    return DepthTemplate(spec, exporter=exporter)


def _ort(proto, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {INPUT_NAME: x.numpy()})[0]


def _ops(proto) -> Counter[str]:
    return Counter(n.op_type for n in proto.graph.node)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_member_equals_a_direct_export_in_outputs_and_structure(tiny_lg, exporter):
    template = _template(tiny_lg.spec, exporter)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    tol = TOLERANCES["fp32"]
    for depth in (1, 2, 3, 7) if exporter == "torchscript" else (3,):  # a dynamo export: 1-2 s each
        model = expand(tiny_lg, depth).eval()
        built = template.proto(model)
        onnx.checker.check_model(built)
        direct = export_proto(model, exporter=exporter)
        assert _ops(built) == _ops(direct), depth  # every op type, Constant and Identity included
        with torch.no_grad():
            ref = model(x).numpy()
        got, want = _ort(built, x), _ort(direct, x)
        assert np.abs(got - ref).max() < tol and np.abs(want - ref).max() < tol
        assert np.abs(got - want).max() < tol
    # the comparison can fail: another depth's weights give other logits
    with torch.no_grad():
        assert np.abs(got - expand(tiny_lg, 6).eval()(x).numpy()).max() > 1e-3


def _opaque(proto):
    """A copy of ``proto`` whose nodes, intermediate tensors and initializers all have meaningless names."""
    proto = type(proto).FromString(proto.SerializeToString())
    g = proto.graph
    keep = {i.name for i in g.input} | {o.name for o in g.output}
    names: dict[str, str] = {}
    for k, init in enumerate(g.initializer):
        names[init.name] = init.name = f"w{k}"
    for k, node in enumerate(g.node):
        node.name = f"n{k}"
        for j, o in enumerate(node.output):
            if o and o not in keep:
                names[o] = f"t{k}_{j}"
        node.input[:] = [names.get(i, i) for i in node.input]
        node.output[:] = [names.get(o, o) for o in node.output]
        del node.metadata_props[:]  # the dynamo exporter's stack traces name the modules
        node.doc_string = ""
    del g.value_info[:]
    return proto


@pytest.mark.parametrize("exporter", ("torchscript", "dynamo"))
def test_the_block_is_found_by_structure_not_by_names(tiny_lg, exporter, monkeypatch):
    probe = _template(tiny_lg.spec, exporter)._probe
    opaque = _opaque(probe)
    assert not any("block" in n.name or "block" in o for n in opaque.graph.node for o in n.output)
    monkeypatch.setattr(template_mod, "export_proto", lambda model, **kw: opaque)
    template = DepthTemplate(tiny_lg.spec, exporter=exporter)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for depth in (1, 2, 5):
        model = expand(tiny_lg, depth).eval()
        built = template.proto(model)
        assert _ops(built) == _ops(_template(tiny_lg.spec, exporter).proto(model))
        with torch.no_grad():
            assert np.abs(_ort(built, x) - model(x).numpy()).max() < TOLERANCES["fp32"]
        assert template.verify(built, model)["parameters_bitwise_equal"] == sum(1 for _ in model.parameters())


def _other_op_in_block_1(proto):
    """Block 1 (by the parameters it reads) gets one operator that block 0 does not have."""
    proto = type(proto).FromString(proto.SerializeToString())
    first_of_block1 = next(n for n in proto.graph.node if any(i.startswith("blocks.1.") for i in n.input))
    softmax = next(n for n in proto.graph.node[list(proto.graph.node).index(first_of_block1):]
                   if n.op_type == "Softmax")
    softmax.op_type = "Sigmoid"
    return proto


def _head_reads_block_0(proto):
    """The head reads block 0's output besides block 1's."""
    proto = type(proto).FromString(proto.SerializeToString())
    norm = next(n for n in proto.graph.node if "norm.weight" in n.input)
    first_of_block1 = next(n for n in proto.graph.node if any(i.startswith("blocks.1.") for i in n.input))
    add = onnx.helper.make_node("Add", [norm.output[0], first_of_block1.input[0]], ["mixed"], name="mix")
    norm_index = list(proto.graph.node).index(norm)
    proto.graph.node.insert(norm_index + 1, add)
    for n in proto.graph.node[norm_index + 2:]:
        n.input[:] = ["mixed" if i == norm.output[0] else i for i in n.input]
    return proto


@pytest.mark.parametrize(("edit", "message"), [(_other_op_in_block_1, "differ in their operators"),
                                               (_head_reads_block_0, "not stem, two chained blocks")])
def test_a_probe_that_is_not_one_repeated_block_is_refused(tiny_lg, monkeypatch, edit, message):
    probe = export_proto(_probe_model(tiny_lg.spec), exporter="torchscript")
    monkeypatch.setattr(template_mod, "export_proto", lambda model, **kw: edit(probe))
    with pytest.raises(ExportError, match=message):
        DepthTemplate(tiny_lg.spec, exporter="torchscript")


def _probe_model(spec: ViTSpec):
    """The probe ``DepthTemplate`` exports (same seed, so the same parameter values)."""
    from tleg_deploy.model.vit import ViT

    probe = ViT(spec, 2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return probe


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_family_with_each_exporter_passes_validation(tiny_lg, tmp_path, exporter):
    out = tmp_path / exporter
    depths = [1, 2, 3] if exporter == "torchscript" else [2, 3]  # a dynamo export of each "full" member: ~0.5 s
    manifest = export_family(tiny_lg, depths, out, "onnx", data=None, exporter=exporter)
    modes = {}
    for a in manifest["artifacts"]:
        report = json.loads((out / a["file"]).with_name("model.validation.json").read_text())
        assert report["passed"] and report["max_abs_diff"]["logits"] < TOLERANCES["fp32"]
        modes[a["depth"]] = report["mode"]
    assert modes == ({1: "template", 2: "full", 3: "template"} if exporter == "torchscript"
                     else {2: "full", 3: "template"})


def test_cli_threads_the_exporter_to_the_template(tiny_lg, tmp_path, monkeypatch):
    from tleg_deploy.cli.app import app

    lg_file = tmp_path / "lg.safetensors"
    tiny_lg.save(lg_file)
    asked = []
    cached = _template(tiny_lg.spec, "dynamo")._probe

    def fake_export(model, **kw):
        asked.append(kw.get("exporter"))
        return cached  # the very probe a dynamo export of this spec gives (saves seconds)

    monkeypatch.setattr(template_mod, "export_proto", fake_export)
    template_mod.clear_shared_templates()  # this process may hold the spec's template from an earlier test
    out = tmp_path / "fam"
    runner = CliRunner()
    result = runner.invoke(app, ["export-family", "--learngene", str(lg_file), "--depths", "2-3", "-o", str(out),
                                 "--exporter", "dynamo", "--json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    assert asked == ["dynamo"]
    modes = {a["depth"]: a["parity"]["mode"] for a in json.loads(result.stdout)["artifacts"]}
    assert modes == {2: "full", 3: "template"}
    result = runner.invoke(app, ["export", "--learngene", str(lg_file), "--depth", "2", "-o", str(tmp_path / "x"),
                                 "--exporter", "magic"])
    assert result.exit_code != 0 and "unknown exporter 'magic'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_timed_files_share_one_probe_per_spec_and_equal_a_direct_export(tiny_lg, tmp_path, monkeypatch):
    """``template_onnx`` (the profiler's and the device kits' fp32 files): one exporter trace per spec for the
    whole process, the same graph and outputs as ``export_onnx``; a spec whose probe cannot be cut falls back
    to plain exports, and that failure is remembered rather than traced again."""
    from tleg_deploy.export.onnx import read_metadata

    traced = []
    real = template_mod.export_proto
    monkeypatch.setattr(template_mod, "export_proto", lambda model, **kw: traced.append(kw) or real(model, **kw))
    template_mod.clear_shared_templates()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    for depth in (1, 4, 2):
        model = expand(tiny_lg, depth).eval()
        path = template_mod.template_onnx(model, tmp_path / f"d{depth}.onnx", metadata={"note": "timed"})
        direct = export_proto(model)
        assert _ops(onnx.load(path)) == _ops(direct)
        assert read_metadata(path)["depth"] == str(depth) and read_metadata(path)["note"] == "timed"
        with torch.no_grad():
            assert np.abs(_ort(onnx.load(path), x) - model(x).numpy()).max() < TOLERANCES["fp32"]
    assert len(traced) == 1  # the depth-2 probe, once for all three files
    assert template_mod.shared_template(tiny_lg.spec) is template_mod.shared_template(tiny_lg.spec)

    broken = []
    monkeypatch.setattr(template_mod, "export_proto", lambda model, **kw: broken.append(1) or _other_op_in_block_1(
        real(model, **kw)))
    template_mod.clear_shared_templates()
    for depth in (3, 5):
        model = expand(tiny_lg, depth).eval()
        path = template_mod.template_onnx(model, tmp_path / f"plain{depth}.onnx")
        with torch.no_grad():
            assert np.abs(_ort(onnx.load(path), x) - model(x).numpy()).max() < TOLERANCES["fp32"]
    assert len(broken) == 1  # the refused probe is not traced again for the second file
    template_mod.clear_shared_templates()
