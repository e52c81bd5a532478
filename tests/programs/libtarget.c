/* Shared library for the e2e tests: `work` is the probed function. Its result depends on
 * every earlier call through lib_sink, so a lost or doubled call changes the output. */
volatile unsigned long lib_sink;

unsigned long work(unsigned long x)
{
    lib_sink += x;
    return x * 2654435761u + (lib_sink & 7);
}
