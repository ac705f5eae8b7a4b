/* capture_forwarder.c - the smallest sidecar the capture can feed: the bench's capture-only path.
 *
 * Listens where Envoy's virtualOutbound/virtualInbound listen (0.0.0.0:15001, 0.0.0.0:15006),
 * asks SO_ORIGINAL_DST on every accepted connection exactly as Envoy's original_dst filter does,
 * connects there and copies bytes both ways (recv/send, never splice: a sockmap-fed socket must be
 * read with recv). Inbound upstream connections come from 127.0.0.6, Istio's passthrough source.
 * With "-s LPORT:IP:PORT" it also listens on LPORT and forwards to a fixed address (the explicit,
 * capture-free baseline). One thread, epoll, level-triggered, 64 KiB per direction.
 *
 *   capture_forwarder [-o 15001] [-i 15006] [-n] [-s 15200:10.244.0.3:15300 ...]
 *   -n: no capture listeners (static forwarding only)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter_ipv4.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536
#define MAX_LISTENERS 32

enum kind { OUTBOUND, INBOUND, STATIC };

struct listener {
    int fd;
    enum kind kind;
    struct sockaddr_in target;   /* STATIC only */
};

struct side {
    int fd;
    struct side *peer;
    struct pair *pair;
    char buf[BUF];               /* bytes read from fd, still to be written to peer */
    size_t len, off;
    int eof, shut, connecting;
    uint32_t events;
};

struct pair {
    struct side a, b;
    int dead;
    struct pair *next_dead;
};

static int ep;
static struct pair *graveyard;
static unsigned long accepted, failed;

static void die(const char *what) { perror(what); exit(1); }

static int listen_on(uint32_t addr, int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = addr};
    if (fd < 0) die("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(fd, 4096) < 0) die("listen");
    return fd;
}

static void watch(struct side *s, uint32_t want)
{
    if (s->events == want)
        return;
    struct epoll_event ev = {.events = want, .data.ptr = s};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev) < 0) die("epoll_ctl mod");
    s->events = want;
}

static void kill_pair(struct pair *p)
{
    if (p->dead)
        return;
    p->dead = 1;
    close(p->a.fd);              /* close() also removes the fds from epoll */
    close(p->b.fd);
    p->next_dead = graveyard;    /* freed after this epoll batch: events may still point here */
    graveyard = p;
}

/* Move bytes src -> src->peer as far as the sockets allow. Returns -1 on a fatal error. */
static int pump(struct side *src)
{
    struct side *dst = src->peer;
    for (;;) {
        if (src->len == 0 && !src->eof && !src->connecting) {
            ssize_t n = recv(src->fd, src->buf, BUF, 0);
            if (n > 0) {
                src->len = (size_t)n;
                src->off = 0;
            } else if (n == 0) {
                src->eof = 1;
            } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
                break;
            } else if (errno != EINTR) {
                return -1;
            }
        }
        if (src->len > 0) {
            if (dst->connecting)
                break;
            ssize_t w = send(dst->fd, src->buf + src->off, src->len - src->off, MSG_NOSIGNAL);
            if (w > 0) {
                src->off += (size_t)w;
                if (src->off == src->len)
                    src->len = src->off = 0;
                continue;
            }
            if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            if (w < 0 && errno == EINTR)
                continue;
            return -1;
        }
        break;
    }
    if (src->eof && src->len == 0 && !src->shut && !dst->connecting) {
        shutdown(dst->fd, SHUT_WR);     /* half-close travels on */
        src->shut = 1;
    }
    return 0;
}

static void rearm(struct pair *p)
{
    struct side *s[2] = {&p->a, &p->b};
    for (int i = 0; i < 2; i++) {
        uint32_t want = 0;
        if (s[i]->connecting)
            want = EPOLLOUT;
        else {
            if (s[i]->len == 0 && !s[i]->eof)
                want |= EPOLLIN;
            if (s[i]->peer->len > 0)
                want |= EPOLLOUT;
        }
        watch(s[i], want);
    }
}

static void serve(struct pair *p)
{
    if (pump(&p->a) < 0 || pump(&p->b) < 0) {
        kill_pair(p);
        return;
    }
    if (p->a.shut && p->b.shut) {
        kill_pair(p);
        return;
    }
    rearm(p);
}

static void add_side(struct side *s, struct pair *p, int fd, struct side *peer)
{
    struct epoll_event ev = {.events = 0, .data.ptr = s};
    s->fd = fd;
    s->peer = peer;
    s->pair = p;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl add");
}

static void on_accept(struct listener *l)
{
    for (;;) {
        int cfd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cfd < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED)
                perror("accept4");
            return;
        }
        struct sockaddr_in dst;
        socklen_t dl = sizeof dst;
        if (l->kind == STATIC) {
            dst = l->target;
        } else if (getsockopt(cfd, SOL_IP, SO_ORIGINAL_DST, &dst, &dl) < 0) {
            failed++;        /* no original destination: fail closed, like Envoy */
            close(cfd);
            continue;
        }
        int ufd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (ufd < 0) {
            close(cfd);
            continue;
        }
        int one = 1;
        setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(ufd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (l->kind == INBOUND) {
            struct sockaddr_in src = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000006)};
            setsockopt(ufd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
            if (bind(ufd, (struct sockaddr *)&src, sizeof src) < 0) {
                failed++;
                close(cfd);
                close(ufd);
                continue;
            }
        }
        int rc = connect(ufd, (struct sockaddr *)&dst, sizeof dst);
        if (rc < 0 && errno != EINPROGRESS) {
            failed++;
            close(cfd);
            close(ufd);
            continue;
        }
        struct pair *p = calloc(1, sizeof *p);
        if (!p) die("calloc");
        add_side(&p->a, p, cfd, &p->b);
        add_side(&p->b, p, ufd, &p->a);
        p->b.connecting = rc < 0;
        accepted++;
        serve(p);
    }
}

static void on_side(struct side *s, uint32_t events)
{
    struct pair *p = s->pair;
    if (p->dead)
        return;
    if (s->connecting) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) {
            failed++;
            kill_pair(p);
            return;
        }
        s->connecting = 0;
    } else if ((events & (EPOLLERR | EPOLLHUP)) && !(events & (EPOLLIN | EPOLLOUT))) {
        kill_pair(p);
        return;
    }
    serve(p);
}

static volatile sig_atomic_t stopping;

static void on_term(int sig)
{
    (void)sig;
    stopping = 1;       /* epoll_wait returns EINTR; main prints the counters and exits */
}

int main(int argc, char **argv)
{
    struct listener ls[MAX_LISTENERS];
    int nl = 0, out_port = 15001, in_port = 15006, capture = 1, opt;
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_term};   /* no SA_RESTART: epoll_wait must return */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    while ((opt = getopt(argc, argv, "o:i:s:n")) != -1) {
        if (opt == 'o')
            out_port = atoi(optarg);
        else if (opt == 'i')
            in_port = atoi(optarg);
        else if (opt == 'n')
            capture = 0;
        else if (opt == 's' && nl < MAX_LISTENERS - 2) {
            char ip[64];
            int lport, port;
            if (sscanf(optarg, "%d:%63[^:]:%d", &lport, ip, &port) != 3) {
                fprintf(stderr, "capture_forwarder: bad -s %s (LPORT:IP:PORT)\n", optarg);
                return 2;
            }
            struct listener *l = &ls[nl++];
            memset(l, 0, sizeof *l);
            l->kind = STATIC;
            l->target.sin_family = AF_INET;
            l->target.sin_port = htons(port);
            if (inet_pton(AF_INET, ip, &l->target.sin_addr) != 1) {
                fprintf(stderr, "capture_forwarder: bad address %s\n", ip);
                return 2;
            }
            /* explicit listeners on 127.0.0.1 when the target is remote, else on every address */
            l->fd = listen_on(strncmp(ip, "127.", 4) == 0 ? htonl(INADDR_ANY) : htonl(0x7f000001), lport);
        } else {
            fprintf(stderr, "usage: %s [-o PORT] [-i PORT] [-n] [-s LPORT:IP:PORT]...\n", argv[0]);
            return 2;
        }
    }
    if (capture) {
        ls[nl].kind = OUTBOUND;
        ls[nl].fd = listen_on(htonl(INADDR_ANY), out_port);
        nl++;
        ls[nl].kind = INBOUND;
        ls[nl].fd = listen_on(htonl(INADDR_ANY), in_port);
        nl++;
    }
    for (int i = 0; i < nl; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &ls[i]};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, ls[i].fd, &ev) < 0) die("epoll_ctl listener");
    }
    fprintf(stderr, "capture_forwarder: ready\n");
    struct epoll_event evs[256];
    while (!stopping) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            void *ptr = evs[i].data.ptr;
            struct listener *l = NULL;
            for (int j = 0; j < nl; j++)
                if (ptr == &ls[j])
                    l = &ls[j];
            if (l)
                on_accept(l);
            else
                on_side(ptr, evs[i].events);
        }
        while (graveyard) {
            struct pair *p = graveyard;
            graveyard = p->next_dead;
            free(p);
        }
    }
    fprintf(stderr, "capture_forwarder: accepted %lu failed %lu\n", accepted, failed);
    return 0;
}
