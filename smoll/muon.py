"""Muon with the Newton-Schulz steps of same-shaped matrices run together.

    Muon(params, lr=..., weight_decay=...)   # as torch.optim.Muon, and faster on a CPU

torch.optim.Muon orthogonalises each weight matrix's momentum on its own: five Newton-Schulz steps
of three small matrix products each, 360 products a step for the shipped TinyGPT's 24 matrices.
On a 2-core CPU that took about a fifth of its training step (63 ms of about 290), and products
this small (the largest matrix is 768 x 192) leave the cores partly idle. A TinyGPT's blocks are alike, so its matrices come in four shapes: this
Muon stacks the matrices of each shape and runs the same steps as batched products (60 in all).
The arithmetic is torch.optim.Muon's, in the same bfloat16, so the updates agree to bfloat16's
rounding (tests/test_train.py checks them against torch.optim.Muon). The state and the
hyperparameters are torch.optim.Muon's own, so a checkpoint saved by either resumes with the other.
train.py's make_optimizers builds it.
"""

import torch
from torch.optim._muon import _adjust_lr


class Muon(torch.optim.Muon):

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)  # torch.optim.Muon's: makes the momentum buffers
            if not params:
                continue
            lr, momentum = group["lr"], group["momentum"]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
            by_shape = {}
            for param, update in zip(params, updates):
                by_shape.setdefault(param.shape, []).append((param, update))
            for shape, pairs in by_shape.items():
                stacked = torch.stack([update for _, update in pairs])
                orthogonal = newton_schulz(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"])
                matrices = [param for param, _ in pairs]
                torch._foreach_mul_(matrices, 1 - lr * group["weight_decay"])
                torch._foreach_add_(matrices, list(orthogonal.unbind(0)),
                                    alpha=-_adjust_lr(lr, group["adjust_lr_fn"], shape))
        return loss


def newton_schulz(g, coefficients, steps, eps):
    """The nearest orthogonal matrix to each matrix of the stack g (n, rows, cols), approximately:
    torch.optim.Muon's quintic Newton-Schulz iteration, in bfloat16, on the whole stack at once."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(1) > g.size(2)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)  # each spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x
