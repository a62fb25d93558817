//! Tier kinds. Each kind lives in its own module and is known to the
//! composition engine only through [`register_all`].

pub mod disk;
pub mod grpc;
pub mod memory;
pub mod objectstore;

use crate::composition::Registry;

/// Registers every kind strata ships.
pub fn register_all(registry: &mut Registry) {
    registry.register::<disk::DiskConfig>("disk");
    registry.register::<memory::MemoryConfig>("memory");
    registry.register::<grpc::GrpcConfig>("grpc");
    registry.register::<objectstore::ObjectStoreConfig>("objectstore");
}
