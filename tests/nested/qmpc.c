/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * qmpc: a minimal QMP client for the nested rig's L1, which has busybox but no Python.
 * Built static on the host (gcc -static) and put into the initramfs.
 *
 *   qmpc SOCKET JSON...        send each JSON command, print each reply's line
 *   qmpc SOCKET -h HMP...      send each HMP command line (human-monitor-command) and print
 *                              the text it returns, unescaped
 *
 * Events are skipped. Exit status: 0 if every reply was a "return", 1 if one was an "error"
 * (printed to stderr), 2 on a connection or protocol failure. Every run is bounded by a 120 s
 * alarm, so a hung QEMU cannot hang the rig.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int fd = -1;
static char buf[1 << 20];
static size_t have;

static void die(const char *what)
{
    fprintf(stderr, "qmpc: %s: %s\n", what, errno ? strerror(errno) : "protocol error");
    exit(2);
}

/* One reply line (without the newline) into a static buffer, or NULL at EOF. */
static char *read_line(void)
{
    static char line[1 << 20];
    for (;;) {
        char *nl = memchr(buf, '\n', have);
        if (nl) {
            size_t n = (size_t)(nl - buf);
            if (n >= sizeof(line))
                n = sizeof(line) - 1;
            memcpy(line, buf, n);
            line[n] = 0;
            have -= (size_t)(nl - buf) + 1;
            memmove(buf, nl + 1, have);
            return line;
        }
        if (have == sizeof(buf))
            die("reply line too long");
        ssize_t r = read(fd, buf + have, sizeof(buf) - have);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return NULL;
        have += (size_t)r;
    }
}

static void send_all(const char *s)
{
    size_t len = strlen(s);
    while (len) {
        ssize_t w = write(fd, s, len);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            die("write");
        s += w;
        len -= (size_t)w;
    }
}

/* The reply to the command just sent: the first line that is not an event. */
static char *reply(void)
{
    char *l;
    while ((l = read_line()) != NULL) {
        if (strstr(l, "\"event\""))
            continue;
        return l;
    }
    errno = 0;
    die("QMP connection closed");
    return NULL;
}

/* Prints the JSON string value that starts at s (just past the opening quote), unescaped. */
static void print_json_string(const char *s)
{
    for (; *s && *s != '"'; s++) {
        if (*s != '\\') {
            putchar(*s);
            continue;
        }
        s++;
        switch (*s) {
        case 'n': putchar('\n'); break;
        case 'r': break;
        case 't': putchar('\t'); break;
        case 'u': /* \u00XX: only ASCII is expected from HMP */
            if (strlen(s) >= 5) {
                putchar((int)strtol((char[]){ s[3], s[4], 0 }, NULL, 16));
                s += 4;
            }
            break;
        case 0: return;
        default: putchar(*s);
        }
    }
}

int main(int argc, char **argv)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int hmp = 0, failed = 0;

    if (argc < 3) {
        fprintf(stderr, "usage: qmpc SOCKET JSON... | qmpc SOCKET -h HMP...\n");
        return 2;
    }
    alarm(120); /* pmemsave of 128 MiB in a loaded L1 took up to ~30 s */
    if (strlen(argv[1]) >= sizeof(sa.sun_path))
        die("socket path too long");
    strcpy(sa.sun_path, argv[1]);
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        die(argv[1]);
    if (!read_line())
        die("no QMP greeting");
    send_all("{\"execute\":\"qmp_capabilities\"}\n");
    if (!strstr(reply(), "\"return\""))
        die("qmp_capabilities refused");

    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "-h") == 0) {
            hmp = 1;
            continue;
        }
        if (hmp) {
            /* HMP command lines here never contain quotes or backslashes. */
            if (strpbrk(argv[i], "\"\\")) {
                fprintf(stderr, "qmpc: HMP command line with a quote or backslash: %s\n", argv[i]);
                return 2;
            }
            char cmd[4096];
            snprintf(cmd, sizeof(cmd),
                     "{\"execute\":\"human-monitor-command\",\"arguments\":{\"command-line\":\"%s\"}}\n",
                     argv[i]);
            send_all(cmd);
            char *l = reply();
            char *r = strstr(l, "\"return\"");
            if (r) {
                /* "return": "text" (with or without blanks around the colon) */
                r += strlen("\"return\"");
                r += strspn(r, " :");
            }
            if (!r || *r != '"') {
                fprintf(stderr, "qmpc: %s -> %s\n", argv[i], l);
                failed = 1;
                continue;
            }
            print_json_string(r + 1);
        } else {
            send_all(argv[i]);
            send_all("\n");
            char *l = reply();
            if (strstr(l, "\"error\"")) {
                fprintf(stderr, "qmpc: %s -> %s\n", argv[i], l);
                failed = 1;
            } else {
                printf("%s\n", l);
            }
        }
    }
    fflush(stdout);
    return failed;
}
