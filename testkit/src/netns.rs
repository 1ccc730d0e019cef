//! Network namespaces for tests that need a real LAN (mDNS multicast, addresses that are not
//! loopback): made with `ip` (root only), deleted on drop.

use std::process::Command;

/// Two network namespaces joined by a veth pair, deleted on drop: `a` holds 10.77.0.1; `b` holds
/// 10.77.0.2, and 10.78.0.1 on its loopback interface, where the coordinator listens (`a` routes
/// to it through `b`; mDNS never announces loopback addresses, so peers never use it).
pub struct Lan {
    pub a: String,
    pub b: String,
}

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {} failed (network namespaces need root): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lan {
    pub fn create() -> Lan {
        // Unique per test process and per Lan in it (tests run in parallel).
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10;
        let tag = std::process::id() % 10_000 * 10 + n;
        let lan = Lan { a: format!("shoal-a-{tag}"), b: format!("shoal-b-{tag}") };
        let (va, vb) = (format!("sva{tag}"), format!("svb{tag}"));
        ip(&["netns", "add", &lan.a]);
        ip(&["netns", "add", &lan.b]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &lan.a]);
        ip(&["link", "set", &vb, "netns", &lan.b]);
        ip(&["-n", &lan.a, "addr", "add", "10.77.0.1/24", "dev", &va]);
        ip(&["-n", &lan.b, "addr", "add", "10.77.0.2/24", "dev", &vb]);
        ip(&["-n", &lan.b, "addr", "add", "10.78.0.1/32", "dev", "lo"]);
        for (ns, dev) in [(&lan.a, &va), (&lan.b, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", &lan.a, "route", "add", "10.78.0.1/32", "via", "10.77.0.2"]);
        lan
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}
