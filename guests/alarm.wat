;; alarm: a guest that sets alarms and handles them (docs/alarms.md), for the tests and as
;; the WAT example. Serve it keyed or not; each scope (key, or the service) has one alarm.
;;
;; The body is a command letter, then (for some) a decimal number:
;;   s<ms>   alarm_set(ms): answer its code (0 ok, -2 negative time)
;;   g       alarm_get(): answer the alarm time, or -1
;;   d       alarm_delete(): answer 1 or 0
;;   m<c>    how corral_alarm behaves from now on (kv "mode"): o counts and returns 0 (default),
;;           f counts and returns 1, t counts and traps, a counts and sets the alarm again
;;           100 ms later until the count is 3, r counts and returns 1 until retries is 2,
;;           u counts and traps until retries is 1
;;   c       answer the count of successful alarm runs (kv "count")
;;   t       answer the wall-clock time (ms) of the last successful run (kv "ran"), or 0
;;   l       answer this instance's log: "h" per request, "A<retries>" per alarm run
;;   x<ms>   alarm_set(ms), then trap (502): nothing of it is kept
;;   y<ms>   alarm_set(ms), then throw (500)
;;   z<ms>   alarm_set(ms), then loop until the deadline (504)
;;   anything else: answer "ok"
(module
  (import "corral" "alarm_set" (func $alarm_set (param i64) (result i32)))
  (import "corral" "alarm_get" (func $alarm_get (result i64)))
  (import "corral" "alarm_delete" (func $alarm_delete (result i32)))
  (import "corral" "kv_get" (func $kv_get (param i32 i32 i32 i32) (result i64)))
  (import "corral" "kv_put" (func $kv_put (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock_time_get (param i32 i64 i32) (result i32)))
  (memory (export "memory") 1)
  (tag $panic)
  (global $loglen (mut i32) (i32.const 0))
  ;; 0..8: count.  8..13: "count".  16..20: "mode".  24: the mode byte.  40..48: the clock.  48..51: "ran".
  ;; 32..64: answers.  1024..2048: the request.  4096..: the log.
  (data (i32.const 8) "count")
  (data (i32.const 16) "mode")
  (data (i32.const 48) "ran")

  (func (export "corral_alloc") (param $len i32) (result i32)
    (if (i32.gt_u (local.get $len) (i32.const 1024)) (then (return (i32.const 0))))
    (i32.const 1024))

  (func $log (param $c i32)
    (if (i32.lt_u (global.get $loglen) (i32.const 32768))
      (then (i32.store8 (i32.add (i32.const 4096) (global.get $loglen)) (local.get $c))
            (global.set $loglen (i32.add (global.get $loglen) (i32.const 1))))))

  ;; the decimal number at [ptr, ptr+len), with an optional leading "-"
  (func $number (param $ptr i32) (param $len i32) (result i64)
    (local $n i64) (local $negative i32)
    (if (i32.and (i32.ne (local.get $len) (i32.const 0)) (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 45)))
      (then (local.set $negative (i32.const 1))
            (local.set $ptr (i32.add (local.get $ptr) (i32.const 1)))
            (local.set $len (i32.sub (local.get $len) (i32.const 1)))))
    (block $done
      (loop $next
        (br_if $done (i32.eqz (local.get $len)))
        (local.set $n (i64.add (i64.mul (local.get $n) (i64.const 10))
                               (i64.extend_i32_u (i32.sub (i32.load8_u (local.get $ptr)) (i32.const 48)))))
        (local.set $ptr (i32.add (local.get $ptr) (i32.const 1)))
        (local.set $len (i32.sub (local.get $len) (i32.const 1)))
        (br $next)))
    (if (result i64) (local.get $negative) (then (i64.sub (i64.const 0) (local.get $n))) (else (local.get $n))))

  ;; status byte 0, then $n in signed decimal, ending at 64; the packed response
  (func $answer (param $n i64) (result i64)
    (local $at i32) (local $negative i32)
    (local.set $negative (i64.lt_s (local.get $n) (i64.const 0)))
    (if (local.get $negative) (then (local.set $n (i64.sub (i64.const 0) (local.get $n)))))
    (local.set $at (i32.const 64))
    (loop $next
      (local.set $at (i32.sub (local.get $at) (i32.const 1)))
      (i32.store8 (local.get $at) (i32.wrap_i64 (i64.add (i64.const 48) (i64.rem_u (local.get $n) (i64.const 10)))))
      (local.set $n (i64.div_u (local.get $n) (i64.const 10)))
      (br_if $next (i64.ne (local.get $n) (i64.const 0))))
    (if (local.get $negative)
      (then (local.set $at (i32.sub (local.get $at) (i32.const 1)))
            (i32.store8 (local.get $at) (i32.const 45))))
    (local.set $at (i32.sub (local.get $at) (i32.const 1)))
    (i32.store8 (local.get $at) (i32.const 0))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $at)) (i64.const 32))
            (i64.extend_i32_u (i32.sub (i32.const 64) (local.get $at)))))

  (func $count (result i64)
    (if (i64.eq (call $kv_get (i32.const 8) (i32.const 5) (i32.const 0) (i32.const 8)) (i64.const 8))
      (then (return (i64.load (i32.const 0)))))
    (i64.const 0))

  (func (export "corral_handle") (param $ptr i32) (param $len i32) (result i64)
    (local $c i32) (local $arg i64)
    (call $log (i32.const 104))  ;; "h"
    (if (i32.eqz (local.get $len)) (then (return (call $answer (i64.const 0)))))
    (local.set $c (i32.load8_u (local.get $ptr)))
    (local.set $arg (call $number (i32.add (local.get $ptr) (i32.const 1)) (i32.sub (local.get $len) (i32.const 1))))
    (if (i32.eq (local.get $c) (i32.const 115))  ;; s
      (then (return (call $answer (i64.extend_i32_s (call $alarm_set (local.get $arg)))))))
    (if (i32.eq (local.get $c) (i32.const 103))  ;; g
      (then (return (call $answer (call $alarm_get)))))
    (if (i32.eq (local.get $c) (i32.const 100))  ;; d
      (then (return (call $answer (i64.extend_i32_s (call $alarm_delete))))))
    (if (i32.eq (local.get $c) (i32.const 109))  ;; m
      (then (i32.store8 (i32.const 24) (i32.load8_u (i32.add (local.get $ptr) (i32.const 1))))
            (return (call $answer (i64.extend_i32_s
              (call $kv_put (i32.const 16) (i32.const 4) (i32.const 24) (i32.const 1)))))))
    (if (i32.eq (local.get $c) (i32.const 99))  ;; c
      (then (return (call $answer (call $count)))))
    (if (i32.eq (local.get $c) (i32.const 116))  ;; t
      (then (i64.store (i32.const 40) (i64.const 0))
            (drop (call $kv_get (i32.const 48) (i32.const 3) (i32.const 40) (i32.const 8)))
            (return (call $answer (i64.load (i32.const 40))))))
    (if (i32.eq (local.get $c) (i32.const 108))  ;; l
      (then (i32.store8 (i32.const 4095) (i32.const 0))
            (return (i64.or (i64.shl (i64.const 4095) (i64.const 32))
                            (i64.extend_i32_u (i32.add (global.get $loglen) (i32.const 1)))))))
    (if (i32.eq (local.get $c) (i32.const 120))  ;; x
      (then (drop (call $alarm_set (local.get $arg))) (unreachable)))
    (if (i32.eq (local.get $c) (i32.const 121))  ;; y
      (then (drop (call $alarm_set (local.get $arg))) (throw $panic)))
    (if (i32.eq (local.get $c) (i32.const 122))  ;; z
      (then (drop (call $alarm_set (local.get $arg))) (loop $forever (br $forever))))
    (call $answer (i64.const 0)))

  ;; docs/alarms.md: 0 done (its writes kept, the alarm deleted unless it set another),
  ;; anything else failed (nothing kept; retried after a backoff)
  (func (export "corral_alarm") (param $retries i32) (result i32)
    (local $mode i32)
    (call $log (i32.const 65))  ;; "A"
    (call $log (i32.add (i32.const 48) (local.get $retries)))
    (i64.store (i32.const 0) (i64.add (call $count) (i64.const 1)))
    (drop (call $kv_put (i32.const 8) (i32.const 5) (i32.const 0) (i32.const 8)))
    (drop (call $clock_time_get (i32.const 0) (i64.const 1000000) (i32.const 40)))
    (i64.store (i32.const 40) (i64.div_u (i64.load (i32.const 40)) (i64.const 1000000)))
    (drop (call $kv_put (i32.const 48) (i32.const 3) (i32.const 40) (i32.const 8)))
    (i32.store8 (i32.const 24) (i32.const 111))
    (drop (call $kv_get (i32.const 16) (i32.const 4) (i32.const 24) (i32.const 1)))
    (local.set $mode (i32.load8_u (i32.const 24)))
    (if (i32.eq (local.get $mode) (i32.const 102)) (then (return (i32.const 1))))  ;; f
    (if (i32.eq (local.get $mode) (i32.const 116)) (then (unreachable)))           ;; t
    (if (i32.eq (local.get $mode) (i32.const 114))                                 ;; r
      (then (if (i32.lt_u (local.get $retries) (i32.const 2)) (then (return (i32.const 1))))))
    (if (i32.eq (local.get $mode) (i32.const 117))                                 ;; u
      (then (if (i32.eqz (local.get $retries)) (then (unreachable)))))
    (if (i32.eq (local.get $mode) (i32.const 97))                                  ;; a
      (then (if (i64.lt_u (i64.load (i32.const 0)) (i64.const 3))
        (then (drop (call $alarm_set (i64.add (call $alarm_get) (i64.const 100))))))))
    (i32.const 0)))
