//! A whole policy draft as the UI's `POST /api/v1/policy-drafts/validate` receives it
//! (`{"yaml": ...}` or `{"form": ...}`): decoded as axum's `Json` extractor does, then
//! checked by `check_draft`, the validator the editor and `apply` use.
#![no_main]

use axum::Json;
use libfuzzer_sys::fuzz_target;
use nemesis_controller::ui::edit::{Draft, check_draft};

fuzz_target!(|data: &[u8]| {
    if let Ok(Json(draft)) = Json::<Draft>::from_bytes(data) {
        let _ = check_draft(&draft);
    }
});
