"""Test-only stand-in for mamba_ssm's CUDA ``selective_scan_fn``: a sequential pure-PyTorch reference.

Same signature and semantics as ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (float32 state
and accumulation), so the official MambaVision model runs on CPU for logit-parity tests. Layouts follow
mamba_ssm: u, delta (b, d, l); A (d, n); B, C (b, n, l) or (b, g, n, l) or (d, n); D, delta_bias (d,);
z (b, d, l) or None.
"""

import torch
import torch.nn.functional as F


def selective_scan_fn(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    A = A.float()

    def per_step(M):
        if M.dim() == 2:  # (d, n): time-invariant
            return lambda t: M.float()[None]
        if M.dim() == 4:  # (b, g, n, l): groups of channels
            groups = M.shape[1]
            Mx = M.float().repeat_interleave(dim // groups, dim=1)  # (b, d, n, l)
            return lambda t: Mx[..., t]
        return lambda t: M.float()[:, None, :, t]  # (b, n, l) -> (b, 1, n)

    B_t, C_t = per_step(B), per_step(C)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    x = A.new_zeros((batch, dim, A.shape[1]))
    ys = []
    for t in range(length):
        x = deltaA[:, :, t] * x + (delta[:, :, t] * u[:, :, t])[..., None] * B_t(t)
        ys.append((x * C_t(t)).sum(-1))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, x) if return_last_state else y
