//! [`spawn_owned`]: work moved onto a task of its own that still belongs
//! to the caller.

use std::future::Future;

use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::error::{Error, Result};

/// Runs `work` as a task of its own, in the current span, so it proceeds
/// on whichever runtime thread is free and while the caller is busy. The
/// returned future yields its result; dropping that future aborts the
/// task, so work the caller let go of (a seek, an error, a dropped reader)
/// does not run on. A task that panicked or was aborted is an I/O error.
pub(crate) fn spawn_owned<T: Send + 'static>(
    work: impl Future<Output = Result<T>> + Send + 'static,
) -> impl Future<Output = Result<T>> + Send + 'static {
    let task = AbortOnDropHandle::new(tokio::spawn(work.in_current_span()));
    async move {
        task.await
            .map_err(|e| Error::Io(std::io::Error::other(e)))
            .and_then(|done| done)
    }
}
