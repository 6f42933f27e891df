"""Muon for the blocks' weight matrices, AdamW for everything else, as one optimizer.

Muon (Jordan et al., 2024) keeps a momentum of each matrix's gradient and steps along its
orthogonalized direction: the Newton-Schulz iteration below maps the (Nesterov) momentum
M = U S V^T to about U V^T, so every singular direction moves by the same amount. The step is
scaled so its size means the same at every width:

- ``spectral`` (the default): lr x sqrt(max(1, fan_out / fan_in)), the spectral-norm scaling under
  which the learning rate transfers across widths (Bernstein and Newhouse; Jordan's reference);
- ``adamw_rms``: lr x 0.2 x sqrt(max(fan_out, fan_in)), an update of AdamW's typical RMS (Moonlight),
  so AdamW's learning rate and weight decay can be reused (set ``optim.muon_lr`` to ``optim.lr``).

Stacked expert weights (E, out, in) are E matrices. A sharded matrix is orthogonalized whole, on one
rank, through :func:`parallel.whole_matrices.map_whole_matrices`, so its update equals the update
of the full matrix on one process, whatever the layout. Parameter groups hold a ``muon`` flag; the
AdamW groups run torch's own AdamW kernel with the same state names (``exp_avg``, ``exp_avg_sq``,
``step``), and the Muon group's state is ``momentum_buffer``, a tensor laid out like its parameter,
so the state saves, loads and reshapes like AdamW's.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor
from torch.optim.adam import adam

from parallel.tensors import local_tensor
from parallel.whole_matrices import group_alike, map_whole_matrices

# Coefficients of the quintic Newton-Schulz step (Jordan's), which drives singular values into about [0.7, 1.2].
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
SCALES = ("spectral", "adamw_rms")


def orthogonalize(g: torch.Tensor, steps: int) -> torch.Tensor:
    """About U V^T of each matrix U S V^T of a batch (..., m, n), by `steps` Newton-Schulz steps, in float32."""
    a, b, c = NEWTON_SCHULZ
    x = g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if tall else x).to(g.dtype)


def update_scale(shape: torch.Size, scale: str) -> float:
    """The factor on the learning rate for a matrix of `shape` (..., fan_out, fan_in)."""
    fan_out, fan_in = shape[-2], shape[-1]
    if scale == "spectral":
        return math.sqrt(max(1.0, fan_out / fan_in))
    return 0.2 * math.sqrt(max(fan_out, fan_in))


class Muon(torch.optim.Optimizer):
    """Groups with ``muon=True`` take Muon steps (``momentum``, ``nesterov``, ``ns_steps``, ``scale``);
    the others AdamW steps (``betas``, ``eps``). ``lr`` and ``weight_decay`` (decoupled) apply to both."""

    def __init__(self, param_groups: list[dict], *, lr: float, weight_decay: float, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, scale: str = "spectral",
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, adamw_kernel: dict | None = None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        scale=scale, betas=betas, eps=eps, muon=False)
        self.adamw_kernel = adamw_kernel or {}  # torch's flags: fused / foreach
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon_step if group["muon"] else self._adamw_step)(group, params)

    def _muon_step(self, group: dict, params: list[torch.Tensor]) -> None:
        beta, lr = group["momentum"], group["lr"]
        updates = []
        for p in params:
            grad = local_tensor(p.grad)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = local_tensor(state["momentum_buffer"])
            buf.lerp_(grad, 1 - beta)
            update = grad.lerp(buf, beta) if group["nesterov"] else buf
            updates.append(_like(update, p))
        for members in group_alike(updates):
            directions = map_whole_matrices([updates[i] for i in members],
                                            lambda batch: orthogonalize(batch, group["ns_steps"]))
            for i, direction in zip(members, directions):
                p = local_tensor(params[i])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(direction, alpha=-lr * update_scale(params[i].shape, group["scale"]))

    def _adamw_step(self, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            state = self.state[p]
            if not state:
                device = p.device if self.adamw_kernel.get("fused") else None
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adam(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
             [s["step"] for s in states], **self.adamw_kernel, decoupled_weight_decay=True, amsgrad=False, beta1=beta1,
             beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def _like(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`local` laid out like `param` (a DTensor of the same placements, or itself)."""
    if isinstance(param, DTensor):
        return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
    return local
