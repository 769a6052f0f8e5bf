"""The public-model benchmark's parity judgement (bench/public/compare.py): a tool's output
that only puts tied rows in another order is reordered, never passed off as equal
element by element, and a real change stays a change."""

import numpy as np

from .helpers import bench_module

compare = bench_module("public/compare.py")

ROWS = np.random.default_rng(0).standard_normal((1, 300, 6)).astype(np.float32) * 100


def test_identical_outputs_are_unchanged():
    assert compare.parity([ROWS], [ROWS.copy()]) == (0.0, False, False)


def test_rows_in_another_order_are_reordered_not_changed():
    swapped = ROWS.copy()
    swapped[0, [3, 7]] = swapped[0, [7, 3]]
    diff, changed, reordered = compare.parity([ROWS], [swapped + 1e-6])
    assert (changed, reordered) == (False, True)
    assert diff < 1e-3


def test_a_changed_row_is_a_change_even_when_rows_moved():
    moved = ROWS.copy()
    moved[0, [3, 7]] = moved[0, [7, 3]]
    moved[0, 5, 2] += 10.0
    assert compare.parity([ROWS], [moved])[1:] == (True, False)


def test_rows_are_not_exchanged_across_the_batch():
    batch = np.stack([ROWS[0], ROWS[0] + 50])
    crossed = batch.copy()
    crossed[0, 3], crossed[1, 3] = batch[1, 3], batch[0, 3]
    assert compare.parity([batch], [crossed])[1] is True


def test_a_vector_out_of_order_is_a_change():
    vector = ROWS.reshape(-1)[:10]
    assert compare.parity([vector], [vector[::-1].copy()])[1:] == (True, False)


def test_a_shape_change_is_a_change():
    assert compare.parity([ROWS], [ROWS[:, :299]]) == (None, True, False)
