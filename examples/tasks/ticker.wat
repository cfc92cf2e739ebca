;; ticker: a long-running stateful task. The host calls hm_tick on the task's interval; each tick
;; adds one. An invocation answers the number of ticks so far, in decimal.
(module
  (import "hubmesh" "output" (func $output (param i32 i32)))
  (memory (export "memory") 1)
  (global $ticks (mut i64) (i64.const 0))
  (func (export "hm_tick")
    (global.set $ticks (i64.add (global.get $ticks) (i64.const 1))))
  (func (export "hm_invoke") (param $len i32) (result i32)
    (local $p i32) (local $u i64)
    (local.set $p (i32.const 64))
    (local.set $u (global.get $ticks))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i64.store8 (local.get $p) (i64.add (i64.rem_u (local.get $u) (i64.const 10)) (i64.const 48)))
      (local.set $u (i64.div_u (local.get $u) (i64.const 10)))
      (br_if $digit (i64.ne (local.get $u) (i64.const 0))))
    (call $output (local.get $p) (i32.sub (i32.const 64) (local.get $p)))
    (i32.const 0)))
