//! The introduction two devices make on a new connection, before either serves the other
//! anything (the messages are in `shoal_protocol::peer`). Both sides derive a *binding* from
//! the connection's TLS session (an exporter); every proof is over it, so none can be replayed on
//! another connection, and a party in the middle, which has a TLS session with each side, holds
//! two different bindings and can pass nothing along.
//!
//! Nothing identifying leaves a device before the other side has shown it is one of the user's
//! devices: the caller first proves it holds the user's LAN key (a keyed hash, the same length
//! and as random-looking for every device); only then does the called device send its
//! certificate and signature; only once those check out (the device the caller meant, listed,
//! not revoked) does the caller send its own. Whoever fails a check closes the connection
//! without another word.

use std::time::Duration;

use shoal_protocol::peer::{
    BINDING_LABEL, BINDING_LEN, CALLED_CONTEXT, CALLER_CONTEXT, DeviceProof, GroupProof, MAX_INTRO_MESSAGE, WELCOME,
    frame_intro,
};
use shoal_protocol::{ChunkId, DeviceId};

use super::tls::{Identity, Refusal, Roster};

/// How long the whole introduction may take: it is four short messages.
pub const INTRO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the called side waits for the caller's first message, which a device sends as soon as
/// the handshake is over: a stranger holding connections open without it holds them briefly.
const PROOF_WAIT: Duration = Duration::from_secs(1);

/// The device on the other end, as its introduction established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Introduced {
    pub device: DeviceId,
    /// Its certificate's fingerprint: it stays admitted while the roster lists it unrevoked.
    pub fingerprint: ChunkId,
    /// The id of its current run.
    pub session: [u8; 16],
    /// This connection's binding: both ends hold the same, so both settle a choice between two
    /// connections alike by it.
    pub binding: [u8; BINDING_LEN],
}

/// Why an introduction failed.
#[derive(Debug, thiserror::Error)]
pub enum IntroError {
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    #[error("the connection failed: {0}")]
    Connection(String),
    #[error("malformed introduction: {0}")]
    Malformed(String),
    #[error("the introduction took longer than {}s", INTRO_TIMEOUT.as_secs())]
    TimedOut,
}

/// Closed with this code (and no reason) when an introduction is refused.
const REFUSED: u32 = 1;

/// Introduces this device as the caller on `conn`. With `expect`, the called device must be that
/// one. On failure the connection is closed.
pub async fn as_caller(
    conn: &quinn::Connection,
    identity: &Identity,
    roster: &Roster,
    session: [u8; 16],
    expect: Option<DeviceId>,
) -> Result<Introduced, IntroError> {
    let r = tokio::time::timeout(INTRO_TIMEOUT, caller(conn, identity, roster, session, expect)).await;
    finish(conn, r)
}

/// Introduces this device as the called one on `conn`. On failure the connection is closed.
pub async fn as_called(
    conn: &quinn::Connection,
    identity: &Identity,
    roster: &Roster,
    session: [u8; 16],
) -> Result<Introduced, IntroError> {
    let r = tokio::time::timeout(INTRO_TIMEOUT, called(conn, identity, roster, session)).await;
    finish(conn, r)
}

fn finish(
    conn: &quinn::Connection,
    r: Result<Result<Introduced, IntroError>, tokio::time::error::Elapsed>,
) -> Result<Introduced, IntroError> {
    let r = r.unwrap_or(Err(IntroError::TimedOut));
    match &r {
        Ok(_) => super::tls::admitted(conn),
        Err(_) => conn.close(REFUSED.into(), b""),
    }
    r
}

async fn caller(
    conn: &quinn::Connection,
    identity: &Identity,
    roster: &Roster,
    session: [u8; 16],
    expect: Option<DeviceId>,
) -> Result<Introduced, IntroError> {
    let lan = roster.lan().ok_or(Refusal::NoLanKey)?;
    let binding = binding(conn)?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(io)?;
    send.write_all(&framed(&GroupProof::compute(lan.current.bytes(), &binding).0)?).await.map_err(io)?;
    let theirs = DeviceProof::decode(&read(&mut recv).await?).map_err(|e| IntroError::Malformed(e.to_string()))?;
    let met = check(identity, roster, &theirs, CALLED_CONTEXT, &binding)?;
    if let Some(expected) = expect.filter(|e| *e != met.device) {
        return Err(Refusal::WrongDevice { expected, found: met.device }.into());
    }
    let (scheme, signature) =
        identity.sign(CALLER_CONTEXT, &binding).map_err(|e| IntroError::Connection(e.to_string()))?;
    let mine = DeviceProof { session, cert: identity.cert().to_vec(), scheme, signature };
    send.write_all(&framed(&mine.encode())?).await.map_err(io)?;
    send.finish().map_err(|e| IntroError::Connection(e.to_string()))?;
    match read(&mut recv).await?.as_slice() {
        [WELCOME] => Ok(met),
        other => Err(IntroError::Malformed(format!("{} bytes instead of a welcome", other.len()))),
    }
}

async fn called(
    conn: &quinn::Connection,
    identity: &Identity,
    roster: &Roster,
    session: [u8; 16],
) -> Result<Introduced, IntroError> {
    let binding = binding(conn)?;
    let first = async {
        let (send, mut recv) = conn.accept_bi().await.map_err(io)?;
        let proof = read(&mut recv).await?;
        Ok::<_, IntroError>((send, recv, proof))
    };
    let (mut send, mut recv, proof) =
        tokio::time::timeout(PROOF_WAIT, first).await.map_err(|_| IntroError::TimedOut)??;
    let proof = GroupProof::decode(&proof).map_err(|e| IntroError::Malformed(e.to_string()))?;
    let lan = roster.lan().ok_or(Refusal::NoLanKey)?;
    // The key before the current one still counts: a device may not have fetched the new one.
    let keys = std::iter::once(lan.current).chain(lan.previous);
    if !keys.into_iter().any(|k| proof.verify(k.bytes(), &binding)) {
        return Err(Refusal::NotOfThisUser.into());
    }
    let (scheme, signature) =
        identity.sign(CALLED_CONTEXT, &binding).map_err(|e| IntroError::Connection(e.to_string()))?;
    let mine = DeviceProof { session, cert: identity.cert().to_vec(), scheme, signature };
    send.write_all(&framed(&mine.encode())?).await.map_err(io)?;
    let theirs = DeviceProof::decode(&read(&mut recv).await?).map_err(|e| IntroError::Malformed(e.to_string()))?;
    let met = check(identity, roster, &theirs, CALLER_CONTEXT, &binding)?;
    send.write_all(&framed(&[WELCOME])?).await.map_err(io)?;
    send.finish().map_err(|e| IntroError::Connection(e.to_string()))?;
    Ok(met)
}

/// Checks a device's proof: a certificate of the user's CA, valid now, signed over `context`
/// and the binding, listed by the coordinator for a device not revoked.
fn check(
    identity: &Identity,
    roster: &Roster,
    proof: &DeviceProof,
    context: &[u8],
    binding: &[u8],
) -> Result<Introduced, Refusal> {
    identity.check(&proof.cert, proof.scheme, &proof.signature, context, binding)?;
    let device = roster.authorize_cert(&proof.cert)?;
    let mut bound = [0u8; BINDING_LEN];
    bound.copy_from_slice(binding);
    Ok(Introduced { device, fingerprint: ChunkId::of(&proof.cert), session: proof.session, binding: bound })
}

/// `msg` framed for sending; a message of ours too large to frame (a device certificate past
/// 8 KiB) is a failure of this introduction, not a panic.
fn framed(msg: &[u8]) -> Result<Vec<u8>, IntroError> {
    frame_intro(msg).map_err(|e| IntroError::Malformed(e.to_string()))
}

/// The value both ends derive from this connection's TLS session.
fn binding(conn: &quinn::Connection) -> Result<[u8; BINDING_LEN], IntroError> {
    let mut out = [0u8; BINDING_LEN];
    conn.export_keying_material(&mut out, BINDING_LABEL, b"")
        .map_err(|_| IntroError::Connection("no keying material to bind the introduction to".into()))?;
    Ok(out)
}

/// Reads one introduction message (its 2-byte length, bounded, then its bytes).
async fn read(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, IntroError> {
    let mut len = [0u8; 2];
    recv.read_exact(&mut len).await.map_err(|e| IntroError::Connection(e.to_string()))?;
    let len = u16::from_be_bytes(len) as usize;
    if len > MAX_INTRO_MESSAGE {
        return Err(IntroError::Malformed(format!("a message of {len} bytes")));
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf).await.map_err(|e| IntroError::Connection(e.to_string()))?;
    Ok(buf)
}

fn io(e: impl std::fmt::Display) -> IntroError {
    IntroError::Connection(e.to_string())
}
