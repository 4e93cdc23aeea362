//! The UI's changes to ScalingPolicies, made through the Kubernetes API (so `kubectl get
//! scalingpolicies` sees them and the API server's own checks apply):
//!
//! - `POST /api/v1/policies/{namespace}/{name}/pause` and `.../resume` (operator): set
//!   `spec.paused`;
//! - `POST /api/v1/policy-drafts/validate` and `POST /api/v1/policy-drafts/apply` (admin):
//!   a policy as YAML (`{"yaml": "..."}`) or as the guided short form (`{"form": {...}}`),
//!   checked with the same validator as the controller (problems name the field and, in
//!   expressions, the column, as `kubectl describe` shows them) before it is applied
//!   with server-side apply.
//!
//! It decides nothing about the policy's behaviour; the core reconciles what was applied.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::{Extension, Json};
use http::StatusCode;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde::{Deserialize, Serialize};

use super::UiState;
use super::error::HttpError;
use super::role::Principal;
use crate::policy::ScalingPolicy;
use crate::policy::compile::compile;
use crate::policy::crd::{ScalingPolicySpec, TargetRef};

/// The field manager the UI's applies are recorded under (`kubectl get -o yaml
/// --show-managed-fields` names it).
pub const FIELD_MANAGER: &str = "nemesis-ui";

fn client(ui: &UiState) -> Result<kube::Client, HttpError> {
    ui.sources.kube.clone().ok_or_else(|| {
        HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this UI has no Kubernetes client, so it cannot change policies",
        )
    })
}

fn kube_error(doing: &'static str, e: kube::Error) -> HttpError {
    match &e {
        // The API server's own refusals are the user's to read (a 404, an RBAC denial,
        // an invalid object); anything else is ours.
        kube::Error::Api(s) if (400..500).contains(&s.code) => HttpError::new(
            StatusCode::from_u16(s.code).unwrap_or(StatusCode::BAD_REQUEST),
            format!("{doing}: the API server said: {}", s.message),
        ),
        _ => HttpError::internal(doing, &e),
    }
}

// === pause and resume ===

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Paused {
    pub namespace: String,
    pub name: String,
    pub paused: bool,
}

async fn set_paused(
    ui: &UiState,
    by: &Principal,
    path: Result<Path<(String, String)>, PathRejection>,
    paused: bool,
) -> Result<Json<Paused>, HttpError> {
    let Path((namespace, name)) =
        path.map_err(|e| HttpError::bad_request(format!("bad policy path: {e}")))?;
    let api: Api<ScalingPolicy> = Api::namespaced(client(ui)?, &namespace);
    let patch = serde_json::json!({ "spec": { "paused": paused } });
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| kube_error("setting spec.paused", e))?;
    tracing::info!(%namespace, %name, paused, by = %by.user, "UI paused or resumed a policy");
    Ok(Json(Paused {
        namespace,
        name,
        paused,
    }))
}

pub async fn pause(
    State(ui): State<UiState>,
    Extension(by): Extension<Principal>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Paused>, HttpError> {
    set_paused(&ui, &by, path, true).await
}

pub async fn resume(
    State(ui): State<UiState>,
    Extension(by): Extension<Principal>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Paused>, HttpError> {
    set_paused(&ui, &by, path, false).await
}

// === drafts: validate and apply ===

/// The guided form: the short form of a policy (scale to zero after an idle window,
/// between min and max replicas following one metric).
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ShortForm {
    pub namespace: String,
    pub name: String,
    pub deployment: String,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub min_replicas: Option<i32>,
    #[serde(default)]
    pub max_replicas: Option<i32>,
    #[serde(default)]
    pub idle_timeout: Option<String>,
    #[serde(default)]
    pub target_metric: Option<String>,
    #[serde(default)]
    pub target_value: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Draft {
    #[serde(default)]
    pub yaml: Option<String>,
    #[serde(default)]
    pub form: Option<ShortForm>,
}

/// One problem, as the page shows it beside the field.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DraftProblem {
    /// The field path (`spec.idleTimeout`), or `yaml` for a document that does not parse.
    pub field: String,
    /// In the YAML text: the 1-based line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// In an expression or the YAML text: the 1-based column.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    pub message: String,
}

impl DraftProblem {
    fn at(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            line: None,
            column: None,
            message: message.into(),
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DraftVerdict {
    pub valid: bool,
    pub problems: Vec<DraftProblem>,
    /// The policy as it would be applied (YAML), when it could be read at all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Reads a draft into a policy and checks it. Pure: no I/O.
pub fn check_draft(draft: &Draft) -> Result<ScalingPolicy, Vec<DraftProblem>> {
    let policy = match (&draft.yaml, &draft.form) {
        (Some(yaml), None) => from_yaml(yaml)?,
        (None, Some(form)) => from_form(form),
        _ => {
            return Err(vec![DraftProblem::at(
                "body",
                "send either {\"yaml\": \"...\"} or {\"form\": {...}}",
            )]);
        }
    };
    let mut problems = Vec::new();
    if policy.metadata.name.as_deref().unwrap_or("").is_empty() {
        problems.push(DraftProblem::at("metadata.name", "is required"));
    }
    if policy
        .metadata
        .namespace
        .as_deref()
        .unwrap_or("")
        .is_empty()
    {
        problems.push(DraftProblem::at("metadata.namespace", "is required"));
    }
    for (field, value) in [
        ("metadata.name", policy.metadata.name.as_deref()),
        ("metadata.namespace", policy.metadata.namespace.as_deref()),
    ] {
        if let Some(v) = value.filter(|v| !v.is_empty() && !is_dns_label(v)) {
            problems.push(DraftProblem::at(
                field,
                format!("{v:?} is not a DNS label: lowercase letters, digits and '-', at most 63, starting and ending with a letter or digit"),
            ));
        }
    }
    if let Err(invalid) = compile(&policy.spec) {
        problems.extend(invalid.problems.into_iter().map(|p| DraftProblem {
            field: p.path,
            line: None,
            column: p.column,
            message: p.message,
        }));
    }
    if problems.is_empty() {
        Ok(policy)
    } else {
        Err(problems)
    }
}

fn is_dns_label(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn from_yaml(yaml: &str) -> Result<ScalingPolicy, Vec<DraftProblem>> {
    let value: serde_norway::Value =
        serde_norway::from_str(yaml).map_err(|e| vec![yaml_problem(&e)])?;
    let api_version = value.get("apiVersion").and_then(|v| v.as_str());
    let kind = value.get("kind").and_then(|v| v.as_str());
    let mut problems = Vec::new();
    if api_version != Some("nemesis.dev/v1alpha1") {
        problems.push(DraftProblem::at(
            "apiVersion",
            "must be nemesis.dev/v1alpha1",
        ));
    }
    if kind != Some("ScalingPolicy") {
        problems.push(DraftProblem::at("kind", "must be ScalingPolicy"));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    // Parsed again typed so serde's error carries the line and column of the bad field.
    let mut p: ScalingPolicy = serde_norway::from_str(yaml).map_err(|e| vec![yaml_problem(&e)])?;
    p.status = None;
    p.metadata.managed_fields = None;
    p.metadata.resource_version = None;
    p.metadata.uid = None;
    p.metadata.creation_timestamp = None;
    p.metadata.generation = None;
    Ok(p)
}

fn yaml_problem(e: &serde_norway::Error) -> DraftProblem {
    let loc = e.location();
    DraftProblem {
        field: "yaml".into(),
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
        message: e.to_string(),
    }
}

fn from_form(f: &ShortForm) -> ScalingPolicy {
    let blank = |s: &Option<String>| s.clone().filter(|s| !s.trim().is_empty());
    let mut p = ScalingPolicy::new(
        &f.name,
        ScalingPolicySpec {
            target: TargetRef {
                // The guided form names a Deployment (the short form's shorthand); other
                // kinds take the YAML editor.
                deployment: Some(f.deployment.clone()),
                kind: None,
                api_version: None,
                name: None,
                service: blank(&f.service),
            },
            min_replicas: f.min_replicas,
            max_replicas: f.max_replicas,
            idle_timeout: blank(&f.idle_timeout),
            target_metric: blank(&f.target_metric),
            target_value: f.target_value,
            ..Default::default()
        },
    );
    p.metadata.namespace = Some(f.namespace.clone());
    p
}

fn parse_draft(body: Result<Json<Draft>, JsonRejection>) -> Result<Draft, HttpError> {
    body.map(|Json(d)| d).map_err(|r| {
        HttpError::new(
            r.status(),
            r#"the body must be JSON: {"yaml": "..."} or {"form": {"namespace": ..., "name": ..., "deployment": ...}}"#,
        )
    })
}

fn verdict(draft: &Draft) -> (Result<ScalingPolicy, ()>, DraftVerdict) {
    match check_draft(draft) {
        Ok(p) => {
            let manifest = serde_norway::to_string(&p).ok();
            let v = DraftVerdict {
                valid: true,
                problems: Vec::new(),
                manifest,
                namespace: p.namespace(),
                name: Some(p.name_any()),
            };
            (Ok(p), v)
        }
        Err(problems) => (
            Err(()),
            DraftVerdict {
                valid: false,
                problems,
                manifest: None,
                namespace: None,
                name: None,
            },
        ),
    }
}

/// Checks a draft without applying it (the editors call it as the user types).
pub async fn validate(
    body: Result<Json<Draft>, JsonRejection>,
) -> Result<Json<DraftVerdict>, HttpError> {
    let draft = parse_draft(body)?;
    Ok(Json(verdict(&draft).1))
}

/// Checks a draft and, when valid, applies it (server-side apply, forced: the UI's
/// admin owns what it submits); an invalid one is 422 with the problems.
pub async fn apply(
    State(ui): State<UiState>,
    Extension(by): Extension<Principal>,
    body: Result<Json<Draft>, JsonRejection>,
) -> Result<(StatusCode, Json<DraftVerdict>), HttpError> {
    let draft = parse_draft(body)?;
    let (policy, v) = verdict(&draft);
    let Ok(policy) = policy else {
        return Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(v)));
    };
    let namespace = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    let api: Api<ScalingPolicy> = Api::namespaced(client(&ui)?, &namespace);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&policy),
    )
    .await
    .map_err(|e| kube_error("applying the policy", e))?;
    tracing::info!(%namespace, %name, by = %by.user, "UI applied a policy");
    Ok((StatusCode::OK, Json(v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form() -> ShortForm {
        ShortForm {
            namespace: "shop".into(),
            name: "checkout".into(),
            deployment: "checkout".into(),
            service: Some("checkout".into()),
            idle_timeout: Some("10m".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_valid_short_form_becomes_a_policy() {
        let p = check_draft(&Draft {
            yaml: None,
            form: Some(form()),
        })
        .unwrap();
        assert_eq!(p.spec.idle_timeout.as_deref(), Some("10m"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("shop"));
    }

    #[test]
    fn a_bad_idle_timeout_names_the_field_and_column() {
        let mut f = form();
        f.idle_timeout = Some("10x".into());
        let problems = check_draft(&Draft {
            yaml: None,
            form: Some(f),
        })
        .unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.field == "spec.idleTimeout" && p.column.is_some()),
            "{problems:?}"
        );
    }

    #[test]
    fn yaml_errors_carry_line_and_column() {
        let yaml = "apiVersion: nemesis.dev/v1alpha1\nkind: ScalingPolicy\nmetadata:\n  name: a\n  namespace: b\nspec:\n  target:\n    deployment: a\n  minReplicas: lots\n";
        let problems = check_draft(&Draft {
            yaml: Some(yaml.into()),
            form: None,
        })
        .unwrap_err();
        assert_eq!(problems[0].field, "yaml");
        assert_eq!(problems[0].line, Some(9), "{problems:?}");
        let wrong_kind = check_draft(&Draft {
            yaml: Some("apiVersion: v1\nkind: Pod\n".into()),
            form: None,
        })
        .unwrap_err();
        assert_eq!(wrong_kind.len(), 2);
    }
}
