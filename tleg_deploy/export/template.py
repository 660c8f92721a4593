"""``DepthTemplate``: the ONNX graph of a ViT of any depth, built from one exported probe.

Every member of a depth family has the same stem, the same head and ``L`` blocks of one structure;
only the weights and the count differ. Tracing the exporter once per member repeats work that is
the same every time, so this exports a *depth-2 probe* once (the exporter of ``export_onnx``) and
builds the graph of depth ``L`` by copying the probe's second block ``L - 1`` times (renaming its
tensors ``/blocks/blocks.1/...`` to ``/blocks/blocks.i/...`` and chaining each copy's input to the
previous block's output) and filling the initializers from the member's own state dict.

Which initializer holds which parameter is found by value: the probe's parameters are distinct
random numbers, and the exporter stores each either as is or transposed (``Linear`` as ``MatMul``).
Anything unexpected in the probe raises ``ExportError`` (callers then fall back to a plain export);
the graphs built here are validated against PyTorch like any other export.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tleg_deploy.errors import ExportError
from tleg_deploy.export.onnx import export_proto, model_metadata, set_metadata
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.model.vit import ViT

_B0, _B1 = "/blocks/blocks.0/", "/blocks/blocks.1/"


class DepthTemplate:
    """Export once with ``DepthTemplate(spec)``, then ``template.proto(model)`` for any depth."""

    def __init__(self, spec: ViTSpec, *, opset: int = 18, seed: int = 0) -> None:
        from onnx import TensorProto, numpy_helper

        self.spec = spec
        probe = ViT(spec, 2)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in probe.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        proto = export_proto(probe, opset=opset, exporter="torchscript")
        self._probe = proto
        lookup: dict[tuple[tuple[int, ...], bytes], tuple[str, bool]] = {}
        for name, t in probe.state_dict().items():
            a = t.detach().numpy()
            lookup[(a.shape, a.tobytes())] = (name, False)
            if a.ndim == 2:
                at = np.ascontiguousarray(a.T)
                lookup[(at.shape, at.tobytes())] = (name, True)
        # initializer name -> (parameter name, stored transposed?)
        self._params: dict[str, tuple[str, bool]] = {}
        self._consts: dict[str, Any] = {}
        for init in proto.graph.initializer:
            arr = numpy_helper.to_array(init)
            key = (arr.shape, np.ascontiguousarray(arr).tobytes())
            if init.data_type == TensorProto.FLOAT and key in lookup:
                self._params[init.name] = lookup[key]
            else:
                self._consts[init.name] = init
        mapped = {p for p, _ in self._params.values()}
        missing = sorted(set(probe.state_dict()) - mapped)
        if missing:
            raise ExportError(f"depth template: parameter {missing[0]!r} not found in the exported probe")
        self._layouts: dict[int, tuple[list[Any], dict[str, Any]]] = {}
        self._split(proto)

    def _split(self, proto: Any) -> None:
        self._pre: list[Any] = []
        self._block0: list[Any] = []
        self._block1: list[Any] = []
        self._tail: list[Any] = []
        block_out: set[str] = set()
        for node in proto.graph.node:
            if node.name.startswith(_B0):
                self._block0.append(node)
                block_out.update(node.output)
            elif node.name.startswith(_B1):
                self._block1.append(node)
                block_out.update(node.output)
            elif node.name.startswith("/blocks/"):
                raise ExportError(f"depth template: unexpected node {node.name!r}")
            elif any(i in block_out for i in node.input):
                self._tail.append(node)
                block_out.update(node.output)
            else:
                self._pre.append(node)
        b0_out = {o for n in self._block0 for o in n.output}
        crossing = {i for n in self._block1 for i in n.input if i in b0_out}
        if len(crossing) != 1 or not next(iter(crossing)).startswith(_B0):
            raise ExportError(f"depth template: block 1 reads {sorted(crossing)} from block 0, expected one tensor")
        self._stream_out = next(iter(crossing)).removeprefix(_B0)  # e.g. "Add_1_output_0"
        tail_in = {i for n in self._tail for i in n.input if i.startswith(_B1)}
        if tail_in != {_B1 + self._stream_out}:
            raise ExportError(f"depth template: the head reads {sorted(tail_in)}, expected the last block's output")
        if not self._block0 or not self._block1:
            raise ExportError("depth template: the probe has no block nodes")

    def layout(self, depth: int) -> tuple[list[Any], dict[str, Any]]:
        """The nodes of the depth-``depth`` graph and where each initializer comes from.

        The second value maps an initializer name to ``(parameter name, stored transposed?)`` for
        the model's parameters, or to the probe's ``TensorProto`` for constants. Cached per depth;
        do not modify what it returns.
        """
        if depth < 1:
            raise ExportError("depth template needs depth >= 1")
        if depth in self._layouts:
            return self._layouts[depth]
        refs: dict[str, Any] = {}

        def param_ref(name: str, block: int | None) -> str:
            if name not in self._params:
                if name in self._consts:
                    refs.setdefault(name, self._consts[name])
                return name
            param, transposed = self._params[name]
            if block is not None:
                param = f"blocks.{block}." + param.split(".", 2)[2]
            ref = param + (".T" if transposed else "")
            refs.setdefault(ref, (param, transposed))
            return ref

        def copy(node: Any, block: int | None, rename: dict[str, str]) -> Any:
            new = type(node)()
            new.CopyFrom(node)
            for prefix, repl in rename.items():
                if new.name.startswith(prefix):
                    new.name = repl + new.name[len(prefix):]
            new.input[:] = [param_ref(_rename(i, rename), block) for i in node.input]
            new.output[:] = [_rename(o, rename) for o in node.output]
            return new

        last = f"/blocks/blocks.{depth - 1}/"
        nodes = [copy(n, None, {}) for n in self._pre]
        nodes += [copy(n, 0, {}) for n in self._block0]
        for i in range(1, depth):
            rename = {_B1: f"/blocks/blocks.{i}/", _B0: f"/blocks/blocks.{i - 1}/"}
            nodes += [copy(n, i, rename) for n in self._block1]
        nodes += [copy(n, None, {_B1: last}) for n in self._tail]
        nodes = _prune(nodes, [o.name for o in self._probe.graph.output])
        used = {i for n in nodes for i in n.input}
        self._layouts[depth] = (nodes, {k: v for k, v in refs.items() if k in used})
        return self._layouts[depth]

    def proto(self, model: ViT, metadata: dict[str, str] | None = None) -> Any:
        """The ``onnx.ModelProto`` of ``model`` (any depth >= 1), with metadata props."""
        from onnx import ModelProto, TensorProto, numpy_helper

        if model.spec != self.spec:
            raise ExportError("depth template: the model's spec differs from the template's")
        nodes, refs = self.layout(model.depth)
        state = model.state_dict()
        # Built in place (not helper.make_graph/make_model, which copy every initializer twice more).
        proto = ModelProto()
        proto.ir_version = self._probe.ir_version
        proto.opset_import.extend(self._probe.opset_import)
        graph = proto.graph
        graph.name = "tleg_vit"
        graph.node.extend(nodes)
        graph.input.extend(self._probe.graph.input)
        graph.output.extend(self._probe.graph.output)
        for ref, src in refs.items():
            init = graph.initializer.add()
            if not isinstance(src, tuple):
                init.CopyFrom(src)
                continue
            arr = state[src[0]].detach().cpu().numpy()
            arr = np.ascontiguousarray(arr.T if src[1] else arr)
            if arr.dtype == np.float32 and arr.dtype.byteorder in "=<" and np.little_endian:
                init.name, init.data_type = ref, TensorProto.FLOAT
                init.dims.extend(arr.shape)
                init.raw_data = arr.tobytes()
            else:
                init.CopyFrom(numpy_helper.from_array(arr, ref))
        set_metadata(proto, model_metadata(model) | dict(metadata or {}))
        return proto

    def verify(self, proto: Any, model: ViT) -> dict[str, int]:
        """Prove that ``proto`` (e.g. loaded back from a written file) is this template's graph for
        ``model``: the same nodes, wiring and attributes as ``layout(model.depth)``, the probe's
        inputs, outputs and opsets, and every initializer bitwise equal to ``model``'s parameter
        (or to the probe's constant) it stands for. Raises ``ExportError`` naming the first
        difference; returns counts for the validation report.
        """
        from onnx import TensorProto, numpy_helper

        if model.spec != self.spec:
            raise ExportError("depth template: the model's spec differs from the template's")
        nodes, refs = self.layout(model.depth)
        g, probe = proto.graph, self._probe
        if [i.SerializeToString() for i in g.input] != [i.SerializeToString() for i in probe.graph.input] or \
                [o.SerializeToString() for o in g.output] != [o.SerializeToString() for o in probe.graph.output]:
            raise ExportError("structure differs from the template: graph inputs or outputs")
        if sorted((o.domain, o.version) for o in proto.opset_import) != \
                sorted((o.domain, o.version) for o in probe.opset_import):
            raise ExportError("structure differs from the template: opset imports")
        if len(g.node) != len(nodes):
            raise ExportError(f"structure differs from the template: {len(g.node)} nodes, expected {len(nodes)}")
        for k, (got, want) in enumerate(zip(g.node, nodes, strict=True)):
            if got == want:  # every field: name, op type, domain, inputs, outputs, attributes
                continue
            for what in ("op_type", "domain", "input", "output"):
                if list(_as_list(getattr(got, what))) != list(_as_list(getattr(want, what))):
                    raise ExportError(f"structure differs from the template at node {k} ({want.name!r}): {what} "
                                      f"{list(_as_list(getattr(got, what)))} != {list(_as_list(getattr(want, what)))}")
            what = "attributes" if list(got.attribute) != list(want.attribute) else "name or doc string"
            raise ExportError(f"structure differs from the template at node {k} ({want.name!r}): {what}")
        names = [t.name for t in g.initializer]
        if sorted(names) != sorted(refs) or len(set(names)) != len(names):
            extra = sorted(set(names) ^ set(refs)) or ["(duplicate names)"]
            raise ExportError(f"initializers differ from the template: {extra[0]!r}")
        state = model.state_dict()
        for init in g.initializer:
            src = refs[init.name]
            got_arr = numpy_helper.to_array(init)
            if isinstance(src, tuple):
                param = state[src[0]].detach().cpu().numpy()
                want_arr = param.T if src[1] else param
                ok = init.data_type == TensorProto.FLOAT and want_arr.dtype == np.float32
            else:
                want_arr = numpy_helper.to_array(src)
                ok = init.data_type == src.data_type
            ok = ok and got_arr.shape == want_arr.shape and got_arr.dtype == want_arr.dtype
            if not ok or not np.array_equal(_bits(got_arr), _bits(want_arr)):
                what = f"parameter {src[0]!r}" if isinstance(src, tuple) else "the template's constant"
                raise ExportError(f"initializer {init.name!r} is not bitwise equal to {what}")
        return {"nodes": len(nodes), "initializers": len(refs),
                "parameters_bitwise_equal": sum(isinstance(s, tuple) for s in refs.values())}


def _as_list(x: Any) -> Any:
    return [x] if isinstance(x, str) else x


def _bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of ``a`` as unsigned integers (so NaNs and signed zeros compare bitwise)."""
    kind = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(a.dtype.itemsize)
    if kind is None or a.dtype == object:
        return np.frombuffer(np.ascontiguousarray(a).tobytes(), np.uint8)
    return a.view(kind)


def _rename(name: str, rename: dict[str, str]) -> str:
    for prefix, repl in rename.items():
        if name.startswith(prefix):
            return repl + name[len(prefix):]
    return name


def _prune(nodes: list[Any], outputs: list[str]) -> list[Any]:
    """Drop nodes whose outputs nothing reads (e.g. constants only the probe's block 1 used)."""
    needed = set(outputs)
    keep: list[Any] = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    return keep[::-1]
