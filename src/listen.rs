//! LISTEN for the mappings' `notify_channel`s, so that a row committed now is polled now rather
//! than at the next interval.
//!
//! Each channel gets one connection of its own, outside the pool: notifications arrive on a
//! connection's message stream, which the pool's connections do not expose. A notification only
//! wakes the loops of the mappings on that channel; this module never claims, sends or marks.
//! A notification lost while the connection is down costs latency, not rows: the interval poll
//! still finds them, and every reconnect wakes the loops once in case something was committed
//! meanwhile.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::db::DirectConfig;
use crate::error::DbError;
use crate::source::quote_ident;
use crate::sync::Lane;

/// A dead connection is noticed within about a minute even when the network drops silently.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

/// Starts one listener per distinct channel among `lanes`; each ends when `stop` is cancelled.
pub fn spawn_listeners(
    config: &DirectConfig,
    lanes: &[Arc<Lane>],
    stop: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    let mut channels: BTreeMap<String, Vec<Arc<Lane>>> = BTreeMap::new();
    for lane in lanes {
        if let Some(channel) = &lane.source.config.notify_channel {
            channels
                .entry(channel.clone())
                .or_default()
                .push(lane.clone());
        }
    }
    let mut config = config.clone();
    config
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(KEEPALIVE_RETRIES);
    channels
        .into_iter()
        .map(|(channel, lanes)| tokio::spawn(run(config.clone(), channel, lanes, stop.clone())))
        .collect()
}

/// Keeps a LISTEN session on `channel` open until `stop`, reconnecting with backoff, and wakes
/// `lanes` on every notification.
pub async fn run(
    config: DirectConfig,
    channel: String,
    lanes: Vec<Arc<Lane>>,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let error = match listen(&config, &channel, &lanes, &stop, &mut failures).await {
            Ok(()) => return,
            Err(error) => error,
        };
        failures += 1;
        let wait = reconnect_wait(failures);
        tracing::warn!(
            channel, %error, retry_in_s = wait.as_secs_f64(),
            "LISTEN connection lost; polling on the interval until it is back"
        );
        if !crate::sync::sleep_or_stop(&stop, wait).await {
            return;
        }
    }
}

/// One LISTEN session: returns `Ok` when stopped, an error when the connection fails.
async fn listen(
    config: &DirectConfig,
    channel: &str,
    lanes: &[Arc<Lane>],
    stop: &CancellationToken,
    failures: &mut u32,
) -> Result<(), DbError> {
    let (client, mut connection) = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        connected = config.connect_direct() => connected?,
    };
    // The connection only makes progress while its message stream is polled, so LISTEN is
    // awaited alongside it.
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!("LISTEN {}", quote_ident(channel));
    let subscribe = client.batch_execute(&statement);
    tokio::pin!(subscribe);
    let mut listening = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            done = &mut subscribe, if !listening => {
                done?;
                listening = true;
                tracing::debug!(channel, "listening");
                if *failures > 0 {
                    // Rows committed while the connection was down sent notifications nobody heard.
                    wake(lanes);
                }
                *failures = 0;
            }
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(note))) => {
                    tracing::trace!(channel = note.channel(), "notified");
                    wake(lanes);
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error.into()),
                None => return Err(DbError::Other("the server closed the connection".into())),
            },
        }
    }
}

fn wake(lanes: &[Arc<Lane>]) {
    for lane in lanes {
        lane.wake.notify_one();
    }
}

/// 0.5 s after the first failure, doubling up to 30 s.
fn reconnect_wait(failures: u32) -> Duration {
    let millis = 500u64.saturating_mul(2u64.saturating_pow(failures.saturating_sub(1).min(10)));
    Duration::from_millis(millis).min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_back_off_up_to_thirty_seconds() {
        let waits: Vec<u64> = (1..=8)
            .map(|n| reconnect_wait(n).as_millis() as u64)
            .collect();
        assert_eq!(
            waits,
            vec![500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]
        );
        assert_eq!(reconnect_wait(u32::MAX), Duration::from_secs(30));
    }
}
