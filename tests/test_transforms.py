"""The algebra alone, property-based: random shapes, groups, strides, dilations and pads.

Each test builds the unfolded graph and the graph with the transform's weights, and runs
both in onnxruntime. No engine or rule is involved, so a failure here is in the arithmetic.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxfold import optimize, transforms

from .helpers import assert_same_function, model_from_text, run

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


def graph_model(nodes, weights, input_shape, output_rank):
    """A float32 model: input x, output y, the given nodes and weights."""
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in weights.items()]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * output_rank)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def outputs_agree(before, after, input_shape, seed=0):
    x = np.random.default_rng(seed).uniform(-1, 1, input_shape).astype(np.float32)
    expected, actual = run(before, {"x": x})["y"], run(after, {"x": x})["y"]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(expected).max()))


def bn_params(rng, channels):
    return dict(gamma=rng.normal(size=channels), beta=rng.normal(size=channels),
                mean=rng.normal(size=channels), var=rng.uniform(0.2, 2.0, size=channels))


@st.composite
def conv_setups(draw, max_rank=2):
    rank = draw(st.integers(1, max_rank))
    group = draw(st.sampled_from([1, 2]))
    in_channels = group * draw(st.integers(1, 3))
    out_channels = group * draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 3)) for _ in range(rank)]
    strides = [draw(st.integers(1, 2)) for _ in range(rank)]
    dilations = [draw(st.integers(1, 2)) for _ in range(rank)]
    pads = [draw(st.integers(0, 2)) for _ in range(2 * rank)]
    size = [draw(st.integers(5, 8)) for _ in range(rank)]
    return dict(rank=rank, group=group, in_channels=in_channels, out_channels=out_channels,
                kernel=kernel, strides=strides, dilations=dilations, pads=pads,
                input_shape=[1, in_channels, *size], bias=draw(st.booleans()), seed=draw(st.integers(0, 99)))


def conv_node(setup, inputs, output):
    return helper.make_node("Conv", inputs, [output], group=setup["group"], strides=setup["strides"],
                            dilations=setup["dilations"], pads=setup["pads"])


@SETTINGS
@given(conv_setups(max_rank=3))
def test_bn_after_conv(setup):
    rng = np.random.default_rng(setup["seed"])
    O, rank = setup["out_channels"], setup["rank"]
    W = rng.normal(size=(O, setup["in_channels"] // setup["group"], *setup["kernel"]))
    B = rng.normal(size=O) if setup["bias"] else None
    bn = bn_params(rng, O)
    inputs = ["x", "W", "B"] if setup["bias"] else ["x", "W"]
    before = graph_model(
        [conv_node(setup, inputs, "c"),
         helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], epsilon=1e-3)],
        {"W": W, **({"B": B} if setup["bias"] else {}), **bn}, setup["input_shape"], rank + 2)
    W2, B2 = transforms.fold_bn_into_conv(W, B, **bn, epsilon=1e-3)
    after = graph_model([conv_node(setup, ["x", "W", "B"], "y")], {"W": W2, "B": B2},
                        setup["input_shape"], rank + 2)
    outputs_agree(before, after, setup["input_shape"])


@SETTINGS
@given(conv_setups(), st.integers(1, 2))
def test_bn_after_conv_transpose(setup, stride):
    rng = np.random.default_rng(setup["seed"])
    g, I, O = setup["group"], setup["in_channels"], setup["out_channels"]
    W = rng.normal(size=(I, O // g, *setup["kernel"]))
    bn = bn_params(rng, O)
    strides = [stride] * setup["rank"]
    before = graph_model(
        [helper.make_node("ConvTranspose", ["x", "W"], ["c"], group=g, strides=strides),
         helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"])],
        {"W": W, **bn}, setup["input_shape"], setup["rank"] + 2)
    W2, B2 = transforms.fold_bn_into_conv_transpose(W, None, **bn, epsilon=1e-5, group=g)
    after = graph_model([helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], group=g, strides=strides)],
                        {"W": W2, "B": B2}, setup["input_shape"], setup["rank"] + 2)
    outputs_agree(before, after, setup["input_shape"])


@SETTINGS
@given(conv_setups())
def test_bn_before_unpadded_conv(setup):
    setup = {**setup, "pads": [0] * (2 * setup["rank"])}
    rng = np.random.default_rng(setup["seed"])
    I, O, g = setup["in_channels"], setup["out_channels"], setup["group"]
    W = rng.normal(size=(O, I // g, *setup["kernel"]))
    bn = bn_params(rng, I)
    before = graph_model(
        [helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["b"]),
         conv_node(setup, ["b", "W"], "y")],
        {"W": W, **bn}, setup["input_shape"], setup["rank"] + 2)
    W2, B2 = transforms.fold_bn_into_next_conv(W, None, **bn, epsilon=1e-5, group=g)
    after = graph_model([conv_node(setup, ["x", "W", "B"], "y")], {"W": W2, "B": B2},
                        setup["input_shape"], setup["rank"] + 2)
    outputs_agree(before, after, setup["input_shape"])


@st.composite
def branch_pairs(draw):
    """Two convs of one input whose outputs have the same size, aligned or not."""
    setup = draw(conv_setups())
    rank, d = setup["rank"], setup["dilations"]
    kernel_b = [draw(st.integers(1, 3)) for _ in range(rank)]
    pads_b = [draw(st.integers(0, 2)) for _ in range(2 * rank)]
    if draw(st.booleans()):  # same output size on purpose, so merges are common
        for axis in range(rank):
            total = setup["pads"][axis] + setup["pads"][axis + rank] - d[axis] * (setup["kernel"][axis] - kernel_b[axis])
            if total >= 0:
                pads_b[axis] = draw(st.integers(0, total))
                pads_b[axis + rank] = total - pads_b[axis]
    return setup, kernel_b, pads_b


def _out_size(size, kernel, pad_begin, pad_end, stride, dilation):
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


def one_kernel_holds_the_other(kernel_a, pads_a, kernel_b, pads_b, dilations):
    """Whether, on every axis, the input offsets one branch reads (relative to an output
    position) are among those the other reads, and both give the same output length for
    every input length: then the smaller kernel embeds exactly in the larger one."""
    rank = len(kernel_a)
    for axis, d in enumerate(dilations):
        taps, extents = [], []
        for kernel, pads in ((kernel_a, pads_a), (kernel_b, pads_b)):
            taps.append({j * d - pads[axis] for j in range(kernel[axis])})
            extents.append(pads[axis] + pads[axis + rank] - d * (kernel[axis] - 1))
        if extents[0] != extents[1] or not (taps[0] <= taps[1] or taps[1] <= taps[0]):
            return False
    return True


@settings(max_examples=150, deadline=None, derandomize=True)
@given(branch_pairs())
def test_parallel_branches_merge_exactly_whenever_they_align(branch_pair):
    setup, kernel_b, pads_b = branch_pair
    rank, d = setup["rank"], setup["dilations"]
    sizes = setup["input_shape"][2:]
    for axis in range(rank):
        same = [_out_size(sizes[axis], k, p[axis], p[axis + rank], setup["strides"][axis], d[axis])
                for k, p in ((setup["kernel"][axis], setup["pads"]), (kernel_b[axis], pads_b))]
        if same[0] != same[1] or same[0] < 1:
            event("different output sizes")
            return  # outputs of different size cannot be added
    target_kernel, target_pads = transforms.merged_geometry([setup["kernel"], kernel_b], [setup["pads"], pads_b])
    aligned = all(transforms.branch_offsets(k, p, target_kernel, target_pads, d) is not None
                  for k, p in ((setup["kernel"], setup["pads"]), (kernel_b, pads_b)))
    # The code under test may refuse only where a merge into the larger kernel is impossible.
    assert aligned == one_kernel_holds_the_other(setup["kernel"], setup["pads"], kernel_b, pads_b, d)
    if not aligned:
        event("not aligned")
        return
    event("merged")
    rng = np.random.default_rng(setup["seed"])
    O, I, g = setup["out_channels"], setup["in_channels"], setup["group"]
    Wa, Wb = rng.normal(size=(O, I // g, *setup["kernel"])), rng.normal(size=(O, I // g, *kernel_b))
    Ba, Bb = rng.normal(size=O), rng.normal(size=O)
    second = {**setup, "pads": pads_b}
    before = graph_model(
        [conv_node(setup, ["x", "Wa", "Ba"], "a"), conv_node(second, ["x", "Wb", "Bb"], "b"),
         helper.make_node("Add", ["a", "b"], ["y"])],
        {"Wa": Wa, "Ba": Ba, "Wb": Wb, "Bb": Bb}, setup["input_shape"], rank + 2)
    W, B, P = transforms.add_conv_branches(Wa, Ba, setup["pads"], Wb, Bb, pads_b, d)
    after = graph_model([conv_node({**setup, "pads": P}, ["x", "W", "B"], "y")], {"W": W, "B": B},
                        setup["input_shape"], rank + 2)
    outputs_agree(before, after, setup["input_shape"])


def assert_two_convs_fold(first, second, weights, folded, shape):
    """Conv(first, bias a, padded) then Conv(second, bias p) equals one padded Conv(folded)."""
    before = graph_model([helper.make_node("Conv", ["x", first, "a"], ["h"], pads=[1, 1, 1, 1]),
                          helper.make_node("Conv", ["h", second, "p"], ["y"])], weights, shape, 4)
    W, B = folded
    after = graph_model([helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1])],
                        {"W": W, "B": B}, shape, 4)
    outputs_agree(before, after, shape)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(0, 99))
def test_sequential_convs(channels, kernel, out_channels, seed):
    rng = np.random.default_rng(seed)
    shape = [1, channels, 7, 7]
    A, a = rng.normal(size=(channels, channels, kernel, kernel)), rng.normal(size=channels)
    P, p = rng.normal(size=(out_channels, channels, 1, 1)), rng.normal(size=out_channels)
    assert_two_convs_fold("A", "P", {"A": A, "a": a, "P": P, "p": p},
                          transforms.conv_then_pointwise(A, a, P, p), shape)
    # and the other order: 1x1 (bias, padded) then an unpadded K x K
    K = rng.normal(size=(out_channels, channels, kernel, kernel))
    Q = rng.normal(size=(channels, channels, 1, 1))
    assert_two_convs_fold("Q", "K", {"Q": Q, "a": a, "K": K, "p": p},
                          transforms.pointwise_then_conv(Q, a, K, p), shape)


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 5), st.booleans(), st.floats(0.25, 3), st.floats(-2, 2),
       st.integers(0, 99))
def test_gemm_then_bn(features, inputs, trans_b, alpha, beta, seed):
    rng = np.random.default_rng(seed)
    B = rng.normal(size=(features, inputs) if trans_b else (inputs, features))
    C, bn = rng.normal(size=features), bn_params(rng, features)
    shape = [3, inputs]
    before = graph_model(
        [helper.make_node("Gemm", ["x", "B", "C"], ["g"], alpha=alpha, beta=beta, transB=int(trans_b)),
         helper.make_node("BatchNormalization", ["g", "gamma", "beta", "mean", "var"], ["y"])],
        {"B": B, "C": C, **bn}, shape, 2)
    B2, C2 = transforms.fold_bn_into_gemm(B, C, **bn, epsilon=1e-5, gemm_beta=beta, trans_b=trans_b)
    after = graph_model([helper.make_node("Gemm", ["x", "B", "C"], ["y"], alpha=alpha, transB=int(trans_b))],
                        {"B": B2, "C": C2}, shape, 2)
    outputs_agree(before, after, shape)


def test_transforms_never_modify_their_inputs():
    rng = np.random.default_rng(0)
    W, B = rng.normal(size=(4, 4, 3, 3)), rng.normal(size=4)
    bn = bn_params(rng, 4)
    copies = [W.copy(), B.copy()] + [v.copy() for v in bn.values()]
    transforms.fold_bn_into_conv(W, B, **bn, epsilon=1e-5)
    transforms.add_conv_branches(W, B, [1] * 4, W[:, :, :1, :1], B, [0] * 4, [1, 1])
    transforms.bn_branch(W, **bn, epsilon=1e-5)
    for before, after in zip(copies, [W, B, *bn.values()]):
        np.testing.assert_array_equal(before, after)


def test_identity_kernel_is_the_identity_for_every_group():
    for group in (1, 2, 4):
        W = np.zeros((4, 4 // group, 3, 3))
        kernel, bias, pads = transforms.identity_branch(W)
        model = graph_model([helper.make_node("Conv", ["x", "K"], ["y"], group=group)], {"K": kernel},
                            [1, 4, 5, 5], 4)
        x = np.random.default_rng(group).normal(size=(1, 4, 5, 5)).astype(np.float32)
        np.testing.assert_allclose(run(model, {"x": x})["y"], x, rtol=1e-6)
        assert pads == [0, 0, 0, 0] and not bias.any()


FLOAT16_CONV_BN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float16[1,8,6,6] x, float16[8,8,3,3] W, float16[8] gamma, float16[8] beta, float16[8] mean,
   float16[8] var) => (float16[1,8,6,6] y) {
  c = Conv<pads=[1,1,1,1]>(x, W)
  y = BatchNormalization(c, gamma, beta, mean, var)
}
"""


def test_fold_keeps_float16_rounding_to_one_cast():
    """optimize folds float16 weights in float64 and casts once: its weights are exactly
    the float64 fold rounded to float16, and closer to it than folding in float16."""
    model = model_from_text(FLOAT16_CONV_BN, seed=3)
    optimized, report = optimize(model)
    assert report.fired() == {"fold-bn-into-conv": 1}
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    folded = {t.name: numpy_helper.to_array(t) for t in optimized.graph.initializer}
    conv = optimized.graph.node[0]
    W, B = folded[conv.input[1]], folded[conv.input[2]]
    bn = {k: stored[k] for k in ("gamma", "beta", "mean", "var")}
    exact = transforms.fold_bn_into_conv(stored["W"].astype(np.float64), None,
                                         **{k: v.astype(np.float64) for k, v in bn.items()}, epsilon=1e-5)
    in_float16 = transforms.fold_bn_into_conv(stored["W"], None, **bn, epsilon=1e-5)
    assert in_float16[0].dtype == np.float16  # the comparison really rounds at every step
    for got, want, rounded_often in zip((W, B), exact, in_float16):
        assert got.dtype == np.float16
        assert got.tobytes() == want.astype(np.float16).tobytes(), "not one cast of the float64 fold"
        assert not np.array_equal(got, rounded_often), "this case does not tell the two apart"
        assert np.abs(got - want).sum() < np.abs(rounded_often.astype(np.float64) - want).sum()
    assert_same_function(model, optimized)


def _stored_type_examples(rng):
    """Float64 arguments for every transform that takes weights in their stored type."""
    W, B, bn = rng.normal(size=(6, 3, 3, 3)), rng.normal(size=6), bn_params(rng, 6)
    return {
        "fold_bn_into_conv": (W, B, *bn.values(), 1e-5),
        "fold_bn_into_conv_transpose": (rng.normal(size=(4, 3, 3, 3)), B, *bn.values(), 1e-5, 2),
        "fold_bn_into_gemm": (rng.normal(size=(5, 6)), B, *bn.values(), 1e-5, 0.5, False),
        "fold_bn_into_matmul": (rng.normal(size=(5, 6)), B, *bn.values(), 1e-5),
        "fold_bn_into_next_conv": (rng.normal(size=(4, 3, 1, 1)), None, *bn.values(), 1e-5, 2),
        "scale_conv": (W, B, rng.normal(size=(1, 6, 1, 1))),
        "negate": (W, B),
        "identity_branch": (W,),
        "bn_branch": (rng.normal(size=(6, 6, 3, 3)), *bn.values(), 1e-5),
        "avgpool_branch": (W, [3, 3], [1, 1, 1, 1]),
        "ungroup": (rng.normal(size=(6, 2, 3, 3)), 3),
        "add_conv_branches": (W, B, [1] * 4, W[:, :, :1, :1].copy(), None, [0] * 4, [1, 1]),
        "fold_bn_into_next_gemm": (rng.normal(size=(5, 6)), rng.normal(size=5), *bn.values(), 1e-5, 0.5, 2.0, True),
        "fold_bn_into_next_matmul": (rng.normal(size=(6, 5)), rng.normal(size=5), *bn.values(), 1e-5),
    }


def test_weights_in_their_stored_type_give_bit_identical_folds():
    """Transforms told to take weights as stored (float32, float16) compute exactly what
    they compute from the weights converted to float64, cast once to the type they return:
    float64, or the stored type where the transform sums in it (add_conv_branches)."""
    rng = np.random.default_rng(7)
    examples = _stored_type_examples(rng)
    marked = {name for name, positions in transforms.STORED_TYPE_ARGS.items() if positions}
    assert marked == set(examples), "give every transform with stored=... an example here"
    for name, args in examples.items():
        for stored_type in (np.float32, np.float16):
            stored = [a.astype(stored_type) if i in transforms.STORED_TYPE_ARGS[name] else a
                      for i, a in enumerate(args)]
            widened = [a.astype(np.float64) if i in transforms.STORED_TYPE_ARGS[name] else a
                       for i, a in enumerate(stored)]
            for got, want in zip(_as_tuple(transforms.TRANSFORMS[name](*stored)),
                                 _as_tuple(transforms.TRANSFORMS[name](*widened))):
                if isinstance(want, np.ndarray):
                    assert want.dtype == np.float64 and got.dtype in (np.float64, stored_type), (name, stored_type)
                    assert got.tobytes() == want.astype(got.dtype).tobytes(), (name, stored_type)
                else:
                    assert got == want, (name, stored_type)


@pytest.mark.parametrize("stored_type", [np.float32, np.float16])
def test_branches_summed_in_their_stored_type_round_as_one_cast_of_the_float64_sum(stored_type):
    """Two stored kernels are summed in their own type, a float64 one over its window in
    float64: every element equals the float64 sum cast once, bit for bit. The values span
    the type's whole range (sums whose exact value float64 itself rounds, halfway cases,
    -0.0 + -0.0) so that any other rounding shows."""
    rng = np.random.default_rng(11)
    info = np.finfo(stored_type)
    exponents = rng.integers(int(np.log2(info.tiny)), int(np.log2(info.max)) - 1, size=(2, 64, 8, 3, 3))
    values = (rng.choice([-1.0, 1.0], size=exponents.shape) * rng.uniform(1, 2, size=exponents.shape)
              * np.exp2(exponents.astype(np.float64))).astype(stored_type)
    values[:, :4] = -0.0
    values[1, 4:8] = -values[0, 4:8]  # sums that cancel to +0.0
    Wa, Wb = values[0], values[1, :, :, 1:2, 1:2].copy()
    diagonal = transforms.bn_branch(Wa, *bn_params(rng, 64).values(), 1e-5)[0]
    for second in (Wb, diagonal):
        for order in ((Wa, [1] * 4, second, [0] * 4), (second, [0] * 4, Wa, [1] * 4)):
            got = transforms.add_conv_branches(order[0], None, order[1], order[2], None, order[3], [1, 1])[0]
            widened = [w.astype(np.float64) for w in (order[0], order[2])]
            want = transforms.add_conv_branches(widened[0], None, order[1], widened[1], None, order[3], [1, 1])[0]
            assert got.dtype == stored_type and want.dtype == np.float64
            with np.errstate(over="ignore"):
                assert got.tobytes() == want.astype(stored_type).tobytes()


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("trans_b", [False, True])
def test_bn_before_a_gemm_moves_into_its_rows_and_bias(trans_b):
    """alpha*BN(x).op(B) + beta*C == alpha*x.op(B') + C' (beta 1), for every input x."""
    rng = np.random.default_rng(3)
    bn = bn_params(rng, 4)
    B, C, x = rng.normal(size=(5, 4) if trans_b else (4, 5)), rng.normal(size=(3, 5)), rng.normal(size=(3, 4))
    scale, shift = transforms.bn_scale_shift(*bn.values(), 1e-5)
    op = (lambda M: M.T) if trans_b else (lambda M: M)
    B2, C2 = transforms.fold_bn_into_next_gemm(B, C, *bn.values(), 1e-5, 0.5, 2.0, trans_b)
    np.testing.assert_allclose(0.5 * x @ op(B2) + C2, 0.5 * (x * scale + shift) @ op(B) + 2.0 * C, rtol=1e-12)
