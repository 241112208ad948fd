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
