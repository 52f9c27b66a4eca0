# C declarations for batched datagram I/O (Linux recvmmsg/sendmmsg).
from libc.stdint cimport uint32_t

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t

    struct sockaddr:
        sa_family_t sa_family

    struct sockaddr_storage:
        sa_family_t ss_family

    struct iovec:
        void* iov_base
        size_t iov_len

    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    struct timespec:
        long tv_sec
        long tv_nsec

    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    cmsghdr* CMSG_FIRSTHDR(msghdr* msgh)
    cmsghdr* CMSG_NXTHDR(msghdr* msgh, cmsghdr* cmsg)
    unsigned char* CMSG_DATA(cmsghdr* cmsg)
    int setsockopt(int sockfd, int level, int optname, const void* optval, socklen_t optlen)

    int recvmmsg(int sockfd, mmsghdr* msgvec, unsigned int vlen, int flags, timespec* timeout)
    int sendmmsg(int sockfd, mmsghdr* msgvec, unsigned int vlen, int flags)
    ssize_t sendto(int sockfd, const void* buf, size_t len, int flags,
                   const sockaddr* dest_addr, socklen_t addrlen)
    ssize_t recvfrom(int sockfd, void* buf, size_t len, int flags,
                     sockaddr* src_addr, socklen_t* addrlen)
    enum:
        MSG_DONTWAIT
        AF_INET
        AF_INET6
        SOL_SOCKET
        SO_TIMESTAMPNS
        SCM_TIMESTAMPNS

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr

    struct sockaddr_in:
        sa_family_t sin_family
        unsigned short sin_port
        in_addr sin_addr

    struct in6_addr:
        unsigned char s6_addr[16]

    struct sockaddr_in6:
        sa_family_t sin6_family
        unsigned short sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

cdef extern from "<arpa/inet.h>" nogil:
    unsigned short htons(unsigned short)
    unsigned short ntohs(unsigned short)
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)
    int inet_pton(int af, const char* src, void* dst)

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EWOULDBLOCK
        EINTR

cdef extern from "<time.h>" nogil:
    enum:
        CLOCK_MONOTONIC
    int clock_gettime(int clk_id, timespec* tp)
