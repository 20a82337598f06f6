/* aborts: a counter that traps on request, one request per kind of trap.
 *
 *   abort          corral_abort(), i.e. __builtin_trap(): `unreachable`
 *   oob            loads from beyond linear memory: out-of-bounds trap
 *   div0           divides by zero: integer division by zero trap
 *   anything else  adds one to the count and answers it (ASCII decimal)
 *
 * Every trap is an abort: 502, and corral never enters the instance again,
 * so the count it kept is gone; a fresh instance answers 1 first. (There is
 * no libc in wasm32-freestanding, so no abort(): see corral.h.)
 *
 * Built by guests/build.py into build/guests/c_aborts.wasm. */
#include "corral.h"

static uint64_t count; /* a global: lives as long as the instance */

static int is(const uint8_t *request, uint32_t len, const char *word) {
    uint32_t i = 0;
    for (; i < len; i++)
        if (word[i] != (char)request[i])
            return 0;
    return word[i] == 0;
}

static corral_reply handle(const uint8_t *request, uint32_t len) {
    if (is(request, len, "abort"))
        corral_abort();
    if (is(request, len, "oob")) {
        /* volatile: the compiler must emit the load, past the 4 GiB mark minus 16 */
        volatile uint8_t *far = (volatile uint8_t *)(uintptr_t)0xFFFFFFF0u;
        return corral_ok((const void *)far, *far ? 1 : 0);
    }
    if (is(request, len, "div0")) {
        /* both volatile: with a known dividend clang folds the division
         * into a compare and never executes i32.div_s, which traps on 0 */
        volatile int32_t dividend = 1, zero = 0;
        int32_t quotient = dividend / zero;
        return corral_ok(&quotient, sizeof quotient);
    }

    count++;
    char digits[20];
    uint32_t at = sizeof digits;
    uint64_t n = count;
    do {
        digits[--at] = (char)('0' + n % 10);
        n /= 10;
    } while (n);
    return corral_ok(digits + at, sizeof digits - at);
}

CORRAL_HANDLER(handle)
