//! An in-process fake of the Kubernetes API server, as much of the protocol
//! as kube-runtime's watcher uses: `GET` list with a collection
//! `resourceVersion`, `?watch=true` as a chunked stream of JSON lines
//! (`ADDED`/`MODIFIED`/`DELETED`/`BOOKMARK`), an `ERROR` event with a `410`
//! Status when the requested resourceVersion was compacted away, the
//! `spec.nodeName` field selector, and 503 while "down"; single objects:
//! `GET`, `POST` (create, `409 AlreadyExists`), `PUT` (replace) and `PATCH`
//! (JSON merge patch), each refused with `409 Conflict` when the body's
//! `metadata.resourceVersion` is not the current one; the `status`
//! subresource of ServiceEntry and Gateway (a write to the object keeps its
//! status, a write to `/status` changes only the status); Leases and
//! ConfigMaps; `TokenReview` for tokens the test registers, answering as a
//! projected service-account token does (`user.extra` with the pod and node
//! names; audiences checked and answered as the API server does). Objects are plain JSON as the API serves them. This is what the
//! API source is tested against; no real API server runs on the build
//! machines.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

type Body = BoxBody<Bytes, Infallible>;

/// The audience of the API server's own tokens.
const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// Collection path of a kind, e.g. `/apis/networking.istio.io/v1/serviceentries`.
pub fn collection(api_version: &str, kind: &str) -> String {
    let plural = match kind {
        "Namespace" => "namespaces".to_string(),
        "Pod" => "pods".to_string(),
        "ConfigMap" => "configmaps".to_string(),
        "Lease" => "leases".to_string(),
        "TokenReview" => "tokenreviews".to_string(),
        k => super::ISTIO_KINDS
            .iter()
            .find(|(_, _, kk, _)| *kk == k)
            .map(|(_, _, _, p)| p.to_string())
            .unwrap_or_else(|| panic!("unknown kind {k}")),
    };
    if api_version == "v1" {
        format!("/api/v1/{plural}")
    } else {
        format!("/apis/{api_version}/{plural}")
    }
}

#[derive(Clone)]
struct Event {
    rv: u64,
    collection: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// (collection, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    events: Vec<Event>,
    /// Watches asking for an older resourceVersion get 410 Gone.
    compacted: u64,
    down: bool,
    /// List requests served, per collection.
    lists: BTreeMap<String, usize>,
    /// Pending bookmark round: every open watch sends one.
    bookmarks: u64,
    /// Collections whose CRD is not installed: 404.
    missing: std::collections::BTreeSet<String>,
    /// Bearer tokens TokenReview accepts → the `status.user` it answers
    /// and the token's audiences.
    tokens: BTreeMap<String, (Value, Vec<String>)>,
    /// Writes served (method, path), in order.
    writes: Vec<(String, String)>,
}

/// Kinds with a status subresource.
fn has_status(collection: &str) -> bool {
    collection.ends_with("/serviceentries") || collection.ends_with("/gateways")
}

pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Bumped on every change; `epoch` closes open watches.
    tick: watch::Sender<(u64, u64)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApi {
    pub async fn start() -> FakeApi {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Self::serve(listener)
    }

    /// Serves on `listener` (bound by the caller, e.g. inside a kernel
    /// test's node namespace). Must be called inside a tokio runtime.
    pub fn serve(listener: std::net::TcpListener) -> FakeApi {
        listener.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            rv: 100,
            ..Default::default()
        }));
        let (tick, _) = watch::channel((0u64, 0u64));
        let (st, tk) = (state.clone(), tick.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let (st, tk) = (st.clone(), tk.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (st, tk) = (st.clone(), tk.clone());
                        async move { Ok::<_, Infallible>(handle(req, &st, &tk).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        FakeApi {
            addr,
            state,
            tick,
            task,
        }
    }

    /// A client for this server (plain HTTP, no auth).
    pub fn client(&self) -> kube::Client {
        let cfg = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        super::client_from(cfg).unwrap()
    }

    fn bump(&self, close_watches: bool) {
        self.tick.send_modify(|(n, epoch)| {
            *n += 1;
            if close_watches {
                *epoch += 1;
            }
        });
    }

    /// Creates or replaces an object given in the API's JSON, as `kubectl
    /// apply` would: the server sets uid, resourceVersion, creationTimestamp.
    /// `kubectl apply` leaves the status of a kind with a status
    /// subresource alone.
    pub fn apply(&self, mut obj: Value) {
        {
            let mut s = self.state.lock().unwrap();
            let api = obj["apiVersion"].as_str().unwrap().to_string();
            let kind = obj["kind"].as_str().unwrap().to_string();
            let col = collection(&api, &kind);
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let name = obj["metadata"]["name"].as_str().unwrap().to_string();
            let key = (col.clone(), ns, name);
            if has_status(&col) {
                if let Some(st) = s.objects.get(&key).and_then(|p| p.get("status")).cloned() {
                    obj["status"] = st;
                }
            }
            store(&mut s, key, obj);
        }
        self.bump(false);
    }

    /// The object as stored now.
    pub fn get(&self, api_version: &str, kind: &str, ns: &str, name: &str) -> Option<Value> {
        let s = self.state.lock().unwrap();
        s.objects
            .get(&(collection(api_version, kind), ns.into(), name.into()))
            .cloned()
    }

    /// TokenReview will answer `token` as the projected token of pod
    /// `ns/pod` (service account `sa`) on `node`, for the API server's own
    /// audience.
    pub fn add_pod_token(&self, token: &str, ns: &str, sa: &str, pod: &str, node: &str) {
        self.add_projected_token(token, API_AUDIENCE, ns, sa, pod, node);
    }

    /// As [`add_pod_token`](Self::add_pod_token), for a projected token of
    /// `audience` (e.g. `istio-ca`).
    pub fn add_projected_token(
        &self,
        token: &str,
        audience: &str,
        ns: &str,
        sa: &str,
        pod: &str,
        node: &str,
    ) {
        let user = json!({
            "username": format!("system:serviceaccount:{ns}:{sa}"),
            "uid": format!("uid-{ns}-{sa}"),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
            "extra": {
                "authentication.kubernetes.io/pod-name": [pod],
                "authentication.kubernetes.io/pod-uid": [format!("uid-{pod}")],
                "authentication.kubernetes.io/node-name": [node],
                "authentication.kubernetes.io/node-uid": [format!("uid-{node}")],
            }
        });
        self.state
            .lock()
            .unwrap()
            .tokens
            .insert(token.into(), (user, vec![audience.to_string()]));
    }

    /// Writes served so far, as (method, path).
    pub fn writes(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().writes.clone()
    }

    pub fn delete(&self, api_version: &str, kind: &str, ns: &str, name: &str) {
        {
            let mut s = self.state.lock().unwrap();
            let col = collection(api_version, kind);
            let Some(mut obj) = s.objects.remove(&(col.clone(), ns.into(), name.into())) else {
                return;
            };
            s.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            let rv = s.rv;
            s.events.push(Event {
                rv,
                collection: col,
                kind: "DELETED",
                object: obj,
            });
        }
        self.bump(false);
    }

    /// etcd compaction: every resourceVersion before now is gone, and open
    /// watches are closed (as on an API server restart), so each watcher
    /// must resume, and resuming from a compacted version gets 410.
    pub fn compact(&self) {
        {
            let mut s = self.state.lock().unwrap();
            s.compacted = s.rv;
        }
        self.bump(true);
    }

    /// Sends a BOOKMARK with the current resourceVersion on every open watch.
    pub fn bookmark(&self) {
        self.state.lock().unwrap().bookmarks += 1;
        self.bump(false);
    }

    /// Down: open watches end and every request gets 503 until up again.
    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
        self.bump(true);
    }

    /// Uninstalls a kind's CRD: its collection answers 404 until
    /// [`FakeApi::install`].
    pub fn uninstall(&self, api_version: &str, kind: &str) {
        let mut s = self.state.lock().unwrap();
        s.missing.insert(collection(api_version, kind));
    }

    pub fn install(&self, api_version: &str, kind: &str) {
        let mut s = self.state.lock().unwrap();
        s.missing.remove(&collection(api_version, kind));
    }

    pub fn lists(&self, api_version: &str, kind: &str) -> usize {
        let s = self.state.lock().unwrap();
        *s.lists.get(&collection(api_version, kind)).unwrap_or(&0)
    }
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    let q = req.uri().query().unwrap_or("");
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `spec.nodeName=X` is the only field selector shunt sends.
fn selected(obj: &Value, field_selector: Option<&String>) -> bool {
    match field_selector.and_then(|f| f.strip_prefix("spec.nodeName=")) {
        Some(node) => obj["spec"]["nodeName"].as_str() == Some(node),
        None => true,
    }
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

async fn handle(
    req: Request<Incoming>,
    state: &Arc<Mutex<State>>,
    tick: &watch::Sender<(u64, u64)>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let q = query(&req);
    if req.method() != hyper::Method::GET || !is_collection(&path) {
        let method = req.method().to_string();
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let r = write(&method, &path, &body, state);
        if method != "GET" {
            tick.send_modify(|(n, _)| *n += 1);
        }
        return r;
    }
    let mut s = state.lock().unwrap();
    if s.down {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &status(503, "ServiceUnavailable", "apiserver is shutting down"),
        );
    }
    if s.missing.contains(&path) {
        return json_response(
            StatusCode::NOT_FOUND,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    }
    let fs = q.get("fieldSelector");
    let watching = matches!(q.get("watch").map(String::as_str), Some("true") | Some("1"));
    if !watching {
        *s.lists.entry(path.clone()).or_default() += 1;
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|((c, _, _), o)| *c == path && selected(o, fs))
            .map(|(_, o)| {
                // Real list items carry no apiVersion/kind for built-in types.
                let mut o = o.clone();
                if let Value::Object(m) = &mut o {
                    if path.starts_with("/api/") {
                        m.remove("apiVersion");
                        m.remove("kind");
                    }
                }
                o
            })
            .collect();
        return json_response(
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "List",
                    "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
        );
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let (tx, rx) = futures::channel::mpsc::unbounded::<Bytes>();
    let line = |v: &Value| Bytes::from(format!("{v}\n"));
    if from < s.compacted {
        let _ = tx.unbounded_send(line(&json!({"type": "ERROR",
            "object": status(410, "Expired", &format!("too old resource version: {from} ({})", s.compacted))})));
        drop(tx);
    } else {
        let mut rx_tick = tick.subscribe();
        let epoch = rx_tick.borrow().1;
        let mut sent = from;
        let mut bm = s.bookmarks;
        let state = state.clone();
        let fs = fs.cloned();
        let (api_version, kind) = path_kind(&path);
        tokio::spawn(async move {
            loop {
                let out: Vec<Bytes> = {
                    let s = state.lock().unwrap();
                    let mut out: Vec<Bytes> = s
                        .events
                        .iter()
                        .filter(|e| e.rv > sent && e.collection == path)
                        .filter(|e| selected(&e.object, fs.as_ref()))
                        .map(|e| line(&json!({"type": e.kind, "object": e.object})))
                        .collect();
                    if let Some(e) = s.events.iter().rev().find(|e| e.collection == path) {
                        sent = sent.max(e.rv);
                    }
                    if bookmarks && s.bookmarks != bm {
                        bm = s.bookmarks;
                        sent = s.rv;
                        out.push(line(&json!({"type": "BOOKMARK", "object": {
                            "apiVersion": api_version, "kind": kind,
                            "metadata": {"resourceVersion": s.rv.to_string()}}})));
                    }
                    out
                };
                for b in out {
                    if tx.unbounded_send(b).is_err() {
                        return;
                    }
                }
                if rx_tick.changed().await.is_err() || rx_tick.borrow().1 != epoch {
                    return; // closing ends the chunked body
                }
            }
        });
    }
    drop(s);
    let body = StreamBody::new(futures::StreamExt::map(rx, |b| Ok(Frame::data(b))));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(body))
        .unwrap()
}

/// (apiVersion, Kind) of a collection path, for bookmark objects.
fn path_kind(path: &str) -> (String, String) {
    let plural = path.rsplit('/').next().unwrap_or("");
    let kind = match plural {
        "namespaces" => "Namespace",
        "pods" => "Pod",
        p => super::ISTIO_KINDS
            .iter()
            .find(|(_, _, _, pp)| *pp == p)
            .map(|(_, _, k, _)| *k)
            .unwrap_or("Unknown"),
    };
    let api = path
        .trim_start_matches("/apis/")
        .trim_start_matches("/api/")
        .rsplit_once('/')
        .map(|(a, _)| a.to_string())
        .unwrap_or_default();
    (api, kind.to_string())
}

/// Stores `obj` under `key` as a new version (server-set metadata filled)
/// and records the watch event. Returns the stored object.
fn store(s: &mut State, key: (String, String, String), mut obj: Value) -> Value {
    s.rv += 1;
    let rv = s.rv;
    let prev = s.objects.get(&key).cloned();
    let md = obj["metadata"].as_object_mut().unwrap();
    md.insert("resourceVersion".into(), json!(rv.to_string()));
    let uid = prev
        .as_ref()
        .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("00000000-0000-4000-8000-{rv:012}"));
    md.entry("uid").or_insert(json!(uid));
    let created = prev.as_ref().and_then(|p| {
        p["metadata"]["creationTimestamp"]
            .as_str()
            .map(str::to_string)
    });
    match created {
        Some(c) => {
            md.insert("creationTimestamp".into(), json!(c));
        }
        None => {
            md.entry("creationTimestamp")
                .or_insert(json!("2026-01-01T00:00:00Z"));
        }
    }
    md.insert(
        "managedFields".into(),
        json!([{"manager": "kubectl", "operation": "Apply"}]),
    );
    let kind = if prev.is_some() { "MODIFIED" } else { "ADDED" };
    s.objects.insert(key.clone(), obj.clone());
    s.events.push(Event {
        rv,
        collection: key.0,
        kind,
        object: obj.clone(),
    });
    obj
}

/// A request path, split: collection path (all namespaces), namespace,
/// name and subresource.
struct Target {
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn target(path: &str) -> Option<Target> {
    let (prefix, rest) = if let Some(r) = path.strip_prefix("/api/v1/") {
        ("/api/v1".to_string(), r)
    } else {
        let r = path.strip_prefix("/apis/")?;
        let mut it = r.splitn(3, '/');
        let (g, v, rest) = (it.next()?, it.next()?, it.next()?);
        (format!("/apis/{g}/{v}"), rest)
    };
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let t = |plural: &str, ns: Option<&str>, name: Option<&str>, sub: Option<&str>| Target {
        collection: format!("{prefix}/{plural}"),
        namespace: ns.map(str::to_string),
        name: name.map(str::to_string),
        sub: sub.map(str::to_string),
    };
    Some(match segs.as_slice() {
        [p] => t(p, None, None, None),
        [p, n] => t(p, None, Some(n), None),
        ["namespaces", ns, p] => t(p, Some(ns), None, None),
        [p, n, sub] => t(p, None, Some(n), Some(sub)),
        ["namespaces", ns, p, n] => t(p, Some(ns), Some(n), None),
        ["namespaces", ns, p, n, sub] => t(p, Some(ns), Some(n), Some(sub)),
        _ => return None,
    })
}

/// Whether `path` is an all-namespaces collection (list and watch).
fn is_collection(path: &str) -> bool {
    target(path).is_some_and(|t| t.name.is_none() && t.namespace.is_none())
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn conflict(what: &str) -> Response<Body> {
    json_response(
        StatusCode::CONFLICT,
        &status(
            409,
            "Conflict",
            &format!("Operation cannot be fulfilled on {what}: the object has been modified; please apply your changes to the latest version and try again"),
        ),
    )
}

fn not_found(what: &str) -> Response<Body> {
    json_response(
        StatusCode::NOT_FOUND,
        &status(404, "NotFound", &format!("{what} not found")),
    )
}

/// Single-object requests and creates.
fn write(method: &str, path: &str, body: &[u8], state: &Arc<Mutex<State>>) -> Response<Body> {
    let mut s = state.lock().unwrap();
    if s.down {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &status(503, "ServiceUnavailable", "apiserver is shutting down"),
        );
    }
    let Some(t) = target(path) else {
        return not_found(path);
    };
    if method != "GET" {
        s.writes.push((method.to_string(), path.to_string()));
    }
    let bad = |m: &str| json_response(StatusCode::BAD_REQUEST, &status(400, "BadRequest", m));
    let parsed: Option<Value> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => Some(v),
            Err(e) => return bad(&format!("invalid JSON: {e}")),
        }
    };
    if t.collection.ends_with("/tokenreviews") && method == "POST" {
        let token = parsed
            .as_ref()
            .and_then(|v| v["spec"]["token"].as_str())
            .unwrap_or("");
        // As the API server: the request's audiences (default: its own)
        // must meet the token's; the answer lists those that do.
        let wanted: Vec<String> = parsed
            .as_ref()
            .and_then(|v| v["spec"]["audiences"].as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .filter(|a: &Vec<String>| !a.is_empty())
            .unwrap_or_else(|| vec![API_AUDIENCE.to_string()]);
        let st = match s.tokens.get(token) {
            Some((user, auds)) => {
                let granted: Vec<&String> = wanted.iter().filter(|a| auds.contains(a)).collect();
                if granted.is_empty() {
                    json!({"authenticated": false,
                           "error": "token audiences are invalid for the target audiences"})
                } else {
                    json!({"authenticated": true, "user": user, "audiences": granted})
                }
            }
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
        let mut v = parsed.unwrap_or(json!({}));
        v["status"] = st;
        return json_response(StatusCode::CREATED, &v);
    }
    let ns = t.namespace.clone().unwrap_or_default();
    match (method, &t.name) {
        ("POST", None) => {
            let Some(mut obj) = parsed else {
                return bad("no body");
            };
            let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
                return bad("metadata.name required");
            };
            obj["metadata"]["namespace"] = json!(ns);
            let key = (t.collection.clone(), ns, name.clone());
            if s.objects.contains_key(&key) {
                return json_response(
                    StatusCode::CONFLICT,
                    &status(409, "AlreadyExists", &format!("{name} already exists")),
                );
            }
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            let stored = store(&mut s, key, obj);
            json_response(StatusCode::CREATED, &stored)
        }
        (m, Some(name)) => {
            let key = (t.collection.clone(), ns, name.clone());
            let Some(cur) = s.objects.get(&key).cloned() else {
                return not_found(name);
            };
            let cur_rv = cur["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let status_sub = t.sub.as_deref() == Some("status");
            if t.sub.is_some() && !status_sub {
                return not_found(path);
            }
            if status_sub && !has_status(&t.collection) {
                return not_found(path);
            }
            let sent_rv = parsed
                .as_ref()
                .and_then(|v| v["metadata"]["resourceVersion"].as_str())
                .map(str::to_string);
            if m != "GET" && sent_rv.as_ref().is_some_and(|rv| *rv != cur_rv) {
                return conflict(name);
            }
            let next = match m {
                "GET" => return json_response(StatusCode::OK, &cur),
                "PUT" => {
                    let Some(v) = parsed else {
                        return bad("no body");
                    };
                    v
                }
                "PATCH" => {
                    let Some(p) = parsed else {
                        return bad("no body");
                    };
                    let mut v = cur.clone();
                    merge_patch(&mut v, &p);
                    v
                }
                _ => {
                    return json_response(
                        StatusCode::METHOD_NOT_ALLOWED,
                        &status(405, "MethodNotAllowed", "not served"),
                    )
                }
            };
            // The status subresource: each write changes only its part.
            let next = if status_sub {
                let mut v = cur;
                v["status"] = next.get("status").cloned().unwrap_or(Value::Null);
                v
            } else if has_status(&t.collection) {
                let mut v = next;
                match cur.get("status") {
                    Some(st) => v["status"] = st.clone(),
                    None => {
                        if let Some(o) = v.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
                v
            } else {
                next
            };
            let stored = store(&mut s, key, next);
            json_response(StatusCode::OK, &stored)
        }
        _ => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &status(405, "MethodNotAllowed", "not served"),
        ),
    }
}
