/* corral.h: write a corral/1 guest in freestanding C, in one file.
 *
 *     #include "corral.h"
 *
 *     static corral_reply handle(const uint8_t *request, uint32_t len) {
 *         return corral_ok(request, len);
 *     }
 *     CORRAL_HANDLER(handle)
 *     // optional, run once after instantiation: CORRAL_INIT(setup)
 *
 * Build (guests/build.py does this for the examples):
 *
 *     python -m ziglang cc --target=wasm32-freestanding -O2 -nostdlib \
 *         -mbulk-memory -Wl,--no-entry -o guest.wasm guest.c
 *
 * Memory: wasm32-freestanding has no malloc, so this header keeps a bump
 * arena above __heap_base. corral_alloc empties it and then takes the
 * request buffer from it; the handler takes its response (and any scratch
 * space, via corral_arena_alloc) from it too. Everything in the arena is
 * therefore gone at the next request: keep state that must last in
 * globals, which live in the module's data and keep their values for as
 * long as the instance lives.
 *
 * Faults: freestanding C has no abort(). corral_abort() is __builtin_trap(),
 * a Wasm `unreachable` (wasi-libc's abort() is the same): corral answers 502
 * and never enters the instance again. Report errors the caller should see
 * with corral_error() (status 1, 422).
 *
 * Panics, two ways to a 500 that keep the instance and its globals:
 * - return corral_panicked(msg): status byte 2, a panic the guest caught
 *   itself. Works in any build.
 * - corral_panic(msg): really unwinds. It throws a Wasm exception with the
 *   `__cpp_exception` tag (the one C++ and Rust use) out of every frame up
 *   to the host; corral calls corral_exception_message (exported by
 *   CORRAL_HANDLER) for the message. Frames it passes run no cleanup, so
 *   what they had changed in globals stays changed. Needs the build flags
 *       -mexception-handling
 *       -Wl,--export=__stack_pointer -Wl,--export=__cpp_exception
 *   (the first enables `throw`, which this header then defines the tag
 *   for; the exports let the host restore the shadow stack an escape skips
 *   and recognise the tag). Without -mexception-handling, calling
 *   corral_panic is a compile-time error.
 *
 * Include it in exactly one .c file: it defines functions and exports.
 */
#ifndef CORRAL_H
#define CORRAL_H

#include <stddef.h>
#include <stdint.h>

#define CORRAL_STATUS_OK 0
#define CORRAL_STATUS_ERROR 1
#define CORRAL_STATUS_PANICKED 2

/* A response: (ptr << 32) | len of status byte + body, as corral_handle returns. */
typedef struct {
    int64_t packed;
} corral_reply;

typedef corral_reply (*corral_handler)(const uint8_t *request, uint32_t len);

#define corral_abort() __builtin_trap()

/* Set by the linker: the first address above the stack and static data. */
extern unsigned char __heap_base;

static uint32_t corral__top;           /* the arena's next free address */
static uint32_t corral__request;       /* the buffer corral_alloc handed out */
static uint32_t corral__request_size;

/* The answer when there is no memory left even for an error message. */
static const char corral__oom_reply[] = "\001out of memory";

static inline void corral__reset(void) {
    corral__top = (uint32_t)(uintptr_t)&__heap_base;
}

/* n bytes from the arena, 8-byte aligned, valid until the next request;
 * 0 when memory cannot grow (e.g. at the app's max_memory_mib). */
static inline void *corral_arena_alloc(uint32_t n) {
    if (corral__top == 0)
        corral__reset();
    uint64_t start = ((uint64_t)corral__top + 7) & ~(uint64_t)7;
    uint64_t end = start + n;
    uint64_t have = (uint64_t)__builtin_wasm_memory_size(0) * 65536;
    if (end >= ((uint64_t)1 << 32))
        return 0;
    if (end > have) {
        size_t pages = (size_t)((end - have + 65535) / 65536);
        if (__builtin_wasm_memory_grow(0, pages) == (size_t)-1)
            return 0;
    }
    corral__top = (uint32_t)end;
    return (void *)(uintptr_t)start;
}

static inline corral_reply corral__pack(const void *ptr, uint32_t len) {
    corral_reply reply = {(int64_t)(((uint64_t)(uintptr_t)ptr << 32) | len)};
    return reply;
}

static inline corral_reply corral__out_of_memory(void) {
    return corral__pack(corral__oom_reply, sizeof corral__oom_reply - 1);
}

/* A reply with room for len body bytes after the status byte: fill them
 * through *body. When out of memory, *body is 0 and the reply is an error. */
static inline corral_reply corral_reply_alloc(uint8_t status, uint32_t len, uint8_t **body) {
    uint8_t *out = len < UINT32_MAX ? corral_arena_alloc(len + 1) : 0;
    if (!out) {
        *body = 0;
        return corral__out_of_memory();
    }
    out[0] = status;
    *body = out + 1;
    return corral__pack(out, len + 1);
}

static inline corral_reply corral_reply_bytes(uint8_t status, const void *data, uint32_t len) {
    uint8_t *body;
    corral_reply reply = corral_reply_alloc(status, len, &body);
    if (body)
        __builtin_memcpy(body, data, len); /* memory.copy, with -mbulk-memory */
    return reply;
}

/* 200: the body is len bytes at data (copied). */
static inline corral_reply corral_ok(const void *data, uint32_t len) {
    return corral_reply_bytes(CORRAL_STATUS_OK, data, len);
}

/* 422: the body is the NUL-terminated UTF-8 message. */
static inline corral_reply corral_error(const char *message) {
    uint32_t len = 0;
    while (message[len])
        len++;
    return corral_reply_bytes(CORRAL_STATUS_ERROR, message, len);
}

/* 500: a panic the guest caught itself (status byte 2); the body is the
 * NUL-terminated UTF-8 message. */
static inline corral_reply corral_panicked(const char *message) {
    uint32_t len = 0;
    while (message[len])
        len++;
    return corral_reply_bytes(CORRAL_STATUS_PANICKED, message, len);
}

#ifdef __wasm_exception_handling__
/* The tag C++ throws with; defined here because zig ships no definition. */
__asm__(".globl __cpp_exception\n"
        ".tagtype __cpp_exception i32\n"
        "__cpp_exception:\n");

/* The message of the panic in flight. Static, not on the stack: the host
 * rewinds the shadow stack before it asks for the message. 4 KiB, the most
 * corral keeps. */
static char corral__panic_message[4096];
static uint32_t corral__panic_length;

/* 500 with msg (NUL-terminated UTF-8, cut at 4 KiB): throws a Wasm
 * exception out of the guest. Never returns. */
__attribute__((noreturn)) static inline void corral_panic(const char *msg) {
    uint32_t len = 0;
    while (msg[len] && len < sizeof corral__panic_message) {
        corral__panic_message[len] = msg[len];
        len++;
    }
    corral__panic_length = len;
    __builtin_wasm_throw(0, corral__panic_message);
}

static inline int64_t corral__exception_message(int32_t exn) {
    static const char foreign[] = "a Wasm exception not thrown by corral_panic";
    if ((uint32_t)exn != (uint32_t)(uintptr_t)corral__panic_message)
        return corral__pack(foreign, sizeof foreign - 1).packed;
    uint32_t len = corral__panic_length;
    corral__panic_length = 0; /* no panic in flight any more */
    return corral__pack(corral__panic_message, len).packed;
}

#define CORRAL__EXCEPTION_MESSAGE                                                 \
    __attribute__((export_name("corral_exception_message"))) int64_t              \
    corral_exception_message(int32_t exn) {                                       \
        return corral__exception_message(exn);                                    \
    }
#else
__attribute__((noreturn,
               unavailable("corral_panic throws a Wasm exception: build with -mexception-handling")))
void corral_panic(const char *msg);
#define CORRAL__EXCEPTION_MESSAGE
#endif

static inline int32_t corral__alloc(int32_t len) {
    corral__reset(); /* the previous request and response are done with */
    corral__request = 0;
    if (len < 0)
        return 0;
    /* at least one byte, so that every request has its own address */
    uint8_t *buffer = corral_arena_alloc(len ? (uint32_t)len : 1);
    if (!buffer)
        return 0;
    corral__request = (uint32_t)(uintptr_t)buffer;
    corral__request_size = (uint32_t)len;
    return (int32_t)corral__request;
}

static inline int64_t corral__handle(corral_handler handler, int32_t ptr, int32_t len) {
    uint32_t request = corral__request;
    corral__request = 0; /* one request per corral_alloc */
    if (request == 0 || (uint32_t)ptr != request || len < 0 || (uint32_t)len > corral__request_size)
        return corral_error("corral_handle: the request is not in the buffer corral_alloc returned").packed;
    return handler((const uint8_t *)(uintptr_t)request, (uint32_t)len).packed;
}

/* Export fn (corral_reply fn(const uint8_t *request, uint32_t len)) as the
 * guest's handler, with corral_alloc beside it (and, in a build with
 * -mexception-handling, corral_exception_message for corral_panic). */
#define CORRAL_HANDLER(fn)                                                        \
    __attribute__((export_name("corral_alloc"))) int32_t corral_alloc(int32_t len) { \
        return corral__alloc(len);                                                \
    }                                                                             \
    __attribute__((export_name("corral_handle"))) int64_t corral_handle(int32_t ptr, \
                                                                        int32_t len) { \
        return corral__handle(fn, ptr, len);                                      \
    }                                                                             \
    CORRAL__EXCEPTION_MESSAGE

/* Export fn (void fn(void)) as corral_init, run once after instantiation. */
#define CORRAL_INIT(fn)                                          \
    __attribute__((export_name("corral_init"))) void corral_init(void) { \
        fn();                                                    \
    }

/* Durable state (docs/state.md): host functions of module "corral". A guest
 * that calls none of them imports none of them. Keys are 1 to
 * max_state_key_bytes arbitrary bytes; a keyed app's entries belong to the
 * instance's key, another app's to the service. A request's writes are its
 * own until it ends: they commit when it answers 200 or 422 (corral_ok,
 * corral_error), and are dropped when it unwinds, traps or runs out of
 * time. Every pointer must lie inside memory: one outside is an abort. */
#define CORRAL_KV_ABSENT (-1)        /* kv_get: no such key */
#define CORRAL_KV_BAD_KEY (-2)       /* empty, or over max_state_key_bytes */
#define CORRAL_KV_TOO_LARGE (-3)     /* kv_put: value over max_state_value_kib */
#define CORRAL_KV_OVER_QUOTA (-4)    /* kv_put: the scope would pass max_state_mib */
#define CORRAL_KV_NO_ROOM (-5)       /* kv_list: the next key alone does not fit */
#define CORRAL_KV_UNAVAILABLE (-6)   /* storage unavailable */

/* The value's length (>= 0), copied to buf only if it fits (len <= cap); or a code above. */
__attribute__((import_module("corral"), import_name("kv_get")))
int64_t corral_kv_get(const void *key, uint32_t key_len, void *buf, uint32_t cap);
/* 0, or CORRAL_KV_BAD_KEY, _TOO_LARGE, _OVER_QUOTA, _UNAVAILABLE. */
__attribute__((import_module("corral"), import_name("kv_put")))
int32_t corral_kv_put(const void *key, uint32_t key_len, const void *value, uint32_t value_len);
/* 1 deleted, 0 was absent, or CORRAL_KV_BAD_KEY, _UNAVAILABLE. */
__attribute__((import_module("corral"), import_name("kv_delete")))
int32_t corral_kv_delete(const void *key, uint32_t key_len);
/* The keys that start with prefix and sort after `after` (bytewise; after_len 0:
 * from the start), ascending, into buf as u32 little-endian length + bytes, as
 * many whole keys as fit: the bytes written, 0 when none is left, or
 * CORRAL_KV_NO_ROOM, _UNAVAILABLE. */
__attribute__((import_module("corral"), import_name("kv_list")))
int64_t corral_kv_list(const void *prefix, uint32_t prefix_len, const void *after, uint32_t after_len,
                       void *buf, uint32_t cap);

/* Alarms (docs/alarms.md): one per scope, part of the request's writes like
 * the kv ones. When it is due, corral calls the guest's corral_alarm(retries)
 * as a request of that scope: export it with CORRAL_ALARM(fn), where
 * int32_t fn(int32_t retries) returns 0 when done (the alarm is deleted unless
 * it set another) and anything else when it failed (nothing it wrote is kept;
 * retried after 1 s, 2 s, ... 32 s, then dropped). At least once: make it
 * idempotent. A guest that imports alarm_* must export corral_alarm. */
#define CORRAL_ALARM_NONE (-1)        /* corral_alarm_get: the scope has no alarm */
#define CORRAL_ALARM_BAD_TIME (-2)    /* corral_alarm_set: a negative time */
/* Wake the scope at at_ms (Unix epoch milliseconds; one already past is due at
 * once), replacing its alarm: 0, CORRAL_ALARM_BAD_TIME or CORRAL_KV_UNAVAILABLE. */
__attribute__((import_module("corral"), import_name("alarm_set")))
int32_t corral_alarm_set(int64_t at_ms);
/* The scope's alarm time, or CORRAL_ALARM_NONE (or CORRAL_KV_UNAVAILABLE). */
__attribute__((import_module("corral"), import_name("alarm_get")))
int64_t corral_alarm_get(void);
/* 1 deleted, 0 there was none. */
__attribute__((import_module("corral"), import_name("alarm_delete")))
int32_t corral_alarm_delete(void);

#define CORRAL_ALARM(fn)                                                          \
    __attribute__((export_name("corral_alarm"))) int32_t corral_alarm(int32_t retries) { \
        return fn(retries);                                                       \
    }

#endif /* CORRAL_H */
