//! The registry of tier kinds: maps a `type = "..."` string to the code that
//! parses and builds that kind. The composition engine knows kinds only
//! through it, so a new kind is one module plus one `register` call.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use super::BuildContext;
use crate::blobservice::BlobService;
use crate::error::Result;

/// A parsed `[blobservices.NAME]` table of some kind.
#[async_trait]
pub trait TierConfig: Debug + Send + Sync {
    /// Names of the other tiers this one uses; they are built first.
    fn references(&self) -> Vec<String> {
        Vec::new()
    }

    /// One line for `strata check`: the kind and its salient settings.
    fn describe(&self) -> String;

    /// Checks settings that serde cannot (non-empty lists, duplicates, ...).
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    /// Whether the tier keeps data across restarts (the default `write_to`
    /// of a `tiers` list is its nearest persistent tier).
    fn persistent(&self, _ctx: &BuildContext) -> bool {
        false
    }

    /// The most bytes the tier holds, if it is bounded (caches).
    fn capacity(&self) -> Option<u64> {
        None
    }

    /// Whether the tier is reached over the network (peers, buckets): such
    /// tiers get a circuit breaker unless their table says otherwise.
    fn remote(&self) -> bool {
        false
    }

    /// Whether a `tiers` list fills this tier with what it fetched from
    /// farther tiers (caches and buckets do; peers fill themselves).
    fn fills_by_default(&self) -> bool {
        false
    }

    /// Builds the tier. Tiers named by [`TierConfig::references`] are
    /// available through `ctx`.
    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobService>>;
}

/// A tier kind: how to turn a TOML table into a [`TierConfig`].
pub trait Kind: Send + Sync {
    /// Parses the table (without its `type` key).
    fn parse(
        &self,
        table: toml::de::ValueDeserializer<'_>,
    ) -> Result<Box<dyn TierConfig>, toml::de::Error>;
}

/// A [`Kind`] whose configuration is the serde type `C`.
struct SerdeKind<C>(PhantomData<fn() -> C>);

impl<C> Kind for SerdeKind<C>
where
    C: TierConfig + DeserializeOwned + 'static,
{
    fn parse(
        &self,
        table: toml::de::ValueDeserializer<'_>,
    ) -> Result<Box<dyn TierConfig>, toml::de::Error> {
        Ok(Box::new(C::deserialize(table)?))
    }
}

/// Builds the configuration of an anonymous tier from a URL reference
/// (`memory://`, `grpc+unix:///run/x.sock`, ...).
pub type UrlParser = fn(&str) -> Result<Box<dyn TierConfig>, String>;

/// Tier kinds by name, and URL schemes by prefix.
pub struct Registry {
    kinds: BTreeMap<&'static str, Box<dyn Kind>>,
    urls: Vec<(&'static str, &'static str, UrlParser)>,
}

impl Registry {
    /// A registry without any kinds.
    pub fn empty() -> Self {
        Registry {
            kinds: BTreeMap::new(),
            urls: Vec::new(),
        }
    }

    /// Registers kind `name`, configured by the serde type `C` (which should
    /// reject unknown fields).
    pub fn register<C>(&mut self, name: &'static str)
    where
        C: TierConfig + DeserializeOwned + 'static,
    {
        self.kinds
            .insert(name, Box::new(SerdeKind::<C>(PhantomData)));
    }

    /// Lets URLs starting with `prefix` stand for an anonymous tier of kind
    /// `kind`, configured by `parse`.
    pub fn register_url(&mut self, prefix: &'static str, kind: &'static str, parse: UrlParser) {
        self.urls.push((prefix, kind, parse));
    }

    /// The kind an anonymous tier `url` is, and the parser for its
    /// configuration; `None` when no registered prefix matches.
    pub fn url_kind(&self, url: &str) -> Option<(&'static str, UrlParser)> {
        self.urls
            .iter()
            .find(|(prefix, _, _)| url.starts_with(prefix))
            .map(|(_, kind, parse)| (*kind, *parse))
    }

    /// The kind called `name`.
    pub fn get(&self, name: &str) -> Option<&dyn Kind> {
        self.kinds.get(name).map(|k| k.as_ref())
    }

    /// All kind names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }
}

impl Default for Registry {
    /// Every kind strata ships.
    fn default() -> Self {
        let mut registry = Registry::empty();
        crate::kinds::register_all(&mut registry);
        registry
    }
}
