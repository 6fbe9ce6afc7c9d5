/* handsoff_libb.c -- library B of `handsoff dl`: the same layout as library A with
 * other code, so dlopen usually maps it where A was. */
__attribute__((noipa)) long lib_fn(long x)
{
    return x * 5 + (x >> 3) + 7;
}
