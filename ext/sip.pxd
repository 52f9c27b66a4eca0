# C-level entry points of ext/sip.pyx for other extensions (the transport
# cimports these to skip the Python call layer); Python code uses
# parse_message / frame_length through engine.sip.parser.

cdef object parse_c(bytes data, bint stream)
cdef Py_ssize_t frame_length_c(const unsigned char* p, Py_ssize_t n) except -1
