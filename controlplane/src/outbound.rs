//! Answers to the control plane's own outbound HTTP calls (Prometheus
//! queries, replays, synthetic probes): an error told with its causes, and
//! a body read up to a cap, since whoever answers is not trusted to be
//! small. Imports nothing from the crate.

/// reqwest's top-level message ("error sending request") hides the cause
/// ("connection refused"); the whole chain says what happened. A cause
/// whose text the message already holds is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Why [`read_capped`] returned no body.
#[derive(Debug)]
pub enum ReadError {
    /// The answer broke off.
    Cut(reqwest::Error),
    /// It went over the cap (nothing more was read).
    TooLarge,
}

/// The answer's body, refused as soon as it would exceed `max` bytes.
pub async fn read_capped(
    response: &mut reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Cut)? {
        if body.len().saturating_add(chunk.len()) > max {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_causes() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("error sending request")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(std::io::Error::other("connection refused"));
        assert_eq!(error_chain(&e), "error sending request: connection refused");
    }
}
