# Acquire load / release store of the ring's shared 64-bit cursors
# (C11 memory model through the __atomic builtins; see ring_atomic.h).
from libc.stdint cimport uint64_t

cdef extern from "ring_atomic.h" nogil:
    uint64_t ring_load_acquire(const uint64_t* p)
    void ring_store_release(uint64_t* p, uint64_t v)
