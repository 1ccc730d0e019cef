//! Process limits: the open-file limit raised to what the system allows, for programs that hold
//! many sockets and files at once (the coordinator's connections, an agent's peers, watcher and
//! open files).

use rustix::process::{Resource, getrlimit, setrlimit};

/// Raises the soft limit on open files to the hard limit and returns the limit now in force
/// (`None`: unlimited). A failure to raise it is returned with the limit as it stays.
pub fn raise_open_files() -> (Option<u64>, Option<rustix::io::Errno>) {
    let mut lim = getrlimit(Resource::Nofile);
    let mut failed = None;
    if let Some(hard) = lim.maximum
        && lim.current.is_some_and(|cur| cur < hard)
    {
        lim.current = Some(hard);
        failed = setrlimit(Resource::Nofile, lim).err();
        lim = getrlimit(Resource::Nofile);
    }
    (lim.current, failed)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_reaches_the_hard_limit() {
        let (now, failed) = super::raise_open_files();
        let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
        assert!(failed.is_some() || now == hard, "{now:?} {hard:?} {failed:?}");
    }
}
