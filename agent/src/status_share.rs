//! Bounding what Status costs when many clients ask at once.
//!
//! A status reads about five unit properties over D-Bus at once. dbus-daemon refuses a
//! connection more pending replies than `max_replies_per_connection` (128 on Debian's
//! system bus): 200 WatchStatus streams ticking together got
//! `org.freedesktop.DBus.Error.LimitsExceeded` for everyone. So status computations run in
//! at most [`STATUS_LANES`] at once, and WatchStatus streams share one computation
//! ([`SharedStatus`]): the cost of the streams no longer grows with their number.

use std::future::Future;

use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;

/// Status computations in flight at once (each holds up to 5 D-Bus calls).
pub const STATUS_LANES: usize = 8;

/// The latest result of a computation, and when it started; concurrent callers wait for
/// the one in flight instead of starting their own.
pub struct SharedStatus<T> {
    latest: Mutex<Option<(Instant, T)>>,
}

impl<T: Clone> Default for SharedStatus<T> {
    fn default() -> Self {
        Self {
            latest: Mutex::new(None),
        }
    }
}

impl<T: Clone> SharedStatus<T> {
    /// A result whose computation started at or after `not_before`: the latest one if it
    /// qualifies, else a new one from `compute` (run while other callers wait for it).
    pub async fn get<F: Future<Output = T>>(&self, not_before: Instant, compute: F) -> T {
        let mut latest = self.latest.lock().await;
        if let Some((started, value)) = latest.as_ref()
            && *started >= not_before
        {
            return value.clone();
        }
        let started = Instant::now();
        let value = compute.await;
        *latest = Some((started, value.clone()));
        value
    }
}

/// The lanes: one permit per status computation in flight.
pub fn status_lanes() -> Semaphore {
    Semaphore::new(STATUS_LANES)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_computation() {
        let shared = Arc::new(SharedStatus::<usize>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let asked = Instant::now();
        let callers: Vec<_> = (0..50)
            .map(|_| {
                let (shared, runs) = (shared.clone(), runs.clone());
                tokio::spawn(async move {
                    shared
                        .get(asked, async {
                            tokio::task::yield_now().await;
                            runs.fetch_add(1, Ordering::SeqCst) + 1
                        })
                        .await
                })
            })
            .collect();
        for caller in callers {
            assert_eq!(caller.await.unwrap(), 1);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_older_result_is_not_reused() {
        let shared = SharedStatus::<u32>::default();
        let before = Instant::now();
        assert_eq!(shared.get(before, async { 1 }).await, 1);
        // Started after `before`: reused.
        assert_eq!(shared.get(before, async { 2 }).await, 1);
        // A caller that needs a result newer than a change gets a new one.
        let changed = Instant::now();
        assert_eq!(shared.get(changed, async { 3 }).await, 3);
    }
}
