//! The Shadow pages (`/ui/shadow`, `/ui/shadow/{route}`): match rates,
//! differing paths, samples, replay and the rule preview. Being built on
//! the `preview` branch; this stub keeps the route list in one place.

use axum::Router;

use super::UiState;

pub(super) fn routes() -> Router<UiState> {
    Router::new()
}
