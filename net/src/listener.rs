//! The accept loop of a public HTTPS listener (the coordinator's; a relay's), and the limits that keep one client from starving
//! everyone else: a cap on open connections in total and per source address, a deadline for the
//! TLS handshake and for each request's headers (which also closes idle HTTP/1 keep-alive
//! connections), a deadline on any connection that moves no byte at all (which also finds dead
//! peers), and a limit on HTTP/2 streams. Connections over a cap are closed at once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;

/// Time a client has to complete the TLS handshake. A real device on a slow link needs a few
/// round trips; ten seconds is generous and bounds what a silent connection holds.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a request's headers once the server waits for them, including
/// between requests on a kept-alive connection: a device sends its headers at once (and closes its
/// own idle connections after 4 s), while a client that dribbles half a request loses its slot.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most open connections in total (further capped by the file-descriptor limit). A device keeps
/// two or three (API, push subscription, a parallel fetch), so this serves well over a thousand
/// devices at once.
pub const MAX_CONNECTIONS: usize = 8192;
/// Most open connections from one source address: enough for a few dozen devices behind one NAT,
/// few enough that one address cannot take a meaningful share of the total.
pub const MAX_CONNECTIONS_PER_ADDR: usize = 256;
/// File descriptors kept free for everything that is not a client connection (packs, the
/// database, logs).
const FD_RESERVE: usize = 256;
/// A connection on which nothing has been read or written for this long is closed, whatever state
/// it is in (after TLS but before a request, an idle HTTP/2 connection, a stalled body). Longer
/// than the longest quiet time of a real device: a long-poll waits up to 60 s, and a push
/// subscription gets a ping every 20 s.
pub const CONN_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often a connection's idle time is checked.
const IDLE_CHECK: Duration = Duration::from_secs(5);
/// Most concurrent HTTP/2 streams per connection; a device's parallel fetches use a handful.
const H2_MAX_STREAMS: u32 = 128;

/// Raises the soft limit on open files to the hard limit and returns how many connections the
/// server can therefore hold open at once.
pub fn connection_budget() -> usize {
    let (limit, failed) = shoal_sys::limits::raise_open_files();
    if let Some(e) = failed {
        tracing::warn!(error = %e, "could not raise the open-file limit");
    }
    let fds = limit.map_or(usize::MAX, |c| usize::try_from(c).unwrap_or(usize::MAX));
    MAX_CONNECTIONS.min(fds.saturating_sub(FD_RESERVE)).max(1)
}

/// Open connections, in total and per source address.
#[derive(Default)]
struct Counts {
    total: usize,
    per_addr: HashMap<IpAddr, usize>,
}

/// One admitted connection; gives its slot back when dropped.
struct Slot {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total -= 1;
        if let Some(n) = c.per_addr.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_addr.remove(&self.ip);
            }
        }
    }
}

/// The address a connection is counted under: an IPv4 address (also when written IPv4-mapped), or
/// an IPv6 /64, the block one host or network is usually given.
fn addr_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

fn admit(counts: &Arc<Mutex<Counts>>, ip: IpAddr, limits: Limits) -> Option<Slot> {
    let ip = addr_key(ip);
    let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
    let here = c.per_addr.get(&ip).copied().unwrap_or(0);
    if c.total >= limits.total || here >= limits.per_addr {
        return None;
    }
    c.total += 1;
    c.per_addr.insert(ip, here + 1);
    Some(Slot { counts: counts.clone(), ip })
}

/// Serves `router` over TLS on `listener` until `cancel`, counting connections closed over a
/// cap in `refused`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    router: Router,
    refused: Counter,
    max_total: usize,
    cancel: CancellationToken,
) {
    let limits = Limits { total: max_total, per_addr: MAX_CONNECTIONS_PER_ADDR };
    let on_refused = || {
        refused.inc();
    };
    accept_loop(listener, limits, on_refused, cancel.clone(), |sock, peer| {
        let _ = sock.set_nodelay(true);
        // Handlers that need the client's address (peer hints) read it as `ConnectInfo`.
        let router = router.clone().layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        serve_one(sock, peer, acceptor.clone(), TowerToHyperService::new(router), cancel.clone())
    })
    .await;
}

/// Connection caps of one listener.
#[derive(Clone, Copy)]
struct Limits {
    total: usize,
    per_addr: usize,
}

/// Accepts connections until `cancel`, closing at once those over `limits` (after calling
/// `on_refused`) and running `handle` for the others; each holds its slot until it ends.
async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    limits: Limits,
    on_refused: impl Fn(),
    cancel: CancellationToken,
    mut handle: F,
) where
    F: FnMut(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let counts: Arc<Mutex<Counts>> = Arc::default();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (sock, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for connections to close.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = admit(&counts, peer.ip(), limits) else {
            on_refused();
            tracing::debug!(%peer, "connection limit reached; closing");
            continue;
        };
        let conn = handle(sock, peer);
        conns.spawn(async move {
            let _slot = slot;
            conn.await;
        });
        while conns.try_join_next().is_some() {}
    }
    conns.shutdown().await;
}

async fn serve_one(
    sock: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    service: TowerToHyperService<Router>,
    cancel: CancellationToken,
) {
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    // No HTTP/2 keep-alive pings: they would keep an idle connection "active" for ever. Dead and
    // idle peers alike are closed by the idle deadline below.
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(H2_MAX_STREAMS);
    let activity = Activity::default();
    let conn =
        builder.serve_connection_with_upgrades(TokioIo::new(Watched { io: tls, activity: activity.clone() }), service);
    tokio::select! {
        r = conn => if let Err(e) = r { tracing::debug!(%peer, error = %e, "connection ended with an error") },
        () = activity.idle_for(CONN_IDLE_TIMEOUT) => tracing::debug!(%peer, "closing an idle connection"),
        _ = cancel.cancelled() => {}
    }
}

/// When a connection last moved a byte.
#[derive(Clone)]
struct Activity(Arc<Mutex<tokio::time::Instant>>);

impl Default for Activity {
    fn default() -> Self {
        Activity(Arc::new(Mutex::new(tokio::time::Instant::now())))
    }
}

impl Activity {
    fn touch(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
    }

    /// Returns once no byte has moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last = *self.0.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() >= limit {
                return;
            }
            tokio::time::sleep((last + limit).saturating_duration_since(tokio::time::Instant::now()).max(IDLE_CHECK))
                .await;
        }
    }
}

/// A stream that records its activity.
struct Watched<T> {
    io: T,
    activity: Activity,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Binds the public listener on `listen` and, if asked, the metrics listener on `metrics`; an
/// error names the address and, for the metrics one, the flag that moves it.
pub async fn bind_with_metrics(
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
) -> anyhow::Result<(tokio::net::TcpListener, Option<tokio::net::TcpListener>)> {
    use anyhow::Context;
    let public = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let metrics = match metrics {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the metrics listener {a} (choose another with --metrics-listen)"))?,
        ),
        None => None,
    };
    Ok((public, metrics))
}

/// Serves `router` over plain HTTP on `listener` until `cancel`: the metrics listener, which
/// should only ever be reachable from the operator's own network.
pub async fn serve_plain(listener: tokio::net::TcpListener, router: Router, cancel: CancellationToken) {
    // A scraper needs one connection; a few dozen cover any number of them.
    let limits = Limits { total: 64, per_addr: 64 };
    accept_loop(
        listener,
        limits,
        || {},
        cancel.clone(),
        |sock, _| {
            let service = TowerToHyperService::new(router.clone());
            let token = cancel.clone();
            async move {
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
                tokio::select! {
                    _ = builder.serve_connection(TokioIo::new(sock), service) => {}
                    _ = token.cancelled() => {}
                }
            }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_per_address_and_returned() {
        let counts: Arc<Mutex<Counts>> = Arc::default();
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let limits = Limits { total: 5, per_addr: 3 };
        let held: Vec<Slot> = (0..3).map(|_| admit(&counts, a, limits).unwrap()).collect();
        assert!(admit(&counts, a, limits).is_none(), "per-address cap");
        let other = admit(&counts, b, limits).expect("another address is not affected");
        assert!(admit(&counts, b, Limits { total: 4, ..limits }).is_none(), "total cap");
        drop(other);
        drop(held);
        let c = counts.lock().unwrap();
        assert_eq!((c.total, c.per_addr.len()), (0, 0));
    }

    #[test]
    fn ipv6_is_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let key = |s: &str| addr_key(s.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::2"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
    }
}
