//! An S3 server on loopback for benchmarks (the tests' s3s-fs server, as a process): creates
//! bucket BUCKET under DIR, prints `http://127.0.0.1:PORT` on its first line, then serves until
//! its standard input closes. Credentials are `shoal_packs::testing`'s.
//!
//! `cargo run --release --example s3server -p shoal-packs --features test-s3 -- DIR BUCKET`

use std::io::Read;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, bucket] = &args[..] else {
        eprintln!("usage: s3server DIR BUCKET");
        std::process::exit(2);
    };
    let server = shoal_packs::testing::S3TestServer::start_in(std::path::Path::new(dir), bucket);
    println!("{}", server.endpoint());
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(server);
}
