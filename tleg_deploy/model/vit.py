"""A plain Vision Transformer with timm-compatible parameter names.

The layout follows timm's ``VisionTransformer`` with ``class_token=False, global_pool='avg'``
(Dosovitskiy et al., 2021; Touvron et al., 2021): patch embedding, learned position embedding,
pre-norm blocks, a final LayerNorm, mean pooling and a linear head. The final norm sits where
``spec.fc_norm`` says: on all tokens before pooling (``norm.*``, timm ``fc_norm=False``, the
Aux-Net's computation) or on the pooled vector (``fc_norm.*``, timm ``fc_norm=True``, the official
TLEG descendants). A state dict saved from ``ViT`` loads strictly into the matching timm model.

This is the only module that knows block-parameter names (``BLOCK_PARAMS``) and shapes; the
learngene, expansion, extraction and import code ask it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tleg_deploy.model.spec import ViTSpec

# Block-relative parameter names, in the order timm registers them.
BLOCK_PARAMS: tuple[str, ...] = (
    "norm1.weight", "norm1.bias",
    "attn.qkv.weight", "attn.qkv.bias",
    "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias",
)


def block_param_shapes(spec: ViTSpec) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of one transformer block (``qkv_bias=False`` drops that bias)."""
    d, h = spec.embed_dim, spec.mlp_hidden
    shapes: dict[str, tuple[int, ...]] = {
        "norm1.weight": (d,), "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
        "norm2.weight": (d,), "norm2.bias": (d,),
        "mlp.fc1.weight": (h, d), "mlp.fc1.bias": (h,),
        "mlp.fc2.weight": (d, h), "mlp.fc2.bias": (d,),
    }
    if not spec.qkv_bias:
        del shapes["attn.qkv.bias"]
    return shapes


def shared_param_shapes(spec: ViTSpec) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter outside the blocks: stem, position embedding, final norm, head."""
    d = spec.embed_dim
    shapes: dict[str, tuple[int, ...]] = {}
    if spec.class_token:
        shapes["cls_token"] = (1, 1, d)
    shapes |= {
        "pos_embed": (1, spec.num_tokens, d),
        "patch_embed.proj.weight": (d, spec.in_chans, spec.patch_size, spec.patch_size),
        "patch_embed.proj.bias": (d,),
        f"{final_norm_name(spec)}.weight": (d,), f"{final_norm_name(spec)}.bias": (d,),
        "head.weight": (spec.num_classes, d), "head.bias": (spec.num_classes,),
    }
    return shapes


def final_norm_name(spec: ViTSpec) -> str:
    """timm's name for the final LayerNorm: ``fc_norm`` after pooling, ``norm`` before it."""
    return "fc_norm" if spec.fc_norm else "norm"


def is_norm_param(name: str) -> bool:
    """``norm1.weight``, ``blocks.3.norm2.bias``, ``norm.weight``, ``fc_norm.bias``: LayerNorm tensors."""
    parts = name.split(".")
    return len(parts) >= 2 and (parts[-2].startswith("norm") or parts[-2] == "fc_norm")


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al., 2016); identity at eval or rate 0.

    ``x`` is (B, N, D) or token rows (B·N, D) with ``num_tokens`` rows per sample: either way a sample's
    tokens are kept or dropped together, from the same random draws."""

    def __init__(self, rate: float = 0.0, num_tokens: int = 1) -> None:
        super().__init__()
        self.rate = rate
        self.num_tokens = num_tokens

    def forward(self, x: Tensor) -> Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        if x.ndim == 2:  # token rows: one draw per sample, repeated over its tokens
            mask = x.new_empty((x.shape[0] // self.num_tokens, 1)).bernoulli_(keep)
            mask = mask.repeat_interleave(self.num_tokens, dim=0)
        else:
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention over the spec's ``num_tokens`` tokens.

    Written for the exported graph as much as for PyTorch: every reshape names the spec's token
    count, heads and head width as Python ints and leaves only the batch axis to ``-1``, and the
    softmax scale is passed to SDPA as a number. Reading them from ``x.shape`` instead (and letting
    SDPA derive the scale from the query's shape) exports, with a dynamic batch axis, as
    Shape/Gather/Unsqueeze/Concat chains before every Reshape and a Shape/Slice/Cast/Sqrt/Div scale,
    which stop ONNX Runtime's fusions (FusedMatMul with the scale folded in): 281 nodes after ORT's
    optimizer for digits at depth 6 instead of 161. The numbers PyTorch computes are identical.
    q, k and v come from one transpose of the qkv output to (B, 3·heads, N, head_dim) and a split
    along the head axis, not timm's 5-D permute + unbind: unbind exports as Split + 3 Squeeze per
    block, which ORT does not remove (digits depth 12: 311 → 275 nodes after ORT's optimizer, 2.2%
    faster fp32 and 2.5% int8 in one interleaved 1-thread run; deit-tiny unchanged within 0.2%).
    ``x`` is (B, N, D) or token rows (B·N, D) (what ``ViT`` passes its blocks); the output has its layout.
    """

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.num_heads = spec.num_heads
        self.num_tokens = spec.num_tokens
        self.head_dim = spec.embed_dim // spec.num_heads
        self.qkv = nn.Linear(spec.embed_dim, 3 * spec.embed_dim, bias=spec.qkv_bias)
        self.proj = nn.Linear(spec.embed_dim, spec.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        N, H, hd = self.num_tokens, self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(-1, N, 3 * H, hd).transpose(1, 2)  # (B, 3·heads, N, head_dim)
        q, k, v = qkv.split(H, dim=1)  # each (B, heads, N, head_dim)
        rows = x.ndim == 2  # a Python bool while tracing: no shape arithmetic in the graph
        x = F.scaled_dot_product_attention(q, k, v, scale=hd**-0.5).transpose(1, 2)
        return self.proj(x.reshape(-1, H * hd) if rows else x.reshape(-1, N, H * hd))


class Mlp(nn.Module):
    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.fc1 = nn.Linear(spec.embed_dim, spec.mlp_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(spec.mlp_hidden, spec.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, on (B, N, D) or on
    token rows (B·N, D)."""

    def __init__(self, spec: ViTSpec, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.embed_dim, eps=spec.norm_eps)
        self.attn = Attention(spec)
        self.norm2 = nn.LayerNorm(spec.embed_dim, eps=spec.norm_eps)
        self.mlp = Mlp(spec)
        self.drop_path = DropPath(drop_path, spec.num_tokens)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.proj = nn.Conv2d(spec.in_chans, spec.embed_dim, spec.patch_size, spec.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, D)


class ViT(nn.Module):
    """A depth-``depth`` ViT of ``spec``; ``depth=0`` gives the stem and head alone.

    The blocks run on token rows, (B·N, D) (``forward``, ``blocks_on_rows``): every Linear is then a
    2-D product, which exports as one ``Gemm`` with its bias instead of ``MatMul`` + ``Add`` (ONNX
    Runtime fuses MatMul + Add into Gemm only on 2-D inputs). PyTorch computes the same numbers in
    either layout (a Linear folds (B, N) into one axis anyway); the exported file is faster: fp32,
    ONNX Runtime CPU, 1 thread, batch 1, depth 12, one interleaved run on an Intel Xeon, 0.92x the
    (B, N, D) graph's time for digits and 0.97x for deit-tiny (``benchmarks/export_speed.py``, the row
    ``ours, blocks on (B, N, D)``); static int8 QDQ then runs as one QGemm per weight, bias included.
    """

    def __init__(self, spec: ViTSpec, depth: int, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.spec = spec
        self.depth = depth
        self.patch_embed = PatchEmbed(spec)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim)) if spec.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.num_tokens, spec.embed_dim))
        rates = drop_path_rates(depth, drop_path_rate)
        self.blocks = nn.Sequential(*(Block(spec, rate) for rate in rates))
        # Exactly one of the two holds the final LayerNorm; the other is parameter-free, as in timm.
        final = lambda on: nn.LayerNorm(spec.embed_dim, eps=spec.norm_eps) if on else nn.Identity()  # noqa: E731
        self.norm = final(not spec.fc_norm)
        self.fc_norm = final(spec.fc_norm)
        self.head = nn.Linear(spec.embed_dim, spec.num_classes)

    def embed(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    def forward_head(self, x: Tensor) -> Tensor:
        x = self.norm(x)  # (B, N, D); identity when fc_norm
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)  # (B, D)
        return self.head(self.fc_norm(x))  # fc_norm: identity unless spec.fc_norm

    def blocks_on_rows(self, x: Tensor) -> Tensor:
        """``blocks`` on (B, N, D) tokens, run as token rows (B·N, D); returns (B, N, D)."""
        d, n = self.spec.embed_dim, self.spec.num_tokens
        return self.blocks(x.reshape(-1, d)).reshape(-1, n, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.blocks_on_rows(self.embed(x)))


def drop_path_rates(depth: int, rate: float) -> list[float]:
    """timm's linearly increasing stochastic-depth schedule, 0 at the first block."""
    if depth <= 1:
        return [0.0] * depth
    return [rate * i / (depth - 1) for i in range(depth)]


def init_vit_(model: ViT, generator: torch.Generator | None = None) -> ViT:
    """Standard random init (timm/DeiT): linear weights N(0, 0.02) truncated at ±2, biases 0,
    LayerNorm (1, 0), position embedding N(0, 0.02). Used for the ``scratch`` baseline."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("pos_embed") or name.endswith("cls_token") or (
                p.ndim >= 2 and not is_norm_param(name)
            ):
                nn.init.trunc_normal_(p, std=0.02, a=-2.0, b=2.0, generator=generator)
            elif is_norm_param(name) and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return model
