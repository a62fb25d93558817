//! `objectstore`: blobs in any store the `object_store` crate reaches
//! (`file://`, `memory://`, `s3://`, `gs://`, `az://`, `http(s)://`), in the
//! layout snix's objectstore blob service uses, so a bucket can be shared
//! with snix/tvix in both directions.
//!
//! ```toml
//! [blobservices.s3]
//! type = "objectstore"
//! object_store_url = "s3://bucket/prefix"
//! object_store_options = { aws_region = "eu-west-1" }
//! avg_chunk_size = 262144   # optional, bytes
//! ```
//!
//! Layout under the URL's path (see `docs/storage-layout.md`):
//! `chunks/b3/<2 hex>/<64 hex>` holds a zstd-compressed chunk and
//! `blobs/b3/<2 hex>/<64 hex>` the chunk list of a blob of two or more
//! chunks, as a protobuf `StatBlobResponse`.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::Deserialize;
use tracing::instrument;

use crate::blobservice::BlobService;
use crate::chunkstore::{BlobIndex, ChunkStore, ChunkedBlobService, Chunking};
use crate::composition::{BuildContext, TierConfig};
use crate::digest::B3Digest;
use crate::error::{Error, Result};

/// zstd level for new chunks: zstd's default, as snix uses.
const ZSTD_LEVEL: i32 = 3;
/// No chunk decompresses to more than this: FastCDC v2020 never cuts a chunk
/// larger than 16 MiB, so anything bigger is corrupt or hostile.
const MAX_CHUNK_DECOMPRESSED: u64 = crate::blobservice::LARGEST_CHUNK;
/// No stored chunk object is larger than this: zstd never makes a chunk
/// more than a little larger than it was (`ZSTD_compressBound`), so twice
/// the largest chunk leaves room for any encoder's framing.
const MAX_CHUNK_OBJECT: u64 = 2 * MAX_CHUNK_DECOMPRESSED;

/// Configuration of an `objectstore` tier (snix's field names).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectStoreConfig {
    /// Where the blobs live, e.g. `s3://bucket/prefix` or `file:///srv/blobs`.
    pub object_store_url: String,
    /// Backend options (credentials, endpoint, region, ...), passed to
    /// `object_store` as they are.
    #[serde(default)]
    pub object_store_options: BTreeMap<String, String>,
    /// Average FastCDC chunk size for new blobs (default 256 KiB).
    pub avg_chunk_size: Option<u32>,
    /// Chunk uploads in flight per Put (default 8).
    pub upload_concurrency: Option<usize>,
    /// Chunks fetched ahead of a sequential reader (default 8).
    pub read_ahead: Option<usize>,
}

#[async_trait]
impl TierConfig for ObjectStoreConfig {
    fn describe(&self) -> String {
        format!(
            "objectstore (url = {}, avg_chunk_size = {})",
            self.object_store_url,
            self.avg_chunk_size.unwrap_or(Chunking::default().avg)
        )
    }

    fn remote(&self) -> bool {
        true
    }

    fn persistent(&self, _ctx: &BuildContext) -> bool {
        !self.object_store_url.starts_with("memory:")
    }

    fn fills_by_default(&self) -> bool {
        true
    }

    async fn build(&self, _ctx: &BuildContext) -> Result<Arc<dyn BlobService>> {
        Ok(Arc::new(ChunkedBlobService::new(ObjectStoreChunks::open(
            self,
        )?)))
    }
}

/// `objectstore+<object_store URL>`: an anonymous objectstore tier with
/// default options, e.g. `objectstore+file:///var/lib/blobs`.
pub fn from_url(url: &str) -> Result<Box<dyn TierConfig>, String> {
    let inner = url
        .strip_prefix("objectstore+")
        .ok_or_else(|| "expected objectstore+<url>".to_owned())?;
    url::Url::parse(inner).map_err(|e| e.to_string())?;
    Ok(Box::new(ObjectStoreConfig {
        object_store_url: inner.to_owned(),
        object_store_options: BTreeMap::new(),
        avg_chunk_size: None,
        upload_concurrency: None,
        read_ahead: None,
    }))
}

/// The [`ChunkStore`] behind an `objectstore` tier.
pub struct ObjectStoreChunks {
    store: Arc<dyn ObjectStore>,
    base: Path,
    url: String,
    chunking: Chunking,
    upload_concurrency: usize,
    read_ahead: usize,
}

impl ObjectStoreChunks {
    /// Opens the store a configuration names.
    pub fn open(config: &ObjectStoreConfig) -> Result<Self> {
        let bad = |why: String| {
            Error::InvalidRequest(format!(
                "object_store_url {:?}: {why}",
                config.object_store_url
            ))
        };
        let url = url::Url::parse(&config.object_store_url).map_err(|e| bad(e.to_string()))?;
        let (store, base) = object_store::parse_url_opts(&url, &config.object_store_options)
            .map_err(|e| bad(e.to_string()))?;
        let chunking = match config.avg_chunk_size {
            None => Chunking::default(),
            Some(avg) => Chunking::with_avg(avg).ok_or_else(|| {
                bad(format!(
                    "avg_chunk_size {avg} is outside {}..={}",
                    Chunking::MIN_AVG,
                    Chunking::MAX_AVG
                ))
            })?,
        };
        Ok(ObjectStoreChunks {
            store: Arc::from(store),
            base,
            url: config.object_store_url.clone(),
            chunking,
            upload_concurrency: config.upload_concurrency.unwrap_or(8).max(1),
            read_ahead: config.read_ahead.unwrap_or(8).max(1),
        })
    }

    fn key(&self, kind: &str, digest: &B3Digest) -> Path {
        let hex = digest.to_hex();
        self.base
            .clone()
            .join(kind)
            .join("b3")
            .join(&hex[..2])
            .join(hex.as_str())
    }

    fn chunk_key(&self, digest: &B3Digest) -> Path {
        self.key("chunks", digest)
    }

    fn index_key(&self, digest: &B3Digest) -> Path {
        self.key("blobs", digest)
    }

    fn backend_error(&self, op: &str, key: &Path, e: object_store::Error) -> Error {
        Error::Backend(format!("{}: {op} {key}: {e}", self.url))
    }

    /// GETs an object; `None` if it does not exist. One larger than
    /// `limit` bytes is refused before its body is read: the bucket is not
    /// trusted to bound what a read holds in memory.
    async fn get_object(&self, key: &Path, limit: u64) -> Result<Option<Bytes>> {
        match self.store.get(key).await {
            Ok(result) if result.meta.size > limit => Err(Error::Corrupt(format!(
                "{}: {key} is {} bytes, more than the {limit} it may be",
                self.url, result.meta.size
            ))),
            Ok(result) => match result.bytes().await {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) => Err(self.backend_error("read", key, e)),
            },
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.backend_error("get", key, e)),
        }
    }

    async fn put_object(&self, key: &Path, data: Bytes) -> Result<()> {
        self.store
            .put(key, PutPayload::from_bytes(data))
            .await
            .map(|_| ())
            .map_err(|e| self.backend_error("put", key, e))
    }
}

/// Decompresses a stored chunk, refusing to produce more than
/// `MAX_CHUNK_DECOMPRESSED` bytes.
pub fn decompress_chunk(compressed: &[u8]) -> std::io::Result<Bytes> {
    let mut decoder = zstd::stream::read::Decoder::new(compressed)?;
    let mut out = Vec::new();
    (&mut decoder)
        .take(MAX_CHUNK_DECOMPRESSED + 1)
        .read_to_end(&mut out)?;
    if out.len() as u64 > MAX_CHUNK_DECOMPRESSED {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("chunk decompresses to more than {MAX_CHUNK_DECOMPRESSED} bytes"),
        ));
    }
    Ok(out.into())
}

/// Compresses a chunk for storage.
pub fn compress_chunk(data: &[u8]) -> std::io::Result<Bytes> {
    zstd::bulk::compress(data, ZSTD_LEVEL).map(Bytes::from)
}

/// Runs CPU-heavy codec work off the async runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?
        .map_err(Error::Io)
}

#[async_trait]
impl ChunkStore for ObjectStoreChunks {
    #[instrument(skip(self), fields(url = %self.url, %digest), err)]
    async fn get_chunk(&self, digest: &B3Digest) -> Result<Option<Bytes>> {
        let Some(compressed) = self
            .get_object(&self.chunk_key(digest), MAX_CHUNK_OBJECT)
            .await?
        else {
            return Ok(None);
        };
        let key = self.chunk_key(digest);
        blocking(move || decompress_chunk(&compressed))
            .await
            .map(Some)
            .map_err(|e| Error::Corrupt(format!("chunk {key}: {e}")))
    }

    async fn chunk_size(&self, digest: &B3Digest) -> Result<Option<u64>> {
        let Some(compressed) = self
            .get_object(&self.chunk_key(digest), MAX_CHUNK_OBJECT)
            .await?
        else {
            return Ok(None);
        };
        // The frame header usually carries the size (strata's chunks always
        // do); streaming compressors may leave it out.
        if let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(&compressed)
            && size <= MAX_CHUNK_DECOMPRESSED
        {
            return Ok(Some(size));
        }
        let key = self.chunk_key(digest);
        let data = blocking(move || decompress_chunk(&compressed))
            .await
            .map_err(|e| Error::Corrupt(format!("chunk {key}: {e}")))?;
        Ok(Some(data.len() as u64))
    }

    async fn has_chunk(&self, digest: &B3Digest) -> Result<bool> {
        let key = self.chunk_key(digest);
        match self.store.head(&key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.backend_error("head", &key, e)),
        }
    }

    #[instrument(skip(self, data), fields(url = %self.url, %digest, len = data.len()), err)]
    async fn put_chunk(&self, digest: B3Digest, data: Bytes) -> Result<()> {
        let compressed = blocking(move || compress_chunk(&data)).await?;
        self.put_object(&self.chunk_key(&digest), compressed).await
    }

    #[instrument(skip(self), fields(url = %self.url, %digest), err)]
    async fn get_index(&self, digest: &B3Digest) -> Result<Option<BlobIndex>> {
        match self.get_object(&self.index_key(digest), u64::MAX).await? {
            Some(data) => BlobIndex::decode_shared(digest, data).map(Some),
            None => Ok(None),
        }
    }

    #[instrument(skip(self, index), fields(url = %self.url, %digest), err)]
    async fn put_index(&self, digest: B3Digest, index: BlobIndex) -> Result<()> {
        self.put_object(&self.index_key(&digest), index.encode())
            .await
    }

    fn evicts(&self) -> bool {
        false
    }

    fn trusts_indexes(&self) -> bool {
        // A bucket may be written by snix, tvix or anyone with credentials.
        false
    }

    fn read_ahead(&self) -> usize {
        self.read_ahead
    }

    fn write_concurrency(&self) -> usize {
        self.upload_concurrency
    }

    fn chunking(&self) -> Chunking {
        self.chunking
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(avg_chunk_size: Option<u32>) -> ObjectStoreConfig {
        ObjectStoreConfig {
            object_store_url: "memory:///".into(),
            object_store_options: BTreeMap::new(),
            avg_chunk_size,
            upload_concurrency: None,
            read_ahead: None,
        }
    }

    #[test]
    fn an_average_chunk_size_fastcdc_refuses_is_a_config_error() {
        for avg in [Chunking::MIN_AVG, Chunking::MAX_AVG] {
            let store = ObjectStoreChunks::open(&config(Some(avg))).expect("a valid average");
            assert_eq!(store.chunking().avg, avg);
        }
        // FastCDC's own bounds (it panics outside them): average >= 256,
        // maximum >= 1 KiB, minimum <= 1 MiB.
        for avg in [256, Chunking::MIN_AVG - 1, Chunking::MAX_AVG + 2, 8 << 20] {
            let err = ObjectStoreChunks::open(&config(Some(avg)))
                .err()
                .expect("an average FastCDC refuses");
            assert!(err.to_string().contains("avg_chunk_size"), "{avg}: {err}");
        }
    }
}
