"""A matrix's kind: which of the kernels' loops it runs, known when they compile.

q4.py has a loop per kind of offset (minima, Q4_0's folded one, IQ4's lookup), q6.py one per width
(6 to 2 bits held), q8.py one. A matrix passes its kind to the kernels as their first argument
(kernel_args()[0]), and `by_kind` picks the loop from the kind's Numba type: a compiled function
holds only the loops of the kinds it is called with. Were the kind a plain number, every compiled
GEMV, GEMM and decode layer would hold all seven loops, whatever its matrices: about three times
the compile time (bench/RESULTS.md, twentieth session), most of what CI's emulated ARM CPUs spend.

A kind is a one-field numpy record dtype named for it, because Numba's dispatcher types a dtype in
C, as it types arrays and numbers: a decode layer's arguments take 2 us to type, against 300 us
with a Python object of our own in them (measured), which would be typed in Python on every call.
"""

from __future__ import annotations

import numpy as np
from numba.core import types
from numba.extending import overload


def kind(name: str) -> np.dtype:
    return np.dtype([(name, np.uint8)])


def name_of(k) -> str:
    """A kind's name, from the kind or from its Numba type (inside an overload)."""
    record = k.dtype if isinstance(k, types.DType) else k
    return next(iter(record.fields))


def by_kind(table: dict[np.dtype, object]):
    """A function f(kind, *args) = table[kind](*args): in compiled code the choice is made when it
    compiles, so only the chosen function is compiled into the caller."""
    functions = {name_of(k): f for k, f in table.items()}

    def call(k, *args):
        return functions[name_of(k)](*args)

    @overload(call)
    def typed(k, *args):
        if isinstance(k, types.DType) and isinstance(k.dtype, types.Record) and name_of(k) in functions:
            f = functions[name_of(k)]
            return lambda k, *args: f(*args)

    return call
