;; always_abort: a corral/1 test guest whose every request traps (unreachable).
(module
  (memory (export "memory") 1)
  (func (export "corral_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "corral_handle") (param i32 i32) (result i64) (unreachable)))
