//! An in-process fake of the Kubernetes API server, as much of the protocol
//! as kube-runtime's watcher uses: `GET` list with a collection
//! `resourceVersion`, `?watch=true` as a chunked stream of JSON lines
//! (`ADDED`/`MODIFIED`/`DELETED`/`BOOKMARK`), an `ERROR` event with a `410`
//! Status when the requested resourceVersion was compacted away, the
//! `spec.nodeName` field selector, and 503 while "down". Objects are plain
//! JSON as the API serves them. This is what the API source is tested
//! against; no real API server runs on the build machines.

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

/// Collection path of a kind, e.g. `/apis/networking.istio.io/v1/serviceentries`.
pub fn collection(api_version: &str, kind: &str) -> String {
    let plural = match kind {
        "Namespace" => "namespaces".to_string(),
        "Pod" => "pods".to_string(),
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
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
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
                        async move { Ok::<_, Infallible>(handle(req, &st, &tk)) }
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
    pub fn apply(&self, mut obj: Value) {
        {
            let mut s = self.state.lock().unwrap();
            s.rv += 1;
            let rv = s.rv;
            let api = obj["apiVersion"].as_str().unwrap().to_string();
            let kind = obj["kind"].as_str().unwrap().to_string();
            let col = collection(&api, &kind);
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let name = obj["metadata"]["name"].as_str().unwrap().to_string();
            let key = (col.clone(), ns, name);
            let prev = s.objects.get(&key).cloned();
            let md = obj["metadata"].as_object_mut().unwrap();
            md.insert("resourceVersion".into(), json!(rv.to_string()));
            let uid = prev
                .as_ref()
                .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_string))
                .unwrap_or_else(|| format!("00000000-0000-4000-8000-{rv:012}"));
            md.entry("uid").or_insert(json!(uid));
            md.entry("creationTimestamp")
                .or_insert(json!("2026-01-01T00:00:00Z"));
            md.insert(
                "managedFields".into(),
                json!([{"manager": "kubectl", "operation": "Apply"}]),
            );
            let kind = if prev.is_some() { "MODIFIED" } else { "ADDED" };
            s.objects.insert(key, obj.clone());
            s.events.push(Event {
                rv,
                collection: col,
                kind,
                object: obj,
            });
        }
        self.bump(false);
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

fn handle(
    req: Request<Incoming>,
    state: &Arc<Mutex<State>>,
    tick: &watch::Sender<(u64, u64)>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let q = query(&req);
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
    if req.method() != hyper::Method::GET {
        return json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &status(405, "MethodNotAllowed", "only GET is served"),
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
