//! Child processes the harness, the demo and the benchmarks start.

use std::process::Child;

/// A child process killed (and reaped) when dropped; a named one says so.
pub struct ChildGuard {
    child: Child,
    name: Option<&'static str>,
}

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        Self { child, name: None }
    }

    /// Prints "stopped <name>" when it stops (the demo's processes).
    pub fn named(child: Child, name: &'static str) -> Self {
        Self {
            child,
            name: Some(name),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(name) = self.name {
            eprintln!("stopped {name}");
        }
    }
}
