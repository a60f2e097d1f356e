"""The tolerance rule used by every kernel test.

The reference is computed in float64 ("truth") and again in the kernel's dtype with plain PyTorch
(the error PyTorch itself makes). A kernel passes when its max error against the truth is at most
2x PyTorch's plus the rounding floor of the dtype (what merely storing the truth in that dtype
costs). NaN/Inf never passes.
"""

import torch


def rounding_floor(truth: torch.Tensor, dtype: torch.dtype) -> float:
    """What storing values of this size in ``dtype`` costs: the rounding of ``truth + 0.3`` (so
    that an all-zero truth, e.g. dq at seqlen 1, still allows round-off noise of O(eps))."""
    if not truth.numel():
        return 0.0
    shifted = (truth + 0.3).to(dtype).double() - 0.3
    return 2 * (shifted - truth).abs().max().item()


def check(name: str, got: torch.Tensor, truth: torch.Tensor, torch_lowp: torch.Tensor,
          factor: float = 2.0) -> None:
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values in the kernel output"
    if got.numel() == 0:
        return
    err = (got.double() - truth).abs().max().item()
    err_pt = (torch_lowp.double() - truth).abs().max().item()
    floor = rounding_floor(truth, got.dtype)
    bound = factor * err_pt + floor + 1e-12
    assert err <= bound, (f"{name}: max error {err:.3e} > {factor}x PyTorch's {err_pt:.3e} "
                          f"+ floor {floor:.3e}")
