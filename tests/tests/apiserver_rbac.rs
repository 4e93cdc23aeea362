//! ServiceAccount tokens and RBAC through kube-rs and the real kubectl: tokens from
//! TokenRequest authenticate as `system:serviceaccount:<ns>:<name>`, TokenReview checks
//! them (audiences included), Roles, ClusterRoles and their bindings decide every request
//! as the real authorizer does (namespaces, subresources, resourceNames), refusals are
//! upstream's 403 with upstream's message, and `kubectl auth can-i` / `whoami` answer.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenReview};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use serde_json::{Value, json};

const NS: &str = "shop";
const SA: &str = "reader";
const USER: &str = "system:serviceaccount:shop:reader";

async fn apply(client: &kube::Client, objs: &[Value]) -> Result<()> {
    let discovery = kube::Discovery::new(client.clone()).run().await?;
    for o in objs {
        let obj: kube::api::DynamicObject = serde_json::from_value(o.clone())?;
        let tm = obj.types.clone().context("apiVersion and kind")?;
        let gvk = kube::api::GroupVersionKind::try_from(&tm)?;
        let (ar, caps) = discovery.resolve_gvk(&gvk).context("a served kind")?;
        let api: Api<kube::api::DynamicObject> = match caps.scope {
            kube::discovery::Scope::Namespaced => Api::namespaced_with(
                client.clone(),
                obj.metadata.namespace.as_deref().unwrap_or("default"),
                &ar,
            ),
            kube::discovery::Scope::Cluster => Api::all_with(client.clone(), &ar),
        };
        api.create(&PostParams::default(), &obj)
            .await
            .with_context(|| format!("creating {o}"))?;
    }
    Ok(())
}

/// A server with namespace `shop`, ServiceAccount `reader` allowed to read pods in
/// `shop` and to scale the Deployment `web` there (only that one), and a Deployment
/// `web` and `other`.
async fn world() -> Result<(TestApiServer, kube::Client)> {
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let admin = server.client().await?;
    let deployment = |name: &str| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": NS},
               "spec": {"replicas": 0, "selector": {"matchLabels": {"app": name}},
                        "template": {"metadata": {"labels": {"app": name}},
                                     "spec": {"containers": [{"name": "c", "image": "x", "command": ["true"]}]}}}})
    };
    apply(
        &admin,
        &[
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SA, "namespace": NS}}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                   "metadata": {"name": "pod-reader", "namespace": NS},
                   "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": "pod-reader", "namespace": NS},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
                   "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": NS}]}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                   "metadata": {"name": "web-scaler"},
                   "rules": [{"apiGroups": ["apps"], "resources": ["deployments/scale"],
                              "resourceNames": ["web"], "verbs": ["get", "patch"]}]}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": "web-scaler", "namespace": NS},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "web-scaler"},
                   "subjects": [{"kind": "ServiceAccount", "name": SA}]}),
            deployment("web"),
            deployment("other"),
        ],
    )
    .await?;
    Ok((server, admin))
}

fn api_error(r: Result<impl std::fmt::Debug, kube::Error>) -> Result<kube::core::Status> {
    match r {
        Err(kube::Error::Api(s)) => Ok(*s),
        other => bail!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn service_account_tokens_are_authorized_by_roles_and_bindings() -> Result<()> {
    let (server, _admin) = world().await?;
    let token = server.service_account_token(NS, SA)?;
    let sa = server.client_with_token(&token).await?;

    Api::<Pod>::namespaced(sa.clone(), NS)
        .list(&ListParams::default())
        .await
        .context("the Role lets it list pods in shop")?;
    let e = api_error(
        Api::<Pod>::namespaced(sa.clone(), "default")
            .list(&ListParams::default())
            .await,
    )?;
    assert_eq!((e.code, e.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        e.message,
        format!(
            "pods is forbidden: User \"{USER}\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
        )
    );
    let e = api_error(
        Api::<Pod>::all(sa.clone())
            .list(&ListParams::default())
            .await,
    )?;
    assert_eq!(
        e.message,
        format!(
            "pods is forbidden: User \"{USER}\" cannot list resource \"pods\" in API group \"\" at the cluster scope"
        )
    );
    let e = api_error(Api::<ConfigMap>::namespaced(sa.clone(), NS).get("x").await)?;
    assert_eq!(
        e.message,
        format!(
            "configmaps \"x\" is forbidden: User \"{USER}\" cannot get resource \"configmaps\" in API group \"\" in the namespace \"shop\""
        )
    );

    // The scale subresource of the one Deployment named, and nothing else of it.
    let deployments: Api<Deployment> = Api::namespaced(sa.clone(), NS);
    let scale = Patch::Merge(json!({"spec": {"replicas": 2}}));
    deployments
        .patch_scale("web", &PatchParams::default(), &scale)
        .await
        .context("scaling web")?;
    let e = api_error(
        deployments
            .patch_scale("other", &PatchParams::default(), &scale)
            .await,
    )?;
    assert_eq!(
        e.message,
        format!(
            "deployments.apps \"other\" is forbidden: User \"{USER}\" cannot patch resource \"deployments/scale\" in API group \"apps\" in the namespace \"shop\""
        )
    );
    let e = api_error(
        deployments
            .patch("web", &PatchParams::default(), &scale)
            .await,
    )?;
    assert_eq!(e.code, 403, "{e:?}");
    let e = api_error(deployments.list(&ListParams::default()).await)?;
    assert_eq!(e.code, 403, "{e:?}");

    // Discovery is open to every authenticated user, as the bootstrap policy has it.
    kube::Discovery::new(sa.clone())
        .run()
        .await
        .context("discovery as a ServiceAccount")?;
    server.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn token_requests_reviews_and_the_life_of_a_token() -> Result<()> {
    let (server, admin) = world().await?;
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), NS);
    let req: TokenRequest = serde_json::from_value(json!({"spec": {"audiences": []}}))?;
    let issued = sas
        .create_token_request(SA, &PostParams::default(), &req)
        .await?;
    let token = issued
        .status
        .and_then(|s| s.token)
        .context("a token in the status")?;
    let reviews: Api<TokenReview> = Api::all(admin.clone());
    let review = |token: &str, audiences: Option<Vec<&str>>| {
        let spec = match audiences {
            Some(a) => json!({"token": token, "audiences": a}),
            None => json!({"token": token}),
        };
        let reviews = reviews.clone();
        async move {
            let r: TokenReview = serde_json::from_value(json!({"spec": spec}))?;
            let out = reviews.create(&PostParams::default(), &r).await?;
            anyhow::Ok(out.status.context("a review status")?)
        }
    };
    let ok = review(&token, None).await?;
    assert_eq!(ok.authenticated, Some(true));
    let user = ok.user.context("a user")?;
    assert_eq!(user.username.as_deref(), Some(USER));
    let groups = user.groups.unwrap_or_default();
    for g in [
        "system:serviceaccounts",
        "system:serviceaccounts:shop",
        "system:authenticated",
    ] {
        assert!(groups.iter().any(|x| x == g), "{g} in {groups:?}");
    }

    // A token for another audience is no good for the API, but TokenReview with that
    // audience accepts it (another issue's projected tokens rely on this).
    let vault: TokenRequest = serde_json::from_value(
        json!({"spec": {"audiences": ["vault"], "expirationSeconds": 600}}),
    )?;
    let vault_token = sas
        .create_token_request(SA, &PostParams::default(), &vault)
        .await?
        .status
        .and_then(|s| s.token)
        .context("a token in the status")?;
    let e = api_error(
        Api::<Pod>::namespaced(server.client_with_token(&vault_token).await?, NS)
            .list(&ListParams::default())
            .await,
    )?;
    assert_eq!(e.code, 401);
    assert_eq!(review(&vault_token, None).await?.authenticated, None);
    let r = review(&vault_token, Some(vec!["vault"])).await?;
    assert_eq!(r.authenticated, Some(true));
    assert_eq!(r.audiences, Some(vec!["vault".to_string()]));

    // Too short a life is refused as upstream does.
    let short: TokenRequest = serde_json::from_value(json!({"spec": {"expirationSeconds": 60}}))?;
    let e = api_error(
        sas.create_token_request(SA, &PostParams::default(), &short)
            .await,
    )?;
    assert_eq!(e.code, 422);
    assert!(
        e.message
            .contains("may not specify a duration less than 10 minutes"),
        "{e:?}"
    );

    // A ServiceAccount deleted (even if made again) takes its tokens with it.
    sas.delete(SA, &DeleteParams::default()).await?;
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": SA}}))?,
    )
    .await?;
    let e = api_error(
        Api::<Pod>::namespaced(server.client_with_token(&token).await?, NS)
            .list(&ListParams::default())
            .await,
    )?;
    assert_eq!((e.code, e.reason.as_str()), (401, "Unauthorized"));
    server.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn anonymous_requests_see_only_health_and_version() -> Result<()> {
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let mut cfg = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(server.kubeconfig_path())?,
        &Default::default(),
    )
    .await?;
    // No credentials at all (kubectl would prompt for a user name instead).
    cfg.auth_info = Default::default();
    let anonymous = kube::Client::try_from(cfg)?;
    let get = |path: &str| http::Request::get(path).body(Vec::new());
    assert_eq!(anonymous.request_text(get("/healthz")?).await?, "ok");
    anonymous
        .request_text(get("/version")?)
        .await
        .context("/version is public")?;
    let e = api_error(anonymous.request_text(get("/api")?).await)?;
    assert_eq!(
        (e.code, e.message.as_str()),
        (
            403,
            "forbidden: User \"system:anonymous\" cannot get path \"/api\""
        )
    );
    let e = api_error(
        Api::<Pod>::all(anonymous)
            .list(&ListParams::default())
            .await,
    )?;
    assert_eq!(
        e.message,
        "pods is forbidden: User \"system:anonymous\" cannot list resource \"pods\" in API group \"\" at the cluster scope"
    );
    server.shutdown().await;
    Ok(())
}

/// `(success, stdout, stderr)` of kubectl with `kubeconfig`.
async fn kubectl(kubeconfig: &Path, home: &Path, args: &[&str]) -> Result<(bool, String, String)> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(home.join("cache"))
            .args(args)
            .env("HOME", home)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("kubectl timed out")?
    .context("running kubectl (is it installed?)")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn kubectl_auth_can_i_and_whoami_answer_for_the_user_asking() -> Result<()> {
    let (server, _admin) = world().await?;
    let dir = tempfile::tempdir()?;
    let sa_kc = dir.path().join("reader");
    server.write_kubeconfig(&sa_kc, &server.service_account_token(NS, SA)?)?;
    let admin_kc = server.kubeconfig_path().to_path_buf();
    let can_i = |kc: &Path, args: &[&str]| {
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        let all: Vec<String> = all.iter().map(|s| s.to_string()).collect();
        let kc = kc.to_path_buf();
        let home = dir.path().to_path_buf();
        async move {
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            let (_, out, err) = kubectl(&kc, &home, &refs).await?;
            anyhow::Ok(format!(
                "{}{}",
                out.trim(),
                if out.trim().is_empty() {
                    err
                } else {
                    String::new()
                }
            ))
        }
    };
    for (args, want) in [
        (vec!["list", "pods", "-n", NS], "yes"),
        (vec!["watch", "pods", "-n", NS], "yes"),
        (vec!["delete", "pods", "-n", NS], "no"),
        (vec!["list", "pods", "-n", "default"], "no"),
        (
            vec!["patch", "deployments/web", "--subresource=scale", "-n", NS],
            "yes",
        ),
        (
            vec![
                "patch",
                "deployments/other",
                "--subresource=scale",
                "-n",
                NS,
            ],
            "no",
        ),
        (vec!["get", "/healthz"], "yes"),
    ] {
        let got = can_i(&sa_kc, &args).await?;
        ensure!(
            got == want,
            "as the ServiceAccount, can-i {args:?}: {got:?}, want {want}"
        );
    }
    // The admin asks about someone else by impersonation, as `--as` does.
    let got = can_i(&admin_kc, &["list", "pods", "-n", NS, "--as", USER]).await?;
    ensure!(got == "yes", "--as: {got}");
    let got = can_i(
        &admin_kc,
        &[
            "list",
            "endpointslices.discovery.k8s.io",
            "-A",
            "--as",
            USER,
        ],
    )
    .await?;
    ensure!(got == "no", "--as: {got}");
    let got = can_i(&admin_kc, &["delete", "nodes"]).await?;
    ensure!(got == "yes", "the admin: {got}");
    // The ServiceAccount may not impersonate anyone.
    let (ok, _, err) = kubectl(
        &sa_kc,
        dir.path(),
        &["get", "pods", "-n", NS, "--as", "kubernetes-admin"],
    )
    .await?;
    ensure!(!ok, "impersonation by a ServiceAccount must be refused");
    ensure!(
        err.contains(&format!("users \"kubernetes-admin\" is forbidden: User \"{USER}\" cannot impersonate resource \"users\" in API group \"\" at the cluster scope")),
        "{err}"
    );
    // The rules list names the Role's.
    let (ok, list, err) =
        kubectl(&sa_kc, dir.path(), &["auth", "can-i", "--list", "-n", NS]).await?;
    ensure!(ok, "{err}");
    ensure!(
        list.lines()
            .any(|l| l.starts_with("pods ") && l.contains("[get list watch]")),
        "{list}"
    );
    let (ok, who, err) = kubectl(&sa_kc, dir.path(), &["auth", "whoami", "-o", "json"]).await?;
    ensure!(ok, "{err}");
    let who: Value = serde_json::from_str(&who)?;
    assert_eq!(who["status"]["userInfo"]["username"], USER);
    server.shutdown().await;
    Ok(())
}
