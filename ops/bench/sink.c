/*
 * sink: the delivery program of the mailnode benchmark, run by both servers.
 *
 *     sink LOGFILE [GATEFILE]
 *
 * Reads the whole message from stdin, finds the value of its Message-Id:
 * header (header name matched without regard to case) and appends one line
 * "<message-id>\n" to LOGFILE with a single write(2) (O_APPEND, so lines of
 * concurrent sinks never mix). A message without the header is logged as
 * "(no-message-id)". Exit 0 when the line is written, 75 (EX_TEMPFAIL) when
 * the log cannot be opened or written.
 *
 * With GATEFILE, the sink first waits while that file exists: the backlog
 * benchmark queues mail behind a closed gate, so that nothing is delivered
 * until the gate is removed.
 *
 * Built one of two ways from this one file (ops/bench/run, BENCH_SINK):
 *
 *     gcc -O2 -static -nostdlib -ffreestanding -fno-stack-protector \
 *         -fno-tree-loop-distribute-patterns -DSINK_FREESTANDING          (x86_64)
 *     gcc -O2                                                             (any)
 *
 * The freestanding build is the one both servers are measured with. On the
 * benchmark VM every CPUID instruction is a VM exit of about 10 us, and
 * glibc's start-up runs dozens of them to learn the cache sizes (0.9 ms of
 * CPU even for `int main(){return 0;}`, static or not): with a libc sink that
 * start-up was the largest cost in the whole run, for both servers alike, and
 * the figures measured the hypervisor more than the servers. The libc build
 * (BENCH_SINK=libc) is kept to measure that case as well.
 */
#ifdef SINK_FREESTANDING
#if !defined(__x86_64__)
#error "the freestanding sink is written for x86_64 Linux; build without -DSINK_FREESTANDING"
#endif
/* The handful of system calls the sink needs, without a C library. */
typedef long ssize_t;
typedef unsigned long size_t;
#define NULL ((void *)0)
#define EINTR 4
#define O_WRONLY 01
#define O_CREAT 0100
#define O_APPEND 02000
#define O_CLOEXEC 02000000
#define AT_FDCWD (-100)
#define SYS_read 0
#define SYS_write 1
#define SYS_close 3
#define SYS_nanosleep 35
#define SYS_exit_group 231
#define SYS_openat 257
#define SYS_faccessat 269
#define F_OK 0

struct timespec {
    long tv_sec;
    long tv_nsec;
};

static long sys3(long n, long a, long b, long c) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}
static long sys4(long n, long a, long b, long c, long d) {
    long r;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
    return r;
}

/* Raw system calls return -errno; the portable code below expects -1 and errno. */
static int errno;
static long check(long r) {
    if (r < 0 && r > -4096) {
        errno = (int)-r;
        return -1;
    }
    return r;
}
static ssize_t read(int fd, void *buf, size_t n) { return check(sys3(SYS_read, fd, (long)buf, (long)n)); }
static ssize_t write(int fd, const void *buf, size_t n) { return check(sys3(SYS_write, fd, (long)buf, (long)n)); }
static int close(int fd) { return (int)check(sys3(SYS_close, fd, 0, 0)); }
static int open(const char *path, int flags, int mode) {
    return (int)check(sys4(SYS_openat, AT_FDCWD, (long)path, flags, mode));
}
static int exists(const char *path) { return check(sys4(SYS_faccessat, AT_FDCWD, (long)path, F_OK, 0)) == 0; }
static void nanosleep(const struct timespec *ts, struct timespec *rem) {
    sys3(SYS_nanosleep, (long)ts, (long)rem, 0);
}

/* The compiler may call these for block copies even in freestanding code. */
void *memcpy(void *dst, const void *src, size_t n) {
    char *d = dst;
    const char *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}
void *memset(void *dst, int c, size_t n) {
    char *d = dst;
    while (n--)
        *d++ = (char)c;
    return dst;
}

static int sink_main(int argc, char **argv);

/* The kernel enters here with argc, argv... on the stack. */
__attribute__((used)) static void start_c(long *sp) {
    int status = sink_main((int)sp[0], (char **)(sp + 1));
    sys3(SYS_exit_group, status, 0, 0);
    for (;;) {
    }
}
__asm__(".text\n"
        ".global _start\n"
        "_start:\n"
        "  xor %rbp, %rbp\n"
        "  mov %rsp, %rdi\n"
        "  and $-16, %rsp\n"
        "  call start_c\n"
        "  hlt\n");
#else
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int exists(const char *path) { return access(path, F_OK) == 0; }
static int sink_main(int argc, char **argv);
int main(int argc, char **argv) { return sink_main(argc, argv); }
#endif

#define HEAD_MAX (256 * 1024) /* the header section is looked for in this much */
#define LINE_MAX_ID 2048

static char head[HEAD_MAX];
static char discard[65536];

static void wait_gate(const char *gate) {
    struct timespec ts = {0, 20 * 1000 * 1000};
    while (exists(gate))
        nanosleep(&ts, NULL);
}

static int lower(int c) { return c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c; }

static int starts_with_nocase(const char *s, const char *prefix, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (lower((unsigned char)s[i]) != prefix[i])
            return 0;
    return 1;
}

/* Copies the Message-Id value of the header section in buf[0..len) into out. */
static size_t find_id(const char *buf, size_t len, char *out, size_t outmax) {
    static const char name[] = "message-id:";
    const size_t nlen = sizeof name - 1;
    size_t i = 0;
    while (i < len) {
        size_t eol = i;
        while (eol < len && buf[eol] != '\n')
            eol++;
        size_t end = eol;
        if (end > i && buf[end - 1] == '\r')
            end--;
        if (end == i)
            break; /* empty line: end of the header section */
        if (end - i >= nlen && starts_with_nocase(buf + i, name, nlen)) {
            size_t a = i + nlen, b = end;
            while (a < b && (buf[a] == ' ' || buf[a] == '\t'))
                a++;
            while (b > a && (buf[b - 1] == ' ' || buf[b - 1] == '\t'))
                b--;
            if (b - a > outmax)
                b = a + outmax;
            memcpy(out, buf + a, b - a);
            return b - a;
        }
        i = eol + 1;
    }
    return 0;
}

static int sink_main(int argc, char **argv) {
    if (argc < 2 || argc > 3)
        return 64;
    if (argc == 3)
        wait_gate(argv[2]);

    /* Keep the beginning of the message, drain the rest. */
    size_t len = 0;
    for (;;) {
        ssize_t n;
        if (len < sizeof head)
            n = read(0, head + len, sizeof head - len);
        else
            n = read(0, discard, sizeof discard);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return 75;
        }
        if (n == 0)
            break;
        if (len < sizeof head)
            len += (size_t)n;
    }

    char line[LINE_MAX_ID + 1];
    size_t idlen = find_id(head, len, line, LINE_MAX_ID);
    if (idlen == 0) {
        static const char none[] = "(no-message-id)";
        idlen = sizeof none - 1;
        memcpy(line, none, idlen);
    }
    line[idlen++] = '\n';

    int fd = open(argv[1], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0)
        return 75;
    ssize_t w;
    do
        w = write(fd, line, idlen);
    while (w < 0 && errno == EINTR);
    if (w != (ssize_t)idlen)
        return 75;
    if (close(fd) != 0)
        return 75;
    return 0;
}
