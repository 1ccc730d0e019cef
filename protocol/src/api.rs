//! Wire types of the coordinator's HTTPS API (`/v1`), the invite format, the binary framing used
//! to move many chunks in one request, and the stable error codes.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::entry::{Change, Entry};
use crate::ids::{ChunkId, CommitId, DeviceId, Seq};
use crate::path::SyncPath;

/// Largest JSON request body the coordinator accepts.
pub const MAX_JSON_BODY: usize = 64 * 1024 * 1024;
/// Largest chunk-batch upload body: enough to keep a fast link busy, small enough to buffer.
pub const MAX_CHUNK_BATCH_BODY: usize = 16 * 1024 * 1024;
/// Most changes in one commit. A commit is appended in one sled batch, and sled's batches hold a
/// process-wide write lock while they apply: bounding the batch bounds how long one user's commit
/// can pause everyone else's requests (10,000 changes of 480-byte paths took 2.8 s in a debug
/// build). Agents send their changes in commits of this size.
pub const MAX_COMMIT_CHANGES: usize = 1_000;
/// Most chunk ids in one `chunks/missing` or `chunks/fetch` request.
pub const MAX_CHUNK_IDS: usize = 16_384;
/// Most entries in one page of changes, tree or history.
pub const MAX_PAGE: usize = 5_000;
/// Stored (binary) bytes of entries past which a page of changes, tree or history stops, whatever
/// the count: about
/// 5 MiB of JSON (hex ids take ~2.7× their binary size), so a page of large manifests stays a few
/// MiB instead of `MAX_PAGE` × the largest manifest. A page always holds at least one entry.
pub const MAX_PAGE_BYTES: usize = 2 * 1024 * 1024;
/// Largest JSON body accepted before the request is authenticated (enrollment): a device name,
/// an invite secret and a certificate request (an ECDSA one is ~500 bytes) fit with room to spare.
/// A larger declared body from an unknown party is refused without being kept (at most four times
/// this much is read and dropped, so the client sees the 413).
pub const MAX_UNAUTH_BODY: usize = 16 * 1024;
/// Longest long-poll wait.
pub const MAX_WAIT_SECS: u64 = 60;

/// A user name: 1–32 of `a-z 0-9 _ -`, starting with a letter or digit.
pub fn valid_user_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

/// A device name: 1–64 printable characters, none of which reorders or hides text (see
/// [`crate::path::hides_text`]): names are shown to people and end up in conflicted copies' names.
pub fn valid_device_name(name: &str) -> bool {
    (1..=64).contains(&name.chars().count()) && !name.chars().any(|c| c.is_control() || crate::path::hides_text(c))
}

/// Everything a device needs to enroll, as one line:
/// `shoal://HOST:PORT/USER?secret=HEX&fp=HEX`. `fp` is the BLAKE3 of the coordinator's TLS
/// certificate (DER), which devices pin instead of trusting a CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    pub addr: String,
    pub user: String,
    pub secret: String,
    pub fingerprint: ChunkId,
}

/// Why an invite line did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid Shoal invite ({0}); expected shoal://HOST:PORT/USER?secret=...&fp=...")]
pub struct InviteError(&'static str);

impl fmt::Display for Invite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shoal://{}/{}?secret={}&fp={}", self.addr, self.user, self.secret, self.fingerprint)
    }
}

impl std::str::FromStr for Invite {
    type Err = InviteError;
    fn from_str(s: &str) -> Result<Self, InviteError> {
        let rest = s.trim().strip_prefix("shoal://").ok_or(InviteError("missing shoal:// prefix"))?;
        let (addr, rest) = rest.split_once('/').ok_or(InviteError("missing user"))?;
        let (user, query) = rest.split_once('?').ok_or(InviteError("missing secret"))?;
        if addr.is_empty() || !addr.contains(':') {
            return Err(InviteError("address must be HOST:PORT"));
        }
        if !valid_user_name(user) {
            return Err(InviteError("bad user name"));
        }
        let (mut secret, mut fp) = (None, None);
        for kv in query.split('&') {
            match kv.split_once('=') {
                Some(("secret", v)) => secret = Some(v),
                Some(("fp", v)) => fp = Some(v),
                _ => return Err(InviteError("unknown field")),
            }
        }
        let secret = secret.ok_or(InviteError("missing secret"))?;
        if secret.len() != 32 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(InviteError("bad secret"));
        }
        let fingerprint = fp.ok_or(InviteError("missing fp"))?.parse().map_err(|_| InviteError("bad fp"))?;
        Ok(Invite { addr: addr.to_string(), user: user.to_string(), secret: secret.to_string(), fingerprint })
    }
}

/// What a running coordinator writes to `DATA/server.json` so that `user add`, `shoal demo` and
/// scripts can find it: where it listens and which process it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerInfo {
    pub addr: String,
    pub public_addr: String,
    pub fingerprint: ChunkId,
    pub pid: u32,
    /// Where `/metrics` is served (plain HTTP), if anywhere.
    #[serde(default)]
    pub metrics_addr: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub user: String,
    pub secret: String,
    pub device_name: String,
    /// PKCS#10 certificate request (PEM) for the device's own key; only its public key is used.
    pub csr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub device_id: DeviceId,
    /// Bearer token for every later request. Shown once; stored hashed by the coordinator.
    pub token: String,
    /// The device's certificate (PEM), signed by the user's CA, named `<device id>.device.shoal`.
    pub cert: String,
    /// The user's CA certificate (PEM): peers of this user chain to it.
    pub ca: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: DeviceId,
    pub name: String,
    pub enrolled_ms: u64,
    pub last_seen_ms: u64,
    /// Highest journal seq the device reports as applied.
    pub cursor: Seq,
    pub revoked: bool,
    /// BLAKE3 of the device certificate (DER).
    pub cert_fingerprint: ChunkId,
    /// Another device asked to revoke this one and a second device has yet to confirm.
    #[serde(default)]
    pub revoke_requested: Option<RevokeRequest>,
}

/// A request, by one of the user's devices, to revoke another: it takes effect when a second
/// active device (not the one to be revoked) asks for the same before `expires_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeRequest {
    pub by: DeviceId,
    pub expires_ms: u64,
}

/// Most peer endpoint addresses a device may announce.
pub const MAX_PEER_ADDRS: usize = 8;

/// `POST /v1/peers`: the addresses this device's peer endpoint listens on (`IP:PORT`, at most
/// `MAX_PEER_ADDRS`). The answer lists the user's other devices that announced within the last
/// `PEER_TTL_SECS` from the same public address as this request (the same LAN, most likely).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeersRequest {
    pub addrs: Vec<String>,
}

/// How long an announcement counts: devices announce more often than this while running.
pub const PEER_TTL_SECS: u64 = 90;

/// One of the user's devices that may be reachable directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHint {
    pub device: DeviceId,
    pub name: String,
    pub addrs: Vec<String>,
    /// BLAKE3 of its certificate (DER): the peer must present exactly this one.
    pub cert_fingerprint: ChunkId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeersResponse {
    pub peers: Vec<PeerHint>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesResponse {
    pub devices: Vec<DeviceInfo>,
    /// The user's LAN keys (see [`LanKey`]).
    #[serde(default)]
    pub lan: Option<LanKeys>,
}

/// A secret the coordinator gives each user's devices, and replaces whenever one of them is
/// revoked. With it the devices prove to each other that they belong to the user before saying
/// which device they are (`peer::GroupProof`), and derive the identities they announce on the LAN
/// (mDNS), so that nobody else can tell who they are or follow them from network to network.
/// Never logged: its `Debug` shows nothing of it.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LanKey(ChunkId);

impl LanKey {
    pub fn new(bytes: [u8; 32]) -> LanKey {
        LanKey(ChunkId(bytes))
    }

    pub fn bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for LanKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LanKey(…)")
    }
}

/// The user's LAN key, and the one before it (accepted for a while after a rotation, until every
/// device has fetched the new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LanKeys {
    pub current: LanKey,
    #[serde(default)]
    pub previous: Option<LanKey>,
    /// When `previous` stops counting (ms since the epoch).
    #[serde(default)]
    pub previous_until_ms: u64,
}

impl LanKeys {
    /// The keys that count at `now_ms`: the current one, and the previous one until it expires.
    pub fn at(&self, now_ms: u64) -> LanKeys {
        LanKeys { previous: self.previous.filter(|_| now_ms < self.previous_until_ms), ..*self }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkList {
    pub chunks: Vec<ChunkId>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MissingResponse {
    /// The requested chunks this user has not uploaded (in request order).
    pub missing: Vec<ChunkId>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadResponse {
    pub stored: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    pub commit_id: CommitId,
    pub changes: Vec<Change>,
    /// Commit even if the origin lacks chunks the changes name: those versions are *pending*
    /// until the chunks are uploaded (see `PendingVersion`). Without it such a commit is refused
    /// with `unknown_chunk`.
    #[serde(default)]
    pub pending_ok: bool,
}

/// `GET /v1/pending`: the user's versions committed before the origin had all their chunks.
/// Other devices see them at once and may fetch them from a device that has them (a LAN peer);
/// a version is *durable* — and leaves this list — once the origin has every chunk. A pending
/// version never counts as backed up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingVersion {
    pub path: SyncPath,
    pub version: Seq,
    /// The device that committed it.
    pub device: DeviceId,
    pub since_ms: u64,
    /// Distinct chunks the origin still lacks.
    pub missing_chunks: u64,
    /// Its author reported it can no longer supply the chunks (the file changed before they were
    /// uploaded). It stays listed, and becomes durable if another device that holds it uploads.
    pub withdrawn: bool,
    /// The author is connected to the coordinator now.
    pub author_online: bool,
    /// No device has supplied a chunk of it for a while (the coordinator's `pending_stuck_after`,
    /// 10 minutes by default), or it is withdrawn: devices stop trying to fetch it until that
    /// changes, and a local edit of its path is committed on top of it.
    #[serde(default)]
    pub stuck: bool,
}

/// The oldest `MAX_PAGE` pending versions; `more` when there are others.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PendingResponse {
    pub versions: Vec<PendingVersion>,
    #[serde(default)]
    pub more: bool,
}

/// `POST /v1/pending/withdraw`: the author's pending versions it can no longer supply.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WithdrawRequest {
    pub versions: Vec<Seq>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitResponse {
    /// The new entries, in the order of the request's changes.
    pub entries: Vec<Entry>,
}

/// One path whose `base` was not the head, in a `stale_base` refusal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Conflict {
    pub path: SyncPath,
    pub head: Option<Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangesResponse {
    /// Journal entries with `since < version <= next`, in order.
    pub entries: Vec<Entry>,
    /// The cursor to ask from next.
    pub next: Seq,
    /// The journal head when the page was read.
    pub head: Seq,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TreeResponse {
    /// The seq the tree was read at.
    pub at: Seq,
    /// Live (not deleted) heads, ordered by path, after the request's `after`.
    pub entries: Vec<Entry>,
    /// Set when there are more entries: ask again with `after` = this.
    pub more_after: Option<SyncPath>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryResponse {
    pub path: SyncPath,
    /// Versions of the path after the request's `after`, oldest first.
    pub entries: Vec<Entry>,
    /// Set when there are more versions: ask again with `after` = this.
    #[serde(default)]
    pub more_after: Option<Seq>,
    /// Which of `entries` are past the coordinator's retention: replaced longer ago than it
    /// keeps versions, so they can no longer be restored (their chunks may be gone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expired: Vec<Seq>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CursorRequest {
    pub seq: Seq,
}

/// A push notification on the WebSocket subscription: the user's journal head moved, or the
/// user's device list changed (a device enrolled, revoked or reinstated, or a revocation was
/// requested): `devices` counts those changes since the coordinator started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadNotice {
    pub head: Seq,
    #[serde(default)]
    pub devices: u64,
}

/// Stable machine-readable error codes. Never reorder or rename: clients match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    InvalidJson,
    BodyTooLarge,
    Unauthorized,
    Forbidden,
    NotFound,
    InvalidPath,
    InvalidManifest,
    UnknownChunk,
    HashMismatch,
    StaleBase,
    InviteInvalid,
    Conflict,
    Internal,
    /// The coordinator knows the chunk but cannot serve it intact: its stored copy was lost in a
    /// crash or failed its hash check. It is served again once a device uploads it again.
    ChunkUnavailable,
    /// A commit with `pending_ok` would leave the device or its user with more pending versions,
    /// or chunks awaited, than the coordinator keeps: upload the chunks first, then commit.
    PendingLimit,
    /// The upload or commit would take the user past its storage quota (`GET /v1/usage` says
    /// how far): nothing was stored; try again once space is freed.
    QuotaExceeded,
}

/// `GET /v1/usage`: what counts against the user's quota, and the quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageResponse {
    /// Bytes of the distinct chunks stored for the user, and of those its pending versions await.
    pub used: u64,
    /// `None`: no quota.
    pub quota: Option<u64>,
}

// ---- relays ----

/// `POST /v1/relay/register` (a relay, with its operator token): where the relay listens and the
/// fingerprint of its certificate. Sent at start and then as its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayRegister {
    /// `https://HOST:PORT` as devices should reach it.
    pub url: String,
    /// BLAKE3 of the relay's certificate (DER), which devices pin.
    pub fingerprint: ChunkId,
}

/// The answer to [`RelayRegister`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayRegistered {
    pub name: String,
    pub region: String,
    /// The coordinator's Ed25519 public key, hex, that tickets are checked with.
    pub ticket_key: String,
    /// How often to register again; a relay not heard from for three times this is not listed.
    pub heartbeat_secs: u64,
}

/// One live relay, as `GET /v1/relays` lists them to devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    pub name: String,
    pub region: String,
    pub url: String,
    pub fingerprint: ChunkId,
}

/// `POST /v1/tickets`' answer: a ticket for the chunks asked for (`ChunkList`), which the device
/// hands to a relay with its requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketResponse {
    pub ticket: String,
    /// Milliseconds since the Unix epoch.
    pub expires_ms: u64,
}

/// A request for chunks under a ticket: what a device sends a relay (`POST /v1/chunks/fetch`
/// on the relay), and what a relay sends the coordinator for its misses (`POST
/// /v1/relay/fetch`). `list` is the chunk list a ticket by digest covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketedFetch {
    pub ticket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<Vec<ChunkId>>,
    pub chunks: Vec<ChunkId>,
}

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// For `stale_base`: each refused path with its current head.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<Conflict>,
}

/// Chunk batches (upload body, fetch response) are a sequence of frames:
/// 32-byte id, 4-byte big-endian length, then the bytes.
pub const FRAME_HEADER: usize = 32 + 4;

/// Appends one frame to `out`.
pub fn encode_frame(out: &mut Vec<u8>, id: &ChunkId, data: &[u8]) {
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Why a frame stream is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the chunk size limit")]
    TooLarge(u32),
    #[error("stream ended inside a frame")]
    Truncated,
}

/// A decoded frame: the chunk id, its bytes, and how many bytes of input the frame used.
pub type Frame<'a> = (ChunkId, &'a [u8], usize);

/// Splits the next frame off the front of `buf`, if it is complete. Lengths are bounded by
/// `max_len` before anything is allocated.
pub fn decode_frame(buf: &[u8], max_len: u32) -> Result<Option<Frame<'_>>, FrameError> {
    if buf.len() < FRAME_HEADER {
        return Ok(None);
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(&buf[..32]);
    let len = u32::from_be_bytes([buf[32], buf[33], buf[34], buf[35]]);
    if len > max_len {
        return Err(FrameError::TooLarge(len));
    }
    let end = FRAME_HEADER + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((ChunkId(id), &buf[FRAME_HEADER..end], end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invite_round_trip_and_rejects() {
        let inv = Invite {
            addr: "127.0.0.1:7443".into(),
            user: "alice".into(),
            secret: "0123456789abcdef0123456789abcdef".into(),
            fingerprint: ChunkId::of(b"cert"),
        };
        let line = inv.to_string();
        assert_eq!(line.parse::<Invite>().unwrap(), inv);
        for bad in [
            "",
            "http://x:1/alice?secret=00&fp=00",
            "shoal://x:1/Alice?secret=0123456789abcdef0123456789abcdef&fp=00",
            "shoal://x/alice?secret=0123456789abcdef0123456789abcdef&fp=00",
            &line.replace("secret=", "secrt="),
            &line[..line.len() - 2],
        ] {
            assert!(bad.parse::<Invite>().is_err(), "{bad}");
        }
    }

    #[test]
    fn frames() {
        let mut buf = Vec::new();
        let a = b"hello".as_slice();
        encode_frame(&mut buf, &ChunkId::of(a), a);
        encode_frame(&mut buf, &ChunkId::of(b""), b"");
        let (id, data, used) = decode_frame(&buf, 10).unwrap().unwrap();
        assert_eq!((id, data), (ChunkId::of(a), a));
        let (id, data, _) = decode_frame(&buf[used..], 10).unwrap().unwrap();
        assert_eq!((id, data), (ChunkId::of(b""), b"".as_slice()));
        assert_eq!(decode_frame(&buf[..used - 1], 10).unwrap(), None);
        assert_eq!(decode_frame(&buf, 4), Err(FrameError::TooLarge(5)));
    }

    proptest::proptest! {
        /// Decoders of network input never panic, and never return a frame over the size bound.
        #[test]
        fn decoders_are_total(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), max in 0u32..100) {
            if let Ok(Some((_, data, used))) = decode_frame(&bytes, max) {
                proptest::prop_assert!(data.len() as u32 <= max && used <= bytes.len());
            }
            let text = String::from_utf8_lossy(&bytes);
            let _ = text.parse::<Invite>();
            let _ = serde_json::from_slice::<CommitRequest>(&bytes);
            let _ = serde_json::from_slice::<ChangesResponse>(&bytes);
        }
    }

    #[test]
    fn names() {
        assert!(valid_user_name("alice"));
        assert!(valid_user_name("a-1_b"));
        assert!(!valid_user_name(""));
        assert!(!valid_user_name("-a"));
        assert!(!valid_user_name("Alice"));
        assert!(!valid_user_name(&"a".repeat(33)));
        assert!(valid_device_name("Alice's laptop"));
        assert!(!valid_device_name("bad\nname"));
    }
}
