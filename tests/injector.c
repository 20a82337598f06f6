/* A simulated escape (tests/test_confinement.py, docs/confinement.md): make a live
 * process run ONE system call of our choosing, as a guest that escaped Wasm would.
 *
 *     injector PID NR [ARG ...]      an ARG is a number, or s:TEXT for a string
 *
 * It seizes the process's main thread, interrupts it wherever it is (in a system
 * call or in compiled guest code), writes any strings below its stack pointer,
 * points its registers at a `syscall` instruction found in the process's own libc,
 * steps over that one instruction, reads the result, and puts registers and
 * memory back as they were before detaching. It prints one line:
 *     result N        the call returned N (a negative N is -errno)
 *     killed SIG      the process died of signal SIG at that instruction
 *     exec            the call replaced the process's program (execve went through)
 * x86-64 only, as gdb's `call` cannot be used on this machine's CPUs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(2); }

/* The address of a `syscall` instruction (0f 05) in the target's libc text. */
static unsigned long find_syscall(pid_t pid) {
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%d/maps", pid);
    FILE *maps = fopen(path, "r");
    if (!maps) die("maps");
    unsigned long found = 0;
    while (!found && fgets(line, sizeof line, maps)) {
        unsigned long lo, hi;
        char perms[8];
        if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) != 3) continue;
        if (perms[2] != 'x' || !strstr(line, "/libc.so")) continue;
        size_t size = hi - lo;
        unsigned char *text = malloc(size);
        struct iovec local = {text, size}, remote = {(void *)lo, size};
        if (process_vm_readv(pid, &local, 1, &remote, 1, 0) != (ssize_t)size) die("process_vm_readv");
        for (size_t i = 0; i + 1 < size; i++)
            if (text[i] == 0x0f && text[i + 1] == 0x05) { found = lo + i; break; }
        free(text);
    }
    fclose(maps);
    if (!found) { fprintf(stderr, "no syscall instruction in libc\n"); exit(2); }
    return found;
}

static int report_exit(int status) {
    if (WIFSIGNALED(status)) { printf("killed %d\n", WTERMSIG(status)); return 0; }
    if (WIFEXITED(status)) { printf("exited %d\n", WEXITSTATUS(status)); return 0; }
    return -1;
}

int main(int argc, char **argv) {
    if (argc < 3 || argc > 9) { fprintf(stderr, "usage: injector PID NR [ARG ...]\n"); return 2; }
    pid_t pid = atoi(argv[1]);
    unsigned long syscall_at = find_syscall(pid);
    if (ptrace(PTRACE_SEIZE, pid, 0, PTRACE_O_TRACEEXEC) != 0) die("PTRACE_SEIZE");
    if (ptrace(PTRACE_INTERRUPT, pid, 0, 0) != 0) die("PTRACE_INTERRUPT");
    int status;
    if (waitpid(pid, &status, __WALL) != pid) die("waitpid");
    if (report_exit(status) == 0) return 0;

    struct user_regs_struct saved, regs;
    if (ptrace(PTRACE_GETREGS, pid, 0, &saved) != 0) die("PTRACE_GETREGS");
    regs = saved;

    /* Strings go well below the stack pointer (past the red zone), saved word by word. */
    unsigned long scratch = (saved.rsp - 4096) & ~15UL, cursor = scratch;
    long backup[256];
    int words = 0;
    unsigned long args[6] = {0};
    for (int i = 3; i < argc; i++) {
        if (strncmp(argv[i], "s:", 2) == 0) {
            const char *text = argv[i] + 2;
            size_t n = strlen(text) + 1, nwords = (n + 7) / 8;
            args[i - 3] = cursor;
            for (size_t w = 0; w < nwords && words < 256; w++, words++) {
                errno = 0;
                backup[words] = ptrace(PTRACE_PEEKDATA, pid, scratch + 8 * words, 0);
                if (errno) die("PTRACE_PEEKDATA");
                long word = 0;
                memcpy(&word, text + 8 * w, n - 8 * w < 8 ? n - 8 * w : 8);
                if (ptrace(PTRACE_POKEDATA, pid, scratch + 8 * words, word) != 0) die("PTRACE_POKEDATA");
            }
            cursor = scratch + 8 * words;
        } else {
            args[i - 3] = strtoul(argv[i], NULL, 0);
        }
    }
    regs.rax = strtoul(argv[2], NULL, 0);
    regs.orig_rax = -1;   /* not in a system call any more: no restart of the one it was in */
    regs.rdi = args[0]; regs.rsi = args[1]; regs.rdx = args[2];
    regs.r10 = args[3]; regs.r8 = args[4]; regs.r9 = args[5];
    regs.rip = syscall_at;
    if (ptrace(PTRACE_SETREGS, pid, 0, &regs) != 0) die("PTRACE_SETREGS");
    if (ptrace(PTRACE_SINGLESTEP, pid, 0, 0) != 0) die("PTRACE_SINGLESTEP");
    if (waitpid(pid, &status, __WALL) != pid) die("waitpid");
    if (report_exit(status) == 0) return 0;
    if (status >> 8 == (SIGTRAP | (PTRACE_EVENT_EXEC << 8))) {
        printf("exec\n");
        ptrace(PTRACE_DETACH, pid, 0, 0);
        return 0;
    }
    if (ptrace(PTRACE_GETREGS, pid, 0, &regs) != 0) die("PTRACE_GETREGS");
    printf("result %ld\n", (long)regs.rax);
    for (int w = 0; w < words; w++)
        ptrace(PTRACE_POKEDATA, pid, scratch + 8 * w, backup[w]);
    if (ptrace(PTRACE_SETREGS, pid, 0, &saved) != 0) die("PTRACE_SETREGS (restore)");
    if (ptrace(PTRACE_DETACH, pid, 0, 0) != 0) die("PTRACE_DETACH");
    return 0;
}
