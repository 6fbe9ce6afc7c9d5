/* libdemo.c -- a shared library for uselib.c (build with build_c(..., shared=True)).
 *
 * Probe spec:  libdemo:lib_add   (the library's file is libdemo-<hash>.so, so the
 *              unique prefix "libdemo" works; the bare name "lib_add" also resolves)
 * Hazard:      probes in a shared library (PIC, load bias != 0, -fPIC code).
 */
__attribute__((noipa)) int lib_add(int a, int b)
{
    return a + b;
}
