;; churn: a stateful task for live-migration tests and benchmarks. Its memory is sized by the
;; first call; each later call rewrites K pages (spread over the memory) and counts itself.
;; Input: a little-endian u32 page count N (first call, when the memory is still 1 page) to size
;; the memory; afterwards an optional u32 K, the pages to rewrite (0 with no input).
;; Output: the number of calls applied so far, including this one, as a little-endian u32; so
;; the answers of all calls are 1, 2, 3, ... exactly when every call is applied once.
(module
  (import "hubmesh" "input" (func $input (param i32)))
  (import "hubmesh" "output" (func $output (param i32 i32)))
  (memory (export "memory") 1)
  (global $calls (mut i32) (i32.const 0))
  (func (export "hm_invoke") (param $len i32) (result i32)
    (local $k i32) (local $i i32) (local $pages i32) (local $stride i32)
    (if (i32.ge_u (local.get $len) (i32.const 4))
      (then (call $input (i32.const 0)) (local.set $k (i32.load (i32.const 0)))))
    (if (i32.and (i32.eq (memory.size) (i32.const 1)) (i32.gt_u (local.get $k) (i32.const 1)))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $k) (i32.const 1))) (i32.const -1)) (then unreachable))
        (local.set $k (i32.const 0))))
    (local.set $pages (memory.size))
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (if (i32.gt_u (local.get $k) (local.get $pages)) (then (local.set $k (local.get $pages))))
    (if (local.get $k)
      (then
        ;; start at a different page on each call, so the rewritten pages move over the memory
        (local.set $stride (i32.div_u (local.get $pages) (local.get $k)))
        (block $done
          (loop $w
            (br_if $done (i32.ge_u (local.get $i) (local.get $k)))
            (i32.store
              (i32.add
                (i32.mul
                  (i32.rem_u
                    (i32.add (i32.mul (local.get $i) (local.get $stride)) (global.get $calls))
                    (local.get $pages))
                  (i32.const 65536))
                (i32.const 200))
              (global.get $calls))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $w)))))
    (i32.store (i32.const 8) (global.get $calls))
    (call $output (i32.const 8) (i32.const 4))
    (i32.const 0)))
