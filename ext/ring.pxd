# C-level access to the call-control ring (ext/ring.pyx), so Cython code in the
# engine can stamp records without Python calls:
#
#   from ext.ring cimport RingWriter
#   cdef RingWriter w = ...
#   cdef unsigned char* dst = w._reserve(n)    # room for n bytes, in a slot or the spill buffer
#   ... encode exactly n bytes at dst ...
#   seq = w._commit(n)                          # published: readable once this returns
#
# Between _reserve and _commit nothing else may touch the writer. The seq the
# record will get is w._next, known before encoding.
from libc.stdint cimport uint64_t


cdef class RingWriter:
    cdef unsigned char* _map
    cdef size_t _map_len
    cdef unsigned char* _slots_p
    cdef uint64_t* _cursor_p
    cdef uint64_t* _released_p
    cdef uint64_t* _ow_p
    cdef uint64_t* _ob_p
    cdef uint64_t* _spilled_p
    cdef uint64_t* _oc_p
    cdef uint64_t _next          # seq of the next record
    cdef uint64_t _released      # last loaded reader position (may lag: only ever grows)
    cdef uint64_t _ow            # our overflow end (we are its only writer)
    cdef uint64_t _ob            # our overflow base
    cdef uint64_t _slots
    cdef uint64_t _mask
    cdef size_t _slot_size
    cdef size_t _cap
    cdef int _ovf_fd
    cdef bint _in_ring
    cdef unsigned char* _scratch
    cdef size_t _scratch_len
    cdef object _files
    cdef str _node
    cdef bytes _node_frag        # b"\xa4node" + the msgpack str of the node id
    cdef object __weakref__

    cdef int _check(self) except -1
    cdef int _grow_scratch(self, size_t n) except -1
    cdef int _maybe_reset_overflow(self) except -1
    cdef unsigned char* _reserve(self, size_t n) except NULL
    cdef uint64_t _commit(self, size_t n) except 0
    cdef uint64_t append_c(self, const unsigned char* data, size_t n) except 0


cdef class RingReader:
    cdef unsigned char* _map
    cdef size_t _map_len
    cdef unsigned char* _slots_p
    cdef uint64_t* _cursor_p
    cdef uint64_t* _released_p
    cdef uint64_t* _ow_p
    cdef uint64_t* _ob_p
    cdef uint64_t* _spilled_p
    cdef uint64_t* _oc_p
    cdef uint64_t _next          # seq of the next record to return
    cdef uint64_t _mask
    cdef size_t _slot_size
    cdef size_t _cap
    cdef bint _broken
    cdef object _files
    cdef object _ovf             # ext.ring_py._OverflowQueue
    cdef object __weakref__

    cdef int _check(self) except -1
    cdef int _ring_into(self, list out, uint64_t s, uint64_t stop) except -1
