"""SSD: Mamba2's selective state space (scalar decay per head), the op behind ``model/mamba2.py``.

    from olmo_hybrid import ops
    y, state = ops.ssd(x, dt, A, B, C, D, initial_state=h0, output_final_state=True, reset_mask=reset)

Per head h, with the state S [P, N] (transformers' / mamba_ssm's layout) and group g = h // (H // G):

    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T;        y_t = S_t C_t + D_h x_t

Layouts (time-major, as the GDN ops): x [B, T, H, P]; dt [B, T, H] (the step after softplus, bias and clamp:
positive, not checked, to avoid a device sync); A [H] (negative: -exp(A_log)); B, C [B, T, G, N] with H a
multiple of G; D [H] or None; states [N_rows, H, P, N] in float32 (float64 for float64 inputs). Document
boundaries (``cu_seqlens``, ``reset_mask``) have the GDN ops' meaning (``olmo_hybrid/ops/varlen.py``): a reset clears
the state before its token. Every full-sequence op is differentiable wrt x, dt, A, B, C, D and initial_state.

Files: public functions in ``api.py``; the PyTorch references (chunked, token loop, step) in ``reference.py``;
the Triton kernels in ``chunk_fwd.py``, ``chunk_bwd.py`` (sharing the GDN kernels' helpers,
``gated_delta_rule/chunk_common.py``) and ``step_kernel.py``; their ``torch.library`` custom ops in
``custom_ops.py``. Backends as for every op (``olmo_hybrid/ops/dispatch.py``): "torch", "triton", "auto".
"""

from .api import recurrent_ssd, ssd, ssd_step

__all__ = ["recurrent_ssd", "ssd", "ssd_step"]
