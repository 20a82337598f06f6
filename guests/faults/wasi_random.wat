;; wasi_random: a corral/1 test guest that imports WASI (random_get, proc_exit).
;;   "exit"   calls proc_exit(3): the guest leaves mid-call, an abort (502)
;;   anything else: answers 16 random bytes from random_get
(module
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "corral_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "corral_handle") (param $p i32) (param $n i32) (result i64)
    (if (i32.and (i32.eq (local.get $n) (i32.const 4))
                 (i32.eq (i32.load (local.get $p)) (i32.const 0x74697865)))  ;; "exit"
      (then (call $proc_exit (i32.const 3))))
    (i32.store8 (i32.const 16) (i32.const 0))
    (drop (call $random_get (i32.const 17) (i32.const 16)))
    (i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.const 17))))
