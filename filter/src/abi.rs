//! The proxy-wasm host ABI, called directly.
//!
//! Why this module exists: `proxy_wasm::hostcalls` (0.2.5) `panic!`s on any
//! status it did not expect, and `get_map_value`/`get_map` unwrap UTF-8 on
//! header bytes a peer chose (Envoy passes obs-text 0x80-0xFF through). A
//! panic kills the VM, and under a fail-open policy the filter is then off
//! for that worker. So every host call whose status or bytes can vary with
//! traffic or host state goes through here, and every status comes back as a
//! value ([`Status`]) for [`crate::host`] to handle.
//!
//! Two calls stay with the SDK on purpose: `dispatch_http_call` and
//! `dispatch_grpc_call`. The SDK must register their tokens (its dispatcher
//! `expect`s a known token when the answer arrives), and the statuses Envoy
//! returns for them (`BadArgument`, `ParseFailure`, `InternalFailure`) are
//! the ones the SDK already turns into `Err`.
//!
//! Return codes are read as plain `u32`, never as the SDK's `Status` enum: a
//! code outside that enum (e.g. 6 `Unimplemented`, 11 `InvalidMemoryAccess`)
//! would be undefined behaviour in an enum, and is just an error value here.
//!
//! Memory the host returns was allocated through the SDK's exported
//! `proxy_on_memory_allocate` (a `Vec<u8>` of exactly `size` capacity), so it
//! is taken back with `Vec::from_raw_parts(ptr, size, size)`, as the SDK does.
//!
//! Nothing outside [`crate::host`] calls this module.

// The only unsafe code in the filter: FFI calls into the host. Each call
// passes pointers to live Rust buffers with their exact lengths, and takes
// ownership of host-allocated buffers exactly once.
#![allow(unsafe_code)]

use std::ptr::{null, null_mut};

pub use crate::host::Status;

const OK: u32 = 0;

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_log(level: u32, data: *const u8, size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(ret: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        kind: u32,
        start: usize,
        max: usize,
        ret_data: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(map: u32, ret_data: *mut *mut u8, ret_size: *mut usize) -> u32;
    fn proxy_get_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        ret_data: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_continue_stream(stream: u32) -> u32;
    fn proxy_set_effective_context(context: u32) -> u32;
    fn proxy_get_property(
        path: *const u8,
        path_size: usize,
        ret_data: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        ret_data: *mut *mut u8,
        ret_size: *mut usize,
        ret_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, ret_id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    fn proxy_record_metric(id: u32, value: u64) -> u32;
}

fn check(code: u32) -> Result<(), Status> {
    if code == OK {
        Ok(())
    } else {
        Err(Status(code))
    }
}

/// Takes ownership of a host-allocated buffer (empty when the host gave none).
fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        return Vec::new();
    }
    // SAFETY: the host allocated `size` bytes through proxy_on_memory_allocate
    // (a Vec<u8> with capacity `size`, then forgotten) and hands them to us once.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

pub fn log(level: u32, message: &str) -> Result<(), Status> {
    // SAFETY: pointer and length of a live &str.
    check(unsafe { proxy_log(level, message.as_ptr(), message.len()) })
}

pub fn current_time_ns() -> Result<u64, Status> {
    let mut t = 0u64;
    // SAFETY: `t` outlives the call.
    check(unsafe { proxy_get_current_time_nanoseconds(&mut t) })?;
    Ok(t)
}

pub fn set_tick_period_ms(period: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_set_tick_period_milliseconds(period) })
}

/// `Ok(None)` when the buffer does not exist (NotFound).
pub fn buffer(kind: u32, start: usize, max: usize) -> Result<Option<Vec<u8>>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: out-pointers to locals that outlive the call.
    match unsafe { proxy_get_buffer_bytes(kind, start, max, &mut data, &mut size) } {
        OK => Ok(Some(take(data, size))),
        1 => Ok(None),
        code => Err(Status(code)),
    }
}

/// The serialized header map (see [`crate::host::parse_map`]).
pub fn map_pairs(map: u32) -> Result<Vec<u8>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: out-pointers to locals that outlive the call.
    check(unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) })?;
    Ok(take(data, size))
}

/// One header's raw bytes; `Ok(None)` when absent.
pub fn map_value(map: u32, key: &str) -> Result<Option<Vec<u8>>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: key is a live &str; out-pointers to locals.
    match unsafe { proxy_get_header_map_value(map, key.as_ptr(), key.len(), &mut data, &mut size) }
    {
        OK => Ok(Some(take(data, size))),
        1 => Ok(None),
        code => Err(Status(code)),
    }
}

pub fn replace_map_value(map: u32, key: &str, value: &[u8]) -> Result<(), Status> {
    // SAFETY: live slices with their lengths.
    check(unsafe {
        proxy_replace_header_map_value(map, key.as_ptr(), key.len(), value.as_ptr(), value.len())
    })
}

pub fn add_map_value(map: u32, key: &str, value: &[u8]) -> Result<(), Status> {
    // SAFETY: live slices with their lengths.
    check(unsafe {
        proxy_add_header_map_value(map, key.as_ptr(), key.len(), value.as_ptr(), value.len())
    })
}

pub fn remove_map_value(map: u32, key: &str) -> Result<(), Status> {
    // SAFETY: live slice with its length.
    check(unsafe { proxy_remove_header_map_value(map, key.as_ptr(), key.len()) })
}

/// `headers` is a map serialized by [`crate::host::serialize_map`].
pub fn send_local_response(status: u32, headers: &[u8], body: &[u8]) -> Result<(), Status> {
    // SAFETY: live slices with their lengths; no details string.
    check(unsafe {
        proxy_send_local_response(
            status,
            null(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    })
}

/// Stream type 1 is the HTTP response.
pub fn continue_response() -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_continue_stream(1) })
}

pub fn set_effective_context(context: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_set_effective_context(context) })
}

/// `path` is NUL-separated; `Ok(None)` when the property does not exist.
pub fn property(path: &[u8]) -> Result<Option<Vec<u8>>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: live slice; out-pointers to locals.
    match unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) } {
        OK => Ok(Some(take(data, size))),
        1 => Ok(None),
        code => Err(Status(code)),
    }
}

/// The value and its CAS token (0 = none); `(None, 0)` when the key is absent.
pub fn shared_data(key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
    let (mut data, mut size, mut cas) = (null_mut(), 0usize, 0u32);
    // SAFETY: live slice; out-pointers to locals.
    match unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) }
    {
        OK => Ok(((!data.is_null()).then(|| take(data, size)), cas)),
        1 => Ok((None, 0)),
        code => Err(Status(code)),
    }
}

pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
    // SAFETY: live slices with their lengths.
    check(unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    })
}

pub fn define_metric(kind: u32, name: &str) -> Result<u32, Status> {
    let mut id = 0u32;
    // SAFETY: live slice; out-pointer to a local.
    check(unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn increment_metric(id: u32, offset: i64) -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_increment_metric(id, offset) })
}

pub fn record_metric(id: u32, value: u64) -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_record_metric(id, value) })
}
