;; faults: a corral/1 test guest that fails in every way docs/guest-abi.md, "Outcomes" names.
;;
;; The body picks the behaviour:
;;   count        add one to a counter in linear memory, answer it (state survives unwinds)
;;   ok           answer "ok"                             200
;;   error        status byte 1, "guest error"            422
;;   panic        count, then status byte 2 (caught)      500, instance kept
;;   throw        count, then a Wasm exception escapes    500, instance kept
;;   unreachable  the `unreachable` instruction           502
;;   oob          a load far outside linear memory        502
;;   div0         integer division by zero                502
;;   loop         an infinite loop                        504 at the deadline
;;   slow         a busy loop of about a quarter second   200 "slow"
;;   grow         memory.grow until refused, then trap    502
;;   growsoft     memory.grow until refused, then status 1  422
;;   recurse      unbounded recursion                     502 (stack overflow)
;;   hog          grow by 100 MiB, touch every page, then loop: resident memory for rss limits
;;   badptr       a response pointer outside memory       502 (ABI violation)
;;   badlen       a response length past the memory end   502 (ABI violation)
;;   empty        a zero-length response                  502 (ABI violation)
;;   badstatus    status byte 9                           502 (ABI violation)
;;   anything else: echoed back with status 0.
(module
  (memory (export "memory") 1)
  (tag $panic)
  (global $depth (mut i32) (i32.const 0))

  (data (i32.const 0)   "count")
  (data (i32.const 16)  "ok")
  (data (i32.const 32)  "error")
  (data (i32.const 48)  "panic")
  (data (i32.const 64)  "throw")
  (data (i32.const 80)  "unreachable")
  (data (i32.const 96)  "oob")
  (data (i32.const 112) "div0")
  (data (i32.const 128) "loop")
  (data (i32.const 144) "slow")
  (data (i32.const 160) "grow")
  (data (i32.const 176) "growsoft")
  (data (i32.const 192) "recurse")
  (data (i32.const 208) "badptr")
  (data (i32.const 224) "badlen")
  (data (i32.const 240) "empty")
  (data (i32.const 256) "badstatus")
  (data (i32.const 272) "hog")
  (data (i32.const 288) "\00ok")
  (data (i32.const 304) "\01guest error")
  (data (i32.const 320) "\02caught panic: boom")
  (data (i32.const 352) "\01out of memory")
  (data (i32.const 368) "\00slow")
  ;; 512: the counter.  1024..1088: count responses.  4096..: the request.

  (func (export "corral_alloc") (param $len i32) (result i32)
    (local $need i32)
    (local.set $need (i32.add (i32.const 4097) (local.get $len)))
    (if (i32.gt_u (local.get $need) (i32.mul (memory.size) (i32.const 65536)))
      (then
        (if (i32.eq
              (memory.grow (i32.sub (i32.shr_u (i32.add (local.get $need) (i32.const 65535)) (i32.const 16))
                                    (memory.size)))
              (i32.const -1))
          (then (return (i32.const 0))))))
    (i32.const 4096))

  ;; Is the request [ptr, ptr+len) equal to the word of word_len bytes at word?
  (func $is (param $ptr i32) (param $len i32) (param $word i32) (param $word_len i32) (result i32)
    (local $i i32)
    (if (i32.ne (local.get $len) (local.get $word_len)) (then (return (i32.const 0))))
    (block $differ
      (loop $next
        (if (i32.eq (local.get $i) (local.get $len)) (then (return (i32.const 1))))
        (br_if $differ (i32.ne (i32.load8_u (i32.add (local.get $ptr) (local.get $i)))
                               (i32.load8_u (i32.add (local.get $word) (local.get $i)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 0))

  (func $respond (param $at i32) (param $len i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $at)) (i64.const 32)) (i64.extend_i32_u (local.get $len))))

  (func $bump
    (i32.store (i32.const 512) (i32.add (i32.load (i32.const 512)) (i32.const 1))))

  ;; The count as decimal after a status byte 0, ending at 1088.
  (func $count (result i64)
    (local $n i32) (local $at i32)
    (local.set $n (i32.load (i32.const 512)))
    (local.set $at (i32.const 1088))
    (loop $next
      (local.set $at (i32.sub (local.get $at) (i32.const 1)))
      (i32.store8 (local.get $at) (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $next (local.get $n)))
    (local.set $at (i32.sub (local.get $at) (i32.const 1)))
    (i32.store8 (local.get $at) (i32.const 0))
    (call $respond (local.get $at) (i32.sub (i32.const 1088) (local.get $at))))

  (func $recurse (param $n i32) (result i32)
    (i32.add (call $recurse (i32.add (local.get $n) (i32.const 1))) (i32.const 1)))

  (func $grow_until_refused
    (loop $more
      (br_if $more (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))))

  (func (export "corral_handle") (param $p i32) (param $n i32) (result i64)
    (local $i i64)
    (if (call $is (local.get $p) (local.get $n) (i32.const 0) (i32.const 5))
      (then (call $bump) (return (call $count))))
    (if (call $is (local.get $p) (local.get $n) (i32.const 16) (i32.const 2))
      (then (return (call $respond (i32.const 288) (i32.const 3)))))
    (if (call $is (local.get $p) (local.get $n) (i32.const 32) (i32.const 5))
      (then (return (call $respond (i32.const 304) (i32.const 12)))))
    (if (call $is (local.get $p) (local.get $n) (i32.const 48) (i32.const 5))
      (then (call $bump) (return (call $respond (i32.const 320) (i32.const 19)))))
    (if (call $is (local.get $p) (local.get $n) (i32.const 64) (i32.const 5))
      (then (call $bump) (throw $panic)))
    (if (call $is (local.get $p) (local.get $n) (i32.const 80) (i32.const 11))
      (then (unreachable)))
    (if (call $is (local.get $p) (local.get $n) (i32.const 96) (i32.const 3))
      (then (return (call $respond (i32.load (i32.const 0xFFFFFFF0)) (i32.const 1)))))
    (if (call $is (local.get $p) (local.get $n) (i32.const 112) (i32.const 4))
      (then (return (call $respond (i32.div_s (i32.const 1) (global.get $depth)) (i32.const 1)))))
    (if (call $is (local.get $p) (local.get $n) (i32.const 128) (i32.const 4))
      (then (loop $forever (br $forever))))
    (if (call $is (local.get $p) (local.get $n) (i32.const 144) (i32.const 4))
      (then
        (loop $spin
          (local.set $i (i64.add (local.get $i) (i64.const 1)))
          (br_if $spin (i64.lt_u (local.get $i) (i64.const 600000000))))
        (return (call $respond (i32.const 368) (i32.const 5)))))
    (if (call $is (local.get $p) (local.get $n) (i32.const 160) (i32.const 4))
      (then (call $grow_until_refused) (unreachable)))
    (if (call $is (local.get $p) (local.get $n) (i32.const 176) (i32.const 8))
      (then (call $grow_until_refused) (return (call $respond (i32.const 352) (i32.const 14)))))
    (if (call $is (local.get $p) (local.get $n) (i32.const 192) (i32.const 7))
      (then (return (call $respond (call $recurse (i32.const 0)) (i32.const 1)))))
    (if (call $is (local.get $p) (local.get $n) (i32.const 208) (i32.const 6))
      (then (return (call $respond (i32.const 0xFFFF0000) (i32.const 10)))))
    (if (call $is (local.get $p) (local.get $n) (i32.const 224) (i32.const 6))
      (then (return (call $respond (i32.const 288) (i32.const 0x7FFFFFFF)))))
    (if (call $is (local.get $p) (local.get $n) (i32.const 240) (i32.const 5))
      (then (return (call $respond (i32.const 288) (i32.const 0)))))
    (if (call $is (local.get $p) (local.get $n) (i32.const 256) (i32.const 9))
      (then
        (i32.store8 (i32.const 1024) (i32.const 9))
        (return (call $respond (i32.const 1024) (i32.const 1)))))
    (if (call $is (local.get $p) (local.get $n) (i32.const 272) (i32.const 3))
      (then
        (local.set $i (i64.extend_i32_u (i32.mul (memory.grow (i32.const 1600)) (i32.const 65536))))
        (loop $touch
          (i32.store8 (i32.wrap_i64 (local.get $i)) (i32.const 1))
          (local.set $i (i64.add (local.get $i) (i64.const 4096)))
          (br_if $touch (i64.lt_u (local.get $i) (i64.extend_i32_u (i32.mul (memory.size) (i32.const 65536))))))
        (loop $forever (br $forever))))
    ;; echo: status byte 0 just before the request
    (i32.store8 (i32.const 4095) (i32.const 0))
    (call $respond (i32.const 4095) (i32.add (local.get $n) (i32.const 1)))))
