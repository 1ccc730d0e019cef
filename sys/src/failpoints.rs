//! Named failpoints (the `fail` crate): places where a test build of a Shoal program can be made
//! to misbehave on purpose, switched on through the `FAILPOINTS` environment variable of the
//! process (`NAME=ACTIONS;NAME=ACTIONS`, actions as `fail::cfg` takes them: `return`,
//! `return(VALUE)`, `off`, with `N%` and `N*` prefixes). The end-to-end tests and netsim set it
//! when they start a process. Compiled in only with this crate's `failpoints` feature (which the
//! programs' `test-faults` features turn on); without it `value` is always `None` and `setup`
//! leaves `FAILPOINTS` alone (other programs use the name too).
//!
//! The points, by program:
//!
//! | name | value | what it does |
//! |---|---|---|
//! | `peer-serve` (agent) | `corrupt`, `truncate`, `endless`, `stall`, `trickle`, `slow` | answers to LAN peers go wrong that way (`peer/serve.rs`) |
//! | `crash-after-pending-commit` (agent) | none | exits (status 3) right after the coordinator answers a peer-first commit, before the agent records it |
//! | `announce-delay` (agent) | milliseconds | the coordinator's answer to the peer announcement arrives that much later |
//! | `relay-serve` (relay) | `corrupt` | every chunk served with its first byte flipped |

/// The value failpoint `name` is switched on with (`return(VALUE)`; an empty string for a bare
/// `return`), or `None` while it is off.
pub fn value(name: &str) -> Option<String> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!(name, |v: Option<String>| Some(v.unwrap_or_default()));
    let _ = name;
    None
}

/// Switches on the failpoints `FAILPOINTS` names, in a build that has them. Call once at
/// start. An error names what is wrong with it.
pub fn setup() -> Result<(), String> {
    if !cfg!(feature = "failpoints") {
        return Ok(());
    }
    let Some(spec) = std::env::var_os("FAILPOINTS") else { return Ok(()) };
    let spec = spec.into_string().map_err(|_| "FAILPOINTS is not UTF-8".to_string())?;
    for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, actions) =
            item.split_once('=').ok_or_else(|| format!("FAILPOINTS: `{item}` is not NAME=ACTIONS"))?;
        configure(name.trim(), actions.trim()).map_err(|e| format!("FAILPOINTS: `{item}`: {e}"))?;
    }
    Ok(())
}

#[cfg(feature = "failpoints")]
fn configure(name: &str, actions: &str) -> Result<(), String> {
    fail::cfg(name, actions)
}

#[cfg(not(feature = "failpoints"))]
fn configure(_name: &str, _actions: &str) -> Result<(), String> {
    Err("no failpoints in this build".into())
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    use super::*;

    #[test]
    fn a_point_returns_its_value_while_on() {
        assert_eq!(value("test-point"), None);
        configure("test-point", "return(corrupt)").unwrap();
        assert_eq!(value("test-point").as_deref(), Some("corrupt"));
        configure("test-point", "return").unwrap();
        assert_eq!(value("test-point").as_deref(), Some(""));
        configure("test-point", "off").unwrap();
        assert_eq!(value("test-point"), None);
        assert!(configure("test-point", "explode(now)").is_err());
    }
}
