"""``DepthTemplate``: the ONNX graph of a ViT of any depth, built from one exported probe.

Every member of a depth family has the same stem, the same head and ``L`` blocks of one structure;
only the weights and the count differ. Tracing the exporter once per member repeats work that is
the same every time, so this exports a *depth-2 probe* once (with ``export_proto``'s exporter:
TorchScript or dynamo) and builds the graph of depth ``L`` by copying the probe's second block
``L - 1`` times, chaining each copy's input to the previous block's output, and filling the
initializers from the member's own state dict.

Nothing here reads the exporter's node or tensor names: the graph is cut by STRUCTURE, from what
the PyTorch probe says about its own parameters.

1. Which initializer holds which parameter is found by value: the probe's parameters are distinct
   random numbers, and an exporter stores each either as is or transposed (``Linear`` as ``MatMul``).
2. Each node belongs to the deepest block whose parameters it (transitively) reads; a node that
   reads a non-block parameter downstream of a block (final norm, head) and everything after it
   is the tail; nodes that depend on the input or stem parameters only are the stem. Constant
   nodes (no input, no parameter upstream) go with the one region that reads them, else the stem.
3. Block 1 must read exactly one tensor of block 0 (the residual stream), the tail exactly one of
   block 1, at the same position in two blocks of identical op sequence.

Block nodes and tensors get exporter-independent names, ``/blocks/blocks.{i}/{op}_{k}`` (``k``
the node's index in its block); the stem and the tail keep the probe's. Anything unexpected in the
probe raises ``ExportError`` (callers then fall back to a plain export); the graphs built here are
validated against PyTorch like any other export.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tleg_deploy.errors import ExportError
from tleg_deploy.export.onnx import export_onnx, export_proto, model_metadata, save_proto, set_metadata
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.model.vit import ViT

_PRE, _TAIL = "stem", "tail"  # the regions of a probe graph besides its blocks 0 and 1


class DepthTemplate:
    """Export once with ``DepthTemplate(spec)``, then ``template.proto(model)`` for any depth."""

    def __init__(self, spec: ViTSpec, *, opset: int = 18, seed: int = 0, exporter: str = "auto") -> None:
        self.spec = spec
        self.exporter = exporter
        probe = ViT(spec, 2)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in probe.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self._probe = export_proto(probe, opset=opset, exporter=exporter)
        # initializer name -> (parameter name, stored transposed?); other initializers are constants
        self._params, self._consts = _map_initializers(self._probe, probe.state_dict())
        # initializer name -> the block whose parameter it holds (None: stem or head)
        self._param_block = {init: _block_index(param) for init, (param, _) in self._params.items()}
        self._layouts: dict[int, tuple[list[Any], dict[str, Any]]] = {}
        self._split(self._probe)

    def _split(self, proto: Any) -> None:
        """Cut the probe's nodes into stem, block 0, block 1 and tail (module docstring, 2-3)."""
        from onnx import AttributeProto

        graph = proto.graph
        nodes = list(graph.node)
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for n in nodes for a in n.attribute):
            raise ExportError("depth template: the probe has control flow (subgraphs)")
        depth_of: dict[str, int] = {}  # tensor -> deepest block whose parameters are upstream (-1: none)
        dynamic = {i.name for i in graph.input} | set(self._params)  # tensors not constant
        in_tail: set[str] = set()
        region: list[Any] = []
        for node in nodes:
            ins = [i for i in node.input if i]
            deepest = max((self._depth(i, depth_of) for i in ins), default=-1)
            shared = any(i in self._param_block and self._param_block[i] is None for i in ins)
            tail = any(i in in_tail for i in ins) or (deepest >= 0 and shared)
            r = _TAIL if tail else deepest if deepest >= 0 else _PRE if any(i in dynamic for i in ins) else None
            region.append(r)
            for o in node.output:
                depth_of[o] = deepest
                if tail:
                    in_tail.add(o)
                if r is not None:
                    dynamic.add(o)
        # Constants go with the one region that reads them (so each block copy has its own), else the stem.
        producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
        readers: list[set[Any]] = [set() for _ in nodes]
        for o in graph.output:
            if o.name in producer:
                readers[producer[o.name]].add(_TAIL)
        for k in reversed(range(len(nodes))):
            if region[k] is None:
                region[k] = next(iter(readers[k])) if len(readers[k]) == 1 else _PRE
            for i in nodes[k].input:
                if i in producer:
                    readers[producer[i]].add(region[k])
        groups: dict[Any, list[Any]] = {_PRE: [], 0: [], 1: [], _TAIL: []}
        for node, r in zip(nodes, region, strict=True):
            groups[r].append(node)
        # Parameter-free head nodes right after the last block (fc_norm's mean pool reads the stream
        # before the first head parameter) land in block 1: block 0 says where a block ends.
        surplus = groups[1][len(groups[0]):]
        made = {o for n in surplus for o in n.output}
        if surplus and not any(i in made for n in groups[1][:len(groups[0])] for i in n.input):
            moved = {id(n) for n in surplus}
            region = [_TAIL if id(n) in moved else r for n, r in zip(nodes, region, strict=True)]
            groups[1] = groups[1][:len(groups[0])]
            groups[_TAIL] = [n for n, r in zip(nodes, region, strict=True) if r == _TAIL]
        self._pre, self._block0, self._block1, self._tail = groups[_PRE], groups[0], groups[1], groups[_TAIL]
        self._check(graph, {o: r for n, r in zip(nodes, region, strict=True) for o in n.output if o})

    def _depth(self, tensor: str, depth_of: dict[str, int]) -> int:
        if tensor in self._param_block:
            block = self._param_block[tensor]
            return -1 if block is None else block
        return depth_of.get(tensor, -1)

    def _check(self, graph: Any, where: dict[str, Any]) -> None:
        """The cut must be one repeatable block: find the stream tensors ``_x1`` and ``_x2``."""
        if not self._block0 or not self._block1:
            raise ExportError("depth template: found no block in the probe graph")
        groups = {_PRE: self._pre, 0: self._block0, 1: self._block1, _TAIL: self._tail}
        reads = {(r, s): sorted({i for n in nodes for i in n.input if where.get(i, _PRE) == s and i})
                 for r, nodes in groups.items() for s in groups if s != r}
        x1, x2 = reads.pop((1, 0)), reads.pop((_TAIL, 1))
        for r in (0, 1, _TAIL):
            reads.pop((r, _PRE))
        crossing = [f"{r} reads {s}'s {names[0]!r}" for (r, s), names in reads.items() if names]
        if crossing or len(x1) != 1 or len(x2) != 1:
            raise ExportError(f"depth template: the probe is not stem, two chained blocks and a head "
                              f"({', '.join(crossing) or f'block 1 reads {x1} of block 0, the head {x2} of block 1'})")
        self._x1, self._x2 = x1[0], x2[0]
        ops0 = [(n.op_type, n.domain) for n in self._block0]
        if ops0 != [(n.op_type, n.domain) for n in self._block1]:
            raise ExportError("depth template: the probe's two blocks differ in their operators")
        if _slot(self._block0, self._x1) != _slot(self._block1, self._x2):
            raise ExportError("depth template: the two blocks hand on the stream from different nodes")
        for name, nodes in groups.items():
            for node in nodes:
                blocks = {b for i in node.input if (b := self._param_block.get(i)) is not None}
                if blocks - ({name} if isinstance(name, int) else set()):
                    where_ = f"block {name}" if isinstance(name, int) else name
                    raise ExportError(f"depth template: a {where_} node reads parameters of block {min(blocks)}")
        if any(where.get(o.name) in (0, 1) for o in graph.output):
            raise ExportError("depth template: a graph output comes from a block")

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

        def ref(name: str, block: int) -> str:
            if name in self._consts:
                refs.setdefault(name, self._consts[name])
            if name not in self._params:
                return name
            param, transposed = self._params[name]
            if self._param_block[name] is not None:
                param = f"blocks.{block}." + param.split(".", 2)[2]
            key = param + (".T" if transposed else "")
            refs.setdefault(key, (param, transposed))
            return key

        def copy(node: Any, rename: dict[str, str], block: int = -1, name: str | None = None) -> Any:
            new = type(node)()
            new.CopyFrom(node)
            if name is not None:
                new.name = name
            new.input[:] = [ref(rename.get(i, i), block) for i in node.input]
            new.output[:] = [rename.get(o, o) for o in node.output]
            return new

        nodes = [copy(n, {}) for n in self._pre]
        stream = ""
        for i in range(depth):
            rename = {self._x1: stream} if i else {}
            for k, node in enumerate(self._block1 if i else self._block0):
                base = f"/blocks/blocks.{i}/{node.op_type}_{k}"
                rename.update({o: f"{base}_output_{j}" for j, o in enumerate(node.output) if o})
                nodes.append(copy(node, rename, i, base))
            stream = rename[self._x2 if i else self._x1]
        nodes += [copy(n, {self._x2: stream}) for n in self._tail]
        nodes = _prune(nodes, [o.name for o in self._probe.graph.output])
        for what in ("name", "output"):
            names = [x for n in nodes for x in _as_list(getattr(n, what)) if x]
            if len(set(names)) != len(names):
                raise ExportError(f"depth template: the depth-{depth} graph repeats a node {what}")
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
        proto.functions.extend(self._probe.functions)
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
        if [f.SerializeToString() for f in proto.functions] != [f.SerializeToString() for f in probe.functions]:
            raise ExportError("structure differs from the template: local functions")
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


@functools.lru_cache(maxsize=4)
def _shared(spec: ViTSpec, opset: int, exporter: str) -> DepthTemplate | tuple[str, str | None]:
    try:
        return DepthTemplate(spec, opset=opset, exporter=exporter)
    except ExportError as e:  # remembered too (the same probe would fail the same way), as its words only:
        return e.message, e.hint  # the exception's traceback would keep the probe model alive


def shared_template(spec: ViTSpec, *, opset: int = 18, exporter: str = "auto") -> DepthTemplate:
    """This process's ``DepthTemplate`` of ``spec`` (made on first use, the 4 most recent kept): the profiler,
    device kits, ``fit``'s measured steps and family exports of one spec then pay the exporter's trace once
    between them. Raises the template's ``ExportError`` where the probe cannot be cut into blocks."""
    got = _shared(spec, opset, exporter)
    if isinstance(got, tuple):
        raise ExportError(*got)
    return got


def clear_shared_templates() -> None:
    """Forget every ``shared_template`` (a benchmark's cold run, a test that swaps the exporter)."""
    _shared.cache_clear()


def template_onnx(model: ViT, path: str | os.PathLike[str], *, metadata: dict[str, str] | None = None,
                  exporter: str = "auto") -> Path:
    """``export_onnx(model, path)``'s file built from ``shared_template`` (the same nodes and the model's
    weights, as ``export_family`` builds members), written atomically; a plain ``export_onnx`` where no
    template can be made. For files that are timed, not delivered: a delivered member is validated by
    ``export_family``."""
    if model.depth >= 1:
        try:
            template = shared_template(model.spec, exporter=exporter)
        except ExportError:
            pass
        else:
            return save_proto(template.proto(model, metadata), path)
    return export_onnx(model, path, metadata=metadata, exporter=exporter)


def _as_list(x: Any) -> Any:
    return [x] if isinstance(x, str) else x


def _bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of ``a`` as unsigned integers (so NaNs and signed zeros compare bitwise)."""
    kind = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(a.dtype.itemsize)
    if kind is None or a.dtype == object:
        return np.frombuffer(np.ascontiguousarray(a).tobytes(), np.uint8)
    return a.view(kind)


def _map_initializers(proto: Any, state: dict[str, torch.Tensor]) -> tuple[dict[str, tuple[str, bool]], dict[str, Any]]:
    """Which initializer holds which parameter (as is or transposed), by value; the rest are constants."""
    from onnx import TensorProto, numpy_helper

    lookup: dict[tuple[tuple[int, ...], bytes], tuple[str, bool]] = {}
    for name, t in state.items():
        a = t.detach().numpy()
        lookup[(a.shape, a.tobytes())] = (name, False)
        if a.ndim == 2:
            at = np.ascontiguousarray(a.T)
            lookup[(at.shape, at.tobytes())] = (name, True)
    params: dict[str, tuple[str, bool]] = {}
    consts: dict[str, Any] = {}
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        key = (arr.shape, np.ascontiguousarray(arr).tobytes())
        if init.data_type == TensorProto.FLOAT and key in lookup:
            params[init.name] = lookup[key]
        else:
            consts[init.name] = init
    missing = sorted(set(state) - {p for p, _ in params.values()})
    if missing:
        raise ExportError(f"depth template: parameter {missing[0]!r} not found in the exported probe")
    return params, consts


def _block_index(param: str) -> int | None:
    """``blocks.3.attn.qkv.weight`` -> 3; ``None`` for the stem and head (``ViT``'s state-dict names)."""
    parts = param.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


def _slot(nodes: list[Any], tensor: str) -> tuple[int, int]:
    """Where in ``nodes`` ``tensor`` is made: (node index, output index)."""
    return next((k, j) for k, n in enumerate(nodes) for j, o in enumerate(n.output) if o == tensor)


def _prune(nodes: list[Any], outputs: list[str]) -> list[Any]:
    """Drop nodes whose outputs nothing reads (e.g. constants only the probe's block 1 used)."""
    needed = set(outputs)
    keep: list[Any] = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    return keep[::-1]
