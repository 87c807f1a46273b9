"""When the eager-only fast kernels (fused SDPA, direct oneDNN convs, channels-last decoder) may be used.

They are numerically equivalent to the reference ops but are *different ops*: tracing / ONNX export must see
the reference graph (MatMul + Softmax + MatMul, Conv, InstanceNormalization, Concat), and analysis modes
(``FlopCounterMode``, fake/meta tensors) must count the reference ops. So fast paths run only in plain eager
mode with no ``TorchDispatchMode`` active.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: ``EMORPH_FAST_PATH=0`` runs eager inference on the reference ops too (the model exactly as exported).
_enabled = os.environ.get("EMORPH_FAST_PATH", "1").strip().lower() not in ("0", "false", "no", "off")


def fast_path_enabled() -> bool:
    """Whether eager CPU inference may use the fast kernels (default yes; ``EMORPH_FAST_PATH=0`` disables)."""
    return _enabled


def set_fast_path(enabled: bool) -> bool:
    """Enable/disable the eager fast kernels process-wide; returns the previous setting."""
    global _enabled
    prev, _enabled = _enabled, bool(enabled)
    return prev


@contextmanager
def fast_path(enabled: bool) -> Iterator[None]:
    """``with fast_path(False): model(m, f)`` runs the reference ops (e.g. a baseline or an A/B check)."""
    prev = set_fast_path(enabled)
    try:
        yield
    finally:
        set_fast_path(prev)


def _dispatch_mode_active() -> bool:
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode
    except ImportError:  # pragma: no cover - very old/new torch: stay on the reference ops
        return True
    return _get_current_dispatch_mode() is not None


def is_tracing() -> bool:
    """True while a graph is captured (``torch.jit.trace`` or ONNX export): shapes are then fixed by the
    example inputs, so Python-side checks are skipped to keep them out of the graph."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def reference_ops_required() -> bool:
    """True while tracing / exporting to ONNX, under a dispatch mode (FlopCounterMode, FakeTensorMode), or
    when the fast path is switched off (:func:`set_fast_path`)."""
    return not _enabled or is_tracing() or _dispatch_mode_active()


def use_onednn(x: torch.Tensor) -> bool:
    """Eager CPU float32 inference (no autograd, not traced/exported/analysed) with oneDNN available."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and _plain_eager()
    )


def use_channels_last(x: torch.Tensor) -> bool:
    """CPU, not traced/exported/analysed/compiled (training included): a layer may run channels-last
    (NDHWC memory, same shapes), which changes no value, only oneDNN's speed."""
    return x.device.type == "cpu" and _plain_eager()


def _plain_eager() -> bool:
    """Not traced/exported/analysed, fast path on, and not under ``torch.compile``."""
    return not reference_ops_required() and not _compiling()


def _compiling() -> bool:
    """Under ``torch.compile`` (dynamo) the direct ``torch.mkldnn_convolution`` call cannot run on fake
    tensors; inductor picks oneDNN convolutions (and fuses the norms/activations) on its own."""
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False


def onednn_conv(
    conv: torch.nn.Conv3d, x: torch.Tensor, weight: torch.Tensor | None = None, with_bias: bool = True
) -> torch.Tensor:
    """``conv(x)`` through oneDNN directly (``torch.mkldnn_convolution``), with ``conv``'s padding, stride,
    dilation and groups; ``weight`` overrides ``conv.weight`` (e.g. an input-channel slice). PyTorch's CPU
    heuristic would send small batch-1 3D convs to im2col ``slow_conv3d``. Only when :func:`use_onednn`."""
    w = conv.weight if weight is None else weight
    b = conv.bias if with_bias else None
    return torch.mkldnn_convolution(x, w, b, conv.padding, conv.stride, conv.dilation, conv.groups)


def onednn_conv_cat(conv: torch.nn.Conv3d, parts: list[torch.Tensor]) -> torch.Tensor:
    """``conv(torch.cat(parts, dim=1))`` through oneDNN without building the concatenation: the sum of
    ``conv``'s weight slices along input channels applied to each part (bias once; exact up to float32
    summation order). Saves writing and re-reading the concatenated tensor. Only when :func:`use_onednn`."""
    y = None
    weights = conv.weight.split([t.shape[1] for t in parts], dim=1)
    for i, (t, w) in enumerate(zip(parts, weights, strict=True)):
        z = onednn_conv(conv, t, w.contiguous(), with_bias=i == 0)
        y = z if y is None else y.add_(z)
    assert y is not None, "onednn_conv_cat needs at least one part"
    return y


def use_fast_upsample(x: torch.Tensor) -> bool:
    """Eager CPU inference (no autograd; not traced/exported/analysed/compiled): ×2 trilinear upsampling may
    run as separable passes (:func:`emorph_deploy.models.layers.upsample.upsample2x_trilinear`)."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and _plain_eager()


def use_parallel_sampler(x: torch.Tensor) -> bool:
    """Eager CPU (not traced/exported/analysed/compiled): a batch-1 3D ``grid_sample`` may be spread over all
    threads (:func:`emorph_deploy.sampling.grid_sample_3d`, bit-identical to the plain call)."""
    return x.device.type == "cpu" and _plain_eager()
