"""SIP message parser, the hot-path twin of ext/sip_py.py.

The reference parser is the specification: for every input this module
returns a `SipMessage` with the same `as_dict()` or raises `SipParseError`
exactly where the reference does, with the same `error` tuple. All scanning
works on the raw octets; str objects are built only for what is stored.

Octet-level scanning is equivalent to the reference's str operations because
every delimiter is ASCII and a UTF-8 (surrogateescape) decode never merges an
ASCII octet into a multi-octet character.
"""
cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.list cimport PyList_Append
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject, PyTypeObject
from cpython.unicode cimport Py_UCS1, PyUnicode_1BYTE_DATA, PyUnicode_DecodeLatin1, PyUnicode_DecodeUTF8, PyUnicode_New
from libc.string cimport memchr, memcmp, memcpy

from ext import sip_message as _message
from ext.sip_message import SipMessage, SipParseError

# The slots of SipMessage (__slots__) are member descriptors; writing through
# their offsets fills a fresh instance without 22 setattr calls.
cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        const char* name
        int type
        Py_ssize_t offset
    int T_OBJECT_EX

cdef extern from "Python.h":
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    PyTypeObject PyMemberDescr_Type
    void Py_INCREF(object o)

cdef enum:
    LF = 10
    CR = 13
    SP = 32
    HT = 9
    DQUOTE = 34
    COMMA = 44
    SLASH = 47
    COLON = 58
    SEMI = 59
    LT = 60
    EQ = 61
    GT = 62
    LBRACK = 91
    BSLASH = 92
    RBRACK = 93

# Character classes (RFC 3261 25.1), one bit each in _CT.
cdef enum:
    C_TOKEN = 1
    C_DIGIT = 2
    C_SCHEME = 4
    C_ALPHA = 8
    C_HOST = 16      # hostname octets: ASCII alnum, '-', '.'
    C_V6 = 32        # IPv6reference contents: HEXDIG, ':', '.'
    C_PBAD = 64      # never in an unquoted parameter value
    C_UBAD = 128     # never in a Request-URI: CTL, SP, '<', '>', '"'

cdef unsigned char _CT[256]
cdef unsigned char _LOWER[256]

# Known header names: canonical lower-case spelling, flags and the role a
# header plays in the fields every layer needs.
cdef enum:
    KCAP = 128
    NAME_MAX = 40
    HDR_CAP = 512
    F_LIST = 1
    F_SINGLE = 2
cdef enum:
    R_NONE = 0
    R_VIA = 1
    R_FROM = 2
    R_TO = 3
    R_CALLID = 4
    R_CSEQ = 5
    R_MAXF = 6
    R_CLEN = 7
    R_EXPIRES = 8
    R_COUNT = 9

cdef int _nknown = 0
cdef const unsigned char* _kname[KCAP]
cdef unsigned char _kflags[KCAP]
cdef unsigned char _krole[KCAP]
cdef int _kfirst[NAME_MAX + 2]
cdef int _kcompact[256]
cdef list _kstr = []     # canonical names, the dict keys of `headers`
cdef list _keep = []     # owns the octets _kname points into
cdef str _K_CALLID = "call-id"

cdef Py_ssize_t MAX_MESSAGE = _message.MAX_MESSAGE
cdef Py_ssize_t MAX_HEADERS = _message.MAX_HEADERS
cdef Py_ssize_t MAX_LINE = _message.MAX_LINE
cdef long long MAX_CSEQ = _message.MAX_CSEQ
cdef unsigned long long MAX_EXPIRES = _message.MAX_EXPIRES

cdef tuple E_RLINE = (400, "Malformed Request-Line")
cdef tuple E_CONT = (400, "Continuation line before the first header")
cdef tuple E_HLINE = (400, "Malformed header line")
cdef tuple E_HNAME = (400, "Malformed header name")
cdef tuple E_BADCL = (400, "Bad Content-Length")
cdef tuple E_CLBIG = (400, "Content-Length exceeds the message")
cdef tuple E_NOCL = (400, "Missing Content-Length")
cdef tuple E_CALLID = (400, "Bad Call-ID")
cdef tuple E_CSEQ = (400, "Bad CSeq")
cdef tuple E_CSEQBIG = (400, "CSeq number too large")
cdef tuple E_CSEQM = (400, "CSeq method does not match the Request-Line")
cdef tuple E_MAXF = (400, "Bad Max-Forwards")
cdef tuple E_EXPIRES = (400, "Expires too large")
cdef tuple E_FROM = (400, "Malformed From header")
cdef tuple E_TO = (400, "Malformed To header")
cdef tuple E_VIA = (400, "Malformed Via")
# RFC 3261 8.1.1: the header fields every request carries, checked in this order.
cdef tuple _REQUIRED = (
    (R_TO, (400, "Missing to header")), (R_FROM, (400, "Missing from header")),
    (R_CALLID, (400, "Missing call-id header")), (R_CSEQ, (400, "Missing cseq header")),
    (R_VIA, (400, "Missing via header")),
)


cdef int _init_tables() except -1:
    cdef int i
    for i in range(256):
        _CT[i] = C_UBAD if (i <= 0x20 or i == 0x7F) else 0
        _LOWER[i] = <unsigned char>(i + 32 if 65 <= i <= 90 else i)
        _kcompact[i] = -1
    for i in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~":
        _CT[i] |= C_TOKEN
    for i in b"0123456789":
        _CT[i] |= C_DIGIT
    for i in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        _CT[i] |= C_ALPHA | C_SCHEME | C_HOST
    for i in b"0123456789+-.":
        _CT[i] |= C_SCHEME
    for i in b"0123456789-.":
        _CT[i] |= C_HOST
    for i in b"0123456789abcdefABCDEF:.":
        _CT[i] |= C_V6
    for i in b" \t;,\"<>":
        _CT[i] |= C_PBAD
    for i in b"<>\"":
        _CT[i] |= C_UBAD
    return 0


cdef int _init_names() except -1:
    global _nknown
    cdef int k, n
    cdef bytes b
    roles = {"via": R_VIA, "from": R_FROM, "to": R_TO, "call-id": R_CALLID, "cseq": R_CSEQ,
             "max-forwards": R_MAXF, "content-length": R_CLEN, "expires": R_EXPIRES}
    names = (set(_message.COMPACT.values()) | set(_message.LIST_HEADERS)
             | set(_message.SINGLE_HEADERS) | set(_message.PRETTY) | set(roles))
    ordered = sorted(sorted(names), key=len)
    if len(ordered) > KCAP or max(map(len, ordered)) > NAME_MAX or min(map(len, ordered)) < 2:
        raise ImportError("ext.sip: header name table does not fit")
    if MAX_HEADERS >= HDR_CAP:
        raise ImportError("ext.sip: MAX_HEADERS exceeds the header table")
    for k in range(NAME_MAX + 2):
        _kfirst[k] = len(ordered)
    for k in range(len(ordered) - 1, -1, -1):
        name = ordered[k]
        b = name.encode("ascii")
        _keep.append(b)
        _kname[k] = <const unsigned char*>PyBytes_AS_STRING(b)
        _kflags[k] = ((F_LIST if name in _message.LIST_HEADERS else 0)
                      | (F_SINGLE if name in _message.SINGLE_HEADERS else 0))
        _krole[k] = roles.get(name, R_NONE)
        _kfirst[len(b)] = k
    _kstr.extend(ordered)
    # _kfirst[n] must be the first index of length n, or where length n would start.
    for n in range(NAME_MAX, -1, -1):
        if _kfirst[n] > _kfirst[n + 1]:
            _kfirst[n] = _kfirst[n + 1]
    for letter, full in _message.COMPACT.items():
        k = ordered.index(full)
        _kcompact[ord(letter)] = k
        _kcompact[ord(letter.upper())] = k
    _nknown = len(ordered)
    return 0


_init_tables()
_init_names()


# -- slot offsets of SipMessage -------------------------------------------
cdef enum:
    S_IS_REQUEST = 0
    S_METHOD
    S_URI
    S_VERSION
    S_STATUS
    S_REASON
    S_HEADERS
    S_BODY
    S_CALL_ID
    S_CSEQ
    S_CSEQ_METHOD
    S_FROM_TAG
    S_TO_TAG
    S_MAX_FORWARDS
    S_CONTENT_LENGTH
    S_VIA_TRANSPORT
    S_VIA_HOST
    S_VIA_PORT
    S_VIA_BRANCH
    S_VIA_RPORT
    S_VIA_RECEIVED
    S_ERROR
    S_COUNT

cdef Py_ssize_t _off[S_COUNT]
cdef bint _direct = False
cdef tuple _FIELDS = tuple(_message.FIELDS)
cdef object _new = object.__new__


cdef int _init_slots() except -1:
    global _direct
    cdef int i
    cdef object d
    if len(_FIELDS) != S_COUNT:
        raise ImportError("ext.sip: SipMessage.FIELDS changed; update the slot table")
    for i in range(S_COUNT):
        d = SipMessage.__dict__.get(_FIELDS[i])
        if (d is None or type(d) is not <object><PyObject*>&PyMemberDescr_Type
                or (<PyMemberDescrObject*><PyObject*>d).d_member.type != T_OBJECT_EX):
            return 0  # not plain __slots__: fall back to setattr
        _off[i] = (<PyMemberDescrObject*><PyObject*>d).d_member.offset
    _direct = True
    return 0


_init_slots()


cdef inline object _make_message():
    if _direct:
        return _new(SipMessage)  # every slot is filled by _set below
    return SipMessage()


cdef inline int _set(object msg, int i, object value) except -1:
    if _direct:
        # A fresh instance has NULL slots, so there is nothing to release.
        Py_INCREF(value)
        (<PyObject**>((<char*><PyObject*>msg) + _off[i]))[0] = <PyObject*>value
    else:
        setattr(msg, _FIELDS[i], value)
    return 0


# -- small helpers ---------------------------------------------------------
cdef inline bint _ws(unsigned char c) noexcept nogil:
    return c == SP or c == HT


cdef inline object _dec(const unsigned char* p, Py_ssize_t n):
    # SIP is UTF-8 (RFC 3261 25.1); undecodable octets survive round-trips.
    return PyUnicode_DecodeUTF8(<char*>p, n, "surrogateescape")


cdef inline object _ascii(const unsigned char* p, Py_ssize_t n):
    return PyUnicode_DecodeLatin1(<char*>p, n, NULL)


cdef object _lower_ascii(const unsigned char* p, Py_ssize_t n):
    cdef object s = PyUnicode_New(n, 127)
    cdef Py_UCS1* d = PyUnicode_1BYTE_DATA(s)
    cdef Py_ssize_t i
    for i in range(n):
        d[i] = _LOWER[p[i]]
    return s


cdef object _upper_ascii(const unsigned char* p, Py_ssize_t n):
    cdef object s = PyUnicode_New(n, 127)
    cdef Py_UCS1* d = PyUnicode_1BYTE_DATA(s)
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        d[i] = c - 32 if 97 <= c <= 122 else c
    return s


cdef object _upper_any(const unsigned char* p, Py_ssize_t n):
    # RFC 3261 7.3.1: case folding is ASCII only; other octets pass through.
    cdef Py_ssize_t i
    cdef bint lower = False
    cdef bytes tmp
    cdef unsigned char* d
    cdef unsigned char c
    for i in range(n):
        if 97 <= p[i] <= 122:
            lower = True
            break
    if not lower:
        return _dec(p, n)
    tmp = PyBytes_FromStringAndSize(NULL, n)
    d = <unsigned char*>PyBytes_AS_STRING(tmp)
    for i in range(n):
        c = p[i]
        d[i] = c - 32 if 97 <= c <= 122 else c
    return _dec(d, n)


cdef inline bint _all(const unsigned char* p, Py_ssize_t n, unsigned char cls) noexcept nogil:
    """True for a non-empty run of octets that all have class `cls`."""
    cdef Py_ssize_t i
    if n <= 0:
        return False
    for i in range(n):
        if not (_CT[p[i]] & cls):
            return False
    return True


cdef inline unsigned long long _num(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    # Callers bound n so that the value fits.
    cdef unsigned long long v = 0
    cdef Py_ssize_t i
    for i in range(n):
        v = v * 10 + (p[i] - 48)
    return v


cdef inline bint _ieq(const unsigned char* p, Py_ssize_t n, const char* lower, Py_ssize_t m) noexcept nogil:
    cdef Py_ssize_t i
    if n != m:
        return False
    for i in range(n):
        if _LOWER[p[i]] != <unsigned char>lower[i]:
            return False
    return True


cdef inline void _strip(const unsigned char** p, Py_ssize_t* n) noexcept nogil:
    cdef const unsigned char* a = p[0]
    cdef Py_ssize_t m = n[0]
    while m > 0 and _ws(a[0]):
        a += 1
        m -= 1
    while m > 0 and _ws(a[m - 1]):
        m -= 1
    p[0] = a
    n[0] = m


cdef inline const unsigned char* _find(const unsigned char* p, Py_ssize_t n, int c) noexcept nogil:
    if n <= 0:
        return NULL
    return <const unsigned char*>memchr(p, c, <size_t>n)


cdef inline Py_ssize_t _skip_crlf(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    # RFC 3261 7.5: CRLFs before the start line are ignored (stream keep-alives too).
    cdef Py_ssize_t i = 0
    while i < n and (p[i] == CR or p[i] == LF):
        i += 1
    return i


cdef Py_ssize_t _head_end(const unsigned char* p, Py_ssize_t n, Py_ssize_t start,
                          Py_ssize_t* sep) noexcept nogil:
    """First CRLFCRLF or LFLF at or after `start` (whichever starts first)."""
    cdef const unsigned char* q
    cdef Py_ssize_t k = start
    # Both patterns contain an LF, so one memchr walk finds whichever comes first.
    while k < n:
        q = <const unsigned char*>memchr(p + k, LF, <size_t>(n - k))
        if q == NULL:
            return -1
        k = q - p
        if k + 1 < n and p[k + 1] == LF:
            sep[0] = 2
            return k
        if k > start and p[k - 1] == CR and k + 2 < n and p[k + 1] == CR and p[k + 2] == LF:
            sep[0] = 4
            return k - 1
        k += 1
    return -1


# -- parameters (RFC 3261 25.1 generic-param) ---------------------------------
cdef enum:
    P_TAG = 1
    P_VIA = 2

cdef struct Params:
    int mode
    bint tag_seen
    const unsigned char* tag_p      # NULL: parameter without a value (None)
    Py_ssize_t tag_n
    bint branch_seen
    const unsigned char* branch_p
    Py_ssize_t branch_n
    bint rport_seen
    long rport
    const unsigned char* received_p     # last received=, NULL: none or no value
    Py_ssize_t received_n


cdef bint _balanced_quote(const unsigned char* v, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i = 1
    cdef Py_ssize_t m = n - 1
    while i < m:
        if v[i] == BSLASH:
            i += 2
            continue
        if v[i] == DQUOTE:
            return False
        i += 1
    return i == m


cdef inline void _pinit(Params* pa, int mode) noexcept nogil:
    pa.mode = mode
    pa.tag_seen = False
    pa.tag_p = NULL
    pa.tag_n = 0
    pa.branch_seen = False
    pa.branch_p = NULL
    pa.branch_n = 0
    pa.rport_seen = False
    pa.rport = 0
    pa.received_p = NULL
    pa.received_n = 0


cdef bint _param(const unsigned char* p, Py_ssize_t n, Params* out) noexcept nogil:
    """One `name[=value]` between semicolons; False when it is not valid."""
    cdef const unsigned char* eq
    cdef const unsigned char* name = p
    cdef Py_ssize_t nn
    cdef const unsigned char* val = NULL
    cdef Py_ssize_t vn = 0, i
    _strip(&p, &n)
    if n == 0:
        return False
    name = p
    eq = _find(p, n, EQ)
    if eq == NULL:
        nn = n
    else:
        nn = eq - p
        while nn > 0 and _ws(p[nn - 1]):
            nn -= 1
        val = eq + 1
        vn = n - (val - p)
        _strip(&val, &vn)
        if vn == 0:
            return False
        if val[0] == DQUOTE:
            if vn < 2 or val[vn - 1] != DQUOTE or not _balanced_quote(val, vn):
                return False
        else:
            for i in range(vn):
                if _CT[val[i]] & C_PBAD:
                    return False
    if not _all(name, nn, C_TOKEN):
        return False
    if out.mode == P_TAG:
        if not out.tag_seen and _ieq(name, nn, "tag", 3):
            out.tag_seen = True
            out.tag_p = val
            out.tag_n = vn
    else:
        if _ieq(name, nn, "branch", 6):
            if not out.branch_seen:
                out.branch_seen = True
                out.branch_p = val
                out.branch_n = vn
        elif _ieq(name, nn, "rport", 5):
            # RFC 3581: rport without a value asks for the source port (-1).
            if val == NULL:
                out.rport_seen = True
                out.rport = -1
            elif vn <= 5 and _all(val, vn, C_DIGIT):
                out.rport_seen = True
                out.rport = <long>_num(val, vn)
        elif _ieq(name, nn, "received", 8):
            out.received_p = val
            out.received_n = vn
    return True


cdef bint _params(const unsigned char* p, Py_ssize_t n, Params* out) noexcept nogil:
    """`;name=value;name` (after the first ';'), split outside quoted strings."""
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t s = 0
    cdef bint quoted = False
    cdef unsigned char c
    # RFC 3261 25.1: a quoted-string may hold ';' and quoted-pairs (backslash escapes).
    while i < n:
        c = p[i]
        if quoted:
            if c == BSLASH:
                i += 1
            elif c == DQUOTE:
                quoted = False
        elif c == DQUOTE:
            quoted = True
        elif c == SEMI:
            if not _param(p + s, i - s, out):
                return False
            s = i + 1
        i += 1
    return _param(p + s, n - s, out)


# -- Via (RFC 3261 20.42) ------------------------------------------------------
cdef struct Via:
    const unsigned char* transport_p
    Py_ssize_t transport_n
    const unsigned char* host_p
    Py_ssize_t host_n
    long port
    Params params


cdef bint _hostport(const unsigned char* p, Py_ssize_t n, Via* via) noexcept nogil:
    cdef const unsigned char* e
    cdef const unsigned char* rest
    cdef Py_ssize_t hn, rn, i
    cdef unsigned long long port = 0
    if p[0] == LBRACK:
        e = _find(p, n, RBRACK)
        if e == NULL:
            return False
        hn = e - p + 1
        # RFC 3261 25.1: IPv6reference = "[" IPv6address "]".
        if not _all(p + 1, hn - 2, C_V6) or _find(p + 1, hn - 2, COLON) == NULL:
            return False
    else:
        e = _find(p, n, COLON)
        hn = n if e == NULL else e - p
        if not _all(p, hn, C_HOST):
            return False
    rest = p + hn
    rn = n - hn
    # RFC 3261 25.1: port = 1*DIGIT; anything above 65535 names no port.
    if rn > 0:
        if rest[0] != COLON:
            return False
        rest += 1
        rn -= 1
        _strip(&rest, &rn)
        if not _all(rest, rn, C_DIGIT):
            return False
        for i in range(rn):
            port = port * 10 + (rest[i] - 48)
            if port > 65535:
                return False
    via.host_p = p
    via.host_n = hn
    via.port = <long>port
    return True


cdef bint _via(const unsigned char* p, Py_ssize_t n, Via* via) noexcept nogil:
    """`SIP / 2.0 / UDP host[:port] *(;param)`."""
    cdef const unsigned char* semi = _find(p, n, SEMI)
    cdef Py_ssize_t hn = n if semi == NULL else semi - p
    cdef const unsigned char* s1
    cdef const unsigned char* s2
    cdef const unsigned char* proto
    cdef const unsigned char* ver
    cdef const unsigned char* rest
    cdef Py_ssize_t pn, vn, rn, sp
    _pinit(&via.params, P_VIA)
    if semi != NULL and not _params(semi + 1, n - hn - 1, &via.params):
        return False
    s1 = _find(p, hn, SLASH)
    if s1 == NULL:
        return False
    s2 = _find(s1 + 1, hn - (s1 + 1 - p), SLASH)
    if s2 == NULL or _find(s2 + 1, hn - (s2 + 1 - p), SLASH) != NULL:
        return False
    # RFC 3261 20.42: sent-protocol = protocol-name SLASH protocol-version SLASH transport,
    # with LWS allowed around each SLASH.
    proto = p
    pn = s1 - p
    _strip(&proto, &pn)
    ver = s1 + 1
    vn = s2 - ver
    _strip(&ver, &vn)
    rest = s2 + 1
    rn = hn - (rest - p)
    _strip(&rest, &rn)
    if not _ieq(proto, pn, "sip", 3) or vn == 0:
        return False
    sp = 0
    while sp < rn and not _ws(rest[sp]):
        sp += 1
    if not _all(rest, sp, C_TOKEN):
        return False
    via.transport_p = rest
    via.transport_n = sp
    rest += sp
    rn -= sp
    _strip(&rest, &rn)
    if rn == 0:
        return False
    return _hostport(rest, rn, via)


# -- name-addr / addr-spec (RFC 3261 20.10, 20.20, 20.39) ------------------------
cdef bint _name_addr(const unsigned char* v, Py_ssize_t n, Params* out) noexcept nogil:
    cdef Py_ssize_t i
    cdef const unsigned char* lt
    cdef const unsigned char* gt
    cdef const unsigned char* semi
    cdef const unsigned char* uri
    cdef const unsigned char* rest
    cdef Py_ssize_t un, rn
    _pinit(out, P_TAG)
    _strip(&v, &n)
    if n > 0 and v[0] == DQUOTE:
        i = 1
        while i < n:
            if v[i] == BSLASH:
                i += 2
                continue
            if v[i] == DQUOTE:
                break
            i += 1
        if i >= n:
            return False  # RFC 4475 3.1.2.6: unterminated quoted string
        v += i + 1
        n -= i + 1
        while n > 0 and _ws(v[0]):
            v += 1
            n -= 1
        if n == 0 or v[0] != LT:
            return False
    lt = _find(v, n, LT)
    if lt != NULL:
        gt = _find(lt, n - (lt - v), GT)
        if gt == NULL:
            return False
        uri = lt + 1
        un = gt - uri
        _strip(&uri, &un)
        rest = gt + 1
        rn = n - (rest - v)
        _strip(&rest, &rn)
    else:
        # RFC 3261 20.10: without <>, everything after ';' is a header parameter.
        semi = _find(v, n, SEMI)
        uri = v
        un = n if semi == NULL else semi - v
        _strip(&uri, &un)
        rest = semi
        rn = 0 if semi == NULL else n - (semi - v)
    if un == 0 or _find(uri, un, COLON) == NULL:
        return False
    if rn > 0:
        if rest[0] != SEMI:
            return False
        return _params(rest + 1, rn - 1, out)
    return True


cdef bint _valid_request_uri(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """absoluteURI shape: scheme ':' with no LWS, no <>, no controls."""
    cdef const unsigned char* colon = _find(p, n, COLON)
    cdef Py_ssize_t i
    # RFC 3261 25.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ).
    if colon == NULL or colon == p or not (_CT[p[0]] & C_ALPHA):
        return False
    if not _all(p, colon - p, C_SCHEME):
        return False
    for i in range(n):
        if _CT[p[i]] & C_UBAD:
            return False
    return True


# -- the parse state ---------------------------------------------------------------
cdef struct Scratch:
    # Unfolded lines and LWS-collapsed values; each is no longer than its
    # source, so twice the header block always suffices.
    unsigned char* buf
    Py_ssize_t cap
    Py_ssize_t used


cdef struct State:
    bint is_request
    const unsigned char* method_p
    Py_ssize_t method_n
    # first value of each role header, after unfolding and LWS collapsing
    bint seen[R_COUNT]
    const unsigned char* val_p[R_COUNT]
    Py_ssize_t val_n[R_COUNT]
    # the top Via, and whether any Via value is malformed
    Py_ssize_t via_count
    bint via_top_ok
    bint via_bad
    Via top


cdef unsigned char* _reserve(Scratch* s, Py_ssize_t need) except NULL:
    # Allocated on first use: most messages have neither folding nor LWS runs.
    if s.buf == NULL:
        s.buf = <unsigned char*>PyMem_Malloc(<size_t>s.cap)
        if s.buf == NULL:
            raise MemoryError()
    if s.used + need > s.cap:
        raise SystemError("ext.sip._reserve: scratch use exceeds twice the header block")
    return s.buf + s.used


cdef int _entry(const unsigned char* p, Py_ssize_t n, list out, State* st, bint is_via) except -1:
    cdef Via via
    _strip(&p, &n)
    PyList_Append(out, _dec(p, n))
    if is_via:
        # RFC 3261 18.2.2: responses follow the top Via; the others are only validated.
        if st.via_count == 0:
            st.via_top_ok = n > 0 and _via(p, n, &st.top)
            if not st.via_top_ok:
                st.via_bad = True
        elif not st.via_bad and (n == 0 or not _via(p, n, &via)):
            st.via_bad = True
        st.via_count += 1
    return 0


cdef list _split_list(const unsigned char* v, Py_ssize_t n, State* st, bint is_via):
    """RFC 3261 7.3.1: split at commas outside quoted strings and <...>; empty
    entries are kept so that they can be rejected."""
    cdef list out = []
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t s = 0
    cdef int depth = 0
    cdef bint quoted = False
    cdef unsigned char c
    while i < n:
        c = v[i]
        if quoted:
            if c == BSLASH:
                i += 1
            elif c == DQUOTE:
                quoted = False
        elif c == DQUOTE:
            quoted = True
        elif c == LT:
            depth += 1
        elif c == GT:
            if depth:
                depth -= 1
        elif c == COMMA and depth == 0:
            _entry(v + s, i - s, out, st, is_via)
            s = i + 1
        i += 1
    _entry(v + s, n - s, out, st, is_via)
    return out


cdef inline int _lookup(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef int k
    cdef Py_ssize_t i
    cdef const unsigned char* kn
    if n == 1:
        return _kcompact[p[0]]  # RFC 3261 7.3.3 compact form
    if n > NAME_MAX:
        return -1
    # RFC 3261 7.3.1: field names compare case-insensitively.
    for k in range(_kfirst[n], _kfirst[n + 1]):
        kn = _kname[k]
        i = 0
        while i < n and _LOWER[p[i]] == kn[i]:
            i += 1
        if i == n:
            return k
    return -1


cdef object _headers(const unsigned char** lptr, Py_ssize_t* llen, Py_ssize_t nlog,
                     dict headers, State* st, Scratch* scr, object err):
    cdef Py_ssize_t i, j, m, L, ne, vn
    cdef const unsigned char* lp
    cdef const unsigned char* c
    cdef const unsigned char* vp
    cdef unsigned char* d
    cdef unsigned char ch
    cdef int k, flags, role
    cdef bint collapse, prev
    cdef object key
    cdef PyObject* lst
    cdef unsigned char single[KCAP]
    for k in range(_nknown):
        single[k] = 0
    for i in range(nlog):
        lp = lptr[i]
        L = llen[i]
        # RFC 3261 7.3.1: header-name HCOLON header-value
        c = _find(lp, L, COLON)
        if c == NULL or c == lp:
            if err is None:
                err = E_HLINE
            continue
        # RFC 3261 7.3.1: HCOLON allows LWS between the name and the colon.
        ne = c - lp
        while ne > 0 and _ws(lp[ne - 1]):
            ne -= 1
        if not _all(lp, ne, C_TOKEN):
            if err is None:
                err = E_HNAME
            continue
        k = _lookup(lp, ne)
        if k >= 0:
            key = _kstr[k]
            flags = _kflags[k]
            role = _krole[k]
        else:
            key = _lower_ascii(lp, ne)
            flags = 0
            role = R_NONE
        vp = c + 1
        vn = L - (vp - lp)
        _strip(&vp, &vn)
        collapse = False
        for j in range(vn):
            if vp[j] == HT or (vp[j] == SP and j + 1 < vn and vp[j + 1] == SP):
                collapse = True
                break
        if collapse:
            # Collapse runs of LWS that folding left behind (RFC 3261 7.3.1).
            d = _reserve(scr, vn)
            m = 0
            prev = False
            for j in range(vn):
                ch = vp[j]
                if _ws(ch):
                    if not prev:
                        d[m] = SP
                        m += 1
                    prev = True
                else:
                    d[m] = ch
                    m += 1
                    prev = False
            scr.used += m
            vp = d
            vn = m
        if flags & F_SINGLE:
            # RFC 3261 20 (table 2): at most one of these per message.
            if single[k] and err is None:
                err = (400, f"Multiple {key} header fields")
            single[k] = 1
        lst = PyDict_GetItem(headers, key)
        if flags & F_LIST:
            if lst == NULL:
                PyDict_SetItem(headers, key, _split_list(vp, vn, st, role == R_VIA))
            else:
                (<list>lst).extend(_split_list(vp, vn, st, role == R_VIA))
        elif lst == NULL:
            PyDict_SetItem(headers, key, [_dec(vp, vn)])
        else:
            PyList_Append(<list>lst, _dec(vp, vn))
        if role != R_NONE and not st.seen[role]:
            st.seen[role] = True
            st.val_p[role] = vp
            st.val_n[role] = vn
    return err


@cython.boundscheck(False)
@cython.wraparound(False)
cdef object parse_c(bytes data, bint stream):
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t start, end, sep = 0, he
    cdef Scratch scr
    if n > MAX_MESSAGE:
        raise SipParseError("message exceeds the size limit")
    start = _skip_crlf(p, n)
    end = _head_end(p, n, start, &sep)
    if end < 0:
        # A datagram is complete by itself: headers that end with the
        # datagram (no blank line) still form a message without a body.
        if stream or n == 0 or p[n - 1] != LF:
            raise SipParseError("no end of the header block")
        end = n
        while end > 0 and (p[end - 1] == CR or p[end - 1] == LF):
            end -= 1
        sep = n - end
    he = end if end > start else start
    scr.buf = NULL
    scr.used = 0
    scr.cap = 2 * (he - start) + 2
    try:
        return _parse(p, n, start, he, end + sep, stream, &scr)
    finally:
        if scr.buf != NULL:
            PyMem_Free(scr.buf)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef object _parse(const unsigned char* p, Py_ssize_t n, Py_ssize_t start,
                   Py_ssize_t he, Py_ssize_t body_start, bint stream, Scratch* scr):
    cdef State st
    cdef const unsigned char* q
    cdef const unsigned char* q2
    cdef const unsigned char* lptr[HDR_CAP]
    cdef Py_ssize_t llen[HDR_CAP]
    cdef bint lfold[HDR_CAP]
    cdef unsigned char* d
    cdef Py_ssize_t nlog = 0, i, a, b, fe, s1, s2, k
    cdef object err = None
    cdef object method = "", uri = "", version = "", reason = ""
    cdef int status = 0
    cdef dict headers = {}

    st.is_request = True
    st.method_p = NULL
    st.method_n = 0
    st.via_count = 0
    st.via_top_ok = False
    st.via_bad = False
    for i in range(R_COUNT):
        st.seen[i] = False

    # -- start line (RFC 3261 7.1, 7.2) -------------------------------------
    q = _find(p + start, he - start, LF)
    fe = (q - p) if q != NULL else he
    if fe > start and p[fe - 1] == CR:
        fe -= 1
    if fe - start >= 4 and memcmp(p + start, <const char*>b"SIP/", 4) == 0:
        st.is_request = False
        q2 = _find(p + start, fe - start, SP)
        if q2 == NULL:
            raise SipParseError("malformed Status-Line")
        s1 = q2 - p
        q2 = _find(p + s1 + 1, fe - s1 - 1, SP)
        s2 = fe if q2 == NULL else q2 - p
        if s2 - s1 - 1 != 3 or not _all(p + s1 + 1, 3, C_DIGIT):
            raise SipParseError("malformed Status-Line")
        version = _upper_any(p + start, s1 - start)
        status = <int>_num(p + s1 + 1, 3)
        if q2 != NULL:
            reason = _dec(p + s2 + 1, fe - s2 - 1)
        if status < 100 or status > 699:
            raise SipParseError("status code out of range")  # RFC 4475 3.1.2.19
    else:
        q2 = _find(p + start, fe - start, SP)
        if q2 == NULL or q2 == p + start or not _all(p + start, q2 - p - start, C_TOKEN):
            raise SipParseError("not a SIP start line")
        s1 = q2 - p
        st.method_p = p + start
        st.method_n = s1 - start
        method = _ascii(st.method_p, st.method_n)
        # RFC 3261 25.1: Request-Line = Method SP Request-URI SP SIP-Version CRLF
        q2 = _find(p + s1 + 1, fe - s1 - 1, SP)
        if q2 == NULL:
            err = E_RLINE
            uri = _dec(p + s1 + 1, fe - s1 - 1)
        else:
            s2 = q2 - p
            uri = _dec(p + s1 + 1, s2 - s1 - 1)
            if _find(p + s2 + 1, fe - s2 - 1, SP) != NULL:
                # More than three parts (RFC 4475 3.1.2.9, 3.1.2.10): the version
                # reported is whatever follows the last SP.
                err = E_RLINE
                k = fe
                while p[k - 1] != SP:
                    k -= 1
                version = _upper_any(p + k, fe - k)
            else:
                version = _upper_any(p + s2 + 1, fe - s2 - 1)
                if s2 == s1 + 1 or fe == s2 + 1:
                    err = E_RLINE
                elif not (fe - s2 - 1 >= 4 and _ieq(p + s2 + 1, 3, "sip", 3) and p[s2 + 4] == SLASH):
                    err = E_RLINE
                elif not _valid_request_uri(p + s1 + 1, s2 - s1 - 1):
                    err = E_RLINE

    # -- unfold continuation lines (RFC 3261 7.3.1) into logical lines ------
    if q != NULL:
        a = q - p + 1
        while True:
            q2 = _find(p + a, he - a, LF)
            b = (q2 - p) if q2 != NULL else he
            k = b
            if k > a and p[k - 1] == CR:
                k -= 1
            # A line that starts with SP or HTAB continues the previous header field.
            if k > a and _ws(p[a]):
                if nlog == 0:
                    if err is None:
                        err = E_CONT
                else:
                    i = a
                    while i < k and _ws(p[i]):
                        i += 1
                    while k > i and _ws(p[k - 1]):
                        k -= 1
                    if not lfold[nlog - 1]:
                        # Move the line to the scratch tail so that it can grow.
                        d = _reserve(scr, llen[nlog - 1])
                        memcpy(d, lptr[nlog - 1], <size_t>llen[nlog - 1])
                        lptr[nlog - 1] = d
                        scr.used += llen[nlog - 1]
                        lfold[nlog - 1] = True
                    d = _reserve(scr, 1 + k - i)
                    d[0] = SP
                    memcpy(d + 1, p + i, <size_t>(k - i))
                    scr.used += 1 + k - i
                    llen[nlog - 1] += 1 + k - i
            else:
                if nlog == MAX_HEADERS:
                    raise SipParseError("too many header fields")
                lptr[nlog] = p + a
                llen[nlog] = k - a
                lfold[nlog] = False
                nlog += 1
            if q2 == NULL:
                break
            a = b + 1
    # Checked after the count, so that both limits fail as in the reference.
    for i in range(nlog):
        if llen[i] > MAX_LINE:
            raise SipParseError("header line exceeds the length limit")

    err = _headers(lptr, llen, nlog, headers, &st, scr, err)
    return _finish(p, n, body_start, stream, headers, &st, err, method, uri, version, status, reason)


cdef object _tag(const unsigned char* v, Py_ssize_t n, bint* ok):
    cdef Params pa
    ok[0] = _name_addr(v, n, &pa)
    if not ok[0] or pa.tag_p == NULL:
        return None
    return _dec(pa.tag_p, pa.tag_n)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef object _finish(const unsigned char* p, Py_ssize_t n, Py_ssize_t body_start, bint stream,
                    dict headers, State* st, object err, object method, object uri,
                    object version, int status, object reason):
    cdef Py_ssize_t avail = n - body_start, bl, vn, mn
    cdef const unsigned char* v
    cdef const unsigned char* sp
    cdef long long content_length = -1, cseq = 0, max_forwards = -1, num
    cdef object call_id = "", cseq_method = "", from_tag = None, to_tag = None
    cdef object transport = "", host = "", branch = None, rport = None, received = None
    cdef long port = 0
    cdef bint ok
    cdef Params* pa

    # RFC 3261 18.3: octets past Content-Length are ignored on a datagram;
    # a shorter body than announced is an error.
    bl = avail
    if st.seen[R_CLEN]:
        v = st.val_p[R_CLEN]
        vn = st.val_n[R_CLEN]
        if vn > 9 or not _all(v, vn, C_DIGIT):
            if err is None:
                err = E_BADCL
        else:
            content_length = <long long>_num(v, vn)
            if content_length > avail:
                if err is None:
                    err = E_CLBIG
            else:
                bl = <Py_ssize_t>content_length
    elif stream and err is None:
        err = E_NOCL
    body = PyBytes_FromStringAndSize(<char*>p + body_start, bl)

    # RFC 3261 25.1: callid = word [ "@" word ], so no LWS inside.
    if st.seen[R_CALLID]:
        call_id = (<list>headers[_K_CALLID])[0]
        if st.val_n[R_CALLID] == 0 or _find(st.val_p[R_CALLID], st.val_n[R_CALLID], SP) != NULL:
            if err is None:
                err = E_CALLID
    if st.seen[R_CSEQ]:
        # RFC 3261 20.16: CSeq = 1*DIGIT LWS Method
        v = st.val_p[R_CSEQ]
        vn = st.val_n[R_CSEQ]
        sp = _find(v, vn, SP)
        mn = 0 if sp == NULL else vn - (sp + 1 - v)
        if (sp == NULL or _find(sp + 1, mn, SP) != NULL or not _all(v, sp - v, C_DIGIT)
                or not _all(sp + 1, mn, C_TOKEN)):
            if err is None:
                err = E_CSEQ
        else:
            # RFC 3261 8.1.1.5: the sequence number is below 2**31.
            num = <long long>_num(v, sp - v) if sp - v <= 12 else MAX_CSEQ + 1
            cseq_method = _ascii(sp + 1, mn)
            if num > MAX_CSEQ:
                if err is None:
                    err = E_CSEQBIG
            else:
                cseq = num
            if (st.is_request and st.method_n > 0 and err is None
                    and (mn != st.method_n or memcmp(sp + 1, st.method_p, <size_t>mn) != 0)):
                err = E_CSEQM
    # RFC 3261 20.22: Max-Forwards is an integer in 0-255.
    if st.seen[R_MAXF]:
        v = st.val_p[R_MAXF]
        vn = st.val_n[R_MAXF]
        if vn > 9 or not _all(v, vn, C_DIGIT) or _num(v, vn) > 255:
            if err is None:
                err = E_MAXF
        else:
            max_forwards = <long long>_num(v, vn)
    if st.seen[R_EXPIRES] and err is None:
        # RFC 3261 20.19: delta-seconds fit 32 bits.
        v = st.val_p[R_EXPIRES]
        vn = st.val_n[R_EXPIRES]
        if _all(v, vn, C_DIGIT) and (vn > 10 or _num(v, vn) > MAX_EXPIRES):
            err = E_EXPIRES
    # RFC 3261 8.1.1.2, 8.1.1.3: only the tags are needed to match dialogs.
    if st.seen[R_FROM]:
        from_tag = _tag(st.val_p[R_FROM], st.val_n[R_FROM], &ok)
        if not ok and err is None:
            err = E_FROM
    if st.seen[R_TO]:
        to_tag = _tag(st.val_p[R_TO], st.val_n[R_TO], &ok)
        if not ok and err is None:
            err = E_TO
    # RFC 3581: received and rport tell where the response really goes.
    if st.via_count > 0:
        if st.via_top_ok:
            transport = _upper_ascii(st.top.transport_p, st.top.transport_n)
            host = _lower_ascii(st.top.host_p, st.top.host_n)
            port = st.top.port
            pa = &st.top.params
            if pa.branch_p != NULL:
                branch = _dec(pa.branch_p, pa.branch_n)
            if pa.rport_seen:
                rport = pa.rport
            if pa.received_p != NULL:
                received = _dec(pa.received_p, pa.received_n)
        if st.via_bad and err is None:
            err = E_VIA
    if st.is_request and err is None:
        for role, missing in _REQUIRED:
            if not st.seen[<int>role]:
                err = missing
                break

    # Created last, so that no half-filled instance is ever visible.
    msg = _make_message()
    _set(msg, S_IS_REQUEST, st.is_request)
    _set(msg, S_METHOD, method)
    _set(msg, S_URI, uri)
    _set(msg, S_VERSION, version)
    _set(msg, S_STATUS, status)
    _set(msg, S_REASON, reason)
    _set(msg, S_HEADERS, headers)
    _set(msg, S_BODY, body)
    _set(msg, S_CALL_ID, call_id)
    _set(msg, S_CSEQ, cseq)
    _set(msg, S_CSEQ_METHOD, cseq_method)
    _set(msg, S_FROM_TAG, from_tag)
    _set(msg, S_TO_TAG, to_tag)
    _set(msg, S_MAX_FORWARDS, max_forwards)
    _set(msg, S_CONTENT_LENGTH, content_length)
    _set(msg, S_VIA_TRANSPORT, transport)
    _set(msg, S_VIA_HOST, host)
    _set(msg, S_VIA_PORT, port)
    _set(msg, S_VIA_BRANCH, branch)
    _set(msg, S_VIA_RPORT, rport)
    _set(msg, S_VIA_RECEIVED, received)
    _set(msg, S_ERROR, err)
    return msg


cdef Py_ssize_t frame_length_c(const unsigned char* p, Py_ssize_t n) except -1:
    cdef Py_ssize_t start = _skip_crlf(p, n), sep = 0, end, a, b, c, ne, vn, total
    cdef long long length = -1
    cdef const unsigned char* q
    cdef const unsigned char* v
    end = _head_end(p, n, start, &sep)
    if end < 0:
        if n > MAX_MESSAGE:
            raise SipParseError("header block exceeds the message size limit")
        return 0
    # RFC 3261 18.3: on a stream, Content-Length alone delimits the body.
    a = start
    while a <= end:
        q = _find(p + a, end - a, LF)
        b = (q - p) if q != NULL else end
        while b > a and p[b - 1] == CR:
            b -= 1
        # Continuation lines are skipped: a folded Content-Length is refused here.
        v = _find(p + a, b - a, COLON)
        if v != NULL and v != p + a and not _ws(p[a]):
            c = v - p
            ne = c - a
            while ne > 0 and _ws(p[a + ne - 1]):
                ne -= 1
            if _ieq(p + a, ne, "content-length", 14) or _ieq(p + a, ne, "l", 1):
                v = p + c + 1
                vn = b - c - 1
                _strip(&v, &vn)
                if vn > 9 or not _all(v, vn, C_DIGIT) or length >= 0:
                    raise SipParseError("stream message has a bad Content-Length")
                length = <long long>_num(v, vn)
        if q == NULL:
            break
        a = q - p + 1
    if length < 0:
        raise SipParseError("stream message has no Content-Length")
    total = end + sep + <Py_ssize_t>length
    if total > MAX_MESSAGE:
        raise SipParseError("message exceeds the size limit")
    return total if n >= total else 0


# -- Python API ----------------------------------------------------------------------
def parse_message(data, stream=False):
    """Parse one SIP message from a datagram (or one framed stream message).

    parse_message(data: bytes, stream: bool = False) -> SipMessage

    Raises SipParseError when nothing may be answered; otherwise a message
    whose `error` is None or (status, reason) for the answer."""
    if not PyBytes_Check(data):
        data = bytes(memoryview(data))
    return parse_c(<bytes>data, bool(stream))


def frame_length(buf):
    """Stream framing (RFC 3261 18.3): length of the first complete message
    in `buf`, 0 if more bytes are needed; SipParseError when the stream
    cannot be framed. Accepts bytes, bytearray or any contiguous buffer."""
    cdef Py_buffer view
    # A transport's receive buffer is usually a bytearray; bytes skip the buffer protocol.
    if PyBytes_Check(buf):
        return frame_length_c(<const unsigned char*>PyBytes_AS_STRING(buf), PyBytes_GET_SIZE(buf))
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        return frame_length_c(<const unsigned char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


cdef inline bint _to_has_tag(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    # ";" [ws] "tag" [ws] "=" anywhere in the To header's value
    cdef Py_ssize_t i = 0, j
    while i < n:
        if p[i] == 59:  # ';'
            j = i + 1
            while j < n and _ws(p[j]):
                j += 1
            if j + 3 <= n and _ieq(p + j, 3, "tag", 3):
                j += 3
                while j < n and _ws(p[j]):
                    j += 1
                if j < n and p[j] == 61:  # '='
                    return True
        i += 1
    return False


def initial_invite(data):
    """The overload check's look at a raw datagram, before any parsing: False when it is
    surely not an out-of-dialog INVITE (another method, or a To header with a tag), True
    when it may be one (the parsed message decides). Same answers as the twin's."""
    if not PyBytes_Check(data):
        data = bytes(memoryview(data))
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t i, line, end, colon, a, b
    if n < 7 or memcmp(p, b"INVITE ", 7) != 0:
        return False
    # the header block ends at the first CRLFCRLF (or the datagram's end)
    end = n
    i = 0
    while i + 3 < n:
        if p[i] == 13 and p[i + 1] == 10 and p[i + 2] == 13 and p[i + 3] == 10:
            end = i
            break
        i += 1
    i = 0
    while i < end and p[i] != 10:
        i += 1
    while i < end:
        line = i + 1
        i = line
        while i < end and p[i] != 10:
            i += 1
        colon = line
        while colon < i and p[colon] != 58:  # ':'
            colon += 1
        if colon >= i:
            continue
        a = line
        b = colon
        while a < b and _ws(p[a]):
            a += 1
        while b > a and (_ws(p[b - 1]) or p[b - 1] == 13):
            b -= 1
        if (b - a == 2 and _ieq(p + a, 2, "to", 2)) or (b - a == 1 and (p[a] == 116 or p[a] == 84)):
            return not _to_has_tag(p + colon + 1, i - colon - 1)
    return True
