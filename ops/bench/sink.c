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
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define HEAD_MAX (256 * 1024) /* the header section is looked for in this much */
#define LINE_MAX_ID 2048

static char head[HEAD_MAX];

static void wait_gate(const char *gate) {
    struct timespec ts = {0, 20 * 1000 * 1000};
    struct stat st;
    while (stat(gate, &st) == 0)
        nanosleep(&ts, NULL);
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
        if (end - i >= nlen && strncasecmp(buf + i, name, nlen) == 0) {
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

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3)
        return 64;
    if (argc == 3)
        wait_gate(argv[2]);

    /* Keep the beginning of the message, drain the rest. */
    size_t len = 0;
    char discard[65536];
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
