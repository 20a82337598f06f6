/* panics: a counter that panics on request, both ways a C guest can.
 *
 *   panic <message>   adds one to the count, formats "<message> (count <n>)"
 *                     in a stack buffer and corral_panic()s with it: a Wasm
 *                     exception out of the guest, 500 with that message
 *   caught <message>  answers status byte 2 with <message>: also 500, the
 *                     guest returned normally
 *   get               answers the count
 *   stack             answers an address in this request's stack frame
 *   anything else     adds one to the count and answers it
 *
 * The count survives both kinds of panic: corral keeps the instance. The
 * stack answer stays the same however many panics escaped, as long as the
 * host restores __stack_pointer after each (the exception skips the
 * epilogue that would have).
 *
 * Built by guests/build.py, with -mexception-handling, into
 * build/guests/c_panics.wasm. */
#include "corral.h"

static uint64_t count; /* a global: lives as long as the instance */

static int starts(const uint8_t *request, uint32_t len, const char *word) {
    uint32_t i = 0;
    for (; word[i]; i++)
        if (i >= len || word[i] != (char)request[i])
            return 0;
    return 1;
}

static uint32_t decimal(char *to, uint64_t n) {
    char digits[20];
    uint32_t at = sizeof digits, len = 0;
    do {
        digits[--at] = (char)('0' + n % 10);
        n /= 10;
    } while (n);
    while (at < sizeof digits)
        to[len++] = digits[at++];
    return len;
}

/* noinline, and its buffer in linear memory: a frame on the shadow stack
 * that the escaping exception never pops */
__attribute__((noinline)) static void panic_with_count(const uint8_t *text, uint32_t len) {
    char message[256];
    uint32_t at = 0;
    for (uint32_t i = 0; i < len && at < 200; i++)
        message[at++] = (char)text[i];
    const char middle[] = " (count ";
    for (uint32_t i = 0; middle[i]; i++)
        message[at++] = middle[i];
    at += decimal(message + at, count);
    message[at++] = ')';
    message[at] = 0;
    corral_panic(message);
}

static corral_reply handle(const uint8_t *request, uint32_t len) {
    char digits[20];
    if (starts(request, len, "panic ")) {
        count++;
        panic_with_count(request + 6, len - 6);
    }
    if (starts(request, len, "caught ")) {
        char message[256];
        uint32_t n = len - 7 < sizeof message - 1 ? len - 7 : sizeof message - 1;
        for (uint32_t i = 0; i < n; i++)
            message[i] = (char)request[7 + i];
        message[n] = 0;
        return corral_panicked(message);
    }
    if (starts(request, len, "stack")) {
        volatile char here = 0;
        return corral_ok(digits, decimal(digits, (uint64_t)(uintptr_t)&here));
    }
    if (!starts(request, len, "get"))
        count++;
    return corral_ok(digits, decimal(digits, count));
}

CORRAL_HANDLER(handle)
