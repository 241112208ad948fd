"""Shared by the dropout tests (the models' and the attention kernel's): the masks' hash,
Wellons's lowbias32, written again in NumPy from its definition."""

import numpy as np


def np_lowbias32(x):
    """lowbias32 in 64-bit NumPy integers, reduced mod 2^32."""
    x = np.asarray(x, np.uint64)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & np.uint64(0xFFFFFFFF)
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & np.uint64(0xFFFFFFFF)
    return x ^ (x >> np.uint64(16))


def np_hashed_bits(seed, row, col):
    """``random_bits.hashed_bits`` in NumPy: lowbias32(lowbias32(seed ^ lowbias32(row)) + col),
    broadcast together, the sum reduced mod 2^32."""
    row_key = np_lowbias32(np.asarray(seed, np.uint64) ^ np_lowbias32(row))
    return np_lowbias32((row_key + np.asarray(col, np.uint64)) & np.uint64(0xFFFFFFFF))
