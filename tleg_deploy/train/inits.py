"""Ways to initialize a depth-``L`` descendant, compared in ``benchmarks/paper_claims.py``.

- ``tleg``: the learngene's linear expansion, block ``i`` = ``base + (i/L)·slope`` (Xia et al., AAAI 2024).
- ``scratch``: the standard random init of timm/DeiT (``tleg_deploy.model.vit.init_vit_``).
- ``weight-selection``: Xu et al., "Initializing Models with Larger Ones" (ICLR 2024): copy a subset of
  a larger pretrained teacher's weights — evenly spaced layers (``layers="uniform"``, or the first L
  with ``"first"``) and, inside each tensor, the leading channels of every dimension (q, k and v are
  sliced separately so heads stay aligned).
- ``base-only``: the learngene's intercept repeated in every layer (the slope dropped), the
  "shared-weights" ablation of TLEG: how much does the linear term itself contribute?
- ``mimetic``: Trockman & Kolter, "Mimetic Initialization of Self-Attention Layers" (ICML 2023): no
  stored parameters; per head, ``W_qᵀW_k ≈ 0.7·Z + 0.7·I`` and ``W_projW_v ≈ 0.4·Z − 0.4·I``
  (``Z`` Gaussian with variance 1/d), the rank-``head_dim`` truncated SVD of each target; the rest
  as ``scratch``.
"""

from __future__ import annotations

import torch

from tleg_deploy.errors import SpecError, TlegError
from tleg_deploy.model.expansion import expand, vit_from_state
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.model.spec import ViTSpec, check_depth
from tleg_deploy.model.vit import ViT, block_param_shapes, init_vit_, shared_param_shapes

INITS = ("tleg", "scratch", "weight-selection", "base-only", "mimetic")


def init_model(
    name: str, depth: int, *, spec: ViTSpec | None = None, learngene: Learngene | None = None,
    teacher: ViT | None = None, seed: int = 0,
) -> ViT:
    """A fresh depth-``depth`` ViT initialized by method ``name`` (one of ``INITS``)."""
    check_depth(depth)
    if name in ("tleg", "base-only"):
        if learngene is None:
            raise TlegError(f"initialization {name!r} needs a learngene")
        return expand(learngene, depth) if name == "tleg" else base_only(learngene, depth)
    if name in ("scratch", "mimetic"):
        s = spec or (learngene.spec if learngene is not None else None)
        if s is None:
            raise TlegError(f"initialization {name!r} needs a spec or a learngene")
        g = torch.Generator().manual_seed(seed)
        model = init_vit_(ViT(s, depth), g)
        return mimetic_(model, g) if name == "mimetic" else model
    if name == "weight-selection":
        if teacher is None:
            raise TlegError("initialization 'weight-selection' needs a teacher model", hint="pass --teacher FILE")
        s = spec or (learngene.spec if learngene is not None else teacher.spec)
        return weight_selection(teacher, s, depth)
    raise TlegError(f"unknown initialization {name!r}", hint=f"choose one of {', '.join(INITS)}")


def base_only(lg: Learngene, depth: int) -> ViT:
    state = {k: v.clone() for k, v in lg.shared.items()}
    for i in range(depth):
        state |= {f"blocks.{i}.{k}": v.clone() for k, v in lg.base.items()}
    return vit_from_state(lg.spec, depth, state)


@torch.no_grad()
def mimetic_(model: ViT, generator: torch.Generator, alpha: tuple[float, float] = (0.7, 0.4),
             beta: tuple[float, float] = (0.7, 0.4)) -> ViT:
    """Mimetic init of every block's attention (Trockman & Kolter, ICML 2023), in place."""
    d, k, heads = model.spec.embed_dim, model.spec.head_dim, model.spec.num_heads

    def factors(a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
        m = a * torch.randn(d, d, generator=generator) / d**0.5 + b * torch.eye(d)
        u, s, vh = torch.linalg.svd(m)
        root = s[:k].sqrt()
        return u[:, :k] * root, vh[:k].T * root  # (d, k) each: left @ right.T ≈ m

    state = model.state_dict()  # views of the parameters
    for i in range(model.depth):
        qkv, proj = state[f"blocks.{i}.attn.qkv.weight"], state[f"blocks.{i}.attn.proj.weight"]  # (3d, d), (d, d)
        for h in range(heads):
            rows = slice(h * k, (h + 1) * k)
            wq, wk = factors(alpha[0], beta[0])
            qkv[rows] = wq.T  # q = W_q x, so W_qᵀ W_k ≈ target
            qkv[d:2 * d][rows] = wk.T
            left, right = factors(alpha[1], -beta[1])
            proj[:, rows] = left  # proj[:, head] @ W_v[head] ≈ target
            qkv[2 * d:][rows] = right.T
    return model


def selected_layers(teacher_depth: int, depth: int, mode: str = "uniform") -> list[int]:
    """Teacher layer indices for a depth-``depth`` student: evenly spaced (first and last kept) or the first L."""
    if depth > teacher_depth:
        raise SpecError(f"weight selection cannot make depth {depth} from a depth-{teacher_depth} teacher",
                        hint="use a teacher at least as deep as the model")
    if mode == "first" or depth == 1:
        return list(range(depth))
    if mode != "uniform":
        raise TlegError(f"unknown layer selection {mode!r}", hint="use uniform or first")
    return [round(i * (teacher_depth - 1) / (depth - 1)) for i in range(depth)]


def weight_selection(teacher: ViT, spec: ViTSpec, depth: int, layers: str = "uniform") -> ViT:
    """Xu et al. (ICLR 2024): a smaller ViT whose every tensor is the leading slice of the teacher's."""
    t = teacher.spec
    same = ("img_size", "patch_size", "in_chans", "num_classes", "class_token", "qkv_bias")
    diff = [f for f in same if getattr(t, f) != getattr(spec, f)]
    if diff or t.embed_dim < spec.embed_dim or t.mlp_hidden < spec.mlp_hidden:
        raise SpecError(f"teacher spec cannot be cut down to the model's (differs in {diff or 'width'})",
                        hint="the teacher must be at least as wide, with the same image, patch and classes")
    src = teacher.state_dict()
    state = {k: _lead(src[k], shape) for k, shape in shared_param_shapes(spec).items()}
    block_shapes = block_param_shapes(spec)
    for i, j in enumerate(selected_layers(teacher.depth, depth, layers)):
        for k, shape in block_shapes.items():
            v = src[f"blocks.{j}.{k}"]
            if k.startswith("attn.qkv"):  # slice q, k and v separately
                v = v.reshape(3, t.embed_dim, *v.shape[1:])
                state[f"blocks.{i}.{k}"] = _lead(v, (3, spec.embed_dim, *shape[1:])).reshape(shape)
            else:
                state[f"blocks.{i}.{k}"] = _lead(v, shape)
    return vit_from_state(spec, depth, state)


def _lead(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return t[tuple(slice(0, n) for n in shape)].clone()
