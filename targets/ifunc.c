/* ifunc.c -- GNU IFUNC symbols called through the PLT and through function pointers.
 *
 * Probe specs: libc:strlen  libc:memcpy  libm:sin   (each an STT_GNU_IFUNC symbol in
 *              Debian's glibc: the probe must land on the implementation that runs)
 * Usage:       ifunc [N=1000]
 *   N calls of each through the PLT, then N more through a function pointer taken
 *   with &name (a GLOB_DAT slot, bound at load time), so 2N calls each.
 * Prints:      "ifunc: N strlen=S memcpy=M sin=X" with write(2) and hand-made
 *              digits: nothing else in the program calls the three functions.
 * build-flags: -fno-builtin -Wl,--no-as-needed -lm
 * Hazard:      a probe on the IFUNC resolver (the symbol's own value) counts 0.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char src[64] = "a string of some length";
static char dst[64];
size_t (*volatile p_strlen)(const char *) = strlen;
void *(*volatile p_memcpy)(void *, const void *, size_t) = memcpy;
double (*volatile p_sin)(double) = sin;

static char *put(char *o, const char *s) { while (*s) *o++ = *s++; return o; }

static char *num(char *o, long v)
{
    char tmp[24];
    int n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) *o++ = tmp[--n];
    return o;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1000;
    long s = 0, m = 0;
    double x = 0;
    volatile double arg = 0.5;
    for (long i = 0; i < n; i++) {
        s += (long)strlen(src + (i & 7));
        m += ((char *)memcpy(dst, src, 8 + (i & 7)))[0];
        x += sin(arg);
    }
    for (long i = 0; i < n; i++) {
        s += (long)p_strlen(src + (i & 7));
        m += ((char *)p_memcpy(dst, src, 8 + (i & 7)))[0];
        x += p_sin(arg);
    }
    char line[160], *o = line;
    o = put(o, "ifunc: "); o = num(o, n);
    o = put(o, " strlen="); o = num(o, s);
    o = put(o, " memcpy="); o = num(o, m);
    o = put(o, " sin="); o = num(o, (long)(x * 1000));
    *o++ = '\n';
    return write(1, line, (size_t)(o - line)) < 0;
}
