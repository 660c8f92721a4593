"""``AuxNet``: the auxiliary network through which a learngene is trained (TLEG, Xia et al. 2024).

One block applied ``aux_depth`` times; at step ``i`` its parameters are ``base + (i/aux_depth) ·
slope``. The base and slope are this module's parameters, so training the Aux-Net trains the
learngene. ``expand(lg, lg.aux_depth)`` computes exactly what ``AuxNet(lg)`` computes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from tleg_deploy.model.expansion import vit_from_state
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.model.vit import Block, drop_path_rates

_SEP = "__"  # ParameterDict keys may not contain "."


class AuxNet(nn.Module):
    def __init__(self, learngene: Learngene, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        lg = learngene
        self.spec = lg.spec
        self.aux_depth = lg.aux_depth
        self.provenance = dict(lg.provenance)
        # Stem, position embedding, final norm and head: a depth-0 ViT sharing lg's tensors.
        self.stem = vit_from_state(lg.spec, 0, lg.shared)
        for p in self.stem.parameters():
            p.requires_grad_(True)
        self.base = nn.ParameterDict({k.replace(".", _SEP): nn.Parameter(v) for k, v in lg.base.items()})
        self.slope = nn.ParameterDict({k.replace(".", _SEP): nn.Parameter(v) for k, v in lg.slope.items()})
        # Parameter-free templates on the meta device, one per step for its drop-path rate;
        # kept in a plain list so they are not registered as submodules.
        with torch.device("meta"):
            self._templates = [Block(lg.spec, r) for r in drop_path_rates(lg.aux_depth, drop_path_rate)]

    def train(self, mode: bool = True) -> AuxNet:
        super().train(mode)
        for t in self._templates:
            t.train(mode)
        return self

    def step_params(self, i: int) -> dict[str, Tensor]:
        coef = i / self.aux_depth
        return {k.replace(_SEP, "."): self.base[k] + coef * self.slope[k] for k in self.base}

    def forward(self, x: Tensor) -> Tensor:
        d, n = self.spec.embed_dim, self.spec.num_tokens
        x = self.stem.embed(x).reshape(-1, d)  # token rows (B·N, D), as ViT runs its blocks
        for i, template in enumerate(self._templates):
            x = functional_call(template, self.step_params(i), (x,))
        return self.stem.forward_head(x.reshape(-1, n, d))

    def to_learngene(self) -> Learngene:
        """A detached copy of the current parameters as a ``Learngene``."""
        grab = lambda d: {k.replace(_SEP, "."): v.detach().clone() for k, v in d.items()}  # noqa: E731
        shared = {k: v.detach().clone() for k, v in self.stem.state_dict().items()}
        return Learngene(
            self.spec, self.aux_depth, shared, grab(self.base), grab(self.slope), dict(self.provenance)
        )
