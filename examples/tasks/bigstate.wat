;; bigstate: a stateful task with a large memory, for checkpoint tests and benchmarks.
;; Input: a little-endian u32 page count N (optional, first call) to size the memory, then on
;; each call an optional u32 K: writes 8 bytes into each of K pages, spread over the memory.
;; Output: the number of pages.
(module
  (import "hubmesh" "input" (func $input (param i32)))
  (import "hubmesh" "output" (func $output (param i32 i32)))
  (memory (export "memory") 1)
  (global $round (mut i32) (i32.const 0))
  (func (export "hm_invoke") (param $len i32) (result i32)
    (local $k i32) (local $i i32) (local $pages i32) (local $stride i32)
    (if (i32.ge_u (local.get $len) (i32.const 4))
      (then (call $input (i32.const 0)) (local.set $k (i32.load (i32.const 0)))))
    (if (i32.and (i32.eq (memory.size) (i32.const 1)) (i32.gt_u (local.get $k) (i32.const 1)))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $k) (i32.const 1))) (i32.const -1)) (then unreachable))
        (local.set $k (i32.const 0))))
    (local.set $pages (memory.size))
    (global.set $round (i32.add (global.get $round) (i32.const 1)))
    (if (i32.gt_u (local.get $k) (local.get $pages)) (then (local.set $k (local.get $pages))))
    (if (local.get $k)
      (then
        (local.set $stride (i32.div_u (local.get $pages) (local.get $k)))
        (block $done
          (loop $w
            (br_if $done (i32.ge_u (local.get $i) (local.get $k)))
            ;; the round and the page number, so every written page has distinct content
            (i32.store
              (i32.add (i32.mul (i32.mul (local.get $i) (local.get $stride)) (i32.const 65536)) (i32.const 100))
              (global.get $round))
            (i32.store
              (i32.add (i32.mul (i32.mul (local.get $i) (local.get $stride)) (i32.const 65536)) (i32.const 104))
              (i32.mul (local.get $i) (local.get $stride)))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $w)))))
    (i32.store (i32.const 8) (local.get $pages))
    (call $output (i32.const 8) (i32.const 4))
    (i32.const 0)))
