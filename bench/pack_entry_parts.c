/* Where the per-hit time of a pack entry probe goes: copies of the sequence the agent
 * emits for "entry, pack handler" (agent/src/trampoline.rs, emit_pack_entry), each with
 * one part changed, called in the same loop as probe_overhead's leaf and timed in the same
 * run, interleaved. The sequence: guard `cmp fs:[busy],0`, r11 kept below rsp, enabled
 * test, sharded `lock inc` of the hit count (rax kept below rsp), frame aligned to 64
 * with rbx = the site's rsp, 8 GPRs + r11 stored, `mov fs:[busy],1`, `call [rax+slot]`
 * into a shim shaped as the macro's for `Counter::inc` (binding load, thread-pointer hash,
 * `lock inc` of the shard), `mov fs:[busy],0`, panic check, 9 loads, frame closed, then
 * the leaf's own instructions.
 *
 * Build and run (no PIE, so that the thread-local accesses are fs:disp32 as emitted):
 *   gcc -O2 -no-pie -o /tmp/pack_entry_parts bench/pack_entry_parts.c
 *   chrt -f 1 /tmp/pack_entry_parts 201
 * Prints, per variant, the median and the minimum over rounds of ns per call, and each
 * minus the plain leaf's. The argument is the number of rounds (200,000 calls each). */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

/* TRAMP name, tcount (0 none, 1 lock inc, 2 plain inc), busy (fs stores), call (0 none,
 * 1 through the slot), shim (whose address the slot holds at first). */
__asm__(
    ".intel_syntax noprefix\n"
    ".section .tbss,\"awT\",@nobits\n.p2align 6\n"
    "busy: .zero 8\ncpu_id: .zero 8\n"
    ".data\n.p2align 6\n.globl counters\ncounters: .zero 256\n"
    ".p2align 6\nshard_lines: .zero 128\n"
    "binding: .quad shard_lines\n"
    ".text\n"
    ".macro SHIM name, op\n.p2align 6\n.globl \\name\n\\name:\n"
    "  movabs rax, offset binding\n  mov rax, [rax]\n  test rax, rax\n  je 1f\n"
    "  mov rcx, fs:0\n  movabs rdx, 0x9e3779b97f4a7c15\n  imul rdx, rcx\n"
    "  shr rdx, 0x37\n  and edx, 0x40\n"
    ".if \\op == 1\n  lock inc qword ptr [rax+rdx]\n.endif\n"
    ".if \\op == 2\n  inc qword ptr [rax+rdx]\n.endif\n"
    "1: xor eax, eax\n  ret\n"
    ".globl \\name\\()_end\n\\name\\()_end:\n.endm\n"
    "SHIM shim_lock, 1\nSHIM shim_plain, 2\nSHIM shim_none, 0\n"
    ".macro TRAMP name, tcount, busyst, call, shim\n.p2align 8\n.globl \\name\n\\name:\n"
    "  cmp qword ptr fs:busy@tpoff, 0\n  jne 9f\n"
    "  mov [rsp-0x18], r11\n  lea r11, [rip+counters]\n  test byte ptr [r11+0x28], 1\n  je 8f\n"
    ".if \\tcount\n  mov [rsp-8], rax\n  mov eax, dword ptr fs:cpu_id@tpoff\n"
    "  and eax, 1\n  shl eax, 6\n"
    ".if \\tcount == 1\n  lock inc qword ptr [r11+rax+0x40]\n.else\n"
    "  inc qword ptr [r11+rax+0x40]\n.endif\n  mov rax, [rsp-8]\n.endif\n"
    "  mov r11, [rsp-0x18]\n"
    "  mov [rsp-0x10], rbx\n  mov rbx, rsp\n  lea rsp, [rsp-0x2f0]\n  and rsp, -64\n"
    "  mov [rsp+0xc0], rbx\n  mov [rsp], rdi\n  mov [rsp+8], rsi\n  mov [rsp+0x10], rdx\n"
    "  mov [rsp+0x18], rcx\n  mov [rsp+0x20], r8\n  mov [rsp+0x28], r9\n"
    "  mov [rsp+0x30], rax\n  mov [rsp+0x38], r10\n  mov [rsp+0xc8], r11\n"
    ".if \\busyst\n  mov qword ptr fs:busy@tpoff, 1\n.endif\n"
    ".if \\call\n  mov rdi, rsp\n  movabs rsi, 0x1234\n  lea rax, [rip+slot_\\name]\n"
    "  call [rax+0x50]\n.else\n  xor eax, eax\n.endif\n"
    ".if \\busyst\n  mov qword ptr fs:busy@tpoff, 0\n.endif\n"
    "  cmp eax, 1\n  jne 7f\n  ud2\n"
    "7: mov rdi, [rsp]\n  mov rsi, [rsp+8]\n  mov rdx, [rsp+0x10]\n  mov rcx, [rsp+0x18]\n"
    "  mov r8, [rsp+0x20]\n  mov r9, [rsp+0x28]\n  mov rax, [rsp+0x30]\n"
    "  mov r10, [rsp+0x38]\n  mov r11, [rsp+0xc8]\n  mov rsp, rbx\n  mov rbx, [rsp-0x10]\n"
    "6: lea rax, [rsi+rsi]\n  xor rax, rdi\n  add rax, 7\n  ret\n"
    "9: mov [rsp-0x18], r11\n  lea r11, [rip+counters]\n  lock inc qword ptr [r11+0x10]\n"
    "8: mov r11, [rsp-0x18]\n  jmp 6b\n"
    ".data\n.p2align 3\n.globl slot_\\name\nslot_\\name: .zero 0x50\n  .quad \\shim\n.text\n"
    ".endm\n"
    ".p2align 8\n.globl plain\nplain:\n  lea rax, [rsi+rsi]\n  xor rax, rdi\n  add rax, 7\n  ret\n"
    "TRAMP as_emitted, 1, 1, 1, shim_lock\n"
    "TRAMP shim_plain_add, 1, 1, 1, shim_plain\n"
    "TRAMP shim_no_add, 1, 1, 1, shim_none\n"
    "TRAMP no_hit_count, 0, 1, 1, shim_lock\n"
    "TRAMP plain_hit_count, 2, 1, 1, shim_lock\n"
    "TRAMP no_lock_at_all, 0, 1, 1, shim_none\n"
    "TRAMP no_busy_stores, 1, 0, 1, shim_lock\n"
    "TRAMP no_call, 1, 1, 0, shim_lock\n"
    "TRAMP shim_far_away, 1, 1, 1, shim_lock\n"
    "TRAMP as_emitted_copy, 1, 1, 1, shim_lock\n"
    ".att_syntax\n");

typedef unsigned long (*leaf)(unsigned long, unsigned long);
#define V(n) extern unsigned long n(unsigned long, unsigned long);
V(plain) V(as_emitted) V(shim_plain_add) V(shim_no_add) V(no_hit_count) V(plain_hit_count)
V(no_lock_at_all) V(no_busy_stores) V(no_call) V(shim_far_away) V(as_emitted_copy)
extern unsigned char counters[], shim_lock[], shim_lock_end[];
extern void *slot_shim_far_away[];
static const struct { const char *name; leaf f; } vars[] = {
#define E(n) {#n, n},
    E(plain) E(as_emitted) E(shim_plain_add) E(shim_no_add) E(no_hit_count)
    E(plain_hit_count) E(no_lock_at_all) E(no_busy_stores) E(no_call) E(shim_far_away)
    E(as_emitted_copy)
};
#define NV (int)(sizeof vars / sizeof vars[0])
#define N 200000
#define MAX_ROUNDS 1001

__attribute__((noinline)) static double run(leaf f, unsigned long *out) {
    leaf volatile g = f;
    leaf h = g;
    unsigned long acc = 0;
    struct timespec a, b;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
    for (unsigned long i = 0; i < N; i++)
        acc += h(i, acc & 0xff);
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
    *out = acc;
    return ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / N;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The shim copied 2^46 bytes away from the trampolines, as a pack's shim is from a
 * trampoline next to a PIE executable (its only memory operand is absolute). */
static void place_far_shim(void) {
    void *at = (void *)0x400000000000UL;
    void *p = mmap(at, 4096, PROT_READ | PROT_WRITE | PROT_EXEC,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (p != at) {
        perror("mmap");
        exit(1);
    }
    memcpy(p, shim_lock, shim_lock_end - shim_lock);
    slot_shim_far_away[10] = p;
}

int main(int argc, char **argv) {
    static double t[16][MAX_ROUNDS];
    int rounds = argc > 1 ? atoi(argv[1]) : 101;
    if (rounds < 1 || rounds > MAX_ROUNDS)
        rounds = 101;
    unsigned long want, got;
    counters[0x28] = 1;
    place_far_shim();
    run(plain, &want);
    for (int r = 0; r < rounds; r++)
        for (int k = 0; k < NV; k++) {
            t[k][r] = run(vars[k].f, &got);
            if (got != want) {
                printf("%s computed a different result\n", vars[k].name);
                return 1;
            }
        }
    double base_med = 0, base_min = 0;
    printf("%d rounds of %d calls; ns per call (and minus plain's)\n", rounds, N);
    for (int k = 0; k < NV; k++) {
        qsort(t[k], rounds, sizeof(double), cmp);
        double med = t[k][rounds / 2], min = t[k][0];
        if (k == 0)
            base_med = med, base_min = min;
        printf("%-16s median %6.2f (%+6.2f)  min %6.2f (%+6.2f)\n", vars[k].name, med,
               med - base_med, min, min - base_min);
    }
    return 0;
}
