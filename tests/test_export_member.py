"""validate_member: the cheaper proof for depth-family members built from one DepthTemplate."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tleg_deploy.errors import ExportError
from tleg_deploy.export.family import export_family
from tleg_deploy.export.onnx import save_proto
from tleg_deploy.export.template import DepthTemplate
from tleg_deploy.export.validate import report_path, validate_member, validate_onnx
from tleg_deploy.model.expansion import expand


@pytest.fixture
def member(tiny_lg, tmp_path):
    template = DepthTemplate(tiny_lg.spec)
    model = expand(tiny_lg, 3).eval()
    path = save_proto(template.proto(model), tmp_path / "model.onnx")
    return template, model, path


def test_family_reports_record_the_mode(tiny_lg, tmp_path):
    out = tmp_path / "fam"
    manifest = export_family(tiny_lg, [1, 2, 3, 4], out, "onnx", data=None)
    modes = {}
    for a in manifest["artifacts"]:
        report = json.loads((out / a["file"]).with_name("model.validation.json").read_text())
        assert report["passed"] and report["mode"] == a["parity"]["mode"]
        modes[a["depth"]] = report["mode"]
        if report["mode"] == "template":
            assert report["batch_sizes"] == [1] and 0 <= report["max_abs_diff"]["logits"] < 1e-4
            assert report["template"]["proven_by"] == "depth_02/model.onnx"
            n = sum(1 for _ in expand(tiny_lg, a["depth"]).parameters())
            assert report["template"]["parameters_bitwise_equal"] == n
        else:
            assert report["batch_sizes"] == [1, 3] and report["template"] is None
    # depth 1 has no copied block, so depth 2 proves the whole template (its nodes include all of depth 1's)
    assert modes == {1: "template", 2: "full", 3: "template", 4: "template"}


def test_member_passes_and_full_validation_agrees(member):
    template, model, path = member
    report = validate_member(path, model, template, proven_by="x")
    assert report.passed and report.mode == "template" and report.template["initializers"] > 0
    assert json.loads(report_path(path).read_text())["mode"] == "template"
    assert validate_onnx(path, model, save=False).passed  # the file is a valid export in its own right


def _rewrite(path, edit):
    proto = onnx.load(str(path))
    edit(proto)
    path.write_bytes(proto.SerializeToString())


def test_one_ulp_in_an_initializer_fails_naming_the_tensor(member):
    template, model, path = member
    name = "blocks.2.mlp.fc2.bias"

    def bump(proto):
        init = next(t for t in proto.graph.initializer if t.name == name)
        arr = numpy_helper.to_array(init).copy()
        arr.flat[0] = np.nextafter(arr.flat[0], np.float32(np.inf), dtype=np.float32)
        init.CopyFrom(numpy_helper.from_array(arr, name))

    _rewrite(path, bump)
    with pytest.raises(ExportError, match=f"initializer '{name}' is not bitwise equal"):
        validate_member(path, model, template, proven_by="x")
    saved = json.loads(report_path(path).read_text())
    assert saved["passed"] is False and saved["mode"] == "template" and saved["max_abs_diff"]["logits"] is None


def test_a_model_one_ulp_off_fails(member):
    template, model, path = member
    import torch

    with torch.no_grad():
        w = model.blocks[1].attn.qkv.weight
        w.view(-1)[5] = torch.nextafter(w.view(-1)[5], torch.tensor(float("inf")))
    with pytest.raises(ExportError, match=r"blocks\.1\.attn\.qkv\.weight"):
        validate_member(path, model, template, proven_by="x", save=False)


def _swap_inputs(proto):
    node = next(n for n in proto.graph.node if n.op_type == "MatMul" and n.name.startswith("/blocks/blocks.2/"))
    node.input[0], node.input[1] = node.input[1], node.input[0]


def _change_op(proto):
    node = next(n for n in proto.graph.node if n.op_type == "Add")
    node.op_type = "Sub"


def _drop_last_block_node(proto):
    idx = max(i for i, n in enumerate(proto.graph.node) if n.name.startswith("/blocks/blocks.2/"))
    node = proto.graph.node[idx]
    # bypass the node: its readers read its first input instead
    for n in proto.graph.node:
        n.input[:] = [node.input[0] if i == node.output[0] else i for i in n.input]
    del proto.graph.node[idx]


def _change_attribute(proto):
    node = next(n for n in proto.graph.node if n.name.startswith("/blocks/blocks.1/")
                and any(a.type == onnx.AttributeProto.INT for a in n.attribute))
    attr = next(a for a in node.attribute if a.type == onnx.AttributeProto.INT)
    attr.i += 1


@pytest.mark.parametrize("edit", [_swap_inputs, _change_op, _drop_last_block_node, _change_attribute])
def test_a_structurally_altered_member_fails(member, edit):
    template, model, path = member
    _rewrite(path, edit)
    with pytest.raises(ExportError, match="structure differs from the template"):
        validate_member(path, model, template, proven_by="x", save=False)
