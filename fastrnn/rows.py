"""A (T, B, ...) batch and its valid rows: the flat rows t * B + b with t < lengths[b], ascending
(a PackedSequence's data order), which GEMMs run on so that they skip the padding."""

import math


def select_rows(t, valid_rows):
    """(T, B, ...) -> the (T*B, ...) row matrix, or just its valid rows. A 2-D t is taken to be
    those rows already (a layer input given as valid rows)."""
    if t.dim() == 2:
        return t
    flat = t.reshape(t.shape[0] * t.shape[1], math.prod(t.shape[2:]))
    return flat if valid_rows is None else flat.index_select(0, valid_rows)


def scatter_rows(rows, valid_rows, seq_len, batch):
    """Valid rows (N, F) -> the padded (T, B, F), zero at the padding."""
    padded = rows.new_zeros(seq_len * batch, rows.shape[1]).index_copy_(0, valid_rows, rows)
    return padded.view(seq_len, batch, rows.shape[1])
