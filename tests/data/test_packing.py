"""First-fit packing (data/packing.py) of documents into rows; the corpora packed this way are in
test_loader.py."""

import numpy as np

from minitron_jax.data.packing import pack_first_fit


def test_first_fit_small_cases():
    rows = pack_first_fit([np.array([1, 2, 3]), np.array([4, 5, 6, 7, 8]), np.array([9, 10])], 5, pad_id=0)
    np.testing.assert_array_equal(rows.tokens, [[4, 5, 6, 7, 8], [1, 2, 3, 9, 10]])
    np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1, 1, 1], [1, 1, 1, 2, 2]])
