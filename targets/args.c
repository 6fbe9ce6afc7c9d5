/* args.c -- calls scale(v) for v = 1..10 and prints each result.
 *
 * Probe spec:  scale
 * Prints:      "scale(1)=3" ... "scale(10)=30", one per line.
 * Hazard:      handlers that modify registers: a pre_handler that sets rdi
 *              (the argument) at `scale` changes the printed values, e.g.
 *              rdi += 100 prints "scale(1)=303".
 */
#include <stdio.h>

__attribute__((noipa)) long scale(long v)
{
    return v * 3;
}

int main(void)
{
    for (long v = 1; v <= 10; v++)
        printf("scale(%ld)=%ld\n", v, scale(v));
    return 0;
}
