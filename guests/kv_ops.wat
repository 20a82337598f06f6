;; kv_ops: a corral/1 guest that runs the durable-state operations its request spells out.
;;
;; For tests and the bench (tests/test_state.py builds the bodies). The body is
;; a sequence of operations, numbers little-endian; each appends its result to
;; the response, whose status byte is 0 unless an `E` says otherwise:
;;   P u16 klen, key, u32 vlen, value   kv_put            -> i32 result
;;   G u16 klen, key, u32 cap            kv_get            -> i64 result, then the value if it fit
;;   D u16 klen, key                     kv_delete         -> i32 result
;;   L u16 plen, prefix, u16 alen, after, u32 cap
;;                                       kv_list           -> i64 result, then the bytes written
;;   I u16 klen, key                     add 1 to the u64 stored at key (absent: 0)
;;                                                         -> u64 new value (a failed call: status 1)
;;   R u8 which, 6 x u32                 kv_get/put/delete/list (which = 0..3) with raw arguments
;;                                                         -> i64 result
;;   E u8 status                         stop here, with that status byte (1: 422, 2: 500)
;;   T                                   trap (unreachable): an abort
;;   W                                   spin forever (the deadline interrupts it)
;;   X                                   throw a Wasm exception: an unwind
(module
  (import "corral" "kv_get" (func $kv_get (param i32 i32 i32 i32) (result i64)))
  (import "corral" "kv_put" (func $kv_put (param i32 i32 i32 i32) (result i32)))
  (import "corral" "kv_delete" (func $kv_delete (param i32 i32) (result i32)))
  (import "corral" "kv_list" (func $kv_list (param i32 i32 i32 i32 i32 i32) (result i64)))
  ;; 0..16: scratch.  0x10000..0x50000: the request.  0x50000..0x80000: the response.
  (memory (export "memory") 8)
  (tag $panic)

  (func (export "corral_alloc") (param $len i32) (result i32)
    (if (i32.gt_u (local.get $len) (i32.const 0x40000)) (then (return (i32.const 0))))
    (i32.const 0x10000))

  (func $arg (param $at i32) (param $n i32) (result i32)
    (i32.load (i32.add (local.get $at) (i32.mul (local.get $n) (i32.const 4)))))

  (func (export "corral_handle") (param $ptr i32) (param $len i32) (result i64)
    (local $at i32) (local $end i32) (local $o i32) (local $op i32) (local $status i32)
    (local $klen i32) (local $key i32) (local $vlen i32) (local $cap i32)
    (local $alen i32) (local $after i32) (local $which i32) (local $r i64) (local $n i64)
    (local.set $at (local.get $ptr))
    (local.set $end (i32.add (local.get $ptr) (local.get $len)))
    (local.set $o (i32.const 0x50001))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $at) (local.get $end)))
        (local.set $op (i32.load8_u (local.get $at)))
        (local.set $at (i32.add (local.get $at) (i32.const 1)))
        ;; the ops that start with a u16-prefixed key
        (if (i32.or (i32.or (i32.eq (local.get $op) (i32.const 0x50)) (i32.eq (local.get $op) (i32.const 0x47)))
                    (i32.or (i32.or (i32.eq (local.get $op) (i32.const 0x44)) (i32.eq (local.get $op) (i32.const 0x4c)))
                            (i32.eq (local.get $op) (i32.const 0x49))))
          (then
            (local.set $klen (i32.load16_u (local.get $at)))
            (local.set $key (i32.add (local.get $at) (i32.const 2)))
            (local.set $at (i32.add (local.get $key) (local.get $klen)))))
        (if (i32.eq (local.get $op) (i32.const 0x50)) (then  ;; P
          (local.set $vlen (i32.load (local.get $at)))
          (local.set $at (i32.add (local.get $at) (i32.const 4)))
          (i32.store (local.get $o) (call $kv_put (local.get $key) (local.get $klen) (local.get $at) (local.get $vlen)))
          (local.set $o (i32.add (local.get $o) (i32.const 4)))
          (local.set $at (i32.add (local.get $at) (local.get $vlen)))
          (br $next)))
        (if (i32.eq (local.get $op) (i32.const 0x47)) (then  ;; G
          (local.set $cap (i32.load (local.get $at)))
          (local.set $at (i32.add (local.get $at) (i32.const 4)))
          (local.set $r (call $kv_get (local.get $key) (local.get $klen)
                                      (i32.add (local.get $o) (i32.const 8)) (local.get $cap)))
          (i64.store (local.get $o) (local.get $r))
          (local.set $o (i32.add (local.get $o) (i32.const 8)))
          (if (i32.and (i64.ge_s (local.get $r) (i64.const 0))
                       (i64.le_s (local.get $r) (i64.extend_i32_u (local.get $cap))))
            (then (local.set $o (i32.add (local.get $o) (i32.wrap_i64 (local.get $r))))))
          (br $next)))
        (if (i32.eq (local.get $op) (i32.const 0x44)) (then  ;; D
          (i32.store (local.get $o) (call $kv_delete (local.get $key) (local.get $klen)))
          (local.set $o (i32.add (local.get $o) (i32.const 4)))
          (br $next)))
        (if (i32.eq (local.get $op) (i32.const 0x4c)) (then  ;; L: key is the prefix
          (local.set $alen (i32.load16_u (local.get $at)))
          (local.set $after (i32.add (local.get $at) (i32.const 2)))
          (local.set $at (i32.add (local.get $after) (local.get $alen)))
          (local.set $cap (i32.load (local.get $at)))
          (local.set $at (i32.add (local.get $at) (i32.const 4)))
          (local.set $r (call $kv_list (local.get $key) (local.get $klen) (local.get $after) (local.get $alen)
                                       (i32.add (local.get $o) (i32.const 8)) (local.get $cap)))
          (i64.store (local.get $o) (local.get $r))
          (local.set $o (i32.add (local.get $o) (i32.const 8)))
          (if (i64.gt_s (local.get $r) (i64.const 0))
            (then (local.set $o (i32.add (local.get $o) (i32.wrap_i64 (local.get $r))))))
          (br $next)))
        (if (i32.eq (local.get $op) (i32.const 0x49)) (then  ;; I
          (local.set $r (call $kv_get (local.get $key) (local.get $klen) (i32.const 0) (i32.const 8)))
          (if (i64.eq (local.get $r) (i64.const -1))
            (then (local.set $n (i64.const 0)))
            (else
              (if (i64.ne (local.get $r) (i64.const 8))
                (then (i64.store (local.get $o) (local.get $r))
                      (local.set $o (i32.add (local.get $o) (i32.const 8)))
                      (local.set $status (i32.const 1))
                      (br $done)))
              (local.set $n (i64.load (i32.const 0)))))
          (local.set $n (i64.add (local.get $n) (i64.const 1)))
          (i64.store (i32.const 0) (local.get $n))
          (local.set $r (i64.extend_i32_s (call $kv_put (local.get $key) (local.get $klen) (i32.const 0) (i32.const 8))))
          (if (i64.ne (local.get $r) (i64.const 0))
            (then (i64.store (local.get $o) (local.get $r))
                  (local.set $o (i32.add (local.get $o) (i32.const 8)))
                  (local.set $status (i32.const 1))
                  (br $done)))
          (i64.store (local.get $o) (local.get $n))
          (local.set $o (i32.add (local.get $o) (i32.const 8)))
          (br $next)))
        (if (i32.eq (local.get $op) (i32.const 0x52)) (then  ;; R
          (local.set $which (i32.load8_u (local.get $at)))
          (local.set $at (i32.add (local.get $at) (i32.const 1)))
          (if (i32.eq (local.get $which) (i32.const 0))
            (then (local.set $r (call $kv_get (call $arg (local.get $at) (i32.const 0)) (call $arg (local.get $at) (i32.const 1))
                                              (call $arg (local.get $at) (i32.const 2)) (call $arg (local.get $at) (i32.const 3))))))
          (if (i32.eq (local.get $which) (i32.const 1))
            (then (local.set $r (i64.extend_i32_s
                    (call $kv_put (call $arg (local.get $at) (i32.const 0)) (call $arg (local.get $at) (i32.const 1))
                                  (call $arg (local.get $at) (i32.const 2)) (call $arg (local.get $at) (i32.const 3)))))))
          (if (i32.eq (local.get $which) (i32.const 2))
            (then (local.set $r (i64.extend_i32_s
                    (call $kv_delete (call $arg (local.get $at) (i32.const 0)) (call $arg (local.get $at) (i32.const 1)))))))
          (if (i32.eq (local.get $which) (i32.const 3))
            (then (local.set $r (call $kv_list (call $arg (local.get $at) (i32.const 0)) (call $arg (local.get $at) (i32.const 1))
                                               (call $arg (local.get $at) (i32.const 2)) (call $arg (local.get $at) (i32.const 3))
                                               (call $arg (local.get $at) (i32.const 4)) (call $arg (local.get $at) (i32.const 5))))))
          (local.set $at (i32.add (local.get $at) (i32.const 24)))
          (i64.store (local.get $o) (local.get $r))
          (local.set $o (i32.add (local.get $o) (i32.const 8)))
          (br $next)))
        (if (i32.eq (local.get $op) (i32.const 0x45)) (then  ;; E
          (local.set $status (i32.load8_u (local.get $at)))
          (br $done)))
        (if (i32.eq (local.get $op) (i32.const 0x54)) (then (unreachable)))  ;; T
        (if (i32.eq (local.get $op) (i32.const 0x57)) (then (loop $spin (br $spin))))  ;; W
        (if (i32.eq (local.get $op) (i32.const 0x58)) (then (throw $panic)))  ;; X
        (unreachable)))  ;; an unknown op: the test is broken, say so loudly
    (i32.store8 (i32.const 0x50000) (local.get $status))
    (i64.or (i64.shl (i64.const 0x50000) (i64.const 32))
            (i64.extend_i32_u (i32.sub (local.get $o) (i32.const 0x50000))))))
