//! Raising the open-file limit for `serve` and `proxy`: every session is a
//! socket, and the usual soft limit (1024) would cap a server far below
//! what it can hold.

/// Raises this process's soft open-file limit to its hard limit; returns
/// the limit in force.
pub fn raise() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    let hard = lim.maximum;
    if lim.current != hard {
        lim.current = hard;
        if setrlimit(Resource::Nofile, lim).is_err() {
            return getrlimit(Resource::Nofile).current;
        }
    }
    getrlimit(Resource::Nofile).current
}
