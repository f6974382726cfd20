;; The floor of the `filter_overhead` benchmark: a proxy-wasm filter that
;; does nothing. It exports every HTTP stream callback our filter exports
;; (ABI 0.2.1) and each returns at once (Continue), with no host call. What
;; Envoy spends on it per request is what any proxy-wasm filter in V8 costs
;; before doing any work: a context per stream and one crossing into the VM
;; per callback. `cargo xtask bench` compiles this text with the `wat` crate.
(module
  (memory (export "memory") 1)
  ;; A bump allocator over one page, wrapping around: the host asks for
  ;; memory only when the module calls a host function that returns data,
  ;; and this module calls none. It is here because the host requires one.
  (global $next (mut i32) (i32.const 1024))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $at i32)
    (if (i32.gt_u (i32.add (global.get $next) (local.get $size)) (i32.const 65536))
      (then (global.set $next (i32.const 1024))))
    (local.set $at (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get $size)))
    (local.get $at))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "_initialize"))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_request_trailers") (param i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_response_trailers") (param i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32)))
