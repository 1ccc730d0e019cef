//! Regional relays as a chunk source. The coordinator lists the live relays; the device uses
//! one: of its `region`'s (config.toml, `shoal init --region`), or with no region (or none
//! listed there) of all, the one a TCP connection reaches soonest. The choice is kept until
//! the relay fails, then made again; a relay that served wrong bytes is not used again while the
//! agent runs. Each fetch asks the coordinator for a ticket for its chunks (the relay serves
//! nothing without one) and hands the relay the ticket, never the device's token. Every chunk
//! is verified like any other (`transfer::verify`).

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use shoal_protocol::ChunkId;
use shoal_protocol::api::{RelayInfo, TicketedFetch};
use shoal_protocol::ticket::{MAX_TICKET_IDS, MAX_TICKET_LIST};

use crate::client::{Client, ClientError};
use crate::transfer::{ChunkSource, Source, SourceFailed, verify};

/// How long a listing of relays (and the choice made from it) is used before asking again.
const RELIST: Duration = Duration::from_secs(300);
/// How long a relay's TCP connect may take while measuring.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Choice {
    current: Option<Arc<RelaySource>>,
    chosen_at: Option<Instant>,
    /// Relays that served wrong bytes: not used again while the agent runs.
    banned: HashSet<String>,
}

/// Chooses the relay a device fetches through, and remembers it.
pub struct Relays {
    client: Client,
    region: Option<String>,
    choice: Mutex<Choice>,
}

impl Relays {
    pub fn new(client: Client, region: Option<String>) -> Arc<Relays> {
        Arc::new(Relays { client, region, choice: Mutex::default() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Choice> {
        self.choice.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The relay in use, if one was chosen: its name and url (for `status`).
    pub fn in_use(&self) -> Option<(String, String)> {
        self.lock().current.as_ref().map(|r| (r.info.name.clone(), r.info.url.clone()))
    }

    /// The relay to fetch through now, choosing one if there is none (or the choice is old).
    pub async fn pick(self: &Arc<Self>) -> Option<Arc<RelaySource>> {
        {
            // A choice (none included: no relay listed) holds until it is old or its relay failed.
            let c = self.lock();
            if c.chosen_at.is_some_and(|at| at.elapsed() < RELIST) {
                return c.current.clone();
            }
        }
        let listed = match self.client.relays().await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "relays not listed");
                return self.lock().current.clone();
            }
        };
        let banned = self.lock().banned.clone();
        let usable: Vec<RelayInfo> = listed.into_iter().filter(|r| !banned.contains(&r.name)).collect();
        // The region's relays if it has any listed, else all; of those, the nearest that answers.
        let mine: Vec<RelayInfo> =
            usable.iter().filter(|r| self.region.as_deref() == Some(r.region.as_str())).cloned().collect();
        let chosen = self.nearest(if mine.is_empty() { &usable } else { &mine }).await;
        let source = chosen.and_then(|info| match self.client.relay(&info.url, info.fingerprint) {
            Ok(http) => {
                Some(Arc::new(RelaySource { info, http, client: self.client.clone(), relays: Arc::downgrade(self) }))
            }
            Err(e) => {
                tracing::warn!(relay = %info.name, error = %e, "cannot use this relay");
                None
            }
        });
        let mut c = self.lock();
        let changed = c.current.as_ref().map(|r| &r.info) != source.as_ref().map(|r| &r.info);
        if changed && let Some(r) = &source {
            tracing::info!(relay = %r.info.name, region = %r.info.region, url = %r.info.url, "fetching through this relay");
        }
        c.current = source.clone();
        c.chosen_at = Some(Instant::now());
        source
    }

    /// The relay of `listed` that a TCP connection reaches soonest.
    async fn nearest(&self, listed: &[RelayInfo]) -> Option<RelayInfo> {
        let probes = listed.iter().map(|r| async move {
            let addr = r.url.strip_prefix("https://")?.trim_end_matches('/');
            let started = Instant::now();
            match tokio::time::timeout(PROBE_TIMEOUT, self.client.dialer().tcp(addr)).await {
                Ok(Ok(_)) => Some((started.elapsed(), r.clone())),
                _ => None,
            }
        });
        futures::future::join_all(probes).await.into_iter().flatten().min_by_key(|(rtt, _)| *rtt).map(|(_, r)| r)
    }

    /// `name` failed: choose again next time; never again if it served wrong bytes.
    fn failed(&self, name: &str, wrong_bytes: bool) {
        let mut c = self.lock();
        if c.current.as_ref().is_some_and(|r| r.info.name == name) {
            c.current = None;
            c.chosen_at = None;
        }
        if wrong_bytes {
            tracing::warn!(relay = %name, "the relay served wrong bytes; not using it again");
            c.banned.insert(name.to_string());
        }
    }
}

/// One relay as a chunk source.
pub struct RelaySource {
    info: RelayInfo,
    /// The relay, reached with its certificate pinned.
    http: Client,
    /// The coordinator, for tickets.
    client: Client,
    relays: std::sync::Weak<Relays>,
}

impl RelaySource {
    async fn get_part(
        &self,
        ids: &[ChunkId],
        each: &mut (dyn FnMut(ChunkId, Bytes) + Send),
    ) -> Result<(), SourceFailed> {
        let fail = |wrong: bool, why: String| {
            if let Some(r) = self.relays.upgrade() {
                r.failed(&self.info.name, wrong);
            }
            SourceFailed(why)
        };
        let ticket = self.client.ticket(ids).await.map_err(|e| SourceFailed(format!("no ticket: {e}")))?;
        let list = (ids.len() > MAX_TICKET_IDS).then(|| ids.to_vec());
        let req = TicketedFetch { ticket: ticket.ticket, list, chunks: ids.to_vec() };
        let mut wrong = false;
        let r = self
            .http
            .fetch_ticketed(&req, |id, data| {
                let data = verify(&id, data, Source::Relay).map_err(|e| {
                    wrong = true;
                    e.to_string()
                })?;
                each(id, data);
                Ok(())
            })
            .await;
        match r {
            Ok(()) => Ok(()),
            Err(e) => {
                let why = match &e {
                    ClientError::Api(b) => b.message.clone(),
                    _ => e.to_string(),
                };
                Err(fail(wrong, why))
            }
        }
    }
}

impl ChunkSource for RelaySource {
    fn kind(&self) -> Source {
        Source::Relay
    }

    fn describe(&self) -> String {
        format!("relay {} ({})", self.info.name, self.info.url)
    }

    fn key(&self) -> String {
        format!("relay {}", self.info.name)
    }

    /// A relay can serve any chunk the user may read: it fetches what it lacks.
    fn holds<'a>(&'a self, ids: &'a [ChunkId]) -> BoxFuture<'a, Result<Vec<bool>, SourceFailed>> {
        Box::pin(async move { Ok(vec![true; ids.len()]) })
    }

    fn get<'a>(
        &'a self,
        ids: &'a [ChunkId],
        _floor: &'a AtomicU64,
        each: &'a mut (dyn FnMut(ChunkId, Bytes) + Send),
    ) -> BoxFuture<'a, Result<(), SourceFailed>> {
        Box::pin(async move {
            for part in ids.chunks(MAX_TICKET_LIST) {
                self.get_part(part, each).await?;
            }
            Ok(())
        })
    }
}
