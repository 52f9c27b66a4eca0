# C-level G.711 (ITU-T G.711) kernels for other extensions:
#   from ext.g711 cimport ulaw_encode_buffer, ulaw_decode_sample
# All are table lookups, safe without the GIL. PCM is native-order int16.
from libc.stdint cimport int16_t, uint8_t

cdef uint8_t ulaw_encode_sample(int16_t x) noexcept nogil
cdef int16_t ulaw_decode_sample(uint8_t code) noexcept nogil
cdef uint8_t alaw_encode_sample(int16_t x) noexcept nogil
cdef int16_t alaw_decode_sample(uint8_t code) noexcept nogil

cdef void ulaw_encode_buffer(const int16_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil
cdef void ulaw_decode_buffer(const uint8_t* src, int16_t* dst, Py_ssize_t n) noexcept nogil
cdef void alaw_encode_buffer(const int16_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil
cdef void alaw_decode_buffer(const uint8_t* src, int16_t* dst, Py_ssize_t n) noexcept nogil

# Typed-memoryview variants: dst must be at least as long as src.
cdef void ulaw_encode_view(const int16_t[::1] src, uint8_t[::1] dst) noexcept nogil
cdef void ulaw_decode_view(const uint8_t[::1] src, int16_t[::1] dst) noexcept nogil
cdef void alaw_encode_view(const int16_t[::1] src, uint8_t[::1] dst) noexcept nogil
cdef void alaw_decode_view(const uint8_t[::1] src, int16_t[::1] dst) noexcept nogil
