//! An S3 server for tests: s3s-fs (a real implementation of the S3 protocol over a directory,
//! with signature checking) on a loopback port, in a thread of its own, so sync and async tests
//! and other processes (a coordinator under test) can all use it. It can be stopped and started
//! again on the same port, to play an outage.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

use crate::s3::S3Config;

pub const ACCESS_KEY: &str = "shoal-test-access-key";
pub const SECRET_KEY: &str = "shoal-test-secret-key-0123456789";

/// A running (or stopped) S3 server.
pub struct S3TestServer {
    root: Root,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl S3TestServer {
    /// Starts a server with one (empty) bucket, `bucket`, in a temporary directory.
    pub fn start(bucket: &str) -> Self {
        let root = tempfile::tempdir().expect("a temporary directory for the S3 server");
        Self::with_root(Root::Temp(root), bucket)
    }

    /// Starts a server with one (empty) bucket, `bucket`, kept in `dir`.
    pub fn start_in(dir: &Path, bucket: &str) -> Self {
        Self::with_root(Root::Kept(dir.to_path_buf()), bucket)
    }

    fn with_root(root: Root, bucket: &str) -> Self {
        std::fs::create_dir_all(root.path().join(bucket)).expect("creating the bucket's directory");
        let mut server = S3TestServer { root, addr: "127.0.0.1:0".parse().unwrap(), stop: None, thread: None };
        server.resume();
        server
    }

    /// Where it listens: `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The directory behind it: bucket `B`'s object `K` is the file `B/K` in it.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The file that holds `bucket`'s object `key`.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.path().join(bucket).join(key)
    }

    /// A backend config for `bucket` on this server, path-style, with the right credentials and
    /// no local cache (every read goes to the server).
    pub fn config(&self, bucket: &str, prefix: &str) -> S3Config {
        S3Config {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            region: "us-east-1".to_string(),
            endpoint: Some(self.endpoint()),
            path_style: true,
            cache_bytes: 0,
            access_key_id: ACCESS_KEY.to_string(),
            secret_access_key: SECRET_KEY.to_string(),
        }
    }

    /// Stops answering: the listener closes and open connections are dropped.
    pub fn pause(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Answers again, on the same port (the first time, on a free one).
    pub fn resume(&mut self) {
        if self.thread.is_some() {
            return;
        }
        let root = self.root.path().to_path_buf();
        let want = self.addr;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime for the S3 server");
            rt.block_on(serve(root, want, ready_tx, stop_rx));
            // Connections still open are dropped with the runtime.
            rt.shutdown_background();
        });
        self.addr = ready_rx.recv().expect("the S3 server starts");
        self.stop = Some(stop_tx);
        self.thread = Some(thread);
    }
}

/// Where a server keeps its objects.
enum Root {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl Root {
    fn path(&self) -> &Path {
        match self {
            Root::Temp(t) => t.path(),
            Root::Kept(p) => p,
        }
    }
}

impl Drop for S3TestServer {
    fn drop(&mut self) {
        self.pause();
    }
}

async fn serve(
    root: PathBuf,
    want: SocketAddr,
    ready: std::sync::mpsc::Sender<SocketAddr>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let fs = s3s_fs::FileSystem::new(&root).expect("s3s-fs over the server's directory");
    let service = {
        let mut b = S3ServiceBuilder::new(fs);
        b.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        b.build()
    };
    // The port a paused server had may take a moment to be free again.
    let mut tries = 0;
    let listener = loop {
        match tokio::net::TcpListener::bind(want).await {
            Ok(l) => break l,
            Err(e) if tries < 50 => {
                tries += 1;
                tracing::debug!(error = %e, "S3 test server: port busy, retrying");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the S3 test server cannot listen on {want}: {e}"),
        }
    };
    let _ = ready.send(listener.local_addr().expect("a bound listener has an address"));
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((sock, _)) = accepted else { continue };
                let conn = http.serve_connection(TokioIo::new(sock), service.clone()).into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        }
    }
}
