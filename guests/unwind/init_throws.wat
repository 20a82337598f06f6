;; init_throws.wat: corral_init throws __cpp_exception, so no instance of it
;; ever finishes initialising: every request is an abort (502), never an
;; unwind (tests/test_unwind.py).
(module
  (memory (export "memory") 1)
  (global $sp (export "__stack_pointer") (mut i32) (i32.const 65536))
  (tag $cpp (export "__cpp_exception") (param i32))
  (func (export "corral_init") (throw $cpp (i32.const 0)))
  (func (export "corral_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "corral_handle") (param i32 i32) (result i64)
    (i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.const 1))))
