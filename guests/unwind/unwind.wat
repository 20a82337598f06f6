;; unwind.wat: a corral/1 guest that unwinds the way LLVM-built guests do,
;; written by hand so that every path of the host's unwind handling can be
;; driven on purpose (tests/test_unwind.py).
;;
;; Like a C++ or Rust guest it keeps a shadow stack in linear memory, moved
;; by the exported mutable global __stack_pointer, and throws with an
;; exported tag __cpp_exception whose one i32 field points at the exception
;; object. A throw leaves corral_handle before the epilogue that would give
;; the frame back, so without the host's restore every escape leaks 4 KiB of
;; stack, and after 48 of them the next frame lands outside memory.
;;
;; Requests (the first byte is the command):
;;   c        count: adds one to the count, answers it (4 bytes, little-endian)
;;   g        answers the count unchanged
;;   tN       takes a 4 KiB frame and throws __cpp_exception; N (a digit)
;;            chooses what corral_exception_message then does:
;;              0  answers "boom: stack restored" (it checks the stack
;;                 pointer was given back first, and traps if not)
;;              1  traps (unreachable)
;;              2  throws again
;;              3  answers a pointer outside memory
;;              4  answers 5000 bytes starting with an invalid UTF-8 byte
;;              5  spins until the deadline
;;   o        takes a frame and throws another tag (not __cpp_exception)
;;   a        the next corral_alloc takes a frame and throws
;;
;; Layout: message text at 64, response at 2048, request buffer at 4096,
;; shadow stack from 196608 (the top of 3 pages) down.
(module
  (memory (export "memory") 3)
  (global $sp (export "__stack_pointer") (mut i32) (i32.const 196608))
  (tag $cpp (export "__cpp_exception") (param i32))
  (tag $other (param i32))
  (global $count (mut i32) (i32.const 0))
  (global $mode (mut i32) (i32.const 0))
  (global $alloc_throws (mut i32) (i32.const 0))
  (data (i32.const 64) "boom: stack restored")

  ;; what an LLVM prologue does: move the stack pointer down and use the frame
  (func $frame
    (global.set $sp (i32.sub (global.get $sp) (i32.const 4096)))
    (i32.store (global.get $sp) (global.get $count)))

  (func (export "corral_alloc") (param $len i32) (result i32)
    (if (global.get $alloc_throws)
      (then
        (global.set $alloc_throws (i32.const 0))
        (call $frame)
        (throw $cpp (i32.const 64))))
    (i32.const 4096))

  (func $answer (param $value i32) (result i64)
    (i32.store8 (i32.const 2048) (i32.const 0))
    (i32.store (i32.const 2049) (local.get $value))
    (i64.or (i64.shl (i64.const 2048) (i64.const 32)) (i64.const 5)))

  (func (export "corral_handle") (param $ptr i32) (param $len i32) (result i64)
    (local $cmd i32)
    (local.set $cmd (i32.load8_u (local.get $ptr)))
    (if (i32.eq (local.get $cmd) (i32.const 0x63))      ;; c
      (then
        (global.set $count (i32.add (global.get $count) (i32.const 1)))
        (return (call $answer (global.get $count)))))
    (if (i32.eq (local.get $cmd) (i32.const 0x67))      ;; g
      (then (return (call $answer (global.get $count)))))
    (if (i32.eq (local.get $cmd) (i32.const 0x74))      ;; t
      (then
        (global.set $mode (i32.sub (i32.load8_u offset=1 (local.get $ptr)) (i32.const 0x30)))
        (call $frame)
        (throw $cpp (i32.const 64))))
    (if (i32.eq (local.get $cmd) (i32.const 0x6f))      ;; o
      (then
        (call $frame)
        (throw $other (i32.const 64))))
    (if (i32.eq (local.get $cmd) (i32.const 0x61))      ;; a
      (then
        (global.set $alloc_throws (i32.const 1))
        (return (call $answer (global.get $count)))))
    (unreachable))

  (func (export "corral_exception_message") (param $exn i32) (result i64)
    (if (i32.eq (global.get $mode) (i32.const 0))
      (then
        (if (i32.ne (global.get $sp) (i32.const 196608)) (then (unreachable)))
        (return (i64.or (i64.shl (i64.extend_i32_u (local.get $exn)) (i64.const 32)) (i64.const 20)))))
    (if (i32.eq (global.get $mode) (i32.const 1)) (then (unreachable)))
    (if (i32.eq (global.get $mode) (i32.const 2)) (then (throw $cpp (local.get $exn))))
    (if (i32.eq (global.get $mode) (i32.const 3))
      (then (return (i64.or (i64.shl (i64.const 0xFFFF0000) (i64.const 32)) (i64.const 16)))))
    (if (i32.eq (global.get $mode) (i32.const 4))
      (then
        (memory.fill (i32.const 1024) (i32.const 0x78) (i32.const 5000))
        (i32.store8 (i32.const 1024) (i32.const 0xff))
        (return (i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.const 5000)))))
    (loop $forever (br $forever))
    (unreachable))
)
