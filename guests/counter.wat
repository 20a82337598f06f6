;; counter: a corral/1 guest that keeps a count in linear memory.
;;
;; Serve it with instances = "keyed": each key has its own instance, so its
;; own count. The body says what to do:
;;   ""/"incr"  add one, answer the new count (ASCII decimal)
;;   "get"      answer the count unchanged
;;   "throw"    add one, then throw a Wasm exception out of corral_handle:
;;              an unwind (500); the instance and its count live on
;;   "trap"     add one, then execute `unreachable`: an abort (502); the
;;              instance is never entered again, its count is gone
(module
  (memory (export "memory") 1)
  (tag $panic)
  ;; 0..4: the count.  16..: the response (status byte, digits).  1024..: the request.

  (func (export "corral_alloc") (param $len i32) (result i32)
    (if (i32.gt_u (local.get $len) (i32.const 1024)) (then (return (i32.const 0))))
    (i32.const 1024))

  (func $bump
    (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 1))))

  (func $is (param $ptr i32) (param $len i32) (param $word i64) (param $word_len i32) (result i32)
    ;; does the request equal the first word_len bytes (up to 8) of $word, little-endian?
    (if (i32.ne (local.get $len) (local.get $word_len)) (then (return (i32.const 0))))
    (i64.eq
      (i64.and (i64.load (local.get $ptr))
               (i64.sub (i64.shl (i64.const 1) (i64.extend_i32_u (i32.mul (local.get $len) (i32.const 8))))
                        (i64.const 1)))
      (local.get $word)))

  ;; Write the count as decimal after a status byte 0 at 16; return the packed response.
  (func $answer (result i64)
    (local $n i32) (local $end i32) (local $at i32) (local $digits i32)
    (local.set $n (i32.load (i32.const 0)))
    ;; digits are written backwards from 63, then the response starts before them
    (local.set $at (i32.const 64))
    (loop $next
      (local.set $at (i32.sub (local.get $at) (i32.const 1)))
      (i32.store8 (local.get $at) (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $next (i32.ne (local.get $n) (i32.const 0))))
    (local.set $at (i32.sub (local.get $at) (i32.const 1)))
    (i32.store8 (local.get $at) (i32.const 0))  ;; status byte: ok
    (i64.or (i64.shl (i64.extend_i32_u (local.get $at)) (i64.const 32))
            (i64.extend_i32_u (i32.sub (i32.const 64) (local.get $at)))))

  (func (export "corral_handle") (param $ptr i32) (param $len i32) (result i64)
    (if (call $is (local.get $ptr) (local.get $len) (i64.const 0x746567) (i32.const 3))  ;; "get"
      (then (return (call $answer))))
    (call $bump)
    (if (call $is (local.get $ptr) (local.get $len) (i64.const 0x776f726874) (i32.const 5))  ;; "throw"
      (then (throw $panic)))
    (if (call $is (local.get $ptr) (local.get $len) (i64.const 0x70617274) (i32.const 4))  ;; "trap"
      (then (unreachable)))
    (call $answer)))
