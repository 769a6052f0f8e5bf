"""Regenerate onnxfold's sample models, their oracles and manifest.json.

Run from the repository root:

    .venv-export/bin/python sample_models/make_samples.py

Every block below is a small train-time nn.Module written from its paper's formulas.
Each block that can be re-parameterized has `reparameterize()`, which returns its
inference-time twin (the *oracle*), computed here in PyTorch with the standard fusion
math (in float64, cast to float32 once). The script checks block == oracle in PyTorch,
then exports each block in each of the VARIANTS and checks every file with
onnx.checker (full_check) and onnxruntime against PyTorch.

Everything is deterministic: each block seeds torch with a hash of its own name, so
adding a block never changes the weights of another.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
import warnings
import zlib
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
TS_OPSET = 17
ATOL = 1e-4
VARIANTS = {
    "ts_eval": "TorchScript exporter, TrainingMode.EVAL, constant folding, opset 17 "
               "(it folds Conv->BN itself, nothing else).",
    "ts_preserve": "TorchScript exporter, TrainingMode.PRESERVE on the eval model, opset 17: "
                   "every BatchNormalization kept (training_mode=0).",
    "dynamo": "torch.export exporter (dynamo=True) with its default onnxscript optimizer, "
              "opset 20 (it folds Conv/ConvTranspose/Gemm->BN itself).",
    "dynamo_noopt": "torch.export exporter (dynamo=True, optimize=False), opset 20: every "
                    "BatchNormalization kept; a Conv without bias gets a zero bias computed by "
                    "Shape->Expand->CastLike->Expand.",
    "oracle": "The re-parameterized twin, built in PyTorch and exported like ts_eval.",
}


# --------------------------------------------------------------------------------------
# Fusion math: pure functions on tensors, in float64.
# --------------------------------------------------------------------------------------


def randomize_bn(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Give a BatchNorm non-trivial statistics and affine parameters."""
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c) * 0.5)
        bn.running_var.copy_(torch.rand(c) * 1.5 + 0.5)  # in [0.5, 2]
        bn.weight.copy_(torch.rand(c) + 0.5)  # in [0.5, 1.5]
        bn.bias.copy_(torch.randn(c) * 0.3)


def bn_scale_shift(bn):
    """BatchNorm in eval mode is y = s*x + t, per channel."""
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    t = bn.bias.double() - bn.running_mean.double() * s
    return s, t


def bias_or_zeros(bias, n):
    return torch.zeros(n, dtype=torch.float64) if bias is None else bias.double()


def fuse_conv_bn(conv, bn):
    """Conv -> BN: W' = W * s[o], b' = s * (b - mu) + beta."""
    s, t = bn_scale_shift(bn)
    w = conv.weight.double()
    b = bias_or_zeros(conv.bias, w.shape[0])
    return w * s.reshape(-1, *[1] * (w.dim() - 1)), s * b + t


def fuse_bn_conv(bn, conv):
    """BN -> Conv (exact only without padding): W'[o,i] = W[o,i] s[i], b' = b + sum W t."""
    assert conv.groups == 1
    s, t = bn_scale_shift(bn)
    w = conv.weight.double()
    b = bias_or_zeros(conv.bias, w.shape[0])
    return w * s.reshape(1, -1, 1, 1), b + (w.sum(dim=(2, 3)) @ t)


def fuse_linear_bn(linear, bn):
    s, t = bn_scale_shift(bn)
    return linear.weight.double() * s[:, None], s * bias_or_zeros(linear.bias, len(s)) + t


def fuse_convtranspose_bn(deconv, bn):
    """ConvTranspose weight is [I, O/g, k, k]: scale axis 1, group by group."""
    s, t = bn_scale_shift(bn)
    w = deconv.weight.double()
    g = deconv.groups
    i, o_g = w.shape[:2]
    ws = w.reshape(g, i // g, o_g, *w.shape[2:]) * s.reshape(g, 1, o_g, 1, 1)
    return ws.reshape(w.shape), s * bias_or_zeros(deconv.bias, len(s)) + t


def identity_kernel(channels, groups, k):
    """Kernel of the identity map: K[o, o mod (I/g), centre] = 1."""
    per_group = channels // groups
    w = torch.zeros(channels, per_group, k, k, dtype=torch.float64)
    for o in range(channels):
        w[o, o % per_group, k // 2, k // 2] = 1.0
    return w


def fuse_bn_as_conv(bn, groups, k):
    """A branch BN(x) is the identity kernel times s, bias t."""
    s, t = bn_scale_shift(bn)
    return identity_kernel(bn.num_features, groups, k) * s.reshape(-1, 1, 1, 1), t


def avgpool_kernel(channels, k):
    """AvgPool(k) with count_include_pad as a dense conv: 1/k^2 on the channel diagonal."""
    w = torch.zeros(channels, channels, k, k, dtype=torch.float64)
    for c in range(channels):
        w[c, c] = 1.0 / (k * k)
    return w


def embed_kernel(w, k, branch_pads, target_pads):
    """Place a small kernel inside a k x k one so each output pixel sees the same inputs."""
    top = target_pads[0] - branch_pads[0]
    left = target_pads[1] - branch_pads[1]
    bottom = k - w.shape[2] - top
    right = k - w.shape[3] - left
    assert min(top, left, bottom, right) >= 0
    return F.pad(w, [left, right, top, bottom])


def compose_1x1_then_kxk(a_w, a_b, b_w, b_b):
    """1x1 (A, a) then k x k (B, b), the k x k without padding: W = B.A per tap, b = b + B.a."""
    w = torch.einsum("omhw,mi->oihw", b_w, a_w[:, :, 0, 0])
    return w, b_b + torch.einsum("omhw,m->o", b_w, a_b)


def compose_kxk_then_1x1(a_w, a_b, b_w, b_b):
    """k x k (A, a) then 1x1 (B, b): W = B.A per tap, b = B.a + b."""
    w = torch.einsum("om,mihw->oihw", b_w[:, :, 0, 0], a_w)
    return w, b_w[:, :, 0, 0] @ a_b + b_b


def conv_from(weight, bias, stride=1, padding=0, groups=1, dims=2):
    """A fresh Conv module holding the given (float64) weight and bias as float32."""
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    out_c, in_per_group = weight.shape[:2]
    conv = conv_cls(in_per_group * groups, out_c, tuple(weight.shape[2:]), stride, padding,
                    groups=groups, bias=True)
    with torch.no_grad():
        conv.weight.copy_(weight.float())
        conv.bias.copy_(bias.float())
    return conv


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


class ConvBN(nn.Module):
    """Conv (any of 1d/2d/3d) followed by BatchNorm."""

    def __init__(self, cin, cout, k, stride=1, padding=0, groups=1, bias=False, dims=2):
        super().__init__()
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        bn_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.dims = dims
        self.conv = conv_cls(cin, cout, k, stride, padding, groups=groups, bias=bias)
        self.bn = bn_cls(cout)

    def forward(self, x):
        return self.bn(self.conv(x))

    def fused(self):
        return fuse_conv_bn(self.conv, self.bn)

    def reparameterize(self):
        c = self.conv
        return conv_from(*self.fused(), c.stride, c.padding, c.groups, self.dims)


# ---- Foundation: BN folding ----------------------------------------------------------


class ConvBNReLUStack(nn.Module):
    """Three Conv-BN-ReLU: plain without bias, grouped (g=2), depthwise."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([
            ConvBN(8, 16, 3, padding=1, bias=False),
            ConvBN(16, 16, 3, padding=1, groups=2, bias=True),
            ConvBN(16, 16, 3, padding=1, groups=16, bias=True),
        ])

    def forward(self, x):
        for layer in self.layers:
            x = F.relu(layer(x))
        return x

    def reparameterize(self):
        mods = []
        for layer in self.layers:
            mods += [layer.reparameterize(), nn.ReLU()]
        return nn.Sequential(*mods)


class LinearBN1d(nn.Module):
    """Linear -> BatchNorm1d on a 2-D input [N, F]."""

    def __init__(self, fin=16, fout=12):
        super().__init__()
        self.linear = nn.Linear(fin, fout)
        self.bn = nn.BatchNorm1d(fout)

    def forward(self, x):
        return self.bn(self.linear(x))

    def reparameterize(self):
        w, b = fuse_linear_bn(self.linear, self.bn)
        out = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            out.weight.copy_(w.float())
            out.bias.copy_(b.float())
        return out


class Linear3dBN1d(LinearBN1d):
    """Linear on [N, L, F], then BatchNorm1d over the features of the flattened tokens."""

    def forward(self, x):
        y = self.linear(x)
        n, l, f = y.shape
        return self.bn(y.reshape(-1, f)).reshape(n, l, f)


class ConvTransposeBN(nn.Module):
    """ConvTranspose2d (groups 1, stride 2) -> BN -> ConvTranspose2d (groups 2, stride 2) -> BN."""

    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.up2(self.bn1(self.up1(x))))

    def reparameterize(self):
        mods = []
        for up, bn in ((self.up1, self.bn1), (self.up2, self.bn2)):
            w, b = fuse_convtranspose_bn(up, bn)
            new = nn.ConvTranspose2d(up.in_channels, up.out_channels, up.kernel_size, up.stride,
                                     up.padding, up.output_padding, groups=up.groups, bias=True)
            with torch.no_grad():
                new.weight.copy_(w.float())
                new.bias.copy_(b.float())
            mods.append(new)
        return nn.Sequential(*mods)


class BNConv(nn.Module):
    """BN -> Conv. Foldable only when the conv has no padding."""

    def __init__(self, cin, cout, k, padding):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=True)

    def forward(self, x):
        return self.conv(self.bn(x))

    def reparameterize(self):
        if self.conv.padding != (0, 0):
            return None  # a trap: padded zeros never see the BN shift
        return self.naive_fold()

    def naive_fold(self):
        """BN folded into the conv as if the conv had no padding."""
        return conv_from(*fuse_bn_conv(self.bn, self.conv), padding=self.conv.padding)


class ConvScale(nn.Module):
    """Conv -> x * scale(C,1,1) -> + shift(C,1,1)."""

    def __init__(self, cin=8, cout=16):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=True)
        self.scale = nn.Parameter(torch.rand(cout, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.randn(cout, 1, 1) * 0.3)

    def forward(self, x):
        return self.conv(x) * self.scale + self.shift

    def reparameterize(self):
        s = self.scale.double().flatten()
        w = self.conv.weight.double() * s.reshape(-1, 1, 1, 1)
        b = self.conv.bias.double() * s + self.shift.double().flatten()
        return conv_from(w, b, padding=1)


# ---- Re-parameterization blocks -------------------------------------------------------


class RepVGGBlock(nn.Module):
    """RepVGG: ReLU(BN(3x3 x) + BN(1x1 x) + BN(x)); the identity only when it fits."""

    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.dense = ConvBN(cin, cout, 3, stride, 1, groups)
        self.one = ConvBN(cin, cout, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.groups = groups

    def forward(self, x):
        y = self.dense(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return F.relu(y)

    def fused(self):
        w, b = self.dense.fused()
        w1, b1 = self.one.fused()
        w, b = w + embed_kernel(w1, 3, (0, 0), (1, 1)), b + b1
        if self.identity is not None:
            wi, bi = fuse_bn_as_conv(self.identity, self.groups, 3)
            w, b = w + wi, b + bi
        return w, b

    def reparameterize(self):
        conv = conv_from(*self.fused(), self.dense.conv.stride, 1, self.groups)
        return nn.Sequential(conv, nn.ReLU())


class ACBlock(nn.Module):
    """ACNet asymmetric convolution block: BN(kxk x) + BN(1xk x) + BN(kx1 x)."""

    def __init__(self, c, k):
        super().__init__()
        p = k // 2
        self.k = k
        self.square = ConvBN(c, c, (k, k), padding=(p, p))
        self.hor = ConvBN(c, c, (1, k), padding=(0, p))
        self.ver = ConvBN(c, c, (k, 1), padding=(p, 0))

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)

    def reparameterize(self):
        k, p = self.k, self.k // 2
        w, b = self.square.fused()
        for branch in (self.hor, self.ver):
            wb, bb = branch.fused()
            w, b = w + embed_kernel(wb, k, branch.conv.padding, (p, p)), b + bb
        return conv_from(w, b, padding=p)


class DBB(nn.Module):
    """Diverse Branch Block, branches as in the DBB paper:

    (a) kxk-BN, (b) 1x1-BN, (c) 1x1-BN-AvgPool(k)-BN, (d) 1x1-BN-kxk-BN.

    exact=False: plain zero padding on the AvgPool and the kxk of (c) and (d), as a
    naive implementation writes it. Then (c) and (d) are traps: the padded zeros never
    see the shift of the BN behind the 1x1.
    exact=True: the padding sits on the 1x1 convs instead (AvgPool and kxk unpadded).
    The border of the 1x1-BN output is then the BN shift, which is exactly what the DBB
    paper's BNAndPadLayer does, so the whole block folds into one kxk conv.
    """

    def __init__(self, c=8, k=3, exact=False):
        super().__init__()
        p = k // 2
        self.k, self.exact = k, exact
        pad_1x1, pad_kxk = (p, 0) if exact else (0, p)
        self.kxk = ConvBN(c, c, k, padding=p)
        self.one = ConvBN(c, c, 1)
        self.avg_1x1 = ConvBN(c, c, 1, padding=pad_1x1)
        self.avg = nn.AvgPool2d(k, stride=1, padding=pad_kxk)  # count_include_pad=True
        self.avg_bn = nn.BatchNorm2d(c)
        self.seq_1x1 = ConvBN(c, c, 1, padding=pad_1x1)
        self.seq_kxk = ConvBN(c, c, k, padding=pad_kxk)

    def forward(self, x):
        a = self.kxk(x)
        b = self.one(x)
        c = self.avg_bn(self.avg(self.avg_1x1(x)))
        d = self.seq_kxk(self.seq_1x1(x))
        return a + b + c + d

    def _avg_as_conv(self):
        s, t = bn_scale_shift(self.avg_bn)
        return avgpool_kernel(self.avg_bn.num_features, self.k) * s.reshape(-1, 1, 1, 1), t

    def _single_conv(self):
        k, p = self.k, self.k // 2
        w, b = self.kxk.fused()
        w1, b1 = self.one.fused()
        wc, bc = compose_1x1_then_kxk(*self.avg_1x1.fused(), *self._avg_as_conv())
        wd, bd = compose_1x1_then_kxk(*self.seq_1x1.fused(), *self.seq_kxk.fused())
        w = w + embed_kernel(w1, k, (0, 0), (p, p)) + wc + wd
        return conv_from(w, b + b1 + bc + bd, padding=p)

    def reparameterize(self):
        if self.exact:
            return self._single_conv()
        p = self.k // 2
        w, b = self.kxk.fused()
        w1, b1 = self.one.fused()
        main = conv_from(w + embed_kernel(w1, self.k, (0, 0), (p, p)), b + b1, padding=p)
        return DBBPartial(main,
                          self.avg_1x1.reparameterize(),
                          conv_from(*self._avg_as_conv(), padding=p),
                          self.seq_1x1.reparameterize(),
                          self.seq_kxk.reparameterize())

    def naive_fold(self):
        """The full fold, blind to padding: wrong when exact=False (the check that the trap bites)."""
        return self._single_conv()


class DBBPartial(nn.Module):
    """The most of a zero-padded DBB that folds exactly: one kxk for (a)+(b); (c) and (d)
    each stay a 1x1 conv with bias followed by a padded kxk conv (the trap)."""

    def __init__(self, main, c1, c2, d1, d2):
        super().__init__()
        self.main, self.c1, self.c2, self.d1, self.d2 = main, c1, c2, d1, d2

    def forward(self, x):
        return self.main(x) + self.c2(self.c1(x)) + self.d2(self.d1(x))


class Branches(nn.Module):
    """The sum of its branches, each applied to the input (an oracle's form)."""

    def __init__(self, *branches):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return sum(branch(x) for branch in self.branches)


class DBBOrdered(DBB):
    """DBB summed as its reference forward does, ((kxk + 1x1) + avg) + seq, with the avg
    branch padded naively (a trap: it cannot merge) and the seq branch in BNAndPad form
    (it can): the kxk and seq convs merge only if the sum is regrouped."""

    def __init__(self, c=8, k=3):
        super().__init__(c, k, exact=False)
        p = k // 2
        self.seq_1x1 = ConvBN(c, c, 1, padding=p)
        self.seq_kxk = ConvBN(c, c, k, padding=0)

    def forward(self, x):
        return ((self.kxk(x) + self.one(x)) + self.avg_bn(self.avg(self.avg_1x1(x)))) + \
            self.seq_kxk(self.seq_1x1(x))

    def reparameterize(self):
        k, p = self.k, self.k // 2
        w, b = self.kxk.fused()
        w1, b1 = self.one.fused()
        wd, bd = compose_1x1_then_kxk(*self.seq_1x1.fused(), *self.seq_kxk.fused())
        main = conv_from(w + embed_kernel(w1, k, (0, 0), (p, p)) + wd, b + b1 + bd, padding=p)
        avg = nn.Sequential(self.avg_1x1.reparameterize(), conv_from(*self._avg_as_conv(), padding=p))
        return Branches(main, avg)


class SumWithNonlinearBranch(nn.Module):
    """sum() over branches, a ReLU branch between the convs: 3x3-BN + ReLU(x) + 1x1-BN +
    1x3-BN. Python's sum starts from 0 and adds left to right."""

    def __init__(self, c=8):
        super().__init__()
        self.kxk = ConvBN(c, c, 3, padding=1)
        self.one = ConvBN(c, c, 1)
        self.row = ConvBN(c, c, (1, 3), padding=(0, 1))

    def forward(self, x):
        return sum([self.kxk(x), F.relu(x), self.one(x), self.row(x)])

    def reparameterize(self):
        w, b = self.kxk.fused()
        w1, b1 = self.one.fused()
        wr, br = self.row.fused()
        w = w + embed_kernel(w1, 3, (0, 0), (1, 1)) + embed_kernel(wr, 3, (0, 1), (1, 1))
        return Branches(conv_from(w, b + b1 + br, padding=1), nn.ReLU())


class StackSum(nn.Module):
    """torch.stack([3x3-BN, 1x1-BN, 1x3-BN]).sum(0): the exporters write Unsqueeze,
    Concat and ReduceSum, not Sum."""

    def __init__(self, c=8):
        super().__init__()
        self.kxk = ConvBN(c, c, 3, padding=1)
        self.one = ConvBN(c, c, 1)
        self.row = ConvBN(c, c, (1, 3), padding=(0, 1))

    def forward(self, x):
        return torch.stack([self.kxk(x), self.one(x), self.row(x)]).sum(0)

    def reparameterize(self):
        w, b = self.kxk.fused()
        w1, b1 = self.one.fused()
        wr, br = self.row.fused()
        w = w + embed_kernel(w1, 3, (0, 0), (1, 1)) + embed_kernel(wr, 3, (0, 1), (1, 1))
        return conv_from(w, b + b1 + br, padding=1)


class DistillationHeads(nn.Module):
    """DeiT's inference head: (head(x) + head_dist(x)) / 2, two Linears on one input."""

    def __init__(self, fin=16, classes=10):
        super().__init__()
        self.head = nn.Linear(fin, classes)
        self.head_dist = nn.Linear(fin, classes)

    def forward(self, x):
        return (self.head(x) + self.head_dist(x)) / 2

    def reparameterize(self):
        out = nn.Linear(self.head.in_features, self.head.out_features)
        with torch.no_grad():
            out.weight.copy_((self.head.weight.double() + self.head_dist.weight.double()) / 2)
            out.bias.copy_((self.head.bias.double() + self.head_dist.bias.double()) / 2)
        return out


class MobileOneBlock(nn.Module):
    """MobileOne: ReLU(sum of n kxk conv-BN + 1x1 conv-BN (k>1) + BN skip (if it fits))."""

    def __init__(self, cin, cout, k, stride=1, groups=1, branches=3):
        super().__init__()
        p = k // 2
        self.k, self.stride, self.groups = k, stride, groups
        self.convs = nn.ModuleList(
            ConvBN(cin, cout, k, stride, p, groups) for _ in range(branches))
        self.scale = ConvBN(cin, cout, 1, stride, 0, groups) if k > 1 else None
        self.skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.convs[0](x)  # not sum(...): its start value 0 would export as an extra Add
        for branch in self.convs[1:]:
            y = y + branch(x)
        if self.scale is not None:
            y = y + self.scale(x)
        if self.skip is not None:
            y = y + self.skip(x)
        return F.relu(y)

    def reparameterize(self):
        k, p = self.k, self.k // 2
        fused = [branch.fused() for branch in self.convs]
        w, b = sum(f[0] for f in fused), sum(f[1] for f in fused)
        if self.scale is not None:
            ws, bs = self.scale.fused()
            w, b = w + embed_kernel(ws, k, (0, 0), (p, p)), b + bs
        if self.skip is not None:
            wi, bi = fuse_bn_as_conv(self.skip, self.groups, k)
            w, b = w + wi, b + bi
        return nn.Sequential(conv_from(w, b, self.stride, p, self.groups), nn.ReLU())


class MultiKernel(nn.Module):
    """7x7 + 3x3 + BN skip. conv_first: Conv-BN branches (all fold);
    otherwise BN-Conv branches (BN before padded convs: traps)."""

    def __init__(self, c=8, conv_first=True):
        super().__init__()
        self.conv_first = conv_first
        if conv_first:
            self.b7 = ConvBN(c, c, 7, padding=3)
            self.b3 = ConvBN(c, c, 3, padding=1)
        else:
            self.b7 = BNConv(c, c, 7, padding=3)
            self.b3 = BNConv(c, c, 3, padding=1)
        self.skip = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.b7(x) + self.b3(x) + self.skip(x)

    def reparameterize(self):
        return self.naive_fold() if self.conv_first else None

    def naive_fold(self):
        """One 7x7 conv; exact for conv_first, wrong for BN-first (the traps)."""
        if self.conv_first:
            (w, b), (w3, b3) = self.b7.fused(), self.b3.fused()
        else:
            w, b = fuse_bn_conv(self.b7.bn, self.b7.conv)
            w3, b3 = fuse_bn_conv(self.b3.bn, self.b3.conv)
        wi, bi = fuse_bn_as_conv(self.skip, 1, 7)
        return conv_from(w + embed_kernel(w3, 7, (1, 1), (3, 3)) + wi, b + b3 + bi, padding=3)


class RepMixer(nn.Module):
    """FastViT RepMixer: x + layer_scale * (mixer(x) - norm(x)), mixer = dw 3x3 conv-BN."""

    def __init__(self, c=8, k=3):
        super().__init__()
        self.k = k
        self.mixer = ConvBN(c, c, k, padding=k // 2, groups=c)
        self.norm = nn.BatchNorm2d(c)
        self.layer_scale = nn.Parameter(torch.randn(c, 1, 1) * 0.5)

    def forward(self, x):
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))

    def reparameterize(self):
        c, k = self.norm.num_features, self.k
        ls = self.layer_scale.double().flatten()
        wm, bm = self.mixer.fused()
        wn, bn = fuse_bn_as_conv(self.norm, c, k)
        w = identity_kernel(c, c, k) + ls.reshape(-1, 1, 1, 1) * (wm - wn)
        return conv_from(w, ls * (bm - bn), padding=k // 2, groups=c)


class ResRep(nn.Module):
    """ResRep: kxk conv-BN followed by a 1x1 compactor without bias."""

    def __init__(self, cin=8, cmid=16, cout=12):
        super().__init__()
        self.conv = ConvBN(cin, cmid, 3, padding=1)
        self.compactor = nn.Conv2d(cmid, cout, 1, bias=False)

    def forward(self, x):
        return self.compactor(self.conv(x))

    def reparameterize(self):
        w, b = compose_kxk_then_1x1(*self.conv.fused(), self.compactor.weight.double(),
                                    torch.zeros(self.compactor.out_channels, dtype=torch.float64))
        return conv_from(w, b, padding=1)


# ---- Whole networks -------------------------------------------------------------------


class Net(nn.Module):
    """body -> global average pool -> Linear head."""

    def __init__(self, body, channels, classes=10):
        super().__init__()
        self.body = body
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.body(x)), 1))

    def reparameterize(self):
        body = nn.Sequential(*[block.reparameterize() for block in self.body])
        net = Net(body, self.head.in_features, self.head.out_features)
        net.head.load_state_dict(self.head.state_dict())
        return net


def repvgg_net():
    return Net(nn.Sequential(
        RepVGGBlock(3, 8, stride=2),  # stem
        RepVGGBlock(8, 16, stride=2),
        RepVGGBlock(16, 16),
        RepVGGBlock(16, 16, stride=2),
        RepVGGBlock(16, 16),
    ), 16)


def mobileone_net():
    return Net(nn.Sequential(
        MobileOneBlock(3, 8, 3, stride=2, branches=1),  # stem
        MobileOneBlock(8, 8, 3, groups=8, branches=2), MobileOneBlock(8, 16, 1, branches=2),
        MobileOneBlock(16, 16, 3, stride=2, groups=16, branches=2),
        MobileOneBlock(16, 16, 1, branches=2),
        MobileOneBlock(16, 16, 3, stride=2, groups=16, branches=2),
        MobileOneBlock(16, 16, 1, branches=2),
    ), 16)


# ---- BatchNorm around Linear layers (LeViT, efficient-ViT heads, hybrid nets) ----------


def linear_from(weight, bias):
    """A fresh Linear holding the given (float64) weight [out, in] and bias as float32."""
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight.float())
        linear.bias.copy_(bias.float())
    return linear


def fuse_bn_linear(bn, linear):
    """BN -> Linear (always exact, no padding): W' = W diag(s), b' = b + W t."""
    s, t = bn_scale_shift(bn)
    w = linear.weight.double()
    return w * s[None, :], bias_or_zeros(linear.bias, w.shape[0]) + w @ t


class LinearBN(nn.Module):
    """LeViT's Linear_BN: Linear (no bias in LeViT) on [B, N, C], BatchNorm1d on the
    flattened tokens, reshaped back."""

    def __init__(self, a, b, bias=False):
        super().__init__()
        self.c = nn.Linear(a, b, bias=bias)
        self.bn = nn.BatchNorm1d(b)

    def forward(self, x):
        x = self.c(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)

    def reparameterize(self):
        return linear_from(*fuse_linear_bn(self.c, self.bn))


class LeViTBlock(nn.Module):
    """LeViT attention (qkv and proj are Linear_BN) and MLP (Linear_BN with a bias, then
    without), each with a residual. The oracle replaces every Linear_BN by one Linear."""

    def __init__(self, dim=16, key_dim=4, heads=2, attn_ratio=2):
        super().__init__()
        self.heads, self.key_dim, self.d = heads, key_dim, attn_ratio * key_dim
        self.qkv = LinearBN(dim, heads * (2 * key_dim + self.d))
        self.proj = LinearBN(heads * self.d, dim)
        self.mlp_in = LinearBN(dim, 2 * dim, bias=True)
        self.mlp_out = LinearBN(2 * dim, dim)
        self.scale = key_dim ** -0.5

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, self.heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        x = x + self.proj(F.hardswish((attn @ v).transpose(1, 2).reshape(b, n, -1)))
        return x + self.mlp_out(F.hardswish(self.mlp_in(x)))

    def reparameterize(self):
        twin = copy.deepcopy(self)
        for name in ("qkv", "proj", "mlp_in", "mlp_out"):
            setattr(twin, name, getattr(self, name).reparameterize())
        return twin


class BNHead(nn.Module):
    """Efficient-ViT classifier head: conv stem -> global pool -> flatten -> BatchNorm1d ->
    Linear (LeViT's BN_Linear). The oracle folds the BN into the Linear's columns."""

    def __init__(self, c=16, classes=10):
        super().__init__()
        self.stem = ConvBN(3, c, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn = nn.BatchNorm1d(c)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.bn(torch.flatten(self.pool(F.relu(self.stem(x))), 1)))

    def reparameterize(self):
        return nn.Sequential(self.stem.reparameterize(), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(1), linear_from(*fuse_bn_linear(self.bn, self.head)))


class HybridBlock(nn.Module):
    """Hybrid conv/attention stage: residual dw conv-BN, then a pre-norm BatchNorm2d on
    the residual sum flattened to tokens for separate q, k, v Linears, attention, a
    projection added back; a BatchNorm2d -> spatial mean -> Linear head. The oracle folds
    each BN into every Linear that reads it."""

    def __init__(self, c=16, heads=2, classes=10):
        super().__init__()
        self.heads = heads
        self.mixer = ConvBN(c, c, 3, padding=1, groups=c)
        self.norm = nn.BatchNorm2d(c)
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.proj = nn.Linear(c, c)
        self.head_norm = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, classes)

    def attend(self, tokens):
        b, n, c = tokens.shape
        split = [f(tokens).reshape(b, n, self.heads, -1).transpose(1, 2)
                 for f in (self.q, self.k, self.v)]
        q, k, v = split
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))

    def forward(self, x):
        x = x + self.mixer(x)
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        x = x + self.attend(tokens).transpose(1, 2).reshape(b, c, h, w)
        return self.head(self.head_norm(x).mean((2, 3)))

    def reparameterize(self):
        twin = copy.deepcopy(self)
        twin.mixer = self.mixer.reparameterize()
        twin.norm, twin.head_norm = nn.Identity(), nn.Identity()
        for name in ("q", "k", "v"):
            setattr(twin, name, linear_from(*fuse_bn_linear(self.norm, getattr(self, name))))
        twin.head = linear_from(*fuse_bn_linear(self.head_norm, self.head))
        return twin


# --------------------------------------------------------------------------------------
# The catalogue: block name -> (constructor, input shape, notes, traps or None)
# --------------------------------------------------------------------------------------

BLOCKS = {
    "conv_bn_relu": (ConvBNReLUStack, [1, 8, 16, 16],
                     "3x Conv2d-BN-ReLU: 3x3 bias=False; 3x3 groups=2; 3x3 depthwise (groups=16).",
                     None),
    "conv1d_bn": (lambda: ConvBN(8, 16, 3, padding=1, bias=True, dims=1), [1, 8, 32],
                  "Conv1d(8->16, k3, pad 1, bias) -> BatchNorm1d.", None),
    "conv3d_bn": (lambda: ConvBN(4, 8, 3, padding=1, bias=True, dims=3), [1, 4, 8, 8, 8],
                  "Conv3d(4->8, k3, pad 1, bias) -> BatchNorm3d.", None),
    "linear_bn1d": (LinearBN1d, [4, 16], "Linear(16->12) -> BatchNorm1d on a 2-D input [N, F].",
                    None),
    "linear3d_bn1d": (Linear3dBN1d, [2, 5, 16],
                      "Linear(16->12) on [N, L, F], then bn(y.reshape(-1, F)).reshape(N, L, F).",
                      None),
    "convtranspose_bn": (ConvTransposeBN, [1, 8, 8, 8],
                         "ConvTranspose2d(k3, s2, groups 1, bias) -> BN -> "
                         "ConvTranspose2d(k4, s2, groups 2, no bias) -> BN.", None),
    "bn_conv_nopad": (lambda: BNConv(8, 16, 1, padding=0), [1, 8, 16, 16],
                      "BN -> Conv 1x1 (no padding): the BN folds into the conv exactly.", None),
    "bn_conv_pad": (lambda: BNConv(8, 16, 3, padding=1), [1, 8, 16, 16],
                    "BN -> Conv 3x3 pad 1: only the scale half of the BN could fold exactly.",
                    "BN before padded 3x3 conv: the BN shift must not be folded into the conv "
                    "(padded zeros never receive it)."),
    "conv_scale": (ConvScale, [1, 8, 16, 16],
                   "Conv 3x3 -> Mul by a (C,1,1) parameter -> Add a (C,1,1) parameter.", None),
    "repvgg_s1": (lambda: RepVGGBlock(8, 8), [1, 8, 16, 16],
                  "RepVGG block, stride 1: 3x3-BN + 1x1-BN + BN identity, then ReLU.", None),
    "repvgg_s2": (lambda: RepVGGBlock(8, 16, stride=2), [1, 8, 16, 16],
                  "RepVGG block, stride 2, 8->16: 3x3-BN + 1x1-BN (no identity), then ReLU.",
                  None),
    "repvgg_group": (lambda: RepVGGBlock(8, 8, groups=2), [1, 8, 16, 16],
                     "RepVGG block, groups=2, stride 1: 3x3-BN + 1x1-BN + BN identity, ReLU.",
                     None),
    "acnet3": (lambda: ACBlock(8, 3), [1, 8, 16, 16],
               "ACNet block k=3: 3x3-BN + 1x3-BN (pad 0,1) + 3x1-BN (pad 1,0).", None),
    "acnet5": (lambda: ACBlock(8, 5), [1, 8, 16, 16],
               "ACNet block k=5: 5x5-BN + 1x5-BN (pad 0,2) + 5x1-BN (pad 2,0).", None),
    "dbb": (lambda: DBB(8, 3, exact=False), [1, 8, 16, 16],
            "Diverse Branch Block k=3, zero padding as written naively: (a) 3x3-BN, (b) 1x1-BN, "
            "(c) 1x1-BN-AvgPool(3, s1, pad 1, count_include_pad)-BN, (d) 1x1-BN-3x3(pad 1)-BN. "
            "The oracle is PARTIAL: (a)+(b) merged into one 3x3; (c) and (d) each a 1x1 conv "
            "with bias followed by a padded 3x3 conv (AvgPool+BN became a 3x3 conv).",
            "Branches (c) and (d): a 1x1 conv whose BN gives it a bias, followed by a padded "
            "AvgPool / padded 3x3 conv; the padded zeros never see that bias, so neither "
            "branch can merge into the main 3x3."),
    "dbb_exact": (lambda: DBB(8, 3, exact=True), [1, 8, 16, 16],
                  "Diverse Branch Block k=3 with the DBB paper's BNAndPad semantics in standard "
                  "ops: the padding sits on the 1x1 convs of (c) and (d) (Conv 1x1 pad 1), the "
                  "AvgPool and the 3x3 of (d) are unpadded. Folds exactly into one 3x3 conv.",
                  None),
    "mobileone_dw": (lambda: MobileOneBlock(8, 8, 3, groups=8), [1, 8, 16, 16],
                     "MobileOne depthwise block: 3x dw 3x3-BN + dw 1x1-BN scale + BN skip, ReLU.",
                     None),
    "mobileone_pw": (lambda: MobileOneBlock(8, 8, 1), [1, 8, 16, 16],
                     "MobileOne pointwise block: 3x 1x1-BN + BN skip, ReLU.", None),
    "multikernel_convbn": (lambda: MultiKernel(8, conv_first=True), [1, 8, 16, 16],
                           "7x7(pad 3)-BN + 3x3(pad 1)-BN + BN skip.", None),
    "multikernel_bnconv": (lambda: MultiKernel(8, conv_first=False), [1, 8, 16, 16],
                           "BN-7x7(pad 3) + BN-3x3(pad 1) + BN skip (BN first on the conv "
                           "branches). No oracle: it has no exact single-conv form.",
                           "BN before padded 7x7 conv and BN before padded 3x3 conv: the BN "
                           "shifts must stay; so the three branches cannot merge into one conv."),
    "repmixer": (RepMixer, [1, 8, 16, 16],
                 "FastViT RepMixer: x + layer_scale * (mixer(x) - norm(x)), mixer = dw 3x3-BN, "
                 "norm = BN, layer_scale (C,1,1).", None),
    "resrep": (ResRep, [1, 8, 16, 16],
               "ResRep: 3x3 conv-BN (8->16) -> 1x1 compactor (16->12, no bias).", None),
    "repvgg_net": (repvgg_net, [1, 3, 32, 32],
                   "Small RepVGG network: stem (3->8, s2) + 4 RepVGG blocks (s2, s1, s2, s1), "
                   "global average pool, Linear(16->10). The demo model.", None),
    "mobileone_net": (mobileone_net, [1, 3, 32, 32],
                      "Small MobileOne network: stem (3->8, s2, one 3x3 branch + 1x1 scale) + 3 "
                      "dw/pw block pairs (dw stride s1, s2, s2; 2 conv branches each; BN skip "
                      "where shapes allow), global average pool, Linear(16->10).", None),
    "levit_block": (LeViTBlock, [2, 8, 16],
                    "LeViT block: attention with Linear_BN qkv and proj (Linear without bias -> "
                    "flatten(0, 1) -> BatchNorm1d -> reshape back), Hardswish, MLP of Linear_BN "
                    "(the first with a bias), residual Adds.", None),
    "bn_head": (BNHead, [1, 3, 16, 16],
                "Efficient-ViT head: conv-BN-ReLU stem, AdaptiveAvgPool2d(1), flatten, "
                "BatchNorm1d, Linear(16->10).", None),
    "hybrid_block": (HybridBlock, [1, 16, 4, 4],
                     "Hybrid stage: x + dw conv-BN(x); BatchNorm2d(x) flattened to tokens feeds "
                     "separate q, k, v Linears; attention; proj added back; BatchNorm2d -> "
                     "mean over H, W -> Linear head.", None),
    "dbb_ordered": (lambda: DBBOrdered(8, 3), [1, 8, 16, 16],
                    "Diverse Branch Block k=3 summed ((kxk + 1x1) + avg) + seq: (c) 1x1-BN-"
                    "AvgPool(3, s1, pad 1)-BN padded naively (a trap), (d) in BNAndPad form "
                    "(1x1 pad 1, 3x3 unpadded; it folds). The oracle: one 3x3 for (a)+(b)+(d), "
                    "plus (c) as a 1x1 conv with bias and a padded 3x3 conv; (d) merges only "
                    "once the sum is regrouped.",
                    "Branch (c): a 1x1 conv whose BN gives it a bias, followed by a padded "
                    "AvgPool; the padded zeros never see that bias, so it cannot merge."),
    "sum_relu_branch": (SumWithNonlinearBranch, [1, 8, 16, 16],
                        "sum([3x3-BN, ReLU(x), 1x1-BN, 1x3-BN]) with Python's sum: the convs "
                        "merge into one 3x3 across the ReLU branch once the sum is regrouped.",
                        None),
    "distill_heads": (DistillationHeads, [4, 16],
                      "DeiT distillation heads: (Linear(16->10)(x) + Linear(16->10)(x)) / 2 "
                      "on [N, F]; the oracle is one Linear with averaged weights and biases.",
                      None),
    "distill_heads_tokens": (DistillationHeads, [2, 5, 16],
                             "The distillation heads on [N, L, F] tokens (MatMul + bias Add "
                             "each); the oracle is one Linear with averaged weights.", None),
    "stack_sum": (StackSum, [1, 8, 16, 16],
                  "torch.stack([3x3-BN, 1x1-BN, 1x3-BN (pad 0,1)]).sum(0), exported as "
                  "Unsqueeze/Concat/ReduceSum; the oracle is one 3x3 conv.", None),
}


# --------------------------------------------------------------------------------------
# Export and checks
# --------------------------------------------------------------------------------------


def build(name):
    ctor, shape = BLOCKS[name][:2]
    torch.manual_seed(zlib.crc32(name.encode()))
    model = ctor()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_bn(m)
    model.eval()
    x = torch.randn(*shape)
    return model, x


def export_ts(model, x, path, training):
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=TS_OPSET,
                      training=training, do_constant_folding=True,
                      input_names=["x"], output_names=["y"])


def export_dynamo(model, x, path, optimize):
    program = torch.onnx.export(model, (x,), dynamo=True, optimize=optimize, verbose=False,
                                input_names=["x"], output_names=["y"])
    program.save(path)
    proto = onnx.load(path)  # loads external data too, if the exporter wrote any
    if os.path.exists(path + ".data"):
        os.remove(path + ".data")
    # The exporter records Python stack traces in node metadata; make their file paths
    # relative to the repository so the files do not depend on where it is checked out.
    root = os.path.dirname(HERE) + os.sep
    for node in proto.graph.node:
        for prop in node.metadata_props:
            prop.value = prop.value.replace(root, "")
    onnx.save(proto, path, save_as_external_data=False)


def op_counts(proto):
    return Counter(node.op_type for node in proto.graph.node)


def check_file(path, x, expected):
    """Loads, full checker, embedded weights, onnxruntime == PyTorch within ATOL."""
    proto = onnx.load(path, load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in proto.graph.initializer), f"{path}: external data"
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["x"], f"{path}: inputs"
    assert [o.name for o in proto.graph.output] == ["y"], f"{path}: outputs"
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    diff = float(np.max(np.abs(got - expected)))
    assert got.shape == expected.shape and diff < ATOL, f"{path}: max abs diff {diff}"
    return proto, diff


def main():
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # the dynamo exporter's "torchvision is not installed"
    torch.set_grad_enabled(False)
    entries, table, started = [], [], time.time()
    for old in os.listdir(HERE):  # no stale files from blocks that were renamed or removed
        if old.endswith(".onnx") or old.endswith(".onnx.data"):
            os.remove(os.path.join(HERE, old))
    for name, (_, shape, notes, traps) in BLOCKS.items():
        model, x = build(name)
        expected = model(x).numpy()
        oracle = model.reparameterize()
        if oracle is not None:
            oracle.eval()
            gap = float((oracle(x) - model(x)).abs().max())
            assert gap < ATOL, f"{name}: oracle differs from block by {gap}"
        if traps:  # make sure the trap bites: folding it anyway must change the output
            gap = float((model.naive_fold().eval()(x) - model(x)).abs().max())
            assert gap > 1e-2, f"{name}: the naive fold is exact ({gap}), so no trap"
        files = {}
        for variant in VARIANTS:
            path = os.path.join(HERE, f"{name}.{variant}.onnx")
            if variant == "ts_eval":
                export_ts(model, x, path, torch.onnx.TrainingMode.EVAL)
            elif variant == "ts_preserve":
                export_ts(model, x, path, torch.onnx.TrainingMode.PRESERVE)
            elif variant == "dynamo":
                export_dynamo(model, x, path, optimize=True)
            elif variant == "dynamo_noopt":
                export_dynamo(model, x, path, optimize=False)
            elif oracle is not None:
                export_ts(oracle, x, path, torch.onnx.TrainingMode.EVAL)
            else:
                continue
            proto, diff = check_file(path, x, expected)
            files[variant] = os.path.basename(path)
            counts = op_counts(proto)
            table.append((files[variant], len(proto.graph.node), dict(sorted(counts.items())),
                          os.path.getsize(path), diff))
        for variant, file in files.items():
            entry = {
                "file": file,
                "block": name,
                "variant": variant,
                "oracle": files.get("oracle") if variant != "oracle" else None,
                "input_shape": shape,
                "notes": f"{notes} [{variant}] {VARIANTS[variant]}",
            }
            if traps:
                entry["traps"] = traps
            entries.append(entry)
        print(f"{name}: {', '.join(files)}", flush=True)

    with open(os.path.join(HERE, "manifest.json"), "w") as fh:
        fh.write("[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]\n")
    total = sum(size for *_, size, _ in table)
    print(f"\n{len(table)} files, {total / 1024:.0f} KiB, {time.time() - started:.0f} s")
    if "--table" in sys.argv:
        for file, n, counts, size, diff in table:
            ops = ", ".join(f"{op} {k}" for op, k in counts.items())
            print(f"| {file} | {n} | {ops} | {size / 1024:.1f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
