;; oplog: the chaos suite's durable register. Its state is the append-only list of the operation ids
;; it applied, so a checker can tell a lost, duplicated or reordered update from the final list.
;;
;; Input: 8 bytes, a little-endian operation id: append it. Output: 16 bytes, the new length and
;; the hash of the list up to and including it (both little-endian u64).
;; Input: empty: read. Output: length, hash, 16 bytes to skip, then every id in order (8 bytes
;; each).
;; Any other input answers status 1 and changes nothing; a full memory answers status 2.
;;
;; hash: FNV-1a over the ids as 64-bit words: h = (h xor id) * 0x100000001b3, from 0xcbf29ce484222325.
(module
  (import "hubmesh" "input" (func $input (param i32)))
  (import "hubmesh" "output" (func $output (param i32 i32)))
  (memory (export "memory") 1 256)
  ;; layout: 0..8 length, 8..16 hash, 16..24 input, 32.. the ids
  (data (i32.const 8) "\25\23\22\84\e4\9c\f2\cb")

  (func (export "hm_invoke") (param $len i32) (result i32)
    (local $n i64) (local $end i32) (local $id i64) (local $h i64)
    (if (i32.eqz (local.get $len))
      (then
        (call $output (i32.const 0)
          (i32.add (i32.const 32) (i32.wrap_i64 (i64.mul (i64.load (i32.const 0)) (i64.const 8)))))
        (return (i32.const 0))))
    (if (i32.ne (local.get $len) (i32.const 8))
      (then (return (i32.const 1))))
    (call $input (i32.const 16))
    (local.set $id (i64.load (i32.const 16)))
    (local.set $n (i64.load (i32.const 0)))
    (local.set $end (i32.add (i32.const 40) (i32.wrap_i64 (i64.mul (local.get $n) (i64.const 8)))))
    ;; grow one page at a time when the next id would not fit
    (if (i32.gt_u (local.get $end) (i32.mul (memory.size) (i32.const 65536)))
      (then
        (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1))
          (then (return (i32.const 2))))))
    (i64.store (i32.sub (local.get $end) (i32.const 8)) (local.get $id))
    (local.set $h (i64.mul (i64.xor (i64.load (i32.const 8)) (local.get $id)) (i64.const 0x100000001b3)))
    (i64.store (i32.const 8) (local.get $h))
    (i64.store (i32.const 0) (i64.add (local.get $n) (i64.const 1)))
    (call $output (i32.const 0) (i32.const 16))
    (i32.const 0)))
