;; echo: a corral/1 guest that answers every request with its own body.
;;
;; The request buffer starts one byte after a status byte at offset 1024, so
;; the response is the request itself with status 0 in front: no copy.
(module
  (memory (export "memory") 1)

  ;; corral_alloc(len) -> ptr: room for len bytes at 1025, growing memory as needed.
  (func (export "corral_alloc") (param $len i32) (result i32)
    (local $need i32)
    (local.set $need (i32.add (i32.const 1025) (local.get $len)))
    (if (i32.gt_u (local.get $need) (i32.mul (memory.size) (i32.const 65536)))
      (then
        (if (i32.eq
              (memory.grow
                (i32.sub
                  (i32.shr_u (i32.add (local.get $need) (i32.const 65535)) (i32.const 16))
                  (memory.size)))
              (i32.const -1))
          (then (return (i32.const 0))))))  ;; 0: out of memory
    (i32.const 1025))

  ;; corral_handle(ptr, len) -> (resp_ptr << 32) | resp_len
  (func (export "corral_handle") (param $ptr i32) (param $len i32) (result i64)
    (i32.store8 (i32.const 1024) (i32.const 0))  ;; status byte: ok
    (i64.or
      (i64.shl (i64.const 1024) (i64.const 32))
      (i64.extend_i32_u (i32.add (local.get $len) (i32.const 1))))))
