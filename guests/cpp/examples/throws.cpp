// throws: a counter that throws C++ exceptions on request, with RAII guards
// that count their destructions, so a caller can see what unwinding did.
//
//   incr              adds one to the count and answers it
//   get               answers the count
//   throw <message>   adds one to the count, then throws
//                     std::runtime_error(<message>) past two guards and out
//                     of the guest: 500 with <message>; the count stays
//   catch <message>   throws the same inside a try two guards deep, catches
//                     it: 200 "caught <message>, <n> guards destroyed"
//   at                std::string::at out of range, thrown inside libc++ and
//                     not caught: 500 with libc++'s message
//   int               throw 42: 500 "an exception of type i" (mangled)
//   alloc <MiB>       allocates that much and answers its size; past the
//                     app's max_memory_mib, operator new throws
//                     std::bad_alloc: 500 "std::bad_alloc", the count stays
//   terminate         throws through a noexcept function: std::terminate,
//                     a trap, so an abort (502) and the count is gone
//   stats             "count=<n> live=<guards alive> destroyed=<guards
//                     destroyed> uncaught=<std::uncaught_exceptions()>
//                     stack=<a frame address> pages=<memory pages>"
//
// `stats` is how the tests see that nothing leaked: live and uncaught are 0
// between requests, and stack and pages stay put however many exceptions
// escaped (stack only if the host restores __stack_pointer after each).
//
// Built by guests/build.py into build/guests/cpp_throws.wasm.
#include <cstddef>
#include <stdexcept>
#include <string>
#include <string_view>

#include "corral.hpp"

namespace {

unsigned long long count;       // lives as long as the instance
unsigned long long constructed, destroyed;

struct guard {
    guard() { ++constructed; }
    ~guard() { ++destroyed; }
    guard(const guard &) = delete;
    guard &operator=(const guard &) = delete;
};

// noinline, and its frame in linear memory (the array's address escapes):
// the frames an escaping exception leaves on the shadow stack
[[gnu::noinline]] void throw_through_guards(std::string_view message) {
    guard outer;
    volatile char scratch[256];
    scratch[0] = 1;
    guard inner;
    throw std::runtime_error(std::string(message));
}

[[gnu::noinline]] void promise_not_to_throw() noexcept { throw_through_guards("broken promise"); }

bool starts(std::string_view request, std::string_view word) {
    return request.substr(0, word.size()) == word;
}

corral::reply handle(std::string_view request) {
    if (request == "incr")
        return corral::ok(std::to_string(++count));
    if (request == "get")
        return corral::ok(std::to_string(count));
    if (starts(request, "throw ")) {
        ++count;
        throw_through_guards(request.substr(6));
    }
    if (starts(request, "catch ")) {
        unsigned long long before = destroyed;
        try {
            throw_through_guards(request.substr(6));
        } catch (const std::runtime_error &caught) {
            return corral::ok("caught " + std::string(caught.what()) + ", " + std::to_string(destroyed - before) +
                              " guards destroyed");
        }
    }
    if (request == "at") {
        std::string small = "abc";
        return corral::ok(std::string(1, small.at(10)));
    }
    if (request == "int")
        throw 42;
    if (starts(request, "alloc ")) {
        std::size_t mib = 0;
        for (char digit : request.substr(6))
            mib = mib * 10 + static_cast<std::size_t>(digit - '0');
        std::string block(mib << 20, 'x');
        return corral::ok(std::to_string(block.size()));
    }
    if (request == "terminate")
        promise_not_to_throw();
    if (request == "stats") {
        volatile char here = 0;
        return corral::ok("count=" + std::to_string(count) + " live=" + std::to_string(constructed - destroyed) +
                          " destroyed=" + std::to_string(destroyed) +
                          " uncaught=" + std::to_string(std::uncaught_exceptions()) +
                          " stack=" + std::to_string(reinterpret_cast<std::uintptr_t>(&here)) +
                          " pages=" + std::to_string(__builtin_wasm_memory_size(0)));
    }
    return corral::error("unknown request: " + std::string(request));
}

}  // namespace

CORRAL_HANDLER(handle)
