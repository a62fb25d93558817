//! `combined`: snix's near/far pair, accepted unchanged from snix
//! composition files, with strata's fill semantics.
//!
//! ```toml
//! [blobservices.root]
//! type = "combined"
//! near = "local"
//! far = "remote"
//! ```
//!
//! It is a [`tiers`](super::tiers) list `[near, far]` with `fill = "sync"`
//! and Puts going to `near`, as snix's combined service writes to its near
//! side. Unlike snix's, reads from `far` fill `near`.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use super::tiers::{Fill, TiersConfig};
use crate::blobservice::BlobService;
use crate::composition::{BuildContext, TierConfig};
use crate::error::Result;

/// Configuration of a `combined` tier (snix's field names).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CombinedConfig {
    /// The local side: read first, written to, filled.
    pub near: String,
    /// The remote side.
    pub far: String,
}

impl CombinedConfig {
    fn as_tiers(&self) -> TiersConfig {
        TiersConfig {
            tiers: vec![self.near.clone(), self.far.clone()],
            fill: Fill::Sync,
            write_to: Some(vec![self.near.clone()]),
            fill_to: Some(vec![self.near.clone()]),
            fill_queue: None,
            read_ahead: None,
        }
    }
}

#[async_trait]
impl TierConfig for CombinedConfig {
    fn references(&self) -> Vec<String> {
        vec![self.near.clone(), self.far.clone()]
    }

    fn validate(&self) -> Result<(), String> {
        if self.near == self.far {
            return Err("`near` and `far` name the same tier".into());
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "combined (near = {}, far = {}, fill = sync)",
            self.near, self.far
        )
    }

    fn persistent(&self, ctx: &BuildContext) -> bool {
        ctx.persistent(&self.near)
    }

    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobService>> {
        self.as_tiers().build(ctx).await
    }
}
