/* pipit-ipam, the native front of Pipit's CNI IPAM plugin.
 *
 * A container runtime starts one plugin process per pod and per command, so the plugin's start
 * is most of a pod's IPAM time: a Python interpreter costs ~8 ms of CPU, this program well
 * under 1 ms. It has no CNI logic of its own. It finds the agent's socket (`ipam.socket` in
 * the configuration on stdin, else /run/pipit/ipam.sock), hands the call over whole (the CNI_*
 * variables and stdin) and prints what the agent answers; the agent runs the same code
 * (ipam/cni.py) that the Python plugin runs, so results and errors are the same words.
 *
 * Whenever it cannot do that (VERSION, a configuration it cannot read, bytes that are not
 * UTF-8, the agent not reachable or not answering) it executes the Python plugin installed
 * beside it, pipit-ipam-python, with the same arguments, environment and stdin, and that says
 * what is wrong in the spec's error format. ADD and DEL are idempotent per handle, so a call
 * the agent may already have served can be made again. (An agent that takes more than
 * TIMEOUT_SECONDS to answer is asked again by the Python plugin, with its own 30 s.)
 *
 * Agent protocol (ipam/service.py):
 *   -> {"command": "CNI", "env": {"CNI_COMMAND": ..., ...}, "stdin": "..."}\n
 *   <- EXIT-STATUS SP [one line of JSON to print]\n
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/pipit/ipam.sock"
#define FALLBACK "pipit-ipam-python"
#define MAX_INPUT (1 << 20)  /* the agent reads requests of up to 1 MiB */
#define MAX_REPLY (1 << 20)
#define TIMEOUT_SECONDS 30

extern char **environ;

struct buffer {
    char *data;
    size_t len, cap;
};

static int append(struct buffer *b, const char *bytes, size_t n) {
    if (n == 0)
        return 0;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        char *data = realloc(b->data, cap);
        if (!data)
            return -1;
        b->data = data;
        b->cap = cap;
    }
    memcpy(b->data + b->len, bytes, n);
    b->len += n;
    return 0;
}

static int append_text(struct buffer *b, const char *text) {
    return append(b, text, strlen(text));
}

/* The Python plugin beside this executable, with the same argv and environment, and the
 * stdin already read handed over in a memory file. Returns only if it cannot be started. */
static void fall_back(char **argv, const struct buffer *input) {
    char path[4096];
    ssize_t n = readlink("/proc/self/exe", path, sizeof path - sizeof FALLBACK - 1);
    char *slash = n > 0 ? memrchr(path, '/', (size_t)n) : NULL;
    if (!slash) {
        strcpy(path, FALLBACK);
    } else {
        strcpy(slash + 1, FALLBACK);
    }
    if (input) {
        int fd = memfd_create("pipit-ipam-stdin", 0);
        if (fd < 0)
            goto failed;
        for (size_t done = 0; done < input->len;) {
            ssize_t wrote = write(fd, input->data + done, input->len - done);
            if (wrote < 0 && errno != EINTR)
                goto failed;
            done += wrote > 0 ? (size_t)wrote : 0;
        }
        if (lseek(fd, 0, SEEK_SET) != 0 || dup2(fd, 0) < 0)
            goto failed;
        close(fd);
    }
    execv(path, argv);
failed:
    printf("{\"cniVersion\": \"1.1.0\", \"code\": 5, \"msg\": \"pipit-ipam cannot start %s "
           "(%s); install the plugin again (python -m ipam.cni install DIR).\"}\n",
           path, strerror(errno));
    exit(1);
}

/* ---- just enough JSON to find ipam.socket; anything unusual means "let Python read it" ---- */

struct scan {
    const char *p, *end;
};

static void skip_space(struct scan *s) {
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

/* A string at s->p, decoded into out[cap] (out may be NULL). Returns its length, or -1 for
 * malformed input, \u escapes or a string longer than cap - 1. */
static long read_string(struct scan *s, char *out, size_t cap) {
    size_t len = 0;
    if (s->p >= s->end || *s->p != '"')
        return -1;
    for (s->p++; s->p < s->end; s->p++) {
        char c = *s->p;
        if (c == '"') {
            s->p++;
            if (out)
                out[len] = '\0';
            return (long)len;
        }
        if ((unsigned char)c < 0x20)
            return -1;
        if (c == '\\') {
            if (++s->p >= s->end)
                return -1;
            const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t";
            const char *at = strchr(from, *s->p);
            if (!at || !*at)
                return -1;
            c = to[at - from];
        }
        if (out) {
            if (len + 1 >= cap)
                return -1;
            out[len] = c;
        }
        len++;
    }
    return -1;
}

static int skip_value(struct scan *s) {
    skip_space(s);
    if (s->p >= s->end)
        return -1;
    if (*s->p == '"')
        return read_string(s, NULL, 0) < 0 ? -1 : 0;
    if (*s->p == '{' || *s->p == '[') {
        int depth = 0;
        while (s->p < s->end) {
            if (*s->p == '"') {
                if (read_string(s, NULL, 0) < 0)
                    return -1;
                continue;
            }
            if (*s->p == '{' || *s->p == '[')
                depth++;
            else if (*s->p == '}' || *s->p == ']')
                depth--;
            s->p++;
            if (depth == 0)
                return 0;
        }
        return -1;
    }
    const char *start = s->p;
    while (s->p < s->end && !strchr(",}] \t\n\r", *s->p))
        s->p++;
    return s->p > start ? 0 : -1;
}

/* Calls on_member(key, scan at the value, context) for each member of the object at s->p;
 * on_member must consume the value. */
static int each_member(struct scan *s, int (*on_member)(const char *, struct scan *, void *),
                       void *context) {
    char key[64];
    skip_space(s);
    if (s->p >= s->end || *s->p != '{')
        return -1;
    s->p++;
    skip_space(s);
    if (s->p < s->end && *s->p == '}') {
        s->p++;
        return 0;
    }
    for (;;) {
        skip_space(s);
        struct scan at_key = *s;
        if (read_string(s, key, sizeof key) < 0) {  /* a long key is no key we look for */
            *s = at_key;
            if (read_string(s, NULL, 0) < 0)
                return -1;
            key[0] = '\0';
        }
        skip_space(s);
        if (s->p >= s->end || *s->p != ':')
            return -1;
        s->p++;
        skip_space(s);
        if (on_member(key, s, context) < 0)
            return -1;
        skip_space(s);
        if (s->p < s->end && *s->p == ',') {
            s->p++;
            continue;
        }
        if (s->p < s->end && *s->p == '}') {
            s->p++;
            return 0;
        }
        return -1;
    }
}

struct socket_path {
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
};

static int ipam_member(const char *key, struct scan *s, void *context) {
    struct socket_path *found = context;
    if (strcmp(key, "socket") != 0)
        return skip_value(s);
    /* not a string, or too long for a socket address: Python words the error */
    return read_string(s, found->path, sizeof found->path) <= 0 ? -1 : 0;
}

static int config_member(const char *key, struct scan *s, void *context) {
    struct socket_path *found = context;
    if (strcmp(key, "ipam") != 0)
        return skip_value(s);
    strcpy(found->path, DEFAULT_SOCKET);  /* the last "ipam" counts, as in Python's dict */
    return each_member(s, ipam_member, found);
}

static int find_socket(const struct buffer *input, struct socket_path *found) {
    struct scan s = {input->data, input->data + input->len};
    strcpy(found->path, DEFAULT_SOCKET);
    if (each_member(&s, config_member, found) < 0)
        return -1;
    skip_space(&s);
    return s.p == s.end ? 0 : -1;
}

/* ---- the request ---- */

static int valid_utf8(const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned char c = p[i];
        size_t more = c < 0x80 ? 0 : (c & 0xe0) == 0xc0 ? 1 : (c & 0xf0) == 0xe0 ? 2
                      : (c & 0xf8) == 0xf0 ? 3 : 4;
        if (more == 4 || (more == 1 && c < 0xc2) || i + more >= n)
            return 0;
        unsigned int code = more ? c & (0x3f >> more) : c;
        for (size_t k = 1; k <= more; k++) {
            if ((p[i + k] & 0xc0) != 0x80)
                return 0;
            code = code << 6 | (p[i + k] & 0x3f);
        }
        if ((more == 2 && (code < 0x800 || (code >= 0xd800 && code <= 0xdfff)))
            || (more == 3 && (code < 0x10000 || code > 0x10ffff)))
            return 0;
        i += more + 1;
    }
    return 1;
}

static int append_json_string(struct buffer *b, const char *s, size_t n) {
    size_t plain = 0;  /* start of the bytes not yet appended that need no escape */
    if (!valid_utf8((const unsigned char *)s, n) || append_text(b, "\"") < 0)
        return -1;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char escaped[8];
        if (c != '"' && c != '\\' && c >= 0x20)
            continue;
        if (c < 0x20)
            snprintf(escaped, sizeof escaped, "\\u%04x", c);
        else
            snprintf(escaped, sizeof escaped, "\\%c", c);
        if (append(b, s + plain, i - plain) < 0 || append_text(b, escaped) < 0)
            return -1;
        plain = i + 1;
    }
    if (append(b, s + plain, n - plain) < 0)
        return -1;
    return append_text(b, "\"");
}

static int build_request(const struct buffer *input, struct buffer *request) {
    int first = 1;
    if (append_text(request, "{\"command\": \"CNI\", \"env\": {") < 0)
        return -1;
    for (char **var = environ; *var; var++) {
        const char *equals = strchr(*var, '=');
        if (strncmp(*var, "CNI_", 4) != 0 || !equals)
            continue;
        if ((!first && append_text(request, ", ") < 0)
            || append_json_string(request, *var, (size_t)(equals - *var)) < 0
            || append_text(request, ": ") < 0
            || append_json_string(request, equals + 1, strlen(equals + 1)) < 0)
            return -1;
        first = 0;
    }
    if (append_text(request, "}, \"stdin\": ") < 0
        || append_json_string(request, input->data, input->len) < 0)
        return -1;
    return append_text(request, "}\n");
}

/* ---- the exchange ---- */

static int ask_agent(const char *path, const struct buffer *request, struct buffer *reply) {
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    struct timeval timeout = {.tv_sec = TIMEOUT_SECONDS};
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    strcpy(address.sun_path, path);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout) < 0
        || setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout) < 0
        || connect(fd, (struct sockaddr *)&address, sizeof address) < 0)
        goto failed;
    for (size_t done = 0; done < request->len;) {
        ssize_t sent = send(fd, request->data + done, request->len - done, MSG_NOSIGNAL);
        if (sent < 0 && errno != EINTR)
            goto failed;
        done += sent > 0 ? (size_t)sent : 0;
    }
    while (reply->len == 0 || reply->data[reply->len - 1] != '\n') {
        char chunk[65536];
        ssize_t got = recv(fd, chunk, sizeof chunk, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0 || reply->len + (size_t)got > MAX_REPLY || append(reply, chunk, got) < 0)
            goto failed;
    }
    close(fd);
    return 0;
failed:
    close(fd);
    return -1;
}

/* "STATUS SP [LINE]\n" -> prints LINE, returns STATUS; -1 if the reply is not of that form. */
static int print_reply(const struct buffer *reply) {
    const char *p = reply->data, *end = reply->data + reply->len - 1;  /* at the '\n' */
    int status = 0;
    if (p >= end || *p < '0' || *p > '9')
        return -1;
    for (; p < end && *p >= '0' && *p <= '9'; p++)
        if ((status = status * 10 + (*p - '0')) > 255)
            return -1;
    if (p >= end || *p != ' ' || memchr(p + 1, '\n', (size_t)(end - p - 1)))
        return -1;
    p++;
    if (end > p && (fwrite(p, 1, (size_t)(end - p), stdout) != (size_t)(end - p)
                    || fputc('\n', stdout) == EOF))
        return -1;
    return fflush(stdout) == 0 ? status : -1;
}

int main(int argc, char **argv) {
    struct buffer input = {0}, request = {0}, reply = {0};
    struct socket_path socket_path;
    const char *command = getenv("CNI_COMMAND");
    (void)argc;

    if (!command || strcmp(command, "VERSION") == 0)
        fall_back(argv, NULL);  /* the answer needs no agent; stdin is left unread */
    for (;;) {  /* all of it, whatever its size: a fallback gets all of it too */
        char chunk[65536];
        ssize_t got = read(0, chunk, sizeof chunk);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            break;
        if (append(&input, chunk, (size_t)got) < 0)
            fall_back(argv, &input);
    }
    if (input.len > MAX_INPUT)
        fall_back(argv, &input);
    if (find_socket(&input, &socket_path) < 0 || build_request(&input, &request) < 0
        || ask_agent(socket_path.path, &request, &reply) < 0)
        fall_back(argv, &input);
    int status = print_reply(&reply);
    if (status < 0)
        fall_back(argv, &input);
    return status;
}
