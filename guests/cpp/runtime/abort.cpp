// libc++'s verbose abort, as a trap: the stock one formats to stderr,
// which would make every C++ guest import WASI's fd_write. A trap is an
// abort to corral either way (502).
#include <__verbose_abort>

_LIBCPP_BEGIN_NAMESPACE_STD
[[noreturn]] void __libcpp_verbose_abort(char const*, ...) noexcept { __builtin_trap(); }
_LIBCPP_END_NAMESPACE_STD
