"""How far bf16 autocast moves each parameter's gradient from the fp32 gradient, per GDN backend (CPU).

    TRITON_INTERPRET=1 python benchmarks/param_grad_noise_cpu.py     # ~2 minutes on 2 cores

A small GGGA model, one batch of random tokens, next-token cross-entropy. For each backend ("torch": the
chunked PyTorch reference; "triton": our kernels in Triton's CPU interpreter, which emulates their bf16/tf32
operand rounding) it prints the relative L2 error of the bf16-autocast gradient (and of the fp32 one) against
the fp32 gradient of the torch backend, for the GDN gate parameters and a projection. The gate parameters
(dt_bias, A_log) sum dg over every token of a head, so they amplify any noise in dg.
"""

from __future__ import annotations

import os

# A CPU script: Triton's interpreter runs the kernels, and must be chosen before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import copy

import torch

from olmo_hybrid import ops
from olmo_hybrid.config import ModelConfig
from olmo_hybrid.model import HybridLM


def gradients(model: HybridLM, tokens: torch.Tensor, bf16: bool) -> dict[str, torch.Tensor]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(tokens)
    v = logits.shape[-1]
    torch.nn.functional.cross_entropy(logits.float().view(-1, v), tokens.roll(-1, 1).view(-1)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def main() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=4, layer_pattern="GGGA", n_heads=4, gdn_heads=4,
                      gdn_head_k=32, gdn_head_v=64, mlp_hidden=256, max_seq_len=256, rope_theta=1e4)
    model = HybridLM(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (4, 256))
    with ops.use_backend("torch"):
        truth = gradients(copy.deepcopy(model), tokens, bf16=False)
    shown = [n for n in truth if n.endswith(("dt_bias", "A_log", "linear_attn.q_proj.weight"))]
    for backend in ("torch", "triton"):
        with ops.use_backend(backend):
            g16 = gradients(copy.deepcopy(model), tokens, bf16=True)
            g32 = gradients(copy.deepcopy(model), tokens, bf16=False)
        print(f"backend {backend}: relative L2 error against the fp32 torch gradient")
        for n in shown:
            rel = lambda g: float((g[n] - truth[n]).norm() / truth[n].norm())
            print(f"  {n:45s} bf16 autocast {rel(g16):.3f}   fp32 {rel(g32):.1e}")


if __name__ == "__main__":
    main()
