;; counter: a stateful running total.
;; Input: empty (add 1) or a decimal delta such as "5" or "-3". Output: the new total in decimal.
;; An input that is not a number answers status 1 and leaves the total alone.
;; The input "boom" adds 1000 and then traps: the host must roll that back (used by the tests).
(module
  (import "hubmesh" "input" (func $input (param i32)))
  (import "hubmesh" "output" (func $output (param i32 i32)))
  (memory (export "memory") 1)
  ;; layout: 0..64 output buffer, 64..72 total (i64), 128.. input (up to 1 KiB)
  (global $calls (mut i64) (i64.const 0))
  (data (i32.const 0) "not a number")

  (func $parse (param $ptr i32) (param $len i32) (result i64 i32)
    ;; returns (value, ok)
    (local $i i32) (local $neg i32) (local $v i64) (local $c i32)
    (if (i32.eqz (local.get $len)) (then (return (i64.const 1) (i32.const 1))))
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 45))
      (then (local.set $neg (i32.const 1)) (local.set $i (i32.const 1))))
    (if (i32.ge_u (local.get $i) (local.get $len)) (then (return (i64.const 0) (i32.const 0))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (local.set $c (i32.sub (i32.load8_u (i32.add (local.get $ptr) (local.get $i))) (i32.const 48)))
        (if (i32.gt_u (local.get $c) (i32.const 9)) (then (return (i64.const 0) (i32.const 0))))
        (local.set $v (i64.add (i64.mul (local.get $v) (i64.const 10)) (i64.extend_i32_u (local.get $c))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (if (local.get $neg) (then (local.set $v (i64.sub (i64.const 0) (local.get $v)))))
    (local.get $v) (i32.const 1))

  (func $format (param $v i64) (result i32 i32)
    ;; writes $v in decimal ending at offset 64; returns (ptr, len)
    (local $p i32) (local $neg i32) (local $u i64)
    (local.set $p (i32.const 64))
    (local.set $u (local.get $v))
    (if (i64.lt_s (local.get $v) (i64.const 0))
      (then (local.set $neg (i32.const 1)) (local.set $u (i64.sub (i64.const 0) (local.get $v)))))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i64.store8 (local.get $p) (i64.add (i64.rem_u (local.get $u) (i64.const 10)) (i64.const 48)))
      (local.set $u (i64.div_u (local.get $u) (i64.const 10)))
      (br_if $digit (i64.ne (local.get $u) (i64.const 0))))
    (if (local.get $neg)
      (then (local.set $p (i32.sub (local.get $p) (i32.const 1))) (i32.store8 (local.get $p) (i32.const 45))))
    (local.get $p) (i32.sub (i32.const 64) (local.get $p)))

  (func (export "hm_invoke") (param $len i32) (result i32)
    (local $delta i64) (local $ok i32) (local $ptr i32) (local $out_len i32)
    (if (i32.gt_u (local.get $len) (i32.const 1024))
      (then (call $output (i32.const 0) (i32.const 12)) (return (i32.const 1))))
    (call $input (i32.const 128))
    (global.set $calls (i64.add (global.get $calls) (i64.const 1)))
    ;; "boom": change the state, then trap
    (if (i32.and (i32.eq (local.get $len) (i32.const 4))
                 (i32.eq (i32.load (i32.const 128)) (i32.const 0x6d6f6f62)))
      (then
        (i64.store (i32.const 64) (i64.add (i64.load (i32.const 64)) (i64.const 1000)))
        unreachable))
    (call $parse (i32.const 128) (local.get $len))
    (local.set $ok)
    (local.set $delta)
    (if (i32.eqz (local.get $ok))
      (then (call $output (i32.const 0) (i32.const 12)) (return (i32.const 1))))
    (i64.store (i32.const 64) (i64.add (i64.load (i32.const 64)) (local.get $delta)))
    (call $format (i64.load (i32.const 64)))
    (local.set $out_len)
    (local.set $ptr)
    (call $output (local.get $ptr) (local.get $out_len))
    (i32.const 0)))
