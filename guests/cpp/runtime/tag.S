# The tag every C++ throw and catch refers to (libunwind's Unwind-wasm.c
# throws with it; clang's catch pads catch it). Its one i32 field is the
# _Unwind_Exception* of the thrown object. zig 0.17 ships no definition.
.globl __cpp_exception
.tagtype __cpp_exception i32
__cpp_exception:
