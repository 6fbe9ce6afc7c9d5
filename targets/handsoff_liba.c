/* handsoff_liba.c -- library A of `handsoff dl` (tests/test_handsoff.py): lib_fn. */
__attribute__((noipa)) long lib_fn(long x)
{
    return x * 3 + (x >> 2) + 1;
}
