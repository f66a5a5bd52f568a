/* pipit-ipam, the native front of Pipit's CNI IPAM plugin.
 *
 * A container runtime starts one plugin process per pod and per command, so the plugin's start
 * is most of a pod's IPAM time: a Python interpreter costs ~8 ms of CPU, this program well
 * under 1 ms. It has no CNI logic of its own. It finds the agent's socket (`ipam.socket` in
 * the configuration on stdin, else /run/pipit/ipam.sock), hands the call over whole (the CNI_*
 * variables and stdin) and prints what the agent answers; the agent runs the same code
 * (ipam/cni.py) that the Python plugin runs, so results and errors are the same words.
 *
 * Kubernetes hosts have no Python, so what needs no agent or cannot reach it is answered
 * here, in the Python plugin's words and JSON: VERSION, the agent not reachable, not answering
 * within the call's deadline (`ipam.timeout`, default 30 s, for the whole call: an agent that
 * does not answer is never asked twice), or closing without an answer. Only input this
 * program cannot read (no CNI_COMMAND, a configuration its small scanner refuses, bytes that
 * are not UTF-8, over 1 MiB) and an answer it cannot read (an older agent) go to the Python
 * plugin installed beside it, pipit-ipam-python, with the same arguments, environment and
 * stdin; it says what is wrong in the spec's error format.
 *
 * Agent protocol (ipam/service.py):
 *   -> {"command": "CNI", "env": {"CNI_COMMAND": ..., ...}, "stdin": "...", "timeout": LEFT}\n
 *   <- EXIT-STATUS SP [one line of JSON to print]\n
 *
 * `python -m ipam.cni install` builds it with the Python plugin's constants (-D): the CNI
 * versions, the default socket and the deadline's default and bound.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#if !defined(CNI_VERSIONS) || !defined(DEFAULT_SOCKET) || !defined(DEFAULT_TIMEOUT) \
    || !defined(MAX_TIMEOUT)
#error "build pipit-ipam with: python -m ipam.cni install DIR"
#endif

#define FALLBACK "pipit-ipam-python"
#define MAX_INPUT (1 << 20)  /* the agent reads requests of up to 1 MiB */
#define MAX_REPLY (1 << 20)
#define TRY_AGAIN_LATER 11   /* CNI error codes */
#define NOT_AVAILABLE 50     /* STATUS's one answer for any failure */

static const char *const versions[] = {CNI_VERSIONS};
#define VERSION_COUNT (sizeof versions / sizeof *versions)

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
static void python_plugin(char path[4096]) {
    ssize_t n = readlink("/proc/self/exe", path, 4096 - sizeof FALLBACK - 1);
    char *slash = n > 0 ? memrchr(path, '/', (size_t)n) : NULL;
    if (!slash) {
        strcpy(path, FALLBACK);
    } else {
        strcpy(slash + 1, FALLBACK);
    }
}

static void fall_back(char **argv, const struct buffer *input) {
    char path[4096];
    python_plugin(path);
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

/* What the call needs of the configuration: where the agent is, how long the whole call may
 * take, and the cniVersion errors are answered in (the newest if it names none we support,
 * as the Python plugin does). */
struct config {
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    double timeout;
    const char *version;
    int supported;  /* whether cniVersion is one of versions[] */
    int has_ipam;  /* without an ipam section it is no configuration for us: Python says so */
};

static int ipam_member(const char *key, struct scan *s, void *context) {
    struct config *found = context;
    if (strcmp(key, "socket") == 0)  /* not a string, too long for a socket: Python words it */
        return read_string(s, found->path, sizeof found->path) <= 0 ? -1 : 0;
    if (strcmp(key, "timeout") != 0)
        return skip_value(s);
    /* A deadline in range, else the default: the agent reads the configuration again and
     * refuses a wrong one in words. */
    const char *start = s->p;
    char text[32];
    if (skip_value(s) < 0)
        return -1;
    size_t n = (size_t)(s->p - start);
    found->timeout = DEFAULT_TIMEOUT;
    if (n > 0 && n < sizeof text && *start >= '0' && *start <= '9') {
        char *end;
        memcpy(text, start, n);
        text[n] = '\0';
        double value = strtod(text, &end);
        if (*end == '\0' && value > 0 && value <= MAX_TIMEOUT)
            found->timeout = value;
    }
    return 0;
}

static int config_member(const char *key, struct scan *s, void *context) {
    struct config *found = context;
    if (strcmp(key, "cniVersion") == 0) {  /* the last one counts, as in Python's dict */
        char text[16];
        struct scan at = *s;
        found->version = versions[VERSION_COUNT - 1];
        found->supported = 0;
        if (s->p >= s->end || *s->p != '"')
            return skip_value(s);
        if (read_string(s, text, sizeof text) < 0) {  /* longer: no version we support */
            *s = at;
            return read_string(s, NULL, 0) < 0 ? -1 : 0;
        }
        for (size_t i = 0; i < VERSION_COUNT; i++)
            if (strcmp(text, versions[i]) == 0) {
                found->version = versions[i];
                found->supported = 1;
            }
        return 0;
    }
    if (strcmp(key, "ipam") != 0)
        return skip_value(s);
    strcpy(found->path, DEFAULT_SOCKET);
    found->timeout = DEFAULT_TIMEOUT;
    found->has_ipam = s->p < s->end && *s->p == '{';
    return each_member(s, ipam_member, found);
}

static int find_config(const struct buffer *input, struct config *found) {
    struct scan s = {input->data, input->data + input->len};
    strcpy(found->path, DEFAULT_SOCKET);
    found->timeout = DEFAULT_TIMEOUT;
    found->version = versions[VERSION_COUNT - 1];
    found->supported = found->has_ipam = 0;
    if (each_member(&s, config_member, found) < 0)
        return -1;
    skip_space(&s);
    return s.p == s.end && found->has_ipam ? 0 : -1;
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
    if (append_text(request, "}, \"stdin\": ") < 0)
        return -1;
    return append_json_string(request, input->data, input->len);  /* ask_agent closes it */
}

/* ---- the exchange, within one deadline ---- */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* The socket's send or receive timeout set to what is left until `deadline`: 1, or 0 when
 * nothing is left, -1 on error. */
static int arm(int fd, int option, double deadline) {
    double left = deadline - now();
    if (left <= 0)
        return 0;
    struct timeval timeout = {.tv_sec = (time_t)left};
    timeout.tv_usec = (suseconds_t)((left - (double)timeout.tv_sec) * 1e6);
    if (timeout.tv_sec == 0 && timeout.tv_usec == 0)
        timeout.tv_usec = 1;  /* zero would mean no timeout at all */
    return setsockopt(fd, SOL_SOCKET, option, &timeout, sizeof timeout) == 0 ? 1 : -1;
}

enum outcome { ANSWERED, UNREACHABLE, TIMED_OUT, CLOSED, UNREADABLE };

/* One exchange with the agent before `deadline`; UNREACHABLE leaves the reason in errno. A
 * blocking connect with a send timeout sleeps in the kernel while the agent's listen queue is
 * full (a burst of pods), until there is room or the deadline passes. */
static enum outcome ask_agent(const char *path, double deadline, struct buffer *request,
                              struct buffer *reply) {
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    enum outcome outcome = UNREACHABLE;
    int armed = 1, fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return UNREACHABLE;
    strcpy(address.sun_path, path);
    for (;;) {
        if ((armed = arm(fd, SO_SNDTIMEO, deadline)) <= 0)
            goto done;
        if (connect(fd, (struct sockaddr *)&address, sizeof address) == 0)
            break;
        if (errno != EINTR)
            goto done;
    }
    char tail[64];
    double left = deadline - now();
    snprintf(tail, sizeof tail, ", \"timeout\": %.3f}\n", left > 0.001 ? left : 0.001);
    if (append_text(request, tail) < 0)
        goto done;
    for (size_t done = 0; done < request->len;) {
        if ((armed = arm(fd, SO_SNDTIMEO, deadline)) <= 0)
            goto done;
        ssize_t sent = send(fd, request->data + done, request->len - done, MSG_NOSIGNAL);
        if (sent < 0 && errno != EINTR)
            goto done;
        done += sent > 0 ? (size_t)sent : 0;
    }
    while (reply->len == 0 || reply->data[reply->len - 1] != '\n') {
        char chunk[65536];
        if ((armed = arm(fd, SO_RCVTIMEO, deadline)) <= 0)
            goto done;
        ssize_t got = recv(fd, chunk, sizeof chunk, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            goto done;
        if (got == 0) {  /* it went away mid-request (stopped, crashed) */
            outcome = CLOSED;
            goto done;
        }
        if (reply->len + (size_t)got > MAX_REPLY || append(reply, chunk, (size_t)got) < 0) {
            outcome = UNREADABLE;
            goto done;
        }
    }
    outcome = ANSWERED;
done:
    if (outcome == UNREACHABLE && (armed == 0 || errno == EAGAIN || errno == EWOULDBLOCK))
        outcome = TIMED_OUT;  /* the deadline passed (a send or receive timeout: EAGAIN) */
    int saved = errno;
    close(fd);
    errno = saved;
    return outcome;
}

/* ---- answers given here, in the Python plugin's words and JSON (ipam/cni.py) ---- */

/* `text` as a JSON string the way Python's json.dumps writes it (ensure_ascii). */
static void print_json_string(const char *text) {
    const unsigned char *p = (const unsigned char *)text;
    putchar('"');
    while (*p) {
        unsigned int code = *p++;
        int more = code < 0x80 ? 0 : code < 0xe0 ? 1 : code < 0xf0 ? 2 : 3;
        if (more)
            code &= 0x3f >> more;
        for (; more > 0 && (*p & 0xc0) == 0x80; more--)
            code = code << 6 | (*p++ & 0x3f);
        const char *escape = code == '"' ? "\\\"" : code == '\\' ? "\\\\" : code == '\n' ? "\\n"
                             : code == '\r' ? "\\r" : code == '\t' ? "\\t" : code == '\b' ? "\\b"
                             : code == '\f' ? "\\f" : NULL;
        if (escape)
            fputs(escape, stdout);
        else if (code >= 0x20 && code < 0x7f)
            putchar((int)code);
        else if (code < 0x10000)
            printf("\\u%04x", code);
        else  /* a surrogate pair */
            printf("\\u%04x\\u%04x", 0xd800 + ((code - 0x10000) >> 10),
                   0xdc00 + ((code - 0x10000) & 0x3ff));
    }
    putchar('"');
}

/* The spec's error JSON on stdout, exit status 1. */
static void fail(const struct config *config, int code, const char *format, ...) {
    char msg[1024];
    va_list args;
    va_start(args, format);
    vsnprintf(msg, sizeof msg, format, args);
    va_end(args);
    printf("{\"cniVersion\": \"%s\", \"code\": %d, \"msg\": ", config->version, code);
    print_json_string(msg);
    printf("}\n");
    fflush(stdout);
    exit(1);
}

/* What the agent's silence means, as cni.exchange says it. */
static void agent_failed(const struct config *config, const char *command, enum outcome outcome) {
    int code = strcmp(command, "STATUS") == 0 ? NOT_AVAILABLE : TRY_AGAIN_LATER;
    if (outcome == TIMED_OUT)
        fail(config, code, "pipit-agent did not answer on %s within %g s.", config->path,
             config->timeout);
    if (outcome == CLOSED)
        fail(config, code, "pipit-agent on %s closed the connection without an answer (did it "
             "stop or restart?); try again.", config->path);
    char reason[256];
    snprintf(reason, sizeof reason, "%s", strerror(errno));
    for (char *c = reason; *c; c++)
        if (*c >= 'A' && *c <= 'Z')
            *c = (char)(*c - 'A' + 'a');
    fail(config, code, "pipit-agent is not reachable on %s (%s); is it running on this node?",
         config->path, reason);
}

static int print_versions(void) {
    printf("{\"cniVersion\": \"%s\", \"supportedVersions\": [", versions[VERSION_COUNT - 1]);
    for (size_t i = 0; i < VERSION_COUNT; i++)
        printf("%s\"%s\"", i ? ", " : "", versions[i]);
    printf("]}\n");
    return fflush(stdout) == 0 ? 0 : 1;
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
    struct config config;
    const char *command = getenv("CNI_COMMAND");
    double deadline;
    (void)argc;

    if (!command)
        fall_back(argv, NULL);  /* Python names what is missing */
    if (strcmp(command, "VERSION") == 0)
        return print_versions();  /* stdin is left unread */
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
    if (input.len > MAX_INPUT || find_config(&input, &config) < 0
        || build_request(&input, &request) < 0)
        fall_back(argv, &input);
    char python[4096];
    python_plugin(python);
    if (!config.supported && access(python, X_OK) == 0)
        fall_back(argv, &input);  /* Python refuses it before asking the agent: say the same */
    deadline = now() + config.timeout;
    enum outcome outcome = ask_agent(config.path, deadline, &request, &reply);
    if (outcome == UNREADABLE)
        fall_back(argv, &input);
    if (outcome != ANSWERED)
        agent_failed(&config, command, outcome);
    int status = print_reply(&reply);
    if (status < 0)
        fall_back(argv, &input);  /* an older agent, which knows no "CNI" command */
    return status;
}
