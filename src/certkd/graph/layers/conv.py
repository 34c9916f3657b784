"""Conv2d with zero padding: any padding (incl. 'same'/'valid'), stride, dilation and groups.

The geometry (per-side padding, output size) is computed once here for every engine.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkd.graph.layers.base import Layer, Shape, detached, register, to_numpy
from certkd.graph.windows import Window, win_valid


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@register
class Conv2d(Layer):
    """Rule for ``nn.Conv2d``; subclasses (AvgPool2d) override :meth:`params` only."""

    module_types = (nn.Conv2d,)

    def check(self) -> None:
        if getattr(self.module, "padding_mode", "zeros") != "zeros":
            raise self.unsupported("any engine: only Conv2d with zero padding is supported")

    # geometry --------------------------------------------------------------------------------
    def params(self, channels: int, like: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """(weight (Cout, Cin/groups, kh, kw), bias (Cout,) or None), detached, like ``like``."""
        return detached(self.module.weight, like), detached(self.module.bias, like)

    def hyper(self, channels: int = 0):
        """(kernel, stride, dilation, groups, padding attribute) for ``channels`` input channels."""
        m = self.module
        return _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation), m.groups, m.padding

    def pads(self) -> Tuple[int, int, int, int]:
        """Zero padding (top, bottom, left, right); torch's 'same' puts the smaller half first."""
        k, _, d, _, padding = self.hyper()
        if isinstance(padding, str):
            if padding == "valid":
                return 0, 0, 0, 0
            th, tw = d[0] * (k[0] - 1), d[1] * (k[1] - 1)
            return th // 2, th - th // 2, tw // 2, tw - tw // 2
        ph, pw = _pair(padding)
        return ph, ph, pw, pw

    def out_shape(self, in_shape: Shape) -> Shape:
        k, s, d, _, _ = self.hyper()
        pt, pb, pl, pr = self.pads()
        h = (in_shape[1] + pt + pb - d[0] * (k[0] - 1) - 1) // s[0] + 1
        w = (in_shape[2] + pl + pr - d[1] * (k[1] - 1) - 1) // s[1] + 1
        cout = self.params(in_shape[0], torch.empty(0))[0].shape[0]
        return (cout, h, w)

    def _conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        _, s, d, g, _ = self.hyper(x.shape[1])
        pt, pb, pl, pr = self.pads()
        if pt == pb and pl == pr:
            return F.conv2d(x, weight, bias, s, (pt, pl), d, g)
        return F.conv2d(F.pad(x, (pl, pr, pt, pb)), weight, bias, s, 0, d, g)

    # rules -----------------------------------------------------------------------------------
    def interval(self, c: Tensor, r: Tensor, p: Optional[Tensor] = None):
        w, b = self.params(c.shape[1], c)
        if self.module is not None and type(self) is Conv2d:  # keep autograd to the live weights
            w, b = self.module.weight, self.module.bias
        return self._conv(c, w, b), self._conv(r, w.abs(), None), self.point(p)

    def backward(self, A: Tensor, bias: Tensor, in_shapes: Sequence[Shape], out_shape: Shape):
        in_shape = tuple(in_shapes[0])
        w, b = self.params(in_shape[0], A)
        k, s, d, g, _ = self.hyper(in_shape[0])
        pt, pb, pl, pr = self.pads()
        n, rows = A.shape[:2]
        if b is not None:
            bias = bias + A.sum(dim=(3, 4)) @ b
        symmetric = pt == pb and pl == pr
        # symmetric padding: the transposed convolution crops it itself and returns a contiguous
        # (.., *in_shape) tensor; otherwise compute the padded input and crop (a copy)
        crop = (pt, pl) if symmetric else (0, 0)
        size = (in_shape[1], in_shape[2]) if symmetric else (in_shape[1] + pt + pb, in_shape[2] + pl + pr)
        out_pad = tuple(size[i] - ((out_shape[1 + i] - 1) * s[i] - 2 * crop[i] + d[i] * (k[i] - 1) + 1)
                        for i in range(2))
        A = F.conv_transpose2d(A.reshape(n * rows, *out_shape), w, None, s, crop, out_pad, g, d)
        if not symmetric:
            A = A[:, :, pt:pt + in_shape[1], pl:pl + in_shape[2]]
        return [A.reshape(n, rows, *in_shape)], bias

    def window(self, win: Window, in_shape: Shape, out_shape: Shape) -> Window:
        A, bias = win.A, win.bias
        n, p, g = A.shape[:3]
        w, b = self.params(in_shape[0], A)
        _, s, d, groups, _ = self.hyper(in_shape[0])
        pt, _, pl, _ = self.pads()
        if b is not None:
            bias = bias + A.sum((4, 5)) @ b
        A = F.conv_transpose2d(A.reshape(n * p * g, *A.shape[3:]), w, None, s, 0, 0, groups, d)
        A = A.reshape(n, p, g, *A.shape[1:])
        oy, ox = win.oy * s[0] - pt, win.ox * s[1] - pl
        h, wd = in_shape[1:]
        if (min(int(oy.min()), int(ox.min())) < 0 or int(oy.max()) + A.shape[-2] > h
                or int(ox.max()) + A.shape[-1] > wd):
            A = A * win_valid(oy, ox, A.shape[-2], A.shape[-1], h, wd, A.dtype)
        return Window(A, bias, oy, ox)

    def affine(self, in_shapes: Sequence[Shape], out_shape: Shape):
        """The sparse matrix of the convolution, by index arithmetic."""
        cin, hin, win = in_shapes[0]
        cout, hout, wout = out_shape
        weight, bias = self.params(cin, torch.empty(0, dtype=torch.float64))
        w = to_numpy(weight)
        _, (sh, sw), (dh, dw), groups, _ = self.hyper(cin)
        ph, _, pw, _ = self.pads()
        cin_g, cout_g = cin // groups, cout // groups
        kh, kw = w.shape[2:]
        co, ci, ki, kj, oh, ow = np.meshgrid(np.arange(cout), np.arange(cin_g), np.arange(kh), np.arange(kw),
                                             np.arange(hout), np.arange(wout), indexing="ij")
        ih, iw = oh * sh - ph + ki * dh, ow * sw - pw + kj * dw
        ok = (ih >= 0) & (ih < hin) & (iw >= 0) & (iw < win)
        co, ci, ki, kj, oh, ow, ih, iw = (a[ok] for a in (co, ci, ki, kj, oh, ow, ih, iw))
        rows = (co * hout + oh) * wout + ow
        cols = (((co // cout_g) * cin_g + ci) * hin + ih) * win + iw
        mat = sp.csr_matrix((w[co, ci, ki, kj], (rows, cols)), shape=(cout * hout * wout, cin * hin * win))
        mat.sum_duplicates()
        b = np.zeros(cout) if bias is None else to_numpy(bias)
        return [mat], np.repeat(b, hout * wout)
