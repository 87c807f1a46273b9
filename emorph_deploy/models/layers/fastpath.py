"""When the eager-only fast kernels (fused SDPA, direct oneDNN convs, channels-last decoder) may be used.

They are numerically equivalent to the reference ops but are *different ops*: tracing / ONNX export must see
the reference graph (MatMul + Softmax + MatMul, Conv, InstanceNormalization, Concat), and analysis modes
(``FlopCounterMode``, fake/meta tensors) must count the reference ops. So fast paths run only in plain eager
mode with no ``TorchDispatchMode`` active.
"""

from __future__ import annotations

import torch


def _dispatch_mode_active() -> bool:
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode
    except ImportError:  # pragma: no cover - very old/new torch: stay on the reference ops
        return True
    return _get_current_dispatch_mode() is not None


def reference_ops_required() -> bool:
    """True while tracing / exporting to ONNX or under a dispatch mode (FlopCounterMode, FakeTensorMode)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or _dispatch_mode_active()


def use_onednn(x: torch.Tensor) -> bool:
    """Eager CPU float32 inference (no autograd, not traced/exported/analysed) with oneDNN available."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not reference_ops_required()
    )
