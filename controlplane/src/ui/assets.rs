//! The dashboard's static files, compiled into the binary: the vendored
//! uPlot (see `assets/VENDOR.md` for versions, licenses and integrity) and
//! our own small scripts. Served at `/ui/assets/{name}`; no files beside
//! the binary, no node build step.

use axum::Router;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::UiState;

/// One served file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "uplot-1.6.32.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("assets/vendor/uplot-1.6.32/uPlot.iife.min.js"),
    },
    Asset {
        name: "uplot-1.6.32.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("assets/vendor/uplot-1.6.32/uPlot.min.css"),
    },
    Asset {
        name: "uplot-LICENSE.txt",
        content_type: "text/plain; charset=utf-8",
        bytes: include_bytes!("assets/vendor/uplot-1.6.32/LICENSE"),
    },
    Asset {
        name: "rollout.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("assets/rollout.js"),
    },
];

pub(super) fn routes() -> Router<UiState> {
    Router::new().route("/ui/assets/{name}", get(asset))
}

/// Assets are public (no data in them), so the login page may use them.
async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(a) => (
            [
                (header::CONTENT_TYPE, a.content_type),
                // Short: our own scripts change with the binary.
                (header::CACHE_CONTROL, "public, max-age=300"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            a.bytes,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn sha256(bytes: &[u8]) -> String {
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn vendored_files_are_the_recorded_ones() {
        let record = include_str!("assets/VENDOR.md");
        for name in ["uplot-1.6.32.js", "uplot-1.6.32.css", "uplot-LICENSE.txt"] {
            let a = ASSETS.iter().find(|a| a.name == name).unwrap();
            let digest = sha256(a.bytes);
            assert!(
                record.contains(&format!("`{digest}`")),
                "{name}: SHA-256 {digest} is not the one VENDOR.md records"
            );
        }
    }
}
