/* retprobe_throw.cc -- a C++ exception thrown through a function with a return probe.
 *
 * Usage:  retprobe_throw [N=30]
 * thrower(i) calls inner(i), which throws for i % 3 == 0; main catches each throw.
 * Prints "thrower(I)=R" or "thrower(I) threw I"; N entries of thrower, N - ceil(N/3)
 * exits, ceil(N/3) unwound.
 */
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

static volatile long sink;

extern "C" __attribute__((noipa)) long inner(long i)
{
    if (i % 3 == 0)
        throw std::runtime_error("three");
    return i * 2 + sink;
}

extern "C" __attribute__((noipa)) long thrower(long i)
{
    long r = inner(i);
    return r + 5;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 30;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (long i = 0; i < n; i++) {
        try {
            std::printf("thrower(%ld)=%ld\n", i, thrower(i));
        } catch (const std::exception &) {
            std::printf("thrower(%ld) threw %ld\n", i, i);
        }
    }
    return 0;
}
