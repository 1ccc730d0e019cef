//! The relay's side of the coordinator: registration (and the heartbeat that repeats it), and
//! fetching the chunks the cache misses, with the relay's token and the device's ticket. The
//! coordinator is reached over HTTPS pinned to its certificate's fingerprint, as devices do.

use std::time::Duration;

use bytes::Bytes;
use shoal_protocol::api::{ErrorBody, RelayRegister, RelayRegistered, TicketedFetch, decode_frame};
use shoal_protocol::{CHUNK_PARAMS, ChunkId};

/// How long one request to the coordinator may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a registration did not go through.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// No answer (down, unreachable, timed out): worth trying again.
    #[error("cannot reach the coordinator at {0}: {1}")]
    Unreachable(String, String),
    /// The coordinator answered no (a bad token, say), or something unreadable.
    #[error("{0}")]
    Refused(String),
}

#[derive(Clone)]
pub struct Origin {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Origin {
    /// A client for the coordinator at `addr` (`HOST:PORT`) whose certificate has `fingerprint`.
    pub fn new(addr: &str, fingerprint: ChunkId, token: &str) -> anyhow::Result<Origin> {
        let tls = shoal_net::pinned::client_config(fingerprint)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .build()?;
        Ok(Origin { http, base: format!("https://{addr}"), token: token.trim().to_string() })
    }

    async fn error(resp: reqwest::Response) -> String {
        let status = resp.status();
        match resp.json::<ErrorBody>().await {
            Ok(e) => format!("{status}: {}", e.message),
            Err(_) => status.to_string(),
        }
    }

    /// Registers (or, as the heartbeat, registers again) where the relay listens.
    pub async fn register(&self, url: &str, fingerprint: ChunkId) -> Result<RelayRegistered, RegisterError> {
        let body = RelayRegister { url: url.to_string(), fingerprint };
        let resp = self
            .http
            .post(format!("{}/v1/relay/register", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .map_err(|e| RegisterError::Unreachable(self.base.clone(), e.to_string()))?;
        if resp.status().is_server_error() {
            let why = Self::error(resp).await;
            return Err(RegisterError::Unreachable(self.base.clone(), why));
        }
        if !resp.status().is_success() {
            return Err(RegisterError::Refused(Self::error(resp).await));
        }
        resp.json().await.map_err(|e| RegisterError::Refused(format!("bad answer from the coordinator: {e}")))
    }

    /// Fetches `ids` under `ticket`; returns the chunks delivered, in order, each verified, as
    /// frames (slices of the answer, sent on as they are), and why the rest were not (`None` if
    /// none is missing).
    pub async fn fetch(
        &self,
        ticket: &str,
        list: Option<&[ChunkId]>,
        ids: &[ChunkId],
    ) -> (Vec<(ChunkId, Bytes)>, Option<String>) {
        let req =
            TicketedFetch { ticket: ticket.to_string(), list: list.map(<[ChunkId]>::to_vec), chunks: ids.to_vec() };
        let sent = self.http.post(format!("{}/v1/relay/fetch", self.base)).bearer_auth(&self.token).json(&req).send();
        let resp = match sent.await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => return (Vec::new(), Some(Self::error(r).await)),
            Err(e) => return (Vec::new(), Some(format!("cannot reach the coordinator: {e}"))),
        };
        let (body, cut) = match resp.bytes().await {
            Ok(b) => (b, None),
            Err(e) => (Bytes::new(), Some(format!("the coordinator's answer broke off: {e}"))),
        };
        let mut got = Vec::with_capacity(ids.len());
        let mut at = 0usize;
        for want in ids {
            match decode_frame(&body[at..], CHUNK_PARAMS.max as u32) {
                Ok(Some((id, data, used))) if id == *want && ChunkId::of(data) == id => {
                    got.push((id, body.slice(at..at + used)));
                    at += used;
                }
                Ok(Some(_)) | Err(_) => return (got, Some(format!("the coordinator sent a bad frame for {want}"))),
                Ok(None) => return (got, Some(cut.unwrap_or_else(|| format!("the coordinator did not send {want}")))),
            }
        }
        (got, None)
    }
}
