//! Inbound duplicate suppression by `Idempotency-Key`
//! (draft-ietf-httpapi-idempotency-key-header): the decisions only, with no
//! host calls and no clock. The filter supplies the time (`now_ms`) and the
//! bytes it read from shared data, and carries out the [`Decision`].
//!
//! # The store
//! The filter keeps entries in proxy-wasm *shared data*: a key→bytes map with
//! compare-and-swap writes, but no TTL, no delete and no iteration. Nothing
//! can ever be removed from it, so the only way to bound memory is to bound the
//! set of keys written. The store is therefore a direct-mapped table of
//! [`DedupeConfig::max_entries`] slots: an idempotency key hashes to one slot
//! ([`slot_key`], `{prefix}/{slot}`) and a slot holds at most one [`Entry`].
//! The entry records the full idempotency key, so two keys that hash to one
//! slot are told apart rather than confused.
//!
//! Memory is bounded by `max_entries × (max_body_bytes + stored headers + key
//! and fingerprint)`; the headers are bounded by Envoy's response header limit
//! (`max_response_headers_kb`, 60 KiB by default). Eviction needs no
//! bookkeeping: a completed or expired entry is simply replaced by the next key
//! that hashes to its slot. An unexpired in-flight entry is never replaced by
//! another key; that request is forwarded without deduplication
//! ([`Decision::SlotBusy`]), which is safe because it is merely unprotected.
//! Changing `max_entries` reuses the low slots (the stored key still
//! disambiguates); changing the prefix leaves the old table's entries in memory
//! until Envoy restarts, since shared data cannot delete.
//!
//! # Scope and limits
//! - Shared data is per Envoy *process* (shared by its workers, not by
//!   replicas). Duplicates that reach *different* Envoys are not suppressed;
//!   that needs a store shared between proxies or client affinity by key.
//! - Shared data outlives a filter reload within one process, so entries
//!   carry a format version; bytes this version cannot read count as an empty
//!   slot ([`read_slot`] reports them so the filter can count them).
//! - Envoy treats a CAS of 0 as "write unconditionally", and a slot that was
//!   never written has no CAS. The first claim of a never-used slot is thus not
//!   atomic: two duplicates racing on it within microseconds may both be
//!   forwarded. Every later write to the slot is a real compare-and-swap.
//!
//! # How the filter uses this
//! 1. Request: [`validate_key`] the header; compute [`fingerprint`] over the
//!    method, `:path` (query included) and body; read the slot named by
//!    [`slot_key`] through [`read_slot`]; call [`decide`].
//! 2. [`Decision::Proceed`]: write `claim.encode()` with the CAS just read. On a
//!    CAS mismatch someone else wrote the slot: read it and decide again.
//! 3. Response: read the slot again. Only if it still holds the claim
//!    (`current.as_ref() == Some(&claim)`) write what [`complete`] returns,
//!    or [`FREE_SLOT`] for `None`. If the stream ends with no response, write
//!    [`FREE_SLOT`] under the same condition so the client may retry.
//! 4. Replay / 409 / 422 / forward as each [`Decision`] variant says.

use serde::{Deserialize, Serialize};

use crate::http::{framed_sha256, replayable_headers};
use crate::rules::ConfigError;

/// The request header that carries the key (lower case, as Envoy presents it).
pub const HEADER_NAME: &str = "idempotency-key";
/// Longest accepted key; keys are stored in every entry, so they stay short.
pub const MAX_KEY_LEN: usize = 255;

/// How long a key is remembered when `ttl_s` is not set.
pub const DEFAULT_TTL_S: u64 = 60;
/// A day: longer windows mostly hold memory for retries that never come.
pub const MAX_TTL_S: u64 = 86_400;
/// Slots in the table when `max_entries` is not set.
pub const DEFAULT_MAX_ENTRIES: u32 = 10_000;
/// Upper bound on slots, so a typo cannot reserve gigabytes of shared data.
pub const MAX_ENTRIES_LIMIT: u32 = 1_000_000;
/// Largest response body stored for replay when `max_body_bytes` is not set.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
/// Upper bound on `max_body_bytes` (16 MiB); each slot may hold this much.
pub const MAX_BODY_BYTES_LIMIT: usize = 16 * 1024 * 1024;

/// What the filter writes to release a slot. Shared data has no delete, so an
/// empty value stands for "no entry"; [`read_slot`] reads it as such.
pub const FREE_SLOT: &[u8] = b"";

/// Per-route dedupe settings exactly as written, e.g.
/// `{"ttl_s": 60, "max_entries": 10000, "max_body_bytes": 65536}`.
///
/// Every field is optional. The numbers are read as `u64` so that an
/// out-of-range value gets our message naming the field, not serde's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDedupeConfig {
    /// How long (seconds) a key is remembered after it is claimed or answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u64>,
    /// Slots in the table: the most keys remembered at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_entries: Option<u64>,
    /// Largest response body stored; larger answers are not replayable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
}

/// Validated dedupe settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupeConfig {
    pub ttl_ms: u64,
    pub max_entries: u32,
    pub max_body_bytes: usize,
}

impl Default for DedupeConfig {
    fn default() -> Self {
        Self {
            ttl_ms: DEFAULT_TTL_S * 1000,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

impl DedupeConfig {
    /// Validates `raw`; `field` is where it sits in the filter config (such as
    /// `routes[2].dedupe`) so that errors name the exact setting.
    pub fn from_raw(raw: RawDedupeConfig, field: &str) -> Result<Self, ConfigError> {
        let ttl_s = check_range(field, "ttl_s", raw.ttl_s, DEFAULT_TTL_S, 1, MAX_TTL_S)?;
        let max_entries = check_range(
            field,
            "max_entries",
            raw.max_entries,
            u64::from(DEFAULT_MAX_ENTRIES),
            1,
            u64::from(MAX_ENTRIES_LIMIT),
        )?;
        let max_body_bytes = check_range(
            field,
            "max_body_bytes",
            raw.max_body_bytes,
            DEFAULT_MAX_BODY_BYTES as u64,
            0,
            MAX_BODY_BYTES_LIMIT as u64,
        )?;
        Ok(Self {
            // ttl_s <= 86 400, so this cannot overflow.
            ttl_ms: ttl_s * 1000,
            // Both were just range-checked to fit; the fallbacks are unreachable.
            max_entries: u32::try_from(max_entries).unwrap_or(MAX_ENTRIES_LIMIT),
            max_body_bytes: usize::try_from(max_body_bytes).unwrap_or(MAX_BODY_BYTES_LIMIT),
        })
    }
}

/// Applies the default and checks `min..=max`. `ConfigError` has no variant
/// for a number out of range, so the message (naming the field) goes in `Syntax`.
fn check_range(
    field: &str,
    name: &str,
    value: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let value = value.unwrap_or(default);
    if (min..=max).contains(&value) {
        return Ok(value);
    }
    let expected = if min == 0 {
        format!("must be at most {max}")
    } else {
        format!("must be between {min} and {max}")
    };
    Err(ConfigError::Syntax(format!(
        "{field}.{name}: {expected}, got {value}"
    )))
}

/// Checks an `Idempotency-Key` header value: 1 to 255 visible ASCII
/// characters. The value is used verbatim, so the draft's quoted form
/// (`"abc"`) and a bare token (`abc`) are both accepted, as different keys.
pub fn validate_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        Err("the idempotency key is empty")
    } else if key.len() > MAX_KEY_LEN {
        Err("the idempotency key is longer than 255 characters")
    } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
        Err("the idempotency key may only contain visible ASCII characters")
    } else {
        Ok(())
    }
}

/// The slot (`0..slots`) an idempotency key maps to. SHA-256 rather than
/// std's hasher because every worker and every filter build must agree.
pub fn slot_index(idempotency_key: &str, slots: u32) -> u32 {
    let [a, b, c, d, e, f, g, h, ..] =
        framed_sha256("understudy/dedupe/slot/v1", &[idempotency_key.as_bytes()]);
    let hash = u64::from_be_bytes([a, b, c, d, e, f, g, h]);
    // Zero slots is refused by the config; treat it as one rather than divide by zero.
    let slots = u64::from(slots.max(1));
    u32::try_from(hash % slots).unwrap_or(0)
}

/// The shared-data key of the slot an idempotency key maps to: `{prefix}/{slot}`.
pub fn slot_key(prefix: &str, idempotency_key: &str, slots: u32) -> String {
    format!("{prefix}/{}", slot_index(idempotency_key, slots))
}

/// Request headers that name the caller. A stored answer belongs to the
/// caller who made the request: another caller's request with the same
/// Idempotency-Key lands in another slot and never sees it.
pub const CALLER_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "x-tenant-id",
];

/// The scope of a caller: `anonymous` when no credential header is present,
/// otherwise `c` and 32 hex digits of a framed SHA-256 over each present
/// header's name and raw value (any bytes). Requests without credentials
/// share the `anonymous` scope: nothing tells such callers apart.
pub fn caller_scope(credentials: &[(&str, &[u8])]) -> String {
    if credentials.is_empty() {
        return "anonymous".to_owned();
    }
    let parts: Vec<&[u8]> = credentials
        .iter()
        .flat_map(|(name, value)| [name.as_bytes(), *value])
        .collect();
    let digest = framed_sha256("understudy/dedupe/caller/v1", &parts);
    format!("c{}", to_hex(digest.get(..16).unwrap_or(&digest)))
}

/// The key a slot is chosen by and an [`Entry`] records: the caller's scope
/// and the Idempotency-Key, so two callers' equal keys are different keys.
pub fn scoped_key(caller: &str, idempotency_key: &str) -> String {
    format!("{caller}:{idempotency_key}")
}

/// [`fingerprint`] with the caller's scope framed in as well.
pub fn scoped_fingerprint(caller: &str, method: &str, path: &str, body: &[u8]) -> String {
    let digest = framed_sha256(
        "understudy/dedupe/fingerprint/v2",
        &[caller.as_bytes(), method.as_bytes(), path.as_bytes(), body],
    );
    to_hex(&digest)
}

/// Whether claiming the slot for `key` (after [`decide`] said `Proceed`)
/// replaces another key's entry that still counts: a flood of new keys that
/// pushes out answers their clients may still retry. The filter counts these.
pub fn evicts_live(existing: Option<&Entry>, key: &str, now_ms: u64) -> bool {
    existing.is_some_and(|e| e.is_live(now_ms) && e.key != key)
}

/// Lower-case hex SHA-256 of the request's method, path and body: what must
/// match for a retry to count as "the same request" rather than key reuse.
pub fn fingerprint(method: &str, path: &str, body: &[u8]) -> String {
    let digest = framed_sha256(
        "understudy/dedupe/fingerprint/v1",
        &[method.as_bytes(), path.as_bytes(), body],
    );
    to_hex(&digest)
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Whether the first request with a key is still being answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryState {
    InFlight,
    Done {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
}

/// What one slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The full idempotency key, to detect two keys sharing a slot.
    pub key: String,
    /// [`fingerprint`] of the first request with this key.
    pub fingerprint: String,
    /// Wall-clock milliseconds from which the entry counts as absent.
    pub expires_at_ms: u64,
    pub state: EntryState,
}

/// Why stored bytes are not an [`Entry`]. The filter treats such a slot as
/// empty (and overwrites it); the variants exist for its logs and counters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a dedupe entry (bad magic)")]
    BadMagic,
    /// Written by another (newer) filter build sharing this Envoy process.
    #[error("unsupported dedupe entry version {0}")]
    UnsupportedVersion(u8),
    #[error("dedupe entry is truncated")]
    Truncated,
    #[error("dedupe entry has an unknown state tag {0}")]
    UnknownState(u8),
    #[error("dedupe entry {0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    #[error("dedupe entry has {0} unexpected trailing bytes")]
    TrailingBytes(usize),
}

/// Format: `b"UDE"`, version byte `1`, then big-endian fields. Strings and the
/// body are a `u64` length followed by the bytes. Binary rather than JSON so a
/// body costs its own size (JSON would need base64, a third more).
///
/// ```text
/// magic "UDE" | version u8 | key str | fingerprint str | expires_at_ms u64
/// | state u8 (0 in flight, 1 done)
/// [done: status u16 | header count u64 | (name str, value str)* | body bytes]
/// ```
const MAGIC: &[u8; 3] = b"UDE";
const VERSION: u8 = 1;
const STATE_IN_FLIGHT: u8 = 0;
const STATE_DONE: u8 = 1;
/// A header is at least two empty strings, i.e. two length prefixes.
const MIN_ENCODED_HEADER: usize = 16;

impl Entry {
    /// Whether the entry still counts at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        now_ms < self.expires_at_ms
    }

    /// The bytes to store in shared data (see the format above).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        put_bytes(&mut out, self.key.as_bytes());
        put_bytes(&mut out, self.fingerprint.as_bytes());
        out.extend_from_slice(&self.expires_at_ms.to_be_bytes());
        match &self.state {
            EntryState::InFlight => out.push(STATE_IN_FLIGHT),
            EntryState::Done {
                status,
                headers,
                body,
            } => {
                out.push(STATE_DONE);
                out.extend_from_slice(&status.to_be_bytes());
                out.extend_from_slice(&(headers.len() as u64).to_be_bytes());
                for (name, value) in headers {
                    put_bytes(&mut out, name.as_bytes());
                    put_bytes(&mut out, value.as_bytes());
                }
                put_bytes(&mut out, body);
            }
        }
        out
    }

    fn encoded_len(&self) -> usize {
        let fixed = MAGIC.len() + 1 + 8 + self.key.len() + 8 + self.fingerprint.len() + 8 + 1;
        match &self.state {
            EntryState::InFlight => fixed,
            EntryState::Done { headers, body, .. } => {
                let headers: usize = headers.iter().map(|(n, v)| 16 + n.len() + v.len()).sum();
                fixed + 2 + 8 + headers + 8 + body.len()
            }
        }
    }

    /// Parses bytes written by [`Entry::encode`]. Any other input, however
    /// malformed, is an error and never a panic: these bytes come from a store
    /// shared with other filter builds.
    pub fn decode(bytes: &[u8]) -> Result<Entry, DecodeError> {
        let mut r = Reader { rest: bytes };
        if r.take(MAGIC.len()).map_err(|_| DecodeError::BadMagic)? != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let key = r.string("key")?;
        let fingerprint = r.string("fingerprint")?;
        let expires_at_ms = r.u64()?;
        let state = match r.u8()? {
            STATE_IN_FLIGHT => EntryState::InFlight,
            STATE_DONE => {
                let status = r.u16()?;
                let count = r.u64()?;
                // Refuse a count the remaining bytes cannot hold before
                // allocating for it: the count itself is untrusted.
                let count = usize::try_from(count)
                    .ok()
                    .filter(|&n| n <= r.rest.len() / MIN_ENCODED_HEADER)
                    .ok_or(DecodeError::Truncated)?;
                let mut headers = Vec::with_capacity(count);
                for _ in 0..count {
                    let name = r.string("header name")?;
                    let value = r.string("header value")?;
                    headers.push((name, value));
                }
                let body = r.bytes()?.to_vec();
                EntryState::Done {
                    status,
                    headers,
                    body,
                }
            }
            other => return Err(DecodeError::UnknownState(other)),
        };
        if !r.rest.is_empty() {
            return Err(DecodeError::TrailingBytes(r.rest.len()));
        }
        Ok(Entry {
            key,
            fingerprint,
            expires_at_ms,
            state,
        })
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A cursor over untrusted bytes; every read is bounds-checked.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let (head, tail) = self
            .rest
            .split_at_checked(n)
            .ok_or(DecodeError::Truncated)?;
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.take(N)?.try_into().map_err(|_| DecodeError::Truncated)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.array::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_be_bytes)
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(self.u64()?).map_err(|_| DecodeError::Truncated)?;
        self.take(len)
    }

    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::InvalidUtf8(what))
    }
}

/// Reads a slot as returned by shared data: nothing stored, or [`FREE_SLOT`],
/// is `Ok(None)`; anything else must decode. On `Err` the filter should count
/// it and treat the slot as empty.
pub fn read_slot(bytes: Option<&[u8]>) -> Result<Option<Entry>, DecodeError> {
    match bytes {
        None | Some([]) => Ok(None),
        Some(b) => Entry::decode(b).map(Some),
    }
}

/// What to do with a request that carries an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No live entry for this key: claim the slot with `claim` (an
    /// `InFlight` entry) via CAS, then forward upstream.
    Proceed { claim: Entry },
    /// A completed response for the same key and payload: answer with it
    /// (the filter adds a replay marker header).
    Replay {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// The first request with this key is still in flight: answer 409.
    InFlight,
    /// Same key, different payload: answer 422.
    Mismatch,
    /// The slot holds a *different* key that is still in flight (a hash
    /// collision): do not deduplicate this request, just forward it. Count it.
    SlotBusy,
}

/// Decides what to do with a request, given what its slot holds.
///
/// An expired entry counts as absent. Another key's entry is evicted once it
/// is done, but an in-flight one is left alone (the request is forwarded
/// unprotected) because evicting it would let *its* duplicates through.
pub fn decide(
    existing: Option<&Entry>,
    key: &str,
    fingerprint: &str,
    now_ms: u64,
    cfg: &DedupeConfig,
) -> Decision {
    let Some(entry) = existing.filter(|e| e.is_live(now_ms)) else {
        return proceed(key, fingerprint, now_ms, cfg);
    };
    if entry.key != key {
        return match entry.state {
            EntryState::InFlight => Decision::SlotBusy,
            EntryState::Done { .. } => proceed(key, fingerprint, now_ms, cfg),
        };
    }
    // The draft: reusing a key for a different request is an error whether or
    // not the first one has finished.
    if entry.fingerprint != fingerprint {
        return Decision::Mismatch;
    }
    match &entry.state {
        EntryState::InFlight => Decision::InFlight,
        EntryState::Done {
            status,
            headers,
            body,
        } => Decision::Replay {
            status: *status,
            headers: headers.clone(),
            body: body.clone(),
        },
    }
}

fn proceed(key: &str, fingerprint: &str, now_ms: u64, cfg: &DedupeConfig) -> Decision {
    Decision::Proceed {
        claim: Entry {
            key: key.to_owned(),
            fingerprint: fingerprint.to_owned(),
            expires_at_ms: now_ms.saturating_add(cfg.ttl_ms),
            state: EntryState::InFlight,
        },
    }
}

/// Whether an answer with this status should be remembered and replayed.
///
/// Not: 5xx (the server failed; the client should be able to retry), statuses
/// that themselves ask for a retry (408 Request Timeout, 425 Too Early, 429
/// Too Many Requests: the request was not processed), and 1xx (not a final
/// answer). Everything else, 4xx included, is the answer to this request.
pub fn is_replayable_status(status: u16) -> bool {
    (200..500).contains(&status) && !matches!(status, 408 | 425 | 429)
}

/// What to store when the first request completes. `None` means "free the
/// slot" (write [`FREE_SLOT`]): for answers the client should be able to retry
/// (see [`is_replayable_status`]: 5xx above all) and for bodies over
/// `max_body_bytes`, which cannot be replayed faithfully.
///
/// Write it (or [`FREE_SLOT`]) only if the slot still holds `claim`: after the
/// TTL another key may own it. The replay window starts at `now_ms`, when the
/// answer exists, not when the claim was made.
pub fn complete(
    claim: &Entry,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    now_ms: u64,
    cfg: &DedupeConfig,
) -> Option<Entry> {
    if !is_replayable_status(status) || body.len() > cfg.max_body_bytes {
        return None;
    }
    Some(Entry {
        key: claim.key.clone(),
        fingerprint: claim.fingerprint.clone(),
        expires_at_ms: now_ms.saturating_add(cfg.ttl_ms),
        state: EntryState::Done {
            status,
            headers: replayable_headers(headers),
            body: body.to_vec(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "8e03978e-40d5-43e8-bc93-6894a57f9324";

    fn cfg() -> DedupeConfig {
        DedupeConfig {
            ttl_ms: 60_000,
            max_entries: 100,
            max_body_bytes: 16,
        }
    }

    fn h(name: &str, value: &str) -> (String, String) {
        (name.to_owned(), value.to_owned())
    }

    fn in_flight(key: &str, fp: &str, expires_at_ms: u64) -> Entry {
        Entry {
            key: key.to_owned(),
            fingerprint: fp.to_owned(),
            expires_at_ms,
            state: EntryState::InFlight,
        }
    }

    fn done(key: &str, fp: &str, expires_at_ms: u64) -> Entry {
        Entry {
            state: EntryState::Done {
                status: 201,
                headers: vec![h("content-type", "application/json")],
                body: b"{\"id\":7}".to_vec(),
            },
            ..in_flight(key, fp, expires_at_ms)
        }
    }

    // --- config ---

    fn parse(json: &str) -> Result<DedupeConfig, ConfigError> {
        let raw: RawDedupeConfig =
            serde_json::from_str(json).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        DedupeConfig::from_raw(raw, "routes[2].dedupe")
    }

    #[test]
    fn empty_config_means_defaults() {
        let c = parse("{}").unwrap();
        assert_eq!(c, DedupeConfig::default());
        assert_eq!(c.ttl_ms, 60_000);
        assert_eq!(c.max_entries, 10_000);
        assert_eq!(c.max_body_bytes, 65_536);
    }

    #[test]
    fn config_values_are_taken() {
        let c = parse(r#"{"ttl_s": 86400, "max_entries": 1000000, "max_body_bytes": 16777216}"#)
            .unwrap();
        assert_eq!(
            c,
            DedupeConfig {
                ttl_ms: 86_400_000,
                max_entries: 1_000_000,
                max_body_bytes: 16 * 1024 * 1024,
            }
        );
        assert_eq!(parse(r#"{"max_body_bytes": 0}"#).unwrap().max_body_bytes, 0);
    }

    #[test]
    fn bad_config_values_name_their_field() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"ttl_s": 0}"#,
                "routes[2].dedupe.ttl_s: must be between 1 and 86400, got 0",
            ),
            (
                r#"{"ttl_s": 86401}"#,
                "routes[2].dedupe.ttl_s: must be between 1 and 86400, got 86401",
            ),
            (
                r#"{"max_entries": 0}"#,
                "routes[2].dedupe.max_entries: must be between 1 and 1000000, got 0",
            ),
            (
                r#"{"max_entries": 5000000000}"#,
                "routes[2].dedupe.max_entries: must be between 1 and 1000000, got 5000000000",
            ),
            (
                r#"{"max_body_bytes": 16777217}"#,
                "routes[2].dedupe.max_body_bytes: must be at most 16777216, got 16777217",
            ),
        ];
        for (json, expected) in cases {
            let err = parse(json).unwrap_err();
            assert!(matches!(err, ConfigError::Syntax(_)), "{err:?}");
            let err = err.to_string();
            assert!(
                err.contains(expected),
                "{json}: got {err:?}, want {expected:?}"
            );
        }
    }

    #[test]
    fn unknown_and_mistyped_fields_are_refused() {
        let err = parse(r#"{"ttl": 5}"#).unwrap_err().to_string();
        assert!(err.contains("unknown field `ttl`"), "{err}");
        assert!(parse(r#"{"ttl_s": -1}"#).is_err());
        assert!(parse(r#"{"ttl_s": "60"}"#).is_err());
    }

    #[test]
    fn raw_config_round_trips_through_json() {
        let raw = RawDedupeConfig {
            ttl_s: Some(5),
            max_entries: None,
            max_body_bytes: Some(10),
        };
        let json = serde_json::to_string(&raw).unwrap();
        assert_eq!(json, r#"{"ttl_s":5,"max_body_bytes":10}"#);
        assert_eq!(serde_json::from_str::<RawDedupeConfig>(&json).unwrap(), raw);
    }

    // --- keys, slots, fingerprints ---

    #[test]
    fn key_validation() {
        assert!(validate_key(KEY).is_ok());
        assert!(validate_key("\"quoted-sf-string\"").is_ok());
        assert!(validate_key(&"k".repeat(255)).is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key(&"k".repeat(256)).is_err());
        assert!(validate_key("has space").is_err());
        assert!(validate_key("tab\t").is_err());
        assert!(validate_key("naïve").is_err());
    }

    #[test]
    fn slot_key_format_and_pinned_values() {
        let k = slot_key("understudy/dedupe/api", KEY, 10_000);
        let (prefix, slot) = k.rsplit_once('/').unwrap();
        assert_eq!(prefix, "understudy/dedupe/api");
        assert!(slot.parse::<u32>().unwrap() < 10_000);
        // Pinned: a change here moves every key to another slot for a filter
        // reloaded into a running Envoy, so it must be deliberate.
        assert_eq!(slot_index("abc", u32::MAX), 3_796_233_906);
        assert_eq!(
            fingerprint("POST", "/orders", b"{}"),
            "959e2cb209ca15be50c9dc5b0dd997365943ae89727fb79ad99bfe0f8b29b560"
        );
        assert_eq!(slot_index("anything", 1), 0);
        assert_eq!(slot_index("anything", 0), 0);
    }

    #[test]
    fn slots_are_spread() {
        let mut hits = [0u32; 100];
        for i in 0..10_000 {
            hits[slot_index(&format!("key-{i}"), 100) as usize] += 1;
        }
        // Expect ~100 per slot; a broken hash would pile them up.
        assert!(hits.iter().all(|&n| (50..=150).contains(&n)), "{hits:?}");
    }

    #[test]
    fn fingerprint_framing_is_unambiguous() {
        let base = fingerprint("POST", "/a", b"x");
        assert_eq!(base.len(), 64);
        assert!(base.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(base, fingerprint("POST", "/a", b"x"));
        assert_ne!(base, fingerprint("PUT", "/a", b"x"));
        assert_ne!(base, fingerprint("POST", "/b", b"x"));
        assert_ne!(base, fingerprint("POST", "/a", b"y"));
        assert_ne!(fingerprint("a", "bc", b""), fingerprint("ab", "c", b""));
        assert_ne!(fingerprint("", "ab", b"c"), fingerprint("", "a", b"bc"));
    }

    // --- decide ---

    #[test]
    fn empty_slot_proceeds_with_a_claim() {
        let d = decide(None, KEY, "fp", 1_000, &cfg());
        assert_eq!(
            d,
            Decision::Proceed {
                claim: in_flight(KEY, "fp", 61_000)
            }
        );
    }

    #[test]
    fn same_key_same_payload_in_flight_is_409() {
        let e = in_flight(KEY, "fp", 61_000);
        assert_eq!(
            decide(Some(&e), KEY, "fp", 2_000, &cfg()),
            Decision::InFlight
        );
    }

    #[test]
    fn same_key_same_payload_done_replays() {
        let e = done(KEY, "fp", 61_000);
        assert_eq!(
            decide(Some(&e), KEY, "fp", 2_000, &cfg()),
            Decision::Replay {
                status: 201,
                headers: vec![h("content-type", "application/json")],
                body: b"{\"id\":7}".to_vec(),
            }
        );
    }

    #[test]
    fn same_key_other_payload_is_422_in_flight_or_done() {
        for e in [in_flight(KEY, "fp", 61_000), done(KEY, "fp", 61_000)] {
            assert_eq!(
                decide(Some(&e), KEY, "other", 2_000, &cfg()),
                Decision::Mismatch
            );
        }
    }

    #[test]
    fn other_key_in_flight_is_slot_busy() {
        let e = in_flight("other-key", "fp", 61_000);
        assert_eq!(
            decide(Some(&e), KEY, "fp", 2_000, &cfg()),
            Decision::SlotBusy
        );
    }

    #[test]
    fn other_key_done_is_evicted() {
        let e = done("other-key", "fp", 61_000);
        assert_eq!(
            decide(Some(&e), KEY, "mine", 2_000, &cfg()),
            Decision::Proceed {
                claim: in_flight(KEY, "mine", 62_000)
            }
        );
    }

    #[test]
    fn expired_entries_count_as_absent() {
        for e in [
            in_flight(KEY, "fp", 10_000),
            done(KEY, "fp", 10_000),
            done(KEY, "other", 10_000),
            in_flight("other-key", "fp", 10_000),
        ] {
            // Expiry is inclusive: at exactly expires_at_ms the entry is gone.
            assert!(e.is_live(9_999));
            assert!(!e.is_live(10_000));
            assert_eq!(
                decide(Some(&e), KEY, "fp", 10_000, &cfg()),
                Decision::Proceed {
                    claim: in_flight(KEY, "fp", 70_000)
                }
            );
        }
        // One millisecond earlier the same entries still decide.
        assert_eq!(
            decide(
                Some(&in_flight(KEY, "fp", 10_000)),
                KEY,
                "fp",
                9_999,
                &cfg()
            ),
            Decision::InFlight
        );
        assert_eq!(
            decide(
                Some(&in_flight("other-key", "fp", 10_000)),
                KEY,
                "fp",
                9_999,
                &cfg()
            ),
            Decision::SlotBusy
        );
    }

    #[test]
    fn evicting_another_keys_unexpired_entry_is_flagged() {
        // Live entries of another key: in flight or done, unexpired.
        assert!(evicts_live(
            Some(&done("other-key", "fp", 61_000)),
            KEY,
            2_000
        ));
        assert!(evicts_live(
            Some(&in_flight("other-key", "fp", 61_000)),
            KEY,
            2_000
        ));
        // Not an eviction: empty, expired, or this key's own entry.
        assert!(!evicts_live(None, KEY, 2_000));
        assert!(!evicts_live(
            Some(&done("other-key", "fp", 61_000)),
            KEY,
            61_000
        ));
        assert!(!evicts_live(Some(&done(KEY, "fp", 61_000)), KEY, 2_000));
    }

    #[test]
    fn callers_get_their_own_keys_and_fingerprints() {
        let alice = caller_scope(&[("authorization", b"Bearer alice")]);
        let bob = caller_scope(&[("authorization", b"Bearer bob")]);
        assert_ne!(alice, bob);
        assert_eq!(caller_scope(&[]), "anonymous");
        assert_ne!(scoped_key(&alice, KEY), scoped_key(&bob, KEY));
        assert_ne!(
            scoped_fingerprint(&alice, "POST", "/", b"{}"),
            scoped_fingerprint(&bob, "POST", "/", b"{}")
        );
        // Bob's claim never replays alice's stored answer.
        let stored = done(&scoped_key(&alice, KEY), "fp", 61_000);
        assert!(!matches!(
            decide(Some(&stored), &scoped_key(&bob, KEY), "fp", 2_000, &cfg()),
            Decision::Replay { .. }
        ));
    }

    #[test]
    fn claim_expiry_saturates() {
        let Decision::Proceed { claim } = decide(None, KEY, "fp", u64::MAX - 1, &cfg()) else {
            panic!("expected Proceed");
        };
        assert_eq!(claim.expires_at_ms, u64::MAX);
    }

    // --- complete ---

    #[test]
    fn complete_stores_2xx_3xx_and_4xx() {
        let claim = in_flight(KEY, "fp", 61_000);
        let headers = [
            h(":status", "201"),
            h("content-type", "text/plain"),
            h("content-length", "2"),
        ];
        for status in [200, 201, 204, 302, 400, 404, 409, 422] {
            let e = complete(&claim, status, &headers, b"ok", 5_000, &cfg()).unwrap();
            assert_eq!(
                e,
                Entry {
                    key: KEY.to_owned(),
                    fingerprint: "fp".to_owned(),
                    expires_at_ms: 65_000,
                    state: EntryState::Done {
                        status,
                        headers: vec![h("content-type", "text/plain")],
                        body: b"ok".to_vec(),
                    },
                }
            );
            // The stored answer is what a retry gets back.
            assert_eq!(
                decide(Some(&e), KEY, "fp", 6_000, &cfg()),
                Decision::Replay {
                    status,
                    headers: vec![h("content-type", "text/plain")],
                    body: b"ok".to_vec(),
                }
            );
        }
    }

    #[test]
    fn complete_frees_the_slot_for_retryable_answers() {
        let claim = in_flight(KEY, "fp", 61_000);
        for status in [500, 502, 503, 504, 599, 408, 425, 429, 100, 0] {
            assert_eq!(
                complete(&claim, status, &[], b"", 5_000, &cfg()),
                None,
                "{status}"
            );
        }
    }

    #[test]
    fn complete_frees_the_slot_for_oversized_bodies() {
        let claim = in_flight(KEY, "fp", 61_000);
        assert!(complete(&claim, 200, &[], &[0; 16], 5_000, &cfg()).is_some());
        assert_eq!(complete(&claim, 200, &[], &[0; 17], 5_000, &cfg()), None);
    }

    #[test]
    fn free_slot_reads_as_empty() {
        assert_eq!(read_slot(None), Ok(None));
        assert_eq!(read_slot(Some(FREE_SLOT)), Ok(None));
        let e = done(KEY, "fp", 1);
        assert_eq!(read_slot(Some(&e.encode())), Ok(Some(e)));
        assert_eq!(read_slot(Some(b"junk")), Err(DecodeError::BadMagic));
    }

    // --- replayable headers ---

    #[test]
    fn encode_decode_round_trip() {
        for e in [
            in_flight(KEY, &fingerprint("POST", "/", b""), 42),
            done(KEY, "fp", u64::MAX),
            Entry {
                state: EntryState::Done {
                    status: 204,
                    headers: vec![],
                    body: vec![],
                },
                ..in_flight("", "", 0)
            },
        ] {
            let bytes = e.encode();
            assert_eq!(bytes.len(), e.encoded_len());
            assert_eq!(Entry::decode(&bytes), Ok(e));
        }
    }

    #[test]
    fn decode_rejects_malformed_input() {
        let good = done(KEY, "fp", 1).encode();
        assert_eq!(Entry::decode(b""), Err(DecodeError::BadMagic));
        assert_eq!(Entry::decode(b"UD"), Err(DecodeError::BadMagic));
        assert_eq!(Entry::decode(b"XYZ\x01"), Err(DecodeError::BadMagic));
        assert_eq!(Entry::decode(b"UDE"), Err(DecodeError::Truncated));
        assert_eq!(
            Entry::decode(b"UDE\x02rest"),
            Err(DecodeError::UnsupportedVersion(2))
        );
        assert_eq!(
            Entry::decode(&good[..good.len() - 1]),
            Err(DecodeError::Truncated)
        );
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(Entry::decode(&trailing), Err(DecodeError::TrailingBytes(1)));

        let mut bad_state = in_flight("k", "f", 1).encode();
        *bad_state.last_mut().unwrap() = 9;
        assert_eq!(Entry::decode(&bad_state), Err(DecodeError::UnknownState(9)));

        let mut bad_utf8 = in_flight("k", "f", 1).encode();
        bad_utf8[12] = 0xff; // the key's single byte, after magic, version and length
        assert_eq!(
            Entry::decode(&bad_utf8),
            Err(DecodeError::InvalidUtf8("key"))
        );

        // A header count far beyond the input is refused without allocating for it.
        let mut huge_count = in_flight("k", "f", 1).encode();
        huge_count.pop();
        huge_count.push(STATE_DONE);
        huge_count.extend_from_slice(&200u16.to_be_bytes());
        huge_count.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(Entry::decode(&huge_count), Err(DecodeError::Truncated));
    }

    fn arb_header() -> impl Strategy<Value = (String, String)> {
        (any::<String>(), any::<String>())
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        let state = prop_oneof![
            Just(EntryState::InFlight),
            (
                any::<u16>(),
                proptest::collection::vec(arb_header(), 0..6),
                proptest::collection::vec(any::<u8>(), 0..256),
            )
                .prop_map(|(status, headers, body)| EntryState::Done {
                    status,
                    headers,
                    body
                }),
        ];
        (any::<String>(), "[0-9a-f]{0,64}", any::<u64>(), state).prop_map(
            |(key, fingerprint, expires_at_ms, state)| Entry {
                key,
                fingerprint,
                expires_at_ms,
                state,
            },
        )
    }

    proptest! {
        #[test]
        fn decode_of_arbitrary_bytes_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let _ = Entry::decode(&bytes);
            let mut prefixed = b"UDE\x01".to_vec();
            prefixed.extend_from_slice(&bytes);
            let _ = Entry::decode(&prefixed);
        }

        // Damaged real entries reach deeper into the decoder than random bytes.
        #[test]
        fn decode_of_damaged_entries_never_panics(
            entry in arb_entry(),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            xor in 1u8..,
        ) {
            let bytes = entry.encode();
            let truncated = &bytes[..cut.index(bytes.len())];
            prop_assert!(Entry::decode(truncated).is_err());
            let mut flipped = bytes.clone();
            let i = flip.index(flipped.len());
            flipped[i] ^= xor;
            let _ = Entry::decode(&flipped);
        }

        #[test]
        fn encode_decode_round_trips(entry in arb_entry()) {
            prop_assert_eq!(Entry::decode(&entry.encode()), Ok(entry));
        }

        #[test]
        fn slot_key_is_in_range_and_stable(key in "[!-~]{1,255}", slots in 1u32..) {
            let k = slot_key("p", &key, slots);
            prop_assert_eq!(&k, &slot_key("p", &key, slots));
            let slot: u32 = k.strip_prefix("p/").unwrap().parse().unwrap();
            prop_assert!(slot < slots);
            prop_assert_eq!(slot, slot_index(&key, slots));
        }

        #[test]
        fn fingerprint_differs_when_any_part_differs(
            a in (".{0,8}", ".{0,8}", proptest::collection::vec(any::<u8>(), 0..8)),
            b in (".{0,8}", ".{0,8}", proptest::collection::vec(any::<u8>(), 0..8)),
        ) {
            let fa = fingerprint(&a.0, &a.1, &a.2);
            let fb = fingerprint(&b.0, &b.1, &b.2);
            prop_assert_eq!(fa == fb, a == b);
        }

        // Moving the boundary between two parts always changes the fingerprint.
        #[test]
        fn fingerprint_framing_holds_for_any_split(
            s in "[a-z]{1,16}",
            i in any::<prop::sample::Index>(),
            shift in any::<prop::sample::Index>(),
        ) {
            // Two distinct split points in 0..=len, without rejecting cases.
            let points = s.len() + 1;
            let i = i.index(points);
            let j = (i + 1 + shift.index(points - 1)) % points;
            let (head_i, tail_i) = s.split_at(i);
            let (head_j, tail_j) = s.split_at(j);
            prop_assert_ne!(fingerprint(head_i, tail_i, b""), fingerprint(head_j, tail_j, b""));
            prop_assert_ne!(
                fingerprint("", head_i, tail_i.as_bytes()),
                fingerprint("", head_j, tail_j.as_bytes())
            );
        }

        #[test]
        fn decide_never_replays_another_keys_answer(
            existing in proptest::option::of(arb_entry()),
            key in "[!-~]{1,16}",
            fp in "[0-9a-f]{0,4}",
            now in any::<u64>(),
        ) {
            match decide(existing.as_ref(), &key, &fp, now, &cfg()) {
                Decision::Replay { .. } | Decision::InFlight | Decision::Mismatch => {
                    let e = existing.unwrap();
                    prop_assert_eq!(&e.key, &key);
                    prop_assert!(e.is_live(now));
                }
                Decision::SlotBusy => {
                    let e = existing.unwrap();
                    prop_assert_ne!(&e.key, &key);
                    prop_assert!(e.is_live(now));
                }
                Decision::Proceed { claim } => {
                    prop_assert_eq!(claim.key, key);
                    prop_assert_eq!(claim.fingerprint, fp);
                    prop_assert_eq!(claim.state, EntryState::InFlight);
                }
            }
        }
    }
}
