"""How much: the algebra of every fold, as short pure functions on float64 arrays.

Nothing here knows about graphs. Every function takes arrays (a missing bias is None)
and returns new float64 arrays; inputs are never modified. The engine casts the results
to the model's element type once, after all arithmetic is done in float64. The one
exception, add_conv_branches, returns a sum of two stored weights in their own type,
which is that same cast, bit for bit.

Layouts (ONNX): Conv weight W[O, I/g, k...], ConvTranspose weight W[I, O/g, k...],
Gemm/MatMul weight B[K, N] (or [N, K] with transB).
"""

from __future__ import annotations

import numpy as np

TRANSFORMS: dict = {}
STORED_TYPE_ARGS: dict = {}  # transform name -> positions of the arguments given as stored


def transform(function=None, *, stored=()):
    """Register `function` under its own name, for rule files to call.

    `stored` names weights the engine passes in the model's own floating type (float32,
    float16) instead of converting them to float64 first, sparing a full-size copy of each
    large weight. Only for weights whose every use is exact in float64 anyway: multiplied
    by or added into a float64 array (numpy then computes in float64), copied into one,
    or only measured. Tests check such transforms give bit-identical results either way.
    """
    def register(function):
        TRANSFORMS[function.__name__] = function
        names = function.__code__.co_varnames[:function.__code__.co_argcount]
        STORED_TYPE_ARGS[function.__name__] = frozenset(i for i, name in enumerate(names) if name in stored)
        return function
    return register(function) if function is not None else register


# --- BatchNormalization as an affine map y = s*x + t -------------------------------------

def bn_scale_shift(gamma, beta, mean, var, epsilon):
    scale = gamma / np.sqrt(var + epsilon)
    return scale, beta - mean * scale


def _zeros_if_none(bias, length):
    return np.zeros(length) if bias is None else bias


def _per_channel(vector, axis, ndim):
    """Reshape a 1-D vector so it broadcasts along `axis` of an ndim-D array."""
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


@transform(stored=("W",))
def fold_bn_into_conv(W, B, gamma, beta, mean, var, epsilon):
    """Conv then BN: W' = W*s[o], b' = s*(b - mean) + beta."""
    scale, shift = bn_scale_shift(gamma, beta, mean, var, epsilon)
    bias = _zeros_if_none(B, W.shape[0])
    return W * _per_channel(scale, 0, W.ndim), scale * bias + shift


@transform(stored=("W",))
def fold_bn_into_conv_transpose(W, B, gamma, beta, mean, var, epsilon, group):
    """ConvTranspose then BN: output channel (group q, j) lives at W[q*I/g:(q+1)*I/g, j]."""
    scale, shift = bn_scale_shift(gamma, beta, mean, var, epsilon)
    in_channels, out_per_group = W.shape[0], W.shape[1]
    grouped = W.reshape(group, in_channels // group, out_per_group, *W.shape[2:])
    group_scale = scale.reshape(group, 1, out_per_group, *([1] * (W.ndim - 2)))
    bias = _zeros_if_none(B, scale.shape[0])
    return (grouped * group_scale).reshape(W.shape), scale * bias + shift


@transform(stored=("B",))
def fold_bn_into_gemm(B, C, gamma, beta, mean, var, epsilon, gemm_beta, trans_b):
    """Gemm then BN over the N features: scale the columns of op(B); C' = s*beta*C + t."""
    scale, shift = bn_scale_shift(gamma, beta, mean, var, epsilon)
    scaled = B * (scale[:, None] if trans_b else scale[None, :])
    if C is None:
        return scaled, shift
    return scaled, scale * gemm_beta * C + shift


@transform(stored=("W",))
def fold_bn_into_matmul(W, C, gamma, beta, mean, var, epsilon):
    """MatMul(x, W) (+ C) then BN over the last axis: W' = W*s[col], C' = s*C + t."""
    return fold_bn_into_gemm(W, C, gamma, beta, mean, var, epsilon, 1.0, False)


@transform(stored=("W",))
def fold_bn_into_next_conv(W, B, gamma, beta, mean, var, epsilon, group):
    """BN then an unpadded Conv: W'[o,i] = W[o,i]*s[i], b' = b + sum W[o,i]*t[i]."""
    scale, shift = bn_scale_shift(gamma, beta, mean, var, epsilon)
    out_channels, in_per_group = W.shape[0], W.shape[1]
    spatial = (1,) * (W.ndim - 2)
    # Input channel j of output channel o is global channel (o // (O/g)) * (I/g) + j.
    grouped = W.reshape(group, out_channels // group, in_per_group, *W.shape[2:])
    group_scale = scale.reshape(group, 1, in_per_group, *spatial)
    group_shift = shift.reshape(group, 1, in_per_group, *spatial)
    bias = _zeros_if_none(B, out_channels)
    added = (grouped * group_shift).reshape(out_channels, -1).sum(axis=1)
    return (grouped * group_scale).reshape(W.shape), bias + added


# --- per-channel constants after a Conv -------------------------------------------------

def channel_vector(constant, channels):
    """The per-output-channel values of a constant that broadcasts as [1, O, 1, ...]."""
    flat = np.asarray(constant).reshape(-1)
    return np.broadcast_to(flat, (channels,)) if flat.size == 1 else flat


@transform(stored=("W",))
def scale_conv(W, B, factor):
    """Conv then Mul(c): W*c[o], b*c[o]."""
    scale = channel_vector(factor, W.shape[0])
    bias = _zeros_if_none(B, W.shape[0])
    return W * _per_channel(scale, 0, W.ndim), bias * scale


@transform
def shift_conv(W, B, offset):
    """Conv then Add(c): b + c[o]."""
    return W, _zeros_if_none(B, W.shape[0]) + channel_vector(offset, W.shape[0])


@transform(stored=("W",))
def negate(W, B):
    """The branch -Conv(x): -W, -b."""
    return np.negative(W, dtype=np.float64), -_zeros_if_none(B, W.shape[0])


# --- branches expressed as kernels ---------------------------------------------------------

def _channel_diagonal(channels, in_per_group, spatial):
    """Kernel [C, C/g, *spatial] with 1 on the channel diagonal: K[o, o mod (C/g)] = 1."""
    kernel = np.zeros((channels, in_per_group, *spatial))
    rows = np.arange(channels)
    kernel[rows, rows % in_per_group] = 1.0
    return kernel


@transform(stored=("W",))
def identity_branch(W):
    """x itself, as an unpadded 1x1 kernel in the layout of the conv W it joins.

    Returns (kernel, bias, pads), like every branch-as-kernel transform.
    """
    rank = W.ndim - 2
    kernel = _channel_diagonal(W.shape[0], W.shape[1], (1,) * rank)
    return kernel, np.zeros(W.shape[0]), [0] * (2 * rank)


@transform(stored=("W",))
def bn_branch(W, gamma, beta, mean, var, epsilon):
    """BN(x) as an unpadded 1x1 kernel: the identity kernel times s, bias t."""
    scale, shift = bn_scale_shift(gamma, beta, mean, var, epsilon)
    kernel, _, pads = identity_branch(W)
    return kernel * _per_channel(scale, 0, kernel.ndim), shift, pads


@transform(stored=("W",))
def avgpool_branch(W, kernel_shape, pads):
    """AveragePool(x) (kernel k) as a conv: 1/prod(k) on the channel diagonal."""
    kernel = _channel_diagonal(W.shape[0], W.shape[1], tuple(kernel_shape))
    return kernel / float(np.prod(kernel_shape)), np.zeros(W.shape[0]), list(pads)


@transform
def avgpool_bn_as_conv(kernel_shape, gamma, beta, mean, var, epsilon):
    """AveragePool(k) then BN: a depthwise conv with s/prod(k) at every tap, bias t.

    Returns (W, b, group).
    """
    scale, shift = bn_scale_shift(gamma, beta, mean, var, epsilon)
    channels = scale.shape[0]
    kernel = np.ones((channels, 1, *kernel_shape)) / float(np.prod(kernel_shape))
    return kernel * _per_channel(scale, 0, kernel.ndim), shift, channels


@transform(stored=("W",))
def ungroup(W, group):
    """A grouped conv's weight as the block-diagonal weight of an ungrouped conv."""
    out_channels, in_per_group = W.shape[0], W.shape[1]
    out_per_group = out_channels // group
    dense = np.zeros((out_channels, in_per_group * group, *W.shape[2:]))
    for q in range(group):
        rows = slice(q * out_per_group, (q + 1) * out_per_group)
        dense[rows, q * in_per_group:(q + 1) * in_per_group] = W[rows]
    return dense


@transform
def pointwise_then_avgpool(W, kernel_shape):
    """1x1 conv then AveragePool(k): a k x k conv with W/prod(k) at every tap, dilation 1."""
    # A read-only view: the k^2-times larger weight is written out only once the fold is
    # taken (the cost guard refuses it alone, and reads sizes only).
    spread = np.broadcast_to(W / float(np.prod(kernel_shape)), (*W.shape[:2], *kernel_shape))
    return spread, [1] * len(kernel_shape)


# --- parallel branches summed ----------------------------------------------------------------

def branch_offsets(kernel, pads, target_kernel, target_pads, dilations):
    """Where a kernel sits inside a larger one so every output sees the same inputs.

    Returns per-axis offsets, or None when the alignment is not exact: the offset
    (P_begin - p_begin)/d must be whole and non-negative, the kernel must fit, and both
    convs must produce the same output length for every input length.
    """
    rank = len(kernel)
    offsets = []
    for axis in range(rank):
        d, k, K = dilations[axis], kernel[axis], target_kernel[axis]
        begin, end = pads[axis], pads[axis + rank]
        target_begin, target_end = target_pads[axis], target_pads[axis + rank]
        extent = begin + end - d * (k - 1)
        target_extent = target_begin + target_end - d * (K - 1)
        shift = target_begin - begin
        if extent != target_extent or shift < 0 or shift % d:
            return None
        if shift // d + k > K:
            return None
        offsets.append(shift // d)
    return offsets


def merged_geometry(kernels, pads_list):
    """The kernel and pads of the merged conv: per axis, those of the largest kernel."""
    rank = len(kernels[0])
    target_kernel, begin, end = [], [], []
    for axis in range(rank):
        widest = max(range(len(kernels)), key=lambda i: kernels[i][axis])
        target_kernel.append(kernels[widest][axis])
        begin.append(pads_list[widest][axis])
        end.append(pads_list[widest][axis + rank])
    return target_kernel, begin + end


def _window(offsets, kernel):
    """The index of a kernel placed at `offsets` inside a larger one."""
    return (slice(None), slice(None), *(slice(o, o + k) for o, k in zip(offsets, kernel)))


@transform(stored=("Wa", "Wb"))
def add_conv_branches(Wa, Ba, pads_a, Wb, Bb, pads_b, dilations):
    """Conv_a(x) + Conv_b(x) as one conv; the smaller kernel is embedded in the larger.

    Returns (W, b, pads). The caller has checked `branch_offsets` is not None.
    The kernel is summed in the weights' stored type where both have it: each element is
    the sum of at most two, and one addition in float16 or float32 rounds exactly as the
    float64 sum cast once (double rounding is innocuous when 53 >= 2p + 2). A float64
    kernel (a branch a transform made) is added in float64, over its window only.
    """
    kernels = [Wa.shape[2:], Wb.shape[2:]]
    target_kernel, target_pads = merged_geometry(kernels, [pads_a, pads_b])
    dtype = _sum_type(Wa, Wb)
    total = np.zeros((*Wa.shape[:2], *target_kernel), dtype)
    # The stored-type kernel first: the float64 one is then added to its values, exactly.
    for W, pads in sorted(((Wa, pads_a), (Wb, pads_b)), key=lambda branch: branch[0].dtype != dtype):
        window = _window(branch_offsets(W.shape[2:], pads, target_kernel, target_pads, dilations), W.shape[2:])
        if W.dtype == dtype:
            total[window] += W  # in place: no full-size temporary
        else:
            total[window] = total[window] + W  # in float64, rounded once on assignment
    bias = _zeros_if_none(Ba, Wa.shape[0]) + _zeros_if_none(Bb, Wb.shape[0])
    return total, bias, [int(p) for p in target_pads]


def _sum_type(*weights):
    """The one stored floating type among the weights (float64 ones aside), else float64."""
    narrow = {W.dtype for W in weights if W.dtype != np.float64}
    if len(narrow) == 1 and next(iter(narrow)) in (np.float16, np.float32):
        return narrow.pop()
    return np.dtype(np.float64)


# --- sequential convs and linear chains ----------------------------------------------------

@transform
def add_pads(first_pads, second_pads):
    """Pads of a 1x1 (stride 1) followed by a windowed op: the two paddings add up."""
    return [int(a) + int(b) for a, b in zip(first_pads, second_pads)]


@transform
def conv_then_pointwise(Wa, Ba, Wb, Bb):
    """K x K conv A then 1x1 conv B (groups 1): W = B.A per tap, b = B.b_A + b_B."""
    mix = Wb.reshape(Wb.shape[0], Wb.shape[1])
    weight = np.tensordot(mix, Wa, axes=([1], [0]))
    bias = mix @ _zeros_if_none(Ba, Wa.shape[0]) + _zeros_if_none(Bb, Wb.shape[0])
    return weight, bias


@transform
def pointwise_then_conv(Wa, Ba, Wb, Bb):
    """1x1 conv A then K x K conv B (groups 1): W = B.A per tap, b = b_B + sum B.b_A."""
    mix = Wa.reshape(Wa.shape[0], Wa.shape[1])
    weight = np.einsum("po...,oi->pi...", Wb, mix)
    spatial = tuple(range(2, Wb.ndim))
    carried = Wb.sum(axis=spatial) @ _zeros_if_none(Ba, Wa.shape[0])
    return weight, _zeros_if_none(Bb, Wb.shape[0]) + carried


@transform
def matmul_chain(A, a, B, b):
    """(xA + a)B + b = x(AB) + (aB + b)."""
    bias_a = np.broadcast_to(_zeros_if_none(a, A.shape[1]), (*np.shape(a)[:-1], A.shape[1]))
    bias = bias_a @ B + _zeros_if_none(b, B.shape[1])
    return A @ B, bias


@transform
def gemm_as_matmul(B, C, alpha, gemm_beta, trans_b):
    """Gemm(x, B, C) with transA=0 as x @ B' + C'."""
    weight = (B.T if trans_b else B) * alpha
    bias = None if C is None else np.asarray(C) * gemm_beta
    return weight, bias


# --- BatchNormalization before a Linear ----------------------------------------------------

@transform(stored=("B",))
def fold_bn_into_next_gemm(B, C, gamma, beta, mean, var, epsilon, alpha, gemm_beta, trans_b):
    """BN over the K input features, then Gemm: scale the rows of op(B) by s; the shift
    reaches the output as alpha*t.op(B), so C' = beta*C + alpha*t.op(B) (beta becomes 1).

    alpha*(A.diag(s) + t)op(B) + beta*C = alpha*A.(diag(s)op(B)) + (alpha*t.op(B) + beta*C).
    """
    scale, shift = bn_scale_shift(gamma, beta, mean, var, epsilon)
    scaled = B * (scale[None, :] if trans_b else scale[:, None])
    carried = alpha * (shift @ (B.T if trans_b else B))
    return scaled, carried if C is None else gemm_beta * C + carried


@transform(stored=("W",))
def fold_bn_into_next_matmul(W, C, gamma, beta, mean, var, epsilon):
    """BN over the K input features, then MatMul(., W) (+ C): W' = diag(s).W, C' = C + t.W."""
    return fold_bn_into_next_gemm(W, C, gamma, beta, mean, var, epsilon, 1.0, 1.0, False)



@transform
def compose_perms(first, second):
    """Transpose(Transpose(x, first), second) = Transpose(x, p) with p[i] = first[second[i]]."""
    return [int(first[axis]) for axis in second]


# --- parallel and scaled linear maps ---------------------------------------------------------

def _sum_of_biases(*biases):
    present = [bias for bias in biases if bias is not None]
    return None if not present else present[0] if len(present) == 1 else present[0] + present[1]


@transform
def add_gemm_branches(A, Ca, alpha_a, beta_a, trans_a, B, Cb, alpha_b, beta_b, trans_b):
    """Gemm_a(x) + Gemm_b(x), both transA=t: one Gemm with W = a.op(A) + b.op(B), C the sum
    of the scaled biases (both broadcast to the same [M, N], so their sum does too)."""
    Wa, ca = gemm_as_matmul(A, Ca, alpha_a, beta_a, trans_a)
    Wb, cb = gemm_as_matmul(B, Cb, alpha_b, beta_b, trans_b)
    return Wa + Wb, _sum_of_biases(ca, cb)


@transform
def add_weights(A, B):
    """x.A + x.B = x.(A + B), for weights of one shape."""
    return A + B


@transform
def reciprocal(s):
    """1/s: a Div by s is a Mul by 1/s."""
    return 1.0 / s


def _feature_vector(scale):
    """A scalar or per-feature constant ([..., 1, N]) as a vector along the last axis."""
    return np.asarray(scale).reshape(-1)


@transform
def scale_columns(W, C, scale):
    """(x.W + C)*s, s per feature (last axis) or scalar: W*s along columns, C*s."""
    return W * _feature_vector(scale), None if C is None else C * scale


@transform
def scale_gemm(B, C, alpha, gemm_beta, trans_b, scale):
    """Gemm(x, B, C)*s with transA=0 or 1: op(B)*alpha*s along columns, C*beta*s."""
    W, bias = gemm_as_matmul(B, C, alpha, gemm_beta, trans_b)
    return scale_columns(W, bias, scale)
