/* echo: answers every request with its own bytes, unchanged.
 *
 * Built by guests/build.py into build/guests/c_echo.wasm. */
#include "corral.h"

static corral_reply echo(const uint8_t *request, uint32_t len) {
    return corral_ok(request, len);
}

CORRAL_HANDLER(echo)
