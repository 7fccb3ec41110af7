"""The implicit form of SSAM (Mi et al., TPAMI 2025): a masked backward for the ascent pass.

In the ascent pass of implicit SSAM, every convolution and linear layer keeps its dense forward
and its dense weight gradient, but sends the gradient to its *input* through the masked weight:

```text
Y  = X W^T (+ b)                  forward: dense, unchanged
dW = dY^T X,  db = sum dY         dense, as usual
dX = dY (W ⊙ M)                   the only change: the masked weight
```

(written for a linear layer; a convolution does the same with its transposed convolution). The
perturbation itself is then plain dense SAM on these gradients. The sparsity lives in the dX
product, which is what N:M sparse matrix kernels can accelerate.

Which layers (``layers``): ``"conv"`` masks convolutions only, as the authors' ``--samconv``
(TPAMI release ``models/nm_conv.py``: their ResNets build every convolution as ``SAMConv``; the
classifier stays an ordinary ``nn.Linear``); ``"linear"`` masks Linear layers only (their
``--culinear``, for ViTs); ``"conv+linear"`` (the library default) masks both. A layer whose mask
is entirely False sends no input gradient at all (``dX = 0``), as in the authors' code: with a
structured (whole-tensor) mask the ascent gradient below such a layer flows only through skip
connections, so implicit SSAM differs from SAM. A layer whose weight has no mask keeps its
ordinary backward.

Kernels. On the CPU, and wherever no sparse kernel applies, dX is the dense product with
``W ⊙ M``. On a CUDA device, for fp16/bf16 linear layers, the product ``dY (W ⊙ M)`` contracts
over the output dimension, so a 2:4 kernel can serve it only if the mask is 2:4 along the
*output* dimension (then ``(W ⊙ M)^T`` is a valid ``torch.sparse.to_sparse_semi_structured``
operand and ``dX = F.linear(dY, (W ⊙ M)^T)``). A mask that is 2:4 along the input dimension (the
layout that accelerates the forward ``X W^T``) does not fit, and the dense product is used. The
sparse path is tried only when available and falls back to the dense product on any error.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_warned_sparse = False


def is_2to4_rows(m: Tensor) -> bool:
    """True when every group of 4 consecutive entries along the last dim keeps exactly 2 (and the
    shape suits the semi-structured kernels). Reads a bool back to the host: call it when a mask
    is set, not in a step."""
    if not m.is_cuda or m.dim() != 2 or m.shape[1] % 4 or m.shape[0] % 8 or m.shape[1] < 64:
        return False
    return bool((m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all())


def _masked_dx_linear(gy: Tensor, wm: Tensor, sparse_ok: bool) -> Tensor:
    """dX = dY (W ⊙ M) for a linear layer, dY of shape (..., out), wm of shape (out, in)."""
    global _warned_sparse
    if sparse_ok and gy.is_cuda and gy.dtype in (torch.float16, torch.bfloat16):
        try:
            from torch.sparse import to_sparse_semi_structured

            wt = to_sparse_semi_structured(wm.t().contiguous().to(gy.dtype))
            g2 = gy.reshape(-1, gy.shape[-1])
            return F.linear(g2, wt).reshape(*gy.shape[:-1], wm.shape[1])
        except Exception as exc:  # pragma: no cover - depends on the GPU and the build
            if not _warned_sparse:
                warnings.warn(f"2:4 sparse dX kernel unavailable ({exc}); using the dense masked product", stacklevel=2)
                _warned_sparse = True
    return gy @ wm.to(gy.dtype)


class _ImplicitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor, sparse_ok: bool) -> Tensor:
        ctx.save_for_backward(x, weight, mask)
        ctx.has_bias = bias is not None
        ctx.sparse_ok = sparse_ok
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, w, m = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _masked_dx_linear(gy, w * m, ctx.sparse_ok).to(x.dtype)
        g2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = (g2.t() @ x.reshape(-1, x.shape[-1]).to(gy.dtype)).to(w.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0).to(w.dtype)
        return gx, gw, gb, None, None


class _ImplicitConv(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor, conv: tuple[Any, ...]
    ) -> Tensor:
        stride, padding, dilation, groups = conv
        ctx.save_for_backward(x, weight, mask)
        ctx.conv = conv
        ctx.has_bias = bias is not None
        fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
        return fn(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, w, m = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        gx = gw = gb = None
        dt = gy.dtype
        zeros = [0] * (w.dim() - 2)
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(
                gy,
                x.to(dt),
                (w * m).to(dt),
                None,
                stride,
                padding,
                dilation,
                False,
                zeros,
                groups,
                [True, False, False],
            )[0].to(x.dtype)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            _, gw, gb = torch.ops.aten.convolution_backward(
                gy,
                x.to(dt),
                w.to(dt),
                [w.shape[0]] if ctx.has_bias else None,
                stride,
                padding,
                dilation,
                False,
                zeros,
                groups,
                [False, bool(ctx.needs_input_grad[1]), bool(ctx.has_bias and ctx.needs_input_grad[2])],
            )
            gw = gw.to(w.dtype) if gw is not None and ctx.needs_input_grad[1] else None
            gb = gb.to(w.dtype) if gb is not None and ctx.has_bias else None
        return gx, gw, gb, None, None


def _implicit_forward(module: nn.Module, mask: Tensor, sparse_ok: bool) -> Any:
    if isinstance(module, nn.Linear):

        def forward(x: Tensor) -> Tensor:
            return _ImplicitLinear.apply(x, module.weight, module.bias, mask, sparse_ok)

        return forward
    conv = (module.stride, module.padding, module.dilation, module.groups)

    def conv_forward(x: Tensor) -> Tensor:
        return _ImplicitConv.apply(x, module.weight, module.bias, mask, conv)

    return conv_forward


IMPLICIT_LAYERS = ("conv+linear", "conv", "linear")


def check_implicit_layers(layers: str) -> str:
    """Validate the ``layers`` choice of the implicit form."""
    if layers not in IMPLICIT_LAYERS:
        raise ValueError(f"implicit layers must be one of {IMPLICIT_LAYERS}, got {layers!r}")
    return layers


def supports_implicit(module: nn.Module) -> bool:
    """Layers whose ascent backward the implicit form masks: Linear and Conv1d/2d/3d with zero
    padding and a numeric padding (others keep their ordinary backward)."""
    if type(module) is nn.Linear:
        return True
    if type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return False


@contextmanager
def masked_input_gradients(
    model: nn.Module,
    masks: Mapping[Tensor, Tensor],
    sparse_ok: Mapping[Tensor, bool] | None = None,
    *,
    layers: str = "conv+linear",
) -> Iterator[int]:
    """Within this context, every supported layer of ``model`` of the kind ``layers`` names
    (``"conv+linear"``, ``"conv"`` or ``"linear"``) whose weight has a mask in ``masks`` computes
    ``dX`` through ``W ⊙ M`` (forward and ``dW`` stay dense; an all-False mask gives ``dX = 0``).
    ``sparse_ok`` marks weights whose transposed mask is 2:4 (see ``is_2to4_rows``). Yields
    the number of layers switched. The original forwards are restored on exit, also on error."""
    check_implicit_layers(layers)
    kinds = (
        (nn.Linear,)
        if layers == "linear"
        else ((nn.Conv1d, nn.Conv2d, nn.Conv3d) if layers == "conv" else (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    )
    patched: list[nn.Module] = []
    try:
        for module in model.modules():
            w = getattr(module, "weight", None)
            if isinstance(w, Tensor) and w in masks and supports_implicit(module) and isinstance(module, kinds):
                m = masks[w]
                ok = isinstance(module, nn.Linear) and bool(sparse_ok and sparse_ok.get(w, False))
                module.forward = _implicit_forward(module, m, ok)  # type: ignore[method-assign]  # instance attribute shadows forward until restored
                patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward  # back to the class's forward
