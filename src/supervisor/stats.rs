//! Process statistics and stray reaping, from one sysinfo `System` kept by one sampler task.
//!
//! Every `SAMPLE_INTERVAL` the sampler refreshes the process table (processes only, no threads),
//! sums CPU %, resident memory and CPU time over each instance's whole tree (its pid and every
//! descendant) into `Instance.process`, and, when the sidecar is a child subreaper, sweeps
//! strays: children of the sidecar that are not a live `tokio::process::Child` of ours.
//!
//! Reaping strays must never steal an exit status tokio is waiting for. The rules:
//! - a pid in `OwnedPids` (a `Child` the supervisor still holds) is never touched;
//! - a zombie is reaped (`waitpid(pid, WNOHANG)` on that pid only, never `-1`) only when it was
//!   already a zombie at the previous sweep: anything that waits for its own child reaps it as
//!   soon as SIGCHLD arrives, not seconds later;
//! - a live stray is killed only when an earlier sample saw it (same pid, same start time) as a
//!   descendant of an instance: an Ollama runner orphaned by its `ollama serve`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use sysinfo::{Pid, ProcessRefreshKind, ProcessStatus, ProcessesToUpdate, System};

pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);

/// One instance's process tree at one sample.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct TreeStats {
    /// Percent of one core, summed over the tree.
    pub cpu_percent: f32,
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    pub processes: usize,
}

/// Pids whose exit status belongs to a `tokio::process::Child` the supervisor still holds.
#[derive(Debug, Default)]
pub struct OwnedPids(Mutex<HashSet<u32>>);

impl OwnedPids {
    /// Registers `pid` until the returned guard drops.
    pub fn hold(self: &Arc<Self>, pid: u32) -> OwnedPid {
        if let Ok(mut set) = self.0.lock() {
            set.insert(pid);
        }
        OwnedPid {
            set: self.clone(),
            pid,
        }
    }

    pub fn snapshot(&self) -> HashSet<u32> {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Keeps a pid in `OwnedPids` while alive.
#[derive(Debug)]
pub struct OwnedPid {
    set: Arc<OwnedPids>,
    pid: u32,
}

impl Drop for OwnedPid {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.0.lock() {
            set.remove(&self.pid);
        }
    }
}

pub struct Sampler {
    sys: System,
    me: Pid,
    /// Descendants of instances seen by earlier samples: pid → start time.
    known: HashMap<Pid, u64>,
    /// Stray zombies seen at the previous sweep.
    zombies: HashSet<Pid>,
}

impl Default for Sampler {
    fn default() -> Self {
        Self::new()
    }
}

impl Sampler {
    pub fn new() -> Sampler {
        // sysinfo keeps `/proc/<pid>/stat` files open by default, up to half the fd limit: the
        // proxy needs those descriptors for connections.
        sysinfo::set_open_files_limit(0);
        Sampler {
            sys: System::new(),
            me: Pid::from_u32(std::process::id()),
            known: HashMap::new(),
            zombies: HashSet::new(),
        }
    }

    /// Refreshes the process table (blocking: reads `/proc`; run it off the async workers).
    pub fn refresh(&mut self) {
        self.sys.refresh_processes_specifics(
            ProcessesToUpdate::All,
            true,
            ProcessRefreshKind::nothing()
                .with_cpu()
                .with_memory()
                .without_tasks(),
        );
    }

    /// How many processes the last refresh read (none before the first).
    #[cfg(test)]
    pub fn processes_read(&self) -> usize {
        self.sys.processes().len()
    }

    /// Sums each root's tree from the last refresh (`None`: the root is gone), and remembers the
    /// descendants for the stray sweep (for as long as they exist).
    pub fn trees(&mut self, roots: &[u32]) -> Vec<Option<TreeStats>> {
        let mut children: HashMap<Pid, Vec<Pid>> = HashMap::new();
        for (pid, p) in self.sys.processes() {
            if let Some(parent) = p.parent() {
                children.entry(parent).or_default().push(*pid);
            }
        }
        let sys = &self.sys;
        self.known
            .retain(|pid, start| sys.process(*pid).is_some_and(|p| p.start_time() == *start));
        let known = &mut self.known;
        let out = roots
            .iter()
            .map(|&root| {
                let root = Pid::from_u32(root);
                sys.process(root)?;
                let mut stats = TreeStats::default();
                let mut todo = vec![root];
                let mut seen = HashSet::new();
                while let Some(pid) = todo.pop() {
                    if !seen.insert(pid) {
                        continue;
                    }
                    let Some(p) = sys.process(pid) else {
                        continue;
                    };
                    stats.processes += 1;
                    stats.cpu_percent += p.cpu_usage();
                    stats.cpu_seconds += p.accumulated_cpu_time() as f64 / 1000.0;
                    stats.memory_bytes += p.memory();
                    if pid != root {
                        known.insert(pid, p.start_time());
                    }
                    if let Some(c) = children.get(&pid) {
                        todo.extend(c.iter().copied());
                    }
                }
                Some(stats)
            })
            .collect();
        out
    }

    /// Kills orphaned instance descendants and reaps stray zombies (see the module comment).
    /// Returns how many strays are left.
    pub fn sweep(&mut self, owned: &HashSet<u32>) -> usize {
        let mut zombies = HashSet::new();
        let mut left = 0;
        for (pid, p) in self.sys.processes() {
            if p.parent() != Some(self.me) || owned.contains(&pid.as_u32()) {
                continue;
            }
            let Ok(raw) = libc::pid_t::try_from(pid.as_u32()) else {
                continue;
            };
            if p.status() == ProcessStatus::Zombie {
                if self.zombies.contains(pid) {
                    let mut status = 0;
                    // SAFETY: waitpid on one specific pid with a valid status pointer.
                    let r = unsafe { libc::waitpid(raw, &mut status, libc::WNOHANG) };
                    if r == raw {
                        tracing::debug!(pid = raw, "reaped a stray child");
                        continue;
                    }
                }
                zombies.insert(*pid);
                left += 1;
            } else if self.known.get(pid) == Some(&p.start_time()) {
                tracing::warn!(pid = raw, name = %p.name().to_string_lossy(), "killing a process an instance left behind");
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(raw, libc::SIGKILL) };
                left += 1;
            }
        }
        self.zombies = zombies;
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_includes_descendants() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 5 & sleep 5 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let mut s = Sampler::new();
        s.refresh();
        let t = s.trees(&[child.id(), u32::MAX - 1]);
        unsafe { libc::killpg(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
        let tree = t[0].unwrap();
        assert_eq!(tree.processes, 3, "{tree:?}");
        assert!(tree.memory_bytes > 0);
        assert_eq!(t[1], None);
    }

    #[test]
    fn owned_pids_are_released_on_drop() {
        let owned = Arc::new(OwnedPids::default());
        let g = owned.hold(42);
        assert!(owned.snapshot().contains(&42));
        drop(g);
        assert!(owned.snapshot().is_empty());
    }
}
