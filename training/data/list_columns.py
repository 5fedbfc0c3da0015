"""Fixed-width Arrow list columns ↔ numpy matrices, without a Python loop over rows.

Ranking examples and feature tables store each row's dense features, cohorts, labels and masks
as one ``list<...>`` value of a fixed width W (one Parquet column per kind, whatever W is);
models read them as ``[N, W]`` matrices. These two functions are the only conversion between
the two forms.

Example::

    column = list_column(np.ones((3, 2), np.float32))    # list<float> column, 3 rows of width 2
    list_matrix(column, 2, np.float32).shape              # (3, 2)
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def list_matrix(column: pa.ChunkedArray | pa.Array, width: int, dtype: np.dtype | type) -> np.ndarray:
    """A list column of fixed width → ``[N, width]`` numpy of ``dtype``. O(N · width): it
    flattens the whole column, so look rows up in the matrix, not in the column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    # a zero-copy view of Arrow's buffer is read-only, which torch.from_numpy warns about: copy then
    return flat.astype(dtype, copy=not flat.flags.writeable).reshape(len(column), width)


def list_column(matrix: np.ndarray) -> pa.Array:
    """``[N, W]`` numpy → list<...> column of width W."""
    n, w = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * w, w, dtype=np.int32)) if n else pa.array([0], pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1)))
