;; loop: never returns. The host stops it at the task's deadline.
(module
  (memory (export "memory") 1)
  (func (export "hm_invoke") (param $len i32) (result i32)
    (loop $forever (br $forever))
    (i32.const 0)))
