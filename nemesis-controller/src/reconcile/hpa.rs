//! Sharing a target with a HorizontalPodAutoscaler: which HPA scales the same target,
//! and the replicas the policy may set beside it. The policy owns zero and the wake to
//! the HPA's `minReplicas`; the range above belongs to the HPA (which itself stops
//! acting at zero replicas). Pure; the actor reads the HPA cache and applies.

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::ResourceExt;

use crate::policy::WorkloadRef;

/// The condition type a policy reports while an HPA shares its target.
pub const CONDITION_HPA: &str = "HorizontalPodAutoscaler";

/// What the policy needs of an HPA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HpaView {
    pub name: String,
    /// `spec.minReplicas` (Kubernetes' default 1); never below 1 here, since a wake to
    /// zero is no wake.
    pub min: u32,
    pub max: u32,
}

impl HpaView {
    /// The `HorizontalPodAutoscaler` condition's message.
    pub fn message(&self, target: &WorkloadRef) -> String {
        format!(
            "HorizontalPodAutoscaler {} scales {target} between {} and {}: the policy only \
             scales it between 0 and {} and leaves the range above to the HPA",
            self.name, self.min, self.max, self.min
        )
    }
}

/// The HPA in `namespace` whose `scaleTargetRef` is `target` (same kind, name and API
/// group; the version may differ). Several: the first by name, as a real cluster's HPA
/// controller would fight over the target anyway.
pub fn find<'a>(
    hpas: impl IntoIterator<Item = &'a HorizontalPodAutoscaler>,
    namespace: &str,
    target: &WorkloadRef,
) -> Option<HpaView> {
    hpas.into_iter()
        .filter(|h| h.namespace().as_deref() == Some(namespace))
        .filter(|h| {
            let r = &h.spec.scale_target_ref;
            let group = r
                .api_version
                .as_deref()
                .and_then(|v| v.rsplit_once('/'))
                .map_or("", |(g, _)| g);
            r.kind == target.kind && r.name == target.name && group == target.group()
        })
        .min_by_key(|h| h.name_any())
        .map(|h| HpaView {
            name: h.name_any(),
            min: h.spec.min_replicas.unwrap_or(1).max(1) as u32,
            max: h.spec.max_replicas.max(1) as u32,
        })
}

/// The replicas to set when the policy wants `desired` and the target has `current`:
/// without an HPA, `desired`; with one, zero when the policy sleeps, the HPA's minimum
/// when it wakes the target from zero, and otherwise whatever the HPA set.
pub fn replicas(desired: u32, current: u32, hpa: Option<&HpaView>) -> u32 {
    match hpa {
        None => desired,
        Some(_) if desired == 0 => 0,
        Some(h) if current == 0 => h.min,
        Some(_) => current,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hpa(
        ns: &str,
        name: &str,
        kind: &str,
        api: &str,
        target: &str,
        min: Option<i32>,
    ) -> HorizontalPodAutoscaler {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "scaleTargetRef": {"kind": kind, "apiVersion": api, "name": target},
                "minReplicas": min,
                "maxReplicas": 10,
            },
        }))
        .unwrap()
    }

    #[test]
    fn the_hpa_of_the_same_kind_name_group_and_namespace_is_found() {
        let web = WorkloadRef::deployment("web");
        let hpas = [
            hpa("other", "a", "Deployment", "apps/v1", "web", Some(3)),
            hpa("shop", "b", "StatefulSet", "apps/v1", "web", Some(3)),
            hpa(
                "shop",
                "c",
                "Deployment",
                "extensions/v1beta1",
                "web",
                Some(3),
            ),
            hpa("shop", "e", "Deployment", "apps/v1", "api", Some(3)),
            hpa("shop", "z", "Deployment", "apps/v1", "web", None),
            hpa("shop", "d", "Deployment", "apps/v1beta2", "web", Some(2)),
        ];
        assert_eq!(
            find(&hpas, "shop", &web),
            Some(HpaView {
                name: "d".into(),
                min: 2,
                max: 10
            })
        );
        assert_eq!(find(&hpas[..5], "shop", &web).map(|h| h.min), Some(1));
        assert_eq!(find(&hpas, "nowhere", &web), None);
    }

    #[test]
    fn beside_an_hpa_the_policy_only_moves_between_zero_and_its_minimum() {
        let h = HpaView {
            name: "web".into(),
            min: 2,
            max: 10,
        };
        // (desired, current) -> set
        let table = [
            ((0, 5), 0),
            ((0, 0), 0),
            ((1, 0), 2),
            ((4, 0), 2),
            ((1, 5), 5),
            ((1, 2), 2),
            ((7, 3), 3),
        ];
        for ((desired, current), want) in table {
            assert_eq!(
                replicas(desired, current, Some(&h)),
                want,
                "{desired} {current}"
            );
            assert_eq!(replicas(desired, current, None), desired);
        }
        assert_eq!(
            h.message(&WorkloadRef::deployment("web")),
            "HorizontalPodAutoscaler web scales Deployment/web between 2 and 10: the policy \
             only scales it between 0 and 2 and leaves the range above to the HPA"
        );
    }
}
