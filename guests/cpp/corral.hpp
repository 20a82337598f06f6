// corral.hpp: write a corral/1 guest in C++ with ordinary exceptions.
//
//     #include "corral.hpp"
//
//     corral::reply handle(std::string_view request) {
//         if (request.empty())
//             return corral::error("empty request");          // 422
//         if (request == "boom")
//             throw std::runtime_error("boom");               // 500, body "boom"
//         return corral::ok(std::string(request));            // 200
//     }
//     CORRAL_HANDLER(handle)
//
// Build with the runtime guests/cxxrt.py makes (guests/build.py does both):
// every object with -mexception-handling -fwasm-exceptions
// -mllvm -wasm-use-legacy-eh=false, linked with `zig cc` as a reactor
// exporting __stack_pointer and __cpp_exception (see guests/README.md).
//
// Faults: an exception the handler does not catch leaves corral_handle as
// a Wasm exception: an unwind (500). The destructors of every frame it
// passes run on the way out (Wasm exceptions unwind in one phase), and the
// instance lives on with its globals as the throw left them. corral then
// calls corral_exception_message, defined here, which catches the
// exception again to take its what() as the 500 body and destroy it, so
// std::uncaught_exceptions() is back to 0. A trap (std::abort, a throw
// through a noexcept function, __builtin_trap) is an abort (502).
//
// Static constructors run in corral_init (a reactor has no _start).
// Include it in exactly one .cpp file: it defines the exports.
#ifndef CORRAL_HPP
#define CORRAL_HPP

#include <cxxabi.h>
#include <unwind.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <string_view>
#include <typeinfo>

namespace corral {

enum class status : std::uint8_t { ok = 0, error = 1, panicked = 2 };

struct reply {
    status code;
    std::string body;
};

inline reply ok(std::string body) { return {status::ok, std::move(body)}; }
inline reply error(std::string message) { return {status::error, std::move(message)}; }

namespace detail {

inline std::string request;          // the buffer corral_alloc handed out
inline bool request_open = false;
inline std::string response;         // status byte + body, valid until the next call
// The host keeps at most 4 KiB of a message; a static buffer because
// corral_exception_message must not allocate while it reports.
inline char message[4096];

inline std::int64_t pack(const void *ptr, std::size_t len) {
    return static_cast<std::int64_t>((static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(ptr)) << 32) |
                                     static_cast<std::uint32_t>(len));
}

inline std::int64_t say(const char *text) {
    std::size_t len = std::strlen(text);
    if (len > sizeof message)
        len = sizeof message;
    std::memmove(message, text, len);
    return pack(message, len);
}

inline std::int32_t alloc(std::int32_t len) {
    request_open = false;
    response = std::string();
    if (len < 0)
        return 0;
    try {
        // one byte at least, so that every request has an address
        request.assign(static_cast<std::size_t>(len ? len : 1), '\0');
    } catch (const std::bad_alloc &) {
        return 0;   // out of memory: corral answers 502
    }
    request_open = true;
    return static_cast<std::int32_t>(reinterpret_cast<std::uintptr_t>(request.data()));
}

template <class Handler>
std::int64_t handle(Handler handler, std::int32_t ptr, std::int32_t len) {
    bool open = request_open;
    request_open = false;   // one request per corral_alloc
    if (!open || ptr != static_cast<std::int32_t>(reinterpret_cast<std::uintptr_t>(request.data())) || len < 0 ||
        static_cast<std::size_t>(len) > request.size()) {
        response = std::string(1, '\1') + "corral_handle: the request is not in the buffer corral_alloc returned";
        return pack(response.data(), response.size());
    }
    // No try here: whatever the handler throws escapes as the unwind.
    reply answer = handler(std::string_view(request.data(), static_cast<std::size_t>(len)));
    response.assign(1, static_cast<char>(answer.code));
    response += answer.body;
    return pack(response.data(), response.size());
}

// The escaped exception's payload is its _Unwind_Exception*. Throwing it
// again with _Unwind_RaiseException, inside a try, hands it back to C++:
// the catch clause takes it (__cxa_begin_catch: no longer uncaught) and
// leaving the clause destroys it (__cxa_end_catch).
inline std::int64_t exception_message(std::int32_t exn) {
    auto *header = reinterpret_cast<_Unwind_Exception *>(static_cast<std::uintptr_t>(exn));
    try {
        _Unwind_RaiseException(header);
    } catch (const std::exception &caught) {
        return say(caught.what());
    } catch (...) {
        const std::type_info *type = abi::__cxa_current_exception_type();
        if (!type)
            return say("a foreign exception");
        // The mangled name (`c++filt -t` reads it): abi::__cxa_demangle
        // would add 120 KiB to every guest.
        static const char prefix[] = "an exception of type ";
        std::size_t len = sizeof prefix - 1;
        std::memcpy(message, prefix, len);
        for (const char *name = type->name(); *name && len < sizeof message; ++name)
            message[len++] = *name;
        return pack(message, len);
    }
    return say("corral_exception_message: the payload was not an exception");
}

}  // namespace detail
}  // namespace corral

extern "C" void __wasm_call_ctors(void);

// Export fn (corral::reply fn(std::string_view request)) as the guest's
// handler, with corral_alloc, corral_init and corral_exception_message.
#define CORRAL_HANDLER(fn)                                                                          \
    extern "C" __attribute__((export_name("corral_init"))) void corral_init(void) {                \
        __wasm_call_ctors();                                                                        \
    }                                                                                               \
    extern "C" __attribute__((export_name("corral_alloc"))) std::int32_t corral_alloc(std::int32_t len) { \
        return corral::detail::alloc(len);                                                          \
    }                                                                                               \
    extern "C" __attribute__((export_name("corral_handle"))) std::int64_t corral_handle(std::int32_t ptr, \
                                                                                        std::int32_t len) { \
        return corral::detail::handle(fn, ptr, len);                                                \
    }                                                                                               \
    extern "C" __attribute__((export_name("corral_exception_message"))) std::int64_t                \
    corral_exception_message(std::int32_t exn) {                                                    \
        return corral::detail::exception_message(exn);                                              \
    }

#endif  // CORRAL_HPP
