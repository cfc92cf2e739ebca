// thermostat: a stateful task written in C (wasi-libc, reactor model).
//
// Input: a temperature reading in tenths of a degree, e.g. "215" for 21.5 C, or "set=200" to
// change the target. Output: JSON with the heater decision (with 0.5 C of hysteresis), the
// target, the last reading and statistics over every reading so far. All state lives in static
// variables, i.e. in the module's linear memory, so hubmesh checkpoints and restores it.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((import_module("hubmesh"), import_name("input"))) void hm_input(void *ptr);
__attribute__((import_module("hubmesh"), import_name("output"))) void hm_output(const void *ptr, int len);

static char in[256];
static char out[512];
static int target = 200;
static int heating = 0;
static long readings = 0;
static long sum = 0;
static int min_seen = 0, max_seen = 0, last = 0;

static int reply(int status, int n) {
    hm_output(out, n < 0 ? 0 : (n >= (int)sizeof out ? (int)sizeof out - 1 : n));
    return status;
}

static int parse_int(const char *s, int *v) {
    char *end = 0;
    long x = strtol(s, &end, 10);
    if (end == s || *end != '\0' || x < -1000 || x > 1500) return 0;
    *v = (int)x;
    return 1;
}

__attribute__((export_name("hm_invoke"))) int hm_invoke(int len) {
    if (len < 0 || len >= (int)sizeof in) {
        return reply(1, snprintf(out, sizeof out, "{\"error\":\"input longer than %d bytes\"}", (int)sizeof in - 1));
    }
    hm_input(in);
    in[len] = '\0';
    int v;
    if (strncmp(in, "set=", 4) == 0) {
        if (!parse_int(in + 4, &v)) return reply(1, snprintf(out, sizeof out, "{\"error\":\"bad target\"}"));
        target = v;
    } else if (len > 0) {
        if (!parse_int(in, &v)) return reply(1, snprintf(out, sizeof out, "{\"error\":\"bad reading\"}"));
        if (readings == 0 || v < min_seen) min_seen = v;
        if (readings == 0 || v > max_seen) max_seen = v;
        readings++;
        sum += v;
        last = v;
        if (v < target - 5) heating = 1;
        if (v > target + 5) heating = 0;
    }
    long mean = readings ? sum / readings : 0;
    return reply(0, snprintf(out, sizeof out,
        "{\"heating\":%s,\"target\":%d,\"last\":%d,\"readings\":%ld,\"min\":%d,\"max\":%d,\"mean\":%ld}",
        heating ? "true" : "false", target, last, readings, min_seen, max_seen, mean));
}
