//! The registry: every function and version, in memory, for the data plane.
//!
//! Each function is an immutable snapshot (`Arc<FunctionEntry>`) replaced whole on change,
//! so a reader sees the function either before or after a deploy, never halfway. SQLite
//! remains the source of truth; the registry is rebuilt from it at start.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use super::admission::Admission;
use super::traffic::Routing;
use super::variables::FunctionVariables;
use crate::auth::Limiter;
use crate::cache::Placement;
use crate::meter::{ShadowWindow, VersionMetrics, Window};
use crate::nn::VersionModels;
use crate::runtime::Outbound;
use crate::store::{FunctionInfo, VersionRecord};

/// One version, its admission gate and its models.
pub struct VersionEntry {
    pub record: VersionRecord,
    /// The function's name, shared by usage records and cache entries.
    pub function: Arc<str>,
    pub admission: Admission,
    /// The slots of shadow copies sent to it: a quarter of its concurrency (at least one),
    /// apart from those of the requests it serves, and never waited for.
    pub shadow_slots: Admission,
    /// The version's `wasi:nn` models, by name.
    pub models: Arc<VersionModels>,
    /// The version's invocation metrics.
    pub metrics: VersionMetrics,
    /// Where its responses are cached; `None`: it does not cache them.
    pub responses: Option<Placement>,
    /// Where its guests may send HTTP requests.
    pub outbound: Outbound,
    /// Its recent requests routed by the function's main traffic policy, neither forced
    /// (`@N`, `x-kiln-version`) nor through an alias: what rollout gates judge, so that
    /// no caller can steer them by forcing versions.
    pub routed: Window,
    /// Its other recent requests; with `routed`, what the stats endpoint shows.
    pub other: Window,
    /// How its answers compared with the primaries', when it served as a shadow.
    pub shadow: ShadowWindow,
    /// Whose guest output its requests add to: this function, made by this tenant then.
    pub log_key: crate::runtime::logs::LogKey,
}

impl std::fmt::Debug for VersionEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VersionEntry")
            .field("record", &self.record)
            .field("models", &self.models.names())
            .finish()
    }
}

/// One function: its owner, its versions by number, its request budget.
#[derive(Debug, Clone)]
pub struct FunctionEntry {
    pub name: String,
    pub created_at: i64,
    /// The tenant that owns it.
    pub owner: Arc<str>,
    /// Callable without a key.
    pub public: bool,
    pub versions: BTreeMap<u32, Arc<VersionEntry>>,
    /// The rate limit of the newest version's `[limits] rate`, shared by every version.
    pub limiter: Option<Arc<Limiter>>,
    /// The traffic policy; `None`: the newest version serves everything.
    pub routing: Option<Arc<Routing>>,
    /// Named policies (`/fn/{name}:{alias}/`): environments such as staging and prod.
    pub aliases: BTreeMap<String, Arc<Routing>>,
    /// By policy (`""`: the main one, else the alias), the versions its previous policy
    /// sent traffic to: the instant switch-back target, kept loaded.
    pub standby: BTreeMap<String, BTreeSet<u32>>,
    /// Its variable values (`kiln vars`), opened.
    pub variables: Arc<FunctionVariables>,
}

impl FunctionEntry {
    /// The newest version, which serves unpinned requests.
    pub fn latest(&self) -> Option<&Arc<VersionEntry>> {
        self.versions.values().next_back()
    }

    /// The versions to keep loaded: those a policy (main or alias) sends traffic or copies
    /// to, and each policy's previous targets. As version ids. A function without
    /// policies keeps nothing: the LRU serves it.
    pub fn kept_versions(&self) -> Vec<i64> {
        let mut numbers: BTreeSet<u32> = self.standby.values().flatten().copied().collect();
        numbers.extend(self.routing.iter().flat_map(|r| r.targets()));
        numbers.extend(self.aliases.values().flat_map(|r| r.targets()));
        numbers
            .iter()
            .filter_map(|n| self.versions.get(n).map(|v| v.record.id))
            .collect()
    }

    /// The policy a request follows: alias `alias`'s (`default` is the main one), else
    /// the main one (`None`: the newest version serves everything).
    pub fn routing_for(&self, alias: Option<&str>) -> Result<Option<&Arc<Routing>>, RouteError> {
        match alias {
            None | Some(DEFAULT_ALIAS) => Ok(self.routing.as_ref()),
            Some(a) => self
                .aliases
                .get(a)
                .map(Some)
                .ok_or_else(|| RouteError::NoAlias(self.name.clone(), a.to_string())),
        }
    }

    /// The version that serves a request with `headers`: the forced one (`@N` or
    /// `x-kiln-version`, even at 0%), else `routing`'s pick (sticky keys hashed under
    /// `secret`), else the newest.
    pub fn route_request(
        &self,
        forced: Option<u32>,
        routing: Option<&Arc<Routing>>,
        headers: &http::HeaderMap,
        secret: &super::StickySecret,
    ) -> Result<&Arc<VersionEntry>, RouteError> {
        match (forced, routing) {
            (None, Some(routing)) => self.pick(Some(routing.pick(&self.name, headers, secret))),
            _ => self.pick(forced),
        }
    }

    /// The version that serves a request: the pinned one, else the latest.
    pub fn pick(&self, pinned: Option<u32>) -> Result<&Arc<VersionEntry>, RouteError> {
        let v = match pinned {
            Some(n) => self.versions.get(&n),
            None => self.latest(),
        };
        v.ok_or_else(|| match pinned {
            Some(n) => RouteError::NoVersion(self.name.clone(), n),
            None => RouteError::NoFunction(self.name.clone()),
        })
    }
}

/// Why a request names nothing that exists.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("function {0:?} does not exist")]
    NoFunction(String),
    #[error("function {0:?} has no version {1}")]
    NoVersion(String, u32),
    #[error("function {0:?} has no alias {1:?}")]
    NoAlias(String, String),
}

/// The alias naming a function's main traffic policy (what `/fn/{name}/` follows).
pub const DEFAULT_ALIAS: &str = "default";

/// All functions, by name.
#[derive(Debug)]
pub struct Registry {
    functions: RwLock<HashMap<String, Arc<FunctionEntry>>>,
    queue_depth: u32,
    /// The live nodes, whose number splits every function's rate.
    nodes: crate::auth::Nodes,
}

impl Registry {
    /// An empty registry; `queue_depth` sizes each version's admission queue, `nodes`
    /// splits function rate limits.
    pub fn new(queue_depth: u32, nodes: crate::auth::Nodes) -> Self {
        Registry {
            functions: RwLock::new(HashMap::new()),
            queue_depth,
            nodes,
        }
    }

    /// The admission gate of a new version allowing `max_concurrency` at once.
    pub fn admission(&self, max_concurrency: u32) -> Admission {
        Admission::new(max_concurrency, self.queue_depth)
    }

    /// The gate of shadow copies to a version allowing `max_concurrency` requests.
    pub fn shadow_slots(max_concurrency: u32) -> Admission {
        Admission::new((max_concurrency / 4).max(1), 0)
    }

    /// Adds a version (creating its function entry on the first one); `info` is the
    /// function as the database has it now (owner, visibility).
    pub fn add(&self, entry: VersionEntry, info: &FunctionInfo) {
        let entry = Arc::new(entry);
        let mut map = self.functions.write().unwrap_or_else(|p| p.into_inner());
        let name = entry.record.function.clone();
        let mut f = map
            .get(&name)
            .map(|f| (**f).clone())
            .unwrap_or_else(|| FunctionEntry {
                name: name.clone(),
                created_at: info.created_at,
                owner: Arc::from(info.tenant.as_str()),
                public: info.public,
                versions: BTreeMap::new(),
                limiter: None,
                routing: None,
                aliases: BTreeMap::new(),
                standby: BTreeMap::new(),
                variables: Arc::default(),
            });
        f.public = info.public;
        f.versions.insert(entry.record.version, entry);
        let rate = f.latest().and_then(|v| v.record.limits.rate);
        if f.limiter.as_ref().map(|l| l.rate()) != rate {
            f.limiter = rate.map(|r| Arc::new(Limiter::new(r, &self.nodes)));
        }
        map.insert(name, Arc::new(f));
    }

    /// Replaces a function's traffic policy (the main one, or `alias`'s; `None` removes
    /// an alias) at once: a request sees the old policy or the new one, never a mix.
    /// False when there is no such function.
    pub fn set_routing(
        &self,
        name: &str,
        alias: Option<&str>,
        routing: Option<Arc<Routing>>,
    ) -> bool {
        let mut map = self.functions.write().unwrap_or_else(|p| p.into_inner());
        let Some(f) = map.get(name) else {
            return false;
        };
        let mut f = (**f).clone();
        // What the policy sent traffic to until now: without a main policy, the newest.
        let old: BTreeSet<u32> = match alias {
            None => match &f.routing {
                Some(r) => r.targets().collect(),
                None => f.latest().map(|v| v.record.version).into_iter().collect(),
            },
            Some(a) => f
                .aliases
                .get(a)
                .map(|r| r.targets().collect())
                .unwrap_or_default(),
        };
        let key = alias.unwrap_or_default().to_string();
        match (alias, &routing) {
            // A removed alias has nothing to switch back to.
            (Some(_), None) => f.standby.remove(&key),
            _ => f.standby.insert(key, old),
        };
        match (alias, routing) {
            (None, routing) => f.routing = routing,
            (Some(a), Some(r)) => {
                f.aliases.insert(a.to_string(), r);
            }
            (Some(a), None) => {
                f.aliases.remove(a);
            }
        }
        map.insert(name.to_string(), Arc::new(f));
        true
    }

    /// Replaces a function's variable values at once; false when there is no such function.
    pub fn set_variables(&self, name: &str, variables: Arc<FunctionVariables>) -> bool {
        let mut map = self.functions.write().unwrap_or_else(|p| p.into_inner());
        let Some(f) = map.get(name) else {
            return false;
        };
        let mut f = (**f).clone();
        f.variables = variables;
        map.insert(name.to_string(), Arc::new(f));
        true
    }

    /// Removes a function; returns it so its versions can be unloaded.
    pub fn remove(&self, name: &str) -> Option<Arc<FunctionEntry>> {
        let mut map = self.functions.write().unwrap_or_else(|p| p.into_inner());
        map.remove(name)
    }

    /// The function named `name`.
    pub fn function(&self, name: &str) -> Option<Arc<FunctionEntry>> {
        let map = self.functions.read().unwrap_or_else(|p| p.into_inner());
        map.get(name).cloned()
    }

    /// All functions, sorted by name.
    pub fn functions(&self) -> Vec<Arc<FunctionEntry>> {
        let map = self.functions.read().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = map.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Picks the version that serves a request: the pinned one, else the latest.
    pub fn route(&self, name: &str, pinned: Option<u32>) -> Result<Arc<VersionEntry>, RouteError> {
        self.function(name)
            .ok_or_else(|| RouteError::NoFunction(name.to_string()))?
            .pick(pinned)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::Digest;
    use crate::common::Limits;

    fn rec(function: &str, version: u32) -> VersionRecord {
        VersionRecord {
            id: i64::from(version),
            function: function.into(),
            version,
            digest: Digest::of(&version.to_le_bytes()),
            size: 1,
            limits: Limits::default(),
            nn: Default::default(),
            cache: Default::default(),
            signer: None,
            outbound: Vec::new(),
            created_at: 0,
            validation: None,
            variables: Default::default(),
        }
    }

    fn entry(r: &Registry, function: &str, version: u32) -> VersionEntry {
        VersionEntry {
            record: rec(function, version),
            function: Arc::from(function),
            admission: r.admission(1),
            shadow_slots: Registry::shadow_slots(1),
            models: Arc::default(),
            metrics: crate::meter::Metrics::new().version(function, version),
            responses: None,
            outbound: Outbound::deny_all(),
            routed: Window::default(),
            other: Window::default(),
            shadow: ShadowWindow::default(),
            log_key: crate::runtime::logs::LogKey::new(function, "t", 0),
        }
    }

    #[test]
    fn route_picks_latest_or_pinned() {
        let r = Registry::new(4, crate::auth::Nodes::default());
        let info = FunctionInfo {
            name: "f".into(),
            created_at: 0,
            tenant: "t".into(),
            public: false,
        };
        r.add(entry(&r, "f", 1), &info);
        r.add(entry(&r, "f", 2), &info);
        assert_eq!(r.route("f", None).expect("latest").record.version, 2);
        assert_eq!(r.route("f", Some(1)).expect("pinned").record.version, 1);
        assert_eq!(
            r.route("f", Some(3)).err(),
            Some(RouteError::NoVersion("f".into(), 3))
        );
        assert_eq!(
            r.route("g", None).err(),
            Some(RouteError::NoFunction("g".into()))
        );
        assert!(r.remove("f").is_some());
        assert!(r.route("f", None).is_err());
    }
}
