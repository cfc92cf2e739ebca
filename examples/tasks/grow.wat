;; grow: asks for memory until it is refused, then traps. The host refuses past the task's cap.
(module
  (memory (export "memory") 1)
  (func (export "hm_invoke") (param $len i32) (result i32)
    (loop $more
      (br_if $more (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    unreachable))
