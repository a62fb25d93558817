//! Composition files: which tiers exist, how they are wired, and what the
//! server listens on.
//!
//! ```toml
//! [server]
//! listen = ["127.0.0.1:8000", "/run/strata/strata.sock"]
//!
//! [blobservices.root]
//! type = "memory"
//! max_size = "512MiB"
//! ```
//!
//! Each `[blobservices.NAME]` table has a `type` naming a kind in the
//! [`Registry`]; the kind parses the rest of the table and rejects unknown
//! fields. The tier called `root` is the one served. snix composition files
//! load unchanged: their `directoryservices` and `pathinfoservices` tables
//! are ignored with a warning. Every error names the file, the line and the
//! tier.

mod breaker;
mod duration;
mod instrumented;
mod registry;
mod size;
mod timeout;

pub use breaker::{BreakerConfig, BreakerService};
pub use duration::Duration;
pub use instrumented::InstrumentedService;
pub use registry::{Kind, Registry, TierConfig, UrlParser};
pub use size::ByteSize;
pub use timeout::TimeoutService;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::blobservice::BlobService;
use crate::error::Result;
use crate::metrics::{Metrics, TierMetrics};

/// The tier that is served.
pub const ROOT: &str = "root";

/// Top-level tables of snix composition files that strata does not use.
const IGNORED_TABLES: [&str; 2] = ["directoryservices", "pathinfoservices"];

/// The composition used when `strata serve` gets no `--config`, with
/// `@CACHE_DIR@` standing for the disk cache's directory.
const DEFAULT_COMPOSITION: &str = include_str!("default.toml");

/// Where the default composition keeps its disk cache:
/// `$XDG_CACHE_HOME/strata/blobs` (or the platform's equivalent).
pub fn default_cache_dir() -> std::path::PathBuf {
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("strata")
        .join("blobs")
}

/// The text of the default composition, for a disk cache in `cache_dir`.
pub fn default_composition_text(cache_dir: &Path) -> String {
    // Escape the path as a TOML string (quotes included in the template).
    let quoted = toml::Value::String(cache_dir.display().to_string()).to_string();
    DEFAULT_COMPOSITION.replace("\"@CACHE_DIR@\"", &quoted)
}

/// A configuration error, located in its file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file (or a description of where the text came from).
    pub file: String,
    /// 1-based line of the offending text, when known.
    pub line: Option<usize>,
    /// The tier the error is about, when it is about one.
    pub tier: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": ")?;
        if let Some(tier) = &self.tier {
            write!(f, "tier `{tier}`: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Settings of the `[server]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Addresses to listen on: `HOST:PORT` or a filesystem path (unix socket).
    #[serde(default)]
    pub listen: Vec<String>,
    /// Largest gRPC message accepted from clients (default 4 MiB).
    pub max_message_size: Option<ByteSize>,
    /// Largest blob returned inline by Stat, whatever the client asks for
    /// (default 1 MiB).
    pub max_inline_size: Option<ByteSize>,
    /// Refuse Puts (`PERMISSION_DENIED`): a node that only serves.
    #[serde(default)]
    pub read_only: bool,
    /// Largest blob a Put may carry (default: no cap).
    pub max_put_size: Option<ByteSize>,
    /// Requests served at once; more are refused with `RESOURCE_EXHAUSTED`
    /// (default 1024).
    pub max_concurrent_requests: Option<std::num::NonZeroUsize>,
    /// Requests from one client (IP address; all unix-socket clients are
    /// one) served at once (default 256).
    pub max_concurrent_per_client: Option<std::num::NonZeroUsize>,
    /// File holding a bearer token every request must carry.
    pub token_file: Option<std::path::PathBuf>,
    /// PEM certificate chain: TCP listeners speak TLS (with `tls_key`).
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<std::path::PathBuf>,
    /// Permissions of unix sockets, as an octal string (default `"0660"`).
    pub socket_mode: Option<SocketMode>,
    /// How long requests in flight may take to finish after SIGTERM before
    /// their connections are dropped (default 30 s).
    pub shutdown_grace: Option<Duration>,
    /// After the server stopped, how long queued async fills may still
    /// run before they are abandoned (default 15 s).
    pub fill_drain: Option<Duration>,
}

/// Unix permission bits written as an octal string, like `"0660"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .map(SocketMode)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "socket_mode {s:?} is not an octal mode like \"0660\""
                ))
            })
    }
}

/// One parsed `[blobservices.NAME]` table.
#[derive(Debug)]
pub struct TierSpec {
    /// The `type` string.
    pub kind: String,
    /// 1-based line of the table in its file (for an anonymous tier, of the
    /// table that named it).
    pub line: usize,
    /// `timeout`, which any tier may carry.
    pub timeout: Option<Duration>,
    /// `breaker`, which any tier may carry (remote tiers get the default).
    pub breaker: Option<BreakerConfig>,
    /// The kind-specific settings.
    pub config: Box<dyn TierConfig>,
}

/// A validated composition file.
#[derive(Debug)]
pub struct Composition {
    /// Where it came from, for messages.
    pub file: String,
    /// The tiers by name.
    pub tiers: BTreeMap<String, TierSpec>,
    /// The `[server]` table.
    pub server: ServerConfig,
}

impl Composition {
    /// Reads and validates the file at `path` with the default registry.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            line: None,
            tier: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&src, &file, &Registry::default())
    }

    /// The embedded default composition: memory in front of a disk cache in
    /// [`default_cache_dir`].
    pub fn default_composition() -> Result<Self, ConfigError> {
        Self::parse(
            &default_composition_text(&default_cache_dir()),
            "<default composition>",
            &Registry::default(),
        )
    }

    /// Parses and validates `src`; `file` names it in errors.
    pub fn parse(src: &str, file: &str, registry: &Registry) -> Result<Self, ConfigError> {
        let err = |span: Option<std::ops::Range<usize>>, tier: Option<&str>, message: String| {
            ConfigError {
                file: file.to_owned(),
                line: span.map(|s| line_of(src, s.start)),
                tier: tier.map(str::to_owned),
                message,
            }
        };
        let doc = DeTable::parse(src).map_err(|e| err(e.span(), None, e.message().to_owned()))?;

        let mut tiers = BTreeMap::new();
        let mut server = ServerConfig::default();
        let mut saw_blobservices = false;
        for (key, value) in doc.into_inner() {
            let value_span = value.span();
            match key.get_ref().as_ref() {
                "blobservices" => {
                    saw_blobservices = true;
                    let DeValue::Table(table) = value.into_inner() else {
                        return Err(err(
                            Some(value_span),
                            None,
                            "`blobservices` must be a table of tiers".into(),
                        ));
                    };
                    for (name, spec) in table {
                        let name = name.into_inner().into_owned();
                        let spec = parse_tier(src, registry, &name, spec)
                            .map_err(|(span, msg)| err(span, Some(&name), msg))?;
                        tiers.insert(name, spec);
                    }
                }
                "server" => {
                    server =
                        ServerConfig::deserialize(ValueDeserializer::from(value)).map_err(|e| {
                            err(
                                e.span().or(Some(value_span)),
                                None,
                                format!("[server]: {}", e.message()),
                            )
                        })?;
                }
                other if IGNORED_TABLES.contains(&other) => {
                    tracing::warn!(file, table = other, "ignoring a table strata does not use");
                }
                other => {
                    return Err(err(
                        Some(key.span()),
                        None,
                        format!(
                            "unknown top-level key `{other}` (expected `blobservices`, `server`, \
                             `directoryservices` or `pathinfoservices`)"
                        ),
                    ));
                }
            }
        }
        if !saw_blobservices || !tiers.contains_key(ROOT) {
            return Err(err(
                None,
                None,
                format!(
                    "no tier named `{ROOT}`: add a [blobservices.{ROOT}] table to say what is served"
                ),
            ));
        }
        let mut composition = Composition {
            file: file.to_owned(),
            tiers,
            server,
        };
        composition.add_anonymous_tiers(registry)?;
        composition.check_references()?;
        Ok(composition)
    }

    fn error(&self, tier: &str, message: String) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: self.tiers.get(tier).map(|t| t.line),
            tier: Some(tier.to_owned()),
            message,
        }
    }

    /// Defines a tier for every reference that is a URL (`memory://`,
    /// `grpc+unix:///…`, `objectstore+file:///…`), named by the URL itself.
    fn add_anonymous_tiers(&mut self, registry: &Registry) -> Result<(), ConfigError> {
        let mut anonymous = Vec::new();
        for (name, spec) in &self.tiers {
            for r in spec.config.references() {
                if self.tiers.contains_key(&r) || !r.contains("://") {
                    continue;
                }
                let Some((kind, parse)) = registry.url_kind(&r) else {
                    return Err(self.error(name, format!("no tier kind handles the URL `{r}`")));
                };
                let config = parse(&r).map_err(|e| self.error(name, format!("`{r}`: {e}")))?;
                anonymous.push((
                    r,
                    TierSpec {
                        kind: kind.to_owned(),
                        line: spec.line,
                        timeout: None,
                        breaker: None,
                        config,
                    },
                ));
            }
        }
        for (name, spec) in anonymous {
            self.tiers.entry(name).or_insert(spec);
        }
        Ok(())
    }

    /// Rejects dangling references and cycles.
    fn check_references(&self) -> Result<(), ConfigError> {
        for (name, spec) in &self.tiers {
            for r in spec.config.references() {
                if !self.tiers.contains_key(&r) {
                    return Err(self.error(name, format!("refers to `{r}`, which is not defined")));
                }
            }
        }
        self.build_order().map(|_| ())
    }

    /// Tier names in an order where every tier comes after those it refers to.
    fn build_order(&self) -> Result<Vec<String>, ConfigError> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            Visiting,
            Done,
        }
        fn visit(
            c: &Composition,
            name: &str,
            marks: &mut HashMap<String, Mark>,
            path: &mut Vec<String>,
            order: &mut Vec<String>,
        ) -> Result<(), ConfigError> {
            match marks.get(name) {
                Some(Mark::Done) => return Ok(()),
                Some(Mark::Visiting) => {
                    path.push(name.to_owned());
                    let start = path.iter().position(|n| n == name).unwrap_or(0);
                    return Err(c.error(
                        name,
                        format!("reference cycle: {}", path[start..].join(" -> ")),
                    ));
                }
                None => {}
            }
            marks.insert(name.to_owned(), Mark::Visiting);
            path.push(name.to_owned());
            if let Some(spec) = c.tiers.get(name) {
                for r in spec.config.references() {
                    visit(c, &r, marks, path, order)?;
                }
            }
            path.pop();
            marks.insert(name.to_owned(), Mark::Done);
            order.push(name.to_owned());
            Ok(())
        }
        let mut marks = HashMap::new();
        let mut order = Vec::new();
        for name in self.tiers.keys() {
            visit(self, name, &mut marks, &mut Vec::new(), &mut order)?;
        }
        Ok(order)
    }

    /// Builds every tier reachable from `root` and returns `root`, with
    /// metrics in a registry of its own.
    pub async fn build(&self) -> Result<Arc<dyn BlobService>> {
        self.build_with_metrics(&Metrics::new()).await
    }

    /// Builds every tier reachable from `root` and returns `root`; every
    /// tier is counted in `metrics` under its name.
    pub async fn build_with_metrics(&self, metrics: &Metrics) -> Result<Arc<dyn BlobService>> {
        let mut ctx = BuildContext {
            built: HashMap::new(),
            specs: &self.tiers,
            metrics: metrics.clone(),
            current: String::new(),
        };
        let reachable = self.reachable_from_root();
        let order = self
            .build_order()
            .map_err(|e| crate::Error::InvalidRequest(e.to_string()))?;
        for name in order.into_iter().filter(|n| reachable.contains(n)) {
            let spec = &self.tiers[&name];
            ctx.current.clone_from(&name);
            // Some settings can only be checked by building (a URL's
            // scheme, a chunk size, a file to read): their errors name the
            // tier and its line too.
            let mut service =
                spec.config.build(&ctx).await.map_err(|e| {
                    crate::Error::Config(self.error(&name, e.to_string()).to_string())
                })?;
            if let Some(timeout) = spec.timeout {
                service = Arc::new(TimeoutService::new(service, name.clone(), timeout.0));
            }
            let metrics = ctx.tier_metrics();
            let breaker = spec
                .breaker
                .or_else(|| spec.config.remote().then(BreakerConfig::default));
            if let Some(breaker) = breaker.filter(|b| b.failures > 0) {
                service = Arc::new(BreakerService::new(
                    service,
                    name.clone(),
                    breaker,
                    metrics.breaker_open.clone(),
                    metrics.breaker_trips.clone(),
                ));
            }
            service = Arc::new(InstrumentedService::new(service, name.clone(), metrics));
            ctx.built.insert(name, service);
        }
        ctx.built
            .remove(ROOT)
            .ok_or_else(|| crate::Error::InvalidRequest(format!("no tier named `{ROOT}`")))
    }

    /// The tier graph from `root`, one tier per line, indented by depth.
    pub fn describe(&self) -> String {
        fn walk(c: &Composition, name: &str, depth: usize, out: &mut String) {
            let Some(spec) = c.tiers.get(name) else {
                return;
            };
            let mut timeout = spec
                .timeout
                .map(|t| format!(" [timeout {t}]"))
                .unwrap_or_default();
            if let Some(b) = spec.breaker {
                timeout.push_str(&format!(
                    " [breaker {} failures, open {}]",
                    b.failures, b.open_for
                ));
            }
            out.push_str(&format!(
                "{:indent$}{name}: {}{timeout}\n",
                "",
                spec.config.describe(),
                indent = depth * 2
            ));
            for r in spec.config.references() {
                walk(c, &r, depth + 1, out);
            }
        }
        let mut out = String::new();
        walk(self, ROOT, 0, &mut out);
        let unused: Vec<_> = self
            .tiers
            .keys()
            .filter(|n| !self.reachable_from_root().contains(*n))
            .cloned()
            .collect();
        if !unused.is_empty() {
            out.push_str(&format!("unused: {}\n", unused.join(", ")));
        }
        out
    }

    fn reachable_from_root(&self) -> Vec<String> {
        let mut seen = vec![ROOT.to_owned()];
        let mut i = 0;
        while i < seen.len() {
            if let Some(spec) = self.tiers.get(&seen[i]) {
                for r in spec.config.references() {
                    if !seen.contains(&r) {
                        seen.push(r);
                    }
                }
            }
            i += 1;
        }
        seen
    }
}

/// What a tier's `build` can see: the tiers it refers to, already built,
/// and every tier's configuration.
pub struct BuildContext<'a> {
    built: HashMap<String, Arc<dyn BlobService>>,
    specs: &'a BTreeMap<String, TierSpec>,
    metrics: Metrics,
    /// The tier being built.
    current: String,
}

impl BuildContext<'_> {
    /// The process's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The metric handles of the tier being built (for what only the kind
    /// knows: evictions, occupancy).
    pub fn tier_metrics(&self) -> TierMetrics {
        self.metrics.tier(&self.current)
    }

    /// Whether the tier called `name` keeps data across restarts.
    pub fn persistent(&self, name: &str) -> bool {
        self.specs
            .get(name)
            .is_some_and(|s| s.config.persistent(self))
    }

    /// The most bytes the tier called `name` holds, if bounded.
    pub fn capacity(&self, name: &str) -> Option<u64> {
        self.specs.get(name).and_then(|s| s.config.capacity())
    }

    /// Whether a `tiers` list fills the tier called `name` by default.
    pub fn fills_by_default(&self, name: &str) -> bool {
        self.specs
            .get(name)
            .is_some_and(|s| s.config.fills_by_default())
    }

    /// The built tier called `name`.
    pub fn tier(&self, name: &str) -> Result<Arc<dyn BlobService>> {
        self.built
            .get(name)
            .cloned()
            .ok_or_else(|| crate::Error::InvalidRequest(format!("tier `{name}` is not built")))
    }
}

type SpanError = (Option<std::ops::Range<usize>>, String);

/// Parses one tier table: finds its `type`, looks the kind up, and lets the
/// kind parse the rest.
fn parse_tier(
    src: &str,
    registry: &Registry,
    name: &str,
    spec: serde_spanned::Spanned<DeValue<'_>>,
) -> Result<TierSpec, SpanError> {
    let span = spec.span();
    let DeValue::Table(table) = spec.into_inner() else {
        return Err((Some(span), format!("`blobservices.{name}` must be a table")));
    };
    let mut kind_name = None;
    let mut timeout = None;
    let mut breaker = None;
    let mut rest = DeTable::new();
    for (key, value) in table {
        if key.get_ref() == "breaker" {
            let span = value.span();
            breaker = Some(
                BreakerConfig::deserialize(ValueDeserializer::from(value))
                    .map_err(|e| (e.span().or(Some(span)), format!("breaker: {}", e.message())))?,
            );
        } else if key.get_ref() == "timeout" {
            let span = value.span();
            timeout = Some(
                Duration::deserialize(ValueDeserializer::from(value))
                    .map_err(|e| (e.span().or(Some(span)), format!("timeout: {}", e.message())))?,
            );
        } else if key.get_ref() == "type" {
            let type_span = value.span();
            match value.into_inner() {
                DeValue::String(s) => kind_name = Some((s.into_owned(), type_span)),
                _ => return Err((Some(type_span), "`type` must be a string".into())),
            }
        } else {
            rest.insert(key, value);
        }
    }
    let Some((kind_name, type_span)) = kind_name else {
        return Err((Some(span.clone()), "missing `type`".into()));
    };
    let Some(kind) = registry.get(&kind_name) else {
        let known: Vec<_> = registry.names().collect();
        return Err((
            Some(type_span),
            format!("unknown type `{kind_name}` (known: {})", known.join(", ")),
        ));
    };
    let rest = serde_spanned::Spanned::new(span.clone(), DeValue::Table(rest));
    let config = kind
        .parse(ValueDeserializer::from(rest))
        .map_err(|e| (e.span().or(Some(span.clone())), e.message().to_owned()))?;
    config.validate().map_err(|e| (Some(span.clone()), e))?;
    Ok(TierSpec {
        kind: kind_name,
        line: line_of(src, span.start),
        timeout,
        breaker,
        config,
    })
}

/// 1-based line number of byte offset `pos` in `src`.
fn line_of(src: &str, pos: usize) -> usize {
    src.as_bytes()[..pos.min(src.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}
