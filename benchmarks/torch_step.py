"""The PyTorch baseline for benchmarks/bench_train.py: the `standard` SAE step, written by us.

Same model, loss and optimizer as `jax_sae` (ReLU SAE, L = mean ||x - x_hat||^2 + lambda *
mean sum |h|, decoder-gradient projection, Adam, unit-norm decoder rows after the step), in float32
on all CPU threads. It is written to be a fair opponent: fused/foreach Adam, in-place updates, and
the same `b_dec` trick as `jax_sae.model.architectures.ReLUSAE.pre_activation` (b_dec's gradient as
a mat-vec, so autograd runs the same five [B x F x d] matmuls as the JAX step, not six);
``b_dec_trick=False`` gives the plain-autograd step for comparison.
"""

from __future__ import annotations

import os

import torch


class TorchSAE(torch.nn.Module):
    def __init__(self, d_in: int, d_sae: int, *, b_dec_trick: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.b_dec_trick = b_dec_trick
        g = torch.Generator().manual_seed(seed)
        bound = (6 / d_in) ** 0.5  # kaiming-uniform, fan-in d_in, as jax_sae's init
        self.W_enc = torch.nn.Parameter((torch.rand(d_in, d_sae, generator=g) * 2 - 1) * bound)
        w_dec = torch.rand(d_sae, d_in, generator=g) * 2 - 1
        self.W_dec = torch.nn.Parameter(w_dec / w_dec.norm(dim=1, keepdim=True))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.b_dec_trick:
            b_dec_fixed = self.b_dec.detach()
            pre = torch.addmm(self.b_enc, x - b_dec_fixed, self.W_enc)
            # zero-valued term carrying b_dec's gradient: -(sum_b g_pre) @ W_enc^T, a mat-vec
            pre = pre - (self.b_dec - b_dec_fixed) @ self.W_enc.detach()
        else:  # plain autograd: b_dec's gradient costs a sixth [B x F x d] matmul
            pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)
        h = torch.relu(pre)
        x_hat = torch.addmm(self.b_dec, h, self.W_dec)
        return x_hat, h


class TorchTrainStep:
    """One optimizer step of the standard SAE: forward, backward, projection, Adam, renorm."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        lr: float = 3e-4,
        l1: float = 0.04,
        b_dec_trick: bool = True,
    ) -> None:
        torch.set_num_threads(os.cpu_count() or 1)
        self.model = TorchSAE(d_in, d_sae, b_dec_trick=b_dec_trick)
        self.l1 = l1
        params = list(self.model.parameters())
        try:
            self.opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)
        except (RuntimeError, TypeError):  # no fused CPU kernel in this build
            self.opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), foreach=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        x_hat, h = model(x)
        recon = (x - x_hat).pow(2).sum(dim=1).mean()
        loss = recon + self.l1 * h.abs().sum(dim=1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            w, g = model.W_dec, model.W_dec.grad
            g -= (g * w).sum(dim=1, keepdim=True) * w  # rows are unit norm
            self.opt.step()
            w /= w.norm(dim=1, keepdim=True)
        return loss.detach()
