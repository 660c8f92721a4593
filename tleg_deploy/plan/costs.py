"""Analytic size and compute of a depth-``L`` ViT of a spec: parameters, MACs, artifact bytes.

Torch-free, so the solver and the profile tables can use it. The MAC count is the standard one
for a pre-norm ViT (Dosovitskiy et al., 2021), counting matrix multiplies only (LayerNorm, GELU,
softmax and additions are ignored, as fvcore does):

    per block  N·(4·D² + 2·D·H) + 2·N²·D        (qkv + proj, fc1 + fc2, QKᵀ and AV)
    fixed      N·D·C·P² + D·K                   (patch embedding, head)

with N tokens, width D, MLP hidden H, C input channels, patch P and K classes, per image.
"""

from __future__ import annotations

from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.plan.precisions import PRECISION, PRECISIONS


def block_params(spec: ViTSpec) -> int:
    d, h = spec.embed_dim, spec.mlp_hidden
    qkv_bias = 3 * d if spec.qkv_bias else 0
    return (3 * d * d + qkv_bias) + (d * d + d) + (d * h + h) + (h * d + d) + 4 * d  # + 2 LayerNorms


def fixed_params(spec: ViTSpec) -> int:
    d = spec.embed_dim
    stem = d * spec.in_chans * spec.patch_size**2 + d
    cls = d if spec.class_token else 0
    return stem + cls + spec.num_tokens * d + 2 * d + spec.num_classes * d + spec.num_classes


def params(spec: ViTSpec, depth: int) -> int:
    """Parameters of a depth-``depth`` plain ViT."""
    return fixed_params(spec) + depth * block_params(spec)


def block_macs(spec: ViTSpec) -> int:
    n, d, h = spec.num_tokens, spec.embed_dim, spec.mlp_hidden
    return n * (4 * d * d + 2 * d * h) + 2 * n * n * d


def fixed_macs(spec: ViTSpec) -> int:
    return spec.num_patches * spec.embed_dim * spec.in_chans * spec.patch_size**2 + spec.embed_dim * spec.num_classes


def macs(spec: ViTSpec, depth: int, batch: int = 1) -> int:
    """Multiply-accumulates of one forward pass of ``batch`` images."""
    return batch * (fixed_macs(spec) + depth * block_macs(spec))


def artifact_bytes(spec: ViTSpec, depth: int, precision: str = "fp32") -> int:
    """Approximate size of the exported weights (graph overhead excluded). int8 keeps biases,
    LayerNorms and embeddings in fp32, which this counts as 1 byte/param: a lower bound."""
    try:
        per = PRECISION[precision].bytes_per_param
    except KeyError:
        from tleg_deploy.errors import SpecError

        raise SpecError(f"unknown precision {precision!r}", hint=f"use {', '.join(PRECISIONS)}") from None
    return round(params(spec, depth) * per)
