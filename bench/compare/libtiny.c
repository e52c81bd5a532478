/* The probed library function of bench/compare.sh: 11 bytes at -O2
 * (add rdi,rdi; xor rdi,rsi; lea rax,[rdi+7]; ret), long enough for a 5-byte patch,
 * short enough that any per-call cost a tool adds is visible. */
__attribute__((noinline, noipa)) unsigned long lib_fn(unsigned long a, unsigned long b)
{
    return ((a + a) ^ b) + 7;
}
