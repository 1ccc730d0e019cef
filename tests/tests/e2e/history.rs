//! Version history: `history`, `get --version`, `restore`, and `put`/`get` without a folder.

use crate::harness::*;

#[test]
fn history_get_and_restore_round_trip() {
    let (tmp, _coord, devices) = world("kim", &["a", "b"]);
    let [a, b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    for v in ["one", "two", "three"] {
        a.write("doc.txt", v.as_bytes());
        a.sync();
    }
    std::fs::remove_file(a.path("doc.txt")).unwrap();
    a.sync();

    let out = a.shoal(&["history", "doc.txt", "--json"]);
    assert!(out.status.success());
    let h: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(h.len(), 4);
    for field in ["version", "size", "hash", "deleted", "device", "time"] {
        assert!(h[0].get(field).is_some(), "history entries carry {field}");
    }
    assert_eq!(h[3]["deleted"], true);
    assert_eq!(h[1]["hash"], file_hash(b"two"));
    let v2 = h[1]["version"].as_u64().unwrap().to_string();

    // get --version of a deleted file's old version.
    let got = tmp.path().join("got.txt");
    let out = b.shoal(&["get", "doc.txt", got.to_str().unwrap(), "--version", &v2]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&got).unwrap(), b"two");
    // The head is a deletion: plain get explains.
    let out = b.shoal(&["get", "doc.txt", got.to_str().unwrap()]);
    assert!(!out.status.success());

    // restore brings it back as a new version; devices follow.
    let out = b.shoal(&["restore", "doc.txt", "--version", &v2]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    sync_all(&[&a, &b]);
    assert_eq!(a.read("doc.txt").unwrap(), b"two");
    let h: Vec<serde_json::Value> = serde_json::from_slice(&a.shoal(&["history", "doc.txt", "--json"]).stdout).unwrap();
    assert_eq!(h.len(), 5, "restore adds a version, rewrites none");

    // put and get work without a running folder.
    let src = tmp.path().join("upload.bin");
    let data = noise(5, 5 * 1024 * 1024 + 17);
    std::fs::write(&src, &data).unwrap();
    let out = b.shoal(&["put", src.to_str().unwrap(), "inbox/upload.bin"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let back = tmp.path().join("back.bin");
    let out = a.shoal(&["get", "inbox/upload.bin", back.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(std::fs::read(&back).unwrap(), data);
    sync_all(&[&a, &b]);
    assert_eq!(b.read("inbox/upload.bin").unwrap(), data);

    // ls shows the tree; ls --at shows an older one.
    let ls: Vec<serde_json::Value> = serde_json::from_slice(&a.shoal(&["ls", "--json", "--at", &v2]).stdout).unwrap();
    assert_eq!(ls.len(), 1);
    assert_eq!(ls[0]["path"], "doc.txt");
}
