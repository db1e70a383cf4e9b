"""Shared test helpers: compare floats by error ratio, integers exactly."""

import torch


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    """Assert ``out`` matches ``ref`` within an RMS error ratio; print both errors."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    ref64, out64 = ref.double(), out.double()
    assert torch.isfinite(out64).all(), f"{name}: non-finite values in output"
    diff = (ref64 - out64).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    rms_diff = diff.pow(2).mean().sqrt().item() if diff.numel() else 0.0
    rms_ref = ref64.pow(2).mean().sqrt().item() if diff.numel() else 0.0
    err_ratio = rms_diff / (rms_ref + 1e-30)
    print(f"{name:>24} max_abs={max_abs:.3e} rms_ratio={err_ratio:.3e}")
    assert err_ratio <= ratio, f"{name}: rms error ratio {err_ratio:.3e} > {ratio:.1e}"
