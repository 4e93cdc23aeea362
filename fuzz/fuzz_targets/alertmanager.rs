//! The Alertmanager webhook (`POST /v1/alerts/alertmanager`): a payload decoded as
//! axum's `Json` extractor does, then `alerts::accept` (version check, the firing set
//! updated), twice, as Alertmanager's retries deliver it.
#![no_main]

use axum::Json;
use libfuzzer_sys::fuzz_target;
use nemesis_controller::alerts::{AlertBook, WebhookMessage, accept};

fuzz_target!(|data: &[u8]| {
    let Ok(Json(msg)) = Json::<WebhookMessage>::from_bytes(data) else {
        return;
    };
    let book = AlertBook::new();
    let now = chrono::DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time");
    let _ = accept(&book, &msg, now);
    let _ = accept(&book, &msg, now + chrono::Duration::minutes(90));
    let _ = book.firing();
});
