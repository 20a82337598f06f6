;; counter_durable: the keyed counter of counter.wat, its count kept in durable state.
;;
;; Serve it with instances = "keyed": each key is its own scope, so its own
;; count, stored under the state key "count" with kv_put (docs/state.md). The
;; count survives what throws an instance away: a trap, kill -9 of its
;; worker, a daemon restart. The body says what to do:
;;   ""/"incr"  add one, answer the new count (ASCII decimal)
;;   "get"      answer the count unchanged
;;   "throw"    add one, then throw a Wasm exception: an unwind (500); the add is not kept
;;   "trap"     add one, then execute `unreachable`: an abort (502); the add is not kept
;;   "silence N"  from now on, the count goes back to 0 after N ms without an "incr"
;;              (an alarm, docs/alarms.md; N = 0: never, the default); answers 0
;; A kv_get or kv_put that fails answers 422 with the code.
(module
  (import "corral" "kv_get" (func $kv_get (param i32 i32 i32 i32) (result i64)))
  (import "corral" "kv_put" (func $kv_put (param i32 i32 i32 i32) (result i32)))
  (import "corral" "kv_delete" (func $kv_delete (param i32 i32) (result i32)))
  (import "corral" "alarm_set" (func $alarm_set (param i64) (result i32)))
  ;; the wall clock, for "N ms from now": alarm times are Unix epoch milliseconds
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock_time_get (param i32 i64 i32) (result i32)))
  (memory (export "memory") 1)
  (tag $panic)
  ;; 0..8: the count.  8..13: the state key "count".  16..: the response.
  ;; 64..71: the state key "silence".  72..80: its value.  80..88: the clock.  1024..: the request.
  (data (i32.const 8) "count")
  (data (i32.const 64) "silence")

  ;; the silence period (ms) of this key, 0 if none
  (func $silence (result i64)
    (if (i64.eq (call $kv_get (i32.const 64) (i32.const 7) (i32.const 72) (i32.const 8)) (i64.const 8))
      (then (return (i64.load (i32.const 72)))))
    (i64.const 0))

  ;; set the alarm to now + the silence period (if there is one)
  (func $arm
    (local $ms i64)
    (local.set $ms (call $silence))
    (if (i64.eqz (local.get $ms)) (then (return)))
    (drop (call $clock_time_get (i32.const 0) (i64.const 1000000) (i32.const 80)))
    (drop (call $alarm_set (i64.add (i64.div_u (i64.load (i32.const 80)) (i64.const 1000000)) (local.get $ms)))))

  ;; the alarm: a period of silence is over; forget the count (docs/alarms.md)
  (func (export "corral_alarm") (param $retries i32) (result i32)
    (drop (call $kv_delete (i32.const 8) (i32.const 5)))
    (i32.const 0))

  (func (export "corral_alloc") (param $len i32) (result i32)
    (if (i32.gt_u (local.get $len) (i32.const 1024)) (then (return (i32.const 0))))
    (i32.const 1024))

  (func $is (param $ptr i32) (param $len i32) (param $word i64) (param $word_len i32) (result i32)
    (if (i32.ne (local.get $len) (local.get $word_len)) (then (return (i32.const 0))))
    (i64.eq
      (i64.and (i64.load (local.get $ptr))
               (i64.sub (i64.shl (i64.const 1) (i64.extend_i32_u (i32.mul (local.get $len) (i32.const 8))))
                        (i64.const 1)))
      (local.get $word)))

  ;; status byte, then $n in decimal, ending at 64; returns the packed response
  (func $answer (param $status i32) (param $n i64) (result i64)
    (local $at i32)
    (local.set $at (i32.const 64))
    (loop $next
      (local.set $at (i32.sub (local.get $at) (i32.const 1)))
      (i32.store8 (local.get $at) (i32.wrap_i64 (i64.add (i64.const 48) (i64.rem_u (local.get $n) (i64.const 10)))))
      (local.set $n (i64.div_u (local.get $n) (i64.const 10)))
      (br_if $next (i64.ne (local.get $n) (i64.const 0))))
    (local.set $at (i32.sub (local.get $at) (i32.const 1)))
    (i32.store8 (local.get $at) (local.get $status))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $at)) (i64.const 32))
            (i64.extend_i32_u (i32.sub (i32.const 64) (local.get $at)))))

  (func (export "corral_handle") (param $ptr i32) (param $len i32) (result i64)
    (local $got i64) (local $put i32) (local $at i32) (local $ms i64)
    (if (i32.and (i32.gt_u (local.get $len) (i32.const 8))
                 (i64.eq (i64.load (local.get $ptr)) (i64.const 0x2065636e656c6973)))  ;; "silence "
      (then
        (local.set $at (i32.add (local.get $ptr) (i32.const 8)))
        (loop $digit
          (local.set $ms (i64.add (i64.mul (local.get $ms) (i64.const 10))
                                  (i64.extend_i32_u (i32.sub (i32.load8_u (local.get $at)) (i32.const 48)))))
          (local.set $at (i32.add (local.get $at) (i32.const 1)))
          (br_if $digit (i32.lt_u (local.get $at) (i32.add (local.get $ptr) (local.get $len)))))
        (i64.store (i32.const 72) (local.get $ms))
        (drop (call $kv_put (i32.const 64) (i32.const 7) (i32.const 72) (i32.const 8)))
        (call $arm)
        (return (call $answer (i32.const 0) (i64.const 0)))))
    (local.set $got (call $kv_get (i32.const 8) (i32.const 5) (i32.const 0) (i32.const 8)))
    (if (i64.eq (local.get $got) (i64.const -1))
      (then (i64.store (i32.const 0) (i64.const 0)))
      (else (if (i64.ne (local.get $got) (i64.const 8))
        (then (return (call $answer (i32.const 1) (i64.sub (i64.const 0) (local.get $got))))))))
    (if (call $is (local.get $ptr) (local.get $len) (i64.const 0x746567) (i32.const 3))  ;; "get"
      (then (return (call $answer (i32.const 0) (i64.load (i32.const 0))))))
    (i64.store (i32.const 0) (i64.add (i64.load (i32.const 0)) (i64.const 1)))
    (local.set $put (call $kv_put (i32.const 8) (i32.const 5) (i32.const 0) (i32.const 8)))
    (if (i32.ne (local.get $put) (i32.const 0))
      (then (return (call $answer (i32.const 1) (i64.extend_i32_u (i32.sub (i32.const 0) (local.get $put)))))))
    (call $arm)
    (if (call $is (local.get $ptr) (local.get $len) (i64.const 0x776f726874) (i32.const 5))  ;; "throw"
      (then (throw $panic)))
    (if (call $is (local.get $ptr) (local.get $len) (i64.const 0x70617274) (i32.const 4))  ;; "trap"
      (then (unreachable)))
    (call $answer (i32.const 0) (i64.load (i32.const 0)))))
