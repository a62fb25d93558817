//! Tier kinds. Each kind lives in its own module and is known to the
//! composition engine only through [`register_all`].
//!
//! Stores: [`memory`], [`disk`], [`objectstore`], [`grpc`].
//! Combinators: [`tiers`] (priority order with fills), [`combined`]
//! (snix's near/far pair), [`race`] (equal-priority substituters), [`shard`]
//! (rendezvous hashing over a pool).

pub mod combined;
pub mod disk;
pub mod grpc;
pub mod memory;
pub mod objectstore;
pub mod race;
pub mod shard;
pub mod tiers;

use crate::composition::Registry;

/// Registers every kind strata ships, and the URL forms that stand for
/// anonymous tiers.
pub fn register_all(registry: &mut Registry) {
    registry.register::<combined::CombinedConfig>("combined");
    registry.register::<disk::DiskConfig>("disk");
    registry.register::<grpc::GrpcConfig>("grpc");
    registry.register::<memory::MemoryConfig>("memory");
    registry.register::<objectstore::ObjectStoreConfig>("objectstore");
    registry.register::<race::RaceConfig>("race");
    registry.register::<shard::ShardConfig>("shard");
    registry.register::<tiers::TiersConfig>("tiers");

    registry.register_url("memory:", "memory", memory::from_url);
    registry.register_url("objectstore+", "objectstore", objectstore::from_url);
    registry.register_url("grpc+", "grpc", grpc::from_url);
}
