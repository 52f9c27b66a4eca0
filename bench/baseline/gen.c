/*
 * RTP-sized UDP packet generator for the relay ceiling.
 *
 *   gen PORT SECONDS [RATE_PPS [SIZE [HOST]]]
 *
 * Sends SIZE-byte datagrams (default 172: a 12-byte RTP header and 20 ms of G.711) to
 * HOST:PORT (default 127.0.0.1) for SECONDS, in sendmmsg batches of 64.  RATE_PPS 0
 * (the default) sends flat out; any other value paces the stream to that many packets
 * per second.  Each packet carries a valid RTP header with a rising sequence number, so a
 * relay that parses or latches on RTP sees a real stream.
 *
 * Prints one JSON line on stdout:
 *   {"tool":"gen","sent":N,"errors":E,"seconds":S,"pps":P,"rate":R,"size":Z}
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 64
#define MAX_SIZE 1500

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s PORT SECONDS [RATE_PPS [SIZE [HOST]]]\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    double seconds = atof(argv[2]);
    double rate = argc > 3 ? atof(argv[3]) : 0.0;
    int size = argc > 4 ? atoi(argv[4]) : 172;
    const char *host = argc > 5 ? argv[5] : "127.0.0.1";
    if (size < 12 || size > MAX_SIZE) {
        fprintf(stderr, "gen: SIZE must be between 12 and %d\n", MAX_SIZE);
        return 2;
    }

    struct sockaddr_in dst;
    memset(&dst, 0, sizeof dst);
    dst.sin_family = AF_INET;
    dst.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &dst.sin_addr) != 1) {
        fprintf(stderr, "gen: HOST must be an IPv4 address\n");
        return 2;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) {
        perror("gen: socket");
        return 1;
    }
    int sndbuf = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);

    static unsigned char pkt[BATCH][MAX_SIZE];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        memset(pkt[i], 0xd5, (size_t)size); /* A-law silence */
        pkt[i][0] = 0x80;                   /* RTP version 2 */
        pkt[i][1] = 0x08;                   /* payload type 8, PCMA */
        uint32_t ssrc = htonl(0x42a7011eu);
        memcpy(pkt[i] + 8, &ssrc, 4);
        iov[i].iov_base = pkt[i];
        iov[i].iov_len = (size_t)size;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &dst;
        msgs[i].msg_hdr.msg_namelen = sizeof dst;
    }

    long sent = 0, errors = 0;
    uint16_t seq = 0;
    uint32_t stamp = 0;
    double start = now_s(), t = start;
    while ((t = now_s()) - start < seconds) {
        int want = BATCH;
        if (rate > 0) {
            long due = (long)(rate * (t - start)) + 1 - sent;
            if (due <= 0) {
                /* Ahead of schedule: sleep until the next packet is due, at most 1 ms so
                 * the deadline check stays prompt. */
                double wait = ((double)(sent + 1) / rate) - (t - start);
                if (wait > 0.001) wait = 0.001;
                struct timespec ts = {0, (long)(wait * 1e9)};
                nanosleep(&ts, NULL);
                continue;
            }
            if (due < want) want = (int)due;
        }
        for (int i = 0; i < want; i++) {
            uint16_t s = htons(seq++);
            uint32_t ts = htonl(stamp);
            stamp += 160;
            memcpy(pkt[i] + 2, &s, 2);
            memcpy(pkt[i] + 4, &ts, 4);
        }
        int n = sendmmsg(fd, msgs, (unsigned)want, 0);
        if (n < 0) {
            if (errno != EINTR) errors += want;
            continue;
        }
        sent += n;
        /* Datagrams the kernel would not take in this call are counted as errors, not
         * retried: the generator's clock, not the relay, decides the offered load. */
        errors += want - n;
    }
    double elapsed = now_s() - start;
    printf("{\"tool\":\"gen\",\"sent\":%ld,\"errors\":%ld,\"seconds\":%.3f,\"pps\":%.0f,"
           "\"rate\":%.0f,\"size\":%d}\n",
           sent, errors, elapsed, elapsed > 0 ? (double)sent / elapsed : 0.0, rate, size);
    return 0;
}
