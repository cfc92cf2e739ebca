;; spin: burns CPU (about ten million loop steps, some milliseconds) on every call and answers
;; nothing. The overload test and the migration policy's examples load a hub with it.
(module
  (memory (export "memory") 1)
  (func (export "hm_invoke") (param $len i32) (result i32)
    (local $i i32)
    (loop $more
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 10000000))))
    (i32.const 0)))
