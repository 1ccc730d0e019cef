//! Who may revoke a device. A device's token is one credential: if a device is stolen or its
//! agent goes wrong, it must not be able to lock its user out. So:
//! - a device may revoke itself, unless it is the user's last active device;
//! - revoking another device takes two of the user's active devices: one asks, and another
//!   (neither the first nor the device to be revoked) asks for the same within
//!   [`REQUEST_TTL_MS`];
//! - the operator revokes any device at once (`shoal-coordinator device revoke`), and can
//!   reinstate one revoked by mistake (`device reinstate`).
//!
//! The rule is a pure function ([`decide`]); the API applies it under the user's lock.

use shoal_protocol::DeviceId;
use shoal_protocol::api::RevokeRequest;

/// How long a request to revoke another device waits for a second device: long enough to walk to
/// another machine, short enough that an old request cannot be completed by surprise.
pub const REQUEST_TTL_MS: u64 = 10 * 60 * 1000;

/// What a device's request to revoke a device does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Revoke it now: the device revokes itself, or confirms `requested_by`'s request.
    Revoke { requested_by: Option<DeviceId> },
    /// Record this request, which waits for a second device.
    Request(RevokeRequest),
    /// It is revoked already: nothing changes.
    AlreadyRevoked,
    /// Refused, for the reason given.
    Refuse(&'static str),
}

/// A device's current standing, as the rule needs it.
#[derive(Debug, Clone, Copy)]
pub struct Standing {
    pub id: DeviceId,
    pub revoked: bool,
}

/// Decides what `caller`'s request to revoke `target` does, given the user's `devices` and the
/// request already waiting to revoke `target`, if any.
pub fn decide(
    caller: DeviceId,
    target: DeviceId,
    devices: &[Standing],
    waiting: Option<RevokeRequest>,
    now_ms: u64,
) -> Decision {
    let active = |id: &DeviceId| devices.iter().any(|d| d.id == *id && !d.revoked);
    if !active(&target) {
        return Decision::AlreadyRevoked;
    }
    if caller == target {
        if devices.iter().filter(|d| !d.revoked).count() <= 1 {
            return Decision::Refuse(
                "this is the user's last active device: revoking it would lock the user out; the operator can \
                 revoke it (shoal-coordinator device revoke)",
            );
        }
        return Decision::Revoke { requested_by: None };
    }
    match waiting.filter(|w| w.expires_ms > now_ms && w.by != target && active(&w.by)) {
        Some(w) if w.by != caller => Decision::Revoke { requested_by: Some(w.by) },
        _ => Decision::Request(RevokeRequest { by: caller, expires_ms: now_ms + REQUEST_TTL_MS }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> DeviceId {
        DeviceId([n; 16])
    }

    fn user(revoked: &[u8]) -> Vec<Standing> {
        (1..=4).map(|n| Standing { id: id(n), revoked: revoked.contains(&n) }).collect()
    }

    fn check(caller: u8, target: u8, devices: &[Standing], waiting: Option<(u8, u64)>, want: Decision) {
        let waiting = waiting.map(|(by, expires_ms)| RevokeRequest { by: id(by), expires_ms });
        let got = decide(id(caller), id(target), devices, waiting, 1_000);
        assert_eq!(got, want, "caller {caller} target {target} waiting {waiting:?}");
    }

    fn request(by: u8) -> Decision {
        Decision::Request(RevokeRequest { by: id(by), expires_ms: 1_000 + REQUEST_TTL_MS })
    }

    #[test]
    fn one_device_alone_never_revokes_another() {
        let all = user(&[]);
        check(1, 2, &all, None, request(1));
        // Asking again only renews the request.
        check(1, 2, &all, Some((1, 5_000)), request(1));
        // A second device completes it.
        check(3, 2, &all, Some((1, 5_000)), Decision::Revoke { requested_by: Some(id(1)) });
        // Not once the request expired, nor when its author was revoked since.
        check(3, 2, &all, Some((1, 1_000)), request(3));
        check(3, 2, &user(&[1]), Some((1, 5_000)), request(3));
        // The target cannot "confirm" a request against itself into anything but its own
        // revocation, which it may do anyway.
        check(2, 2, &all, Some((1, 5_000)), Decision::Revoke { requested_by: None });
    }

    #[test]
    fn a_device_revokes_itself_unless_it_is_the_last() {
        check(1, 1, &user(&[]), None, Decision::Revoke { requested_by: None });
        let last = user(&[2, 3, 4]);
        assert!(matches!(decide(id(1), id(1), &last, None, 0), Decision::Refuse(_)));
        check(1, 2, &last, None, Decision::AlreadyRevoked);
    }

    #[test]
    fn two_devices_cannot_revoke_each_other_without_a_third() {
        let two = user(&[3, 4]);
        check(1, 2, &two, None, request(1));
        // The other device is the target: its request never counts.
        check(1, 2, &two, Some((2, 5_000)), request(1));
    }
}
