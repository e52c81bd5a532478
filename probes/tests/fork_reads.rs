//! Fault-free reads cache the pid; after a real `fork` the child's reads must see the
//! child's memory, not the parent's (which a stale pid would read: the parent is alive
//! and waiting, so such a read would succeed and return the parent's value).

use probes::mem::{read, read_str};

#[test]
fn a_forked_child_reads_its_own_memory_not_its_parents() {
    probes::fork::watch();
    let before = probes::fork::generation().expect("watching after watch()");
    let value = Box::new(1u64);
    let at = &*value as *const u64 as u64;
    let text = Box::new(*b"parent\0\0");
    let sat = text.as_ptr() as u64;
    // Fills the cache with the parent's pid.
    assert_eq!(read::<u64>(at), Some(1));
    assert_eq!(read_str(sat, 16).as_deref(), Some("parent"));

    // SAFETY: the child only writes its own copies, issues system calls and `_exit`s: no
    // lock or allocation that another thread of the test harness may hold.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork failed");
    if child == 0 {
        // SAFETY: both boxes are live in the child's copy of the address space.
        unsafe {
            (at as *mut u64).write_volatile(2);
            (sat as *mut [u8; 8]).write_volatile(*b"child\0\0\0");
        }
        let mut code = 0;
        if probes::fork::generation() != Some(before + 1) {
            code |= 1;
        }
        if read::<u64>(at) != Some(2) {
            code |= 2;
        }
        if read_str(sat, 16).map(|s| s.as_bytes() == b"child") != Some(true) {
            code |= 4;
        }
        // SAFETY: ends the child without running the harness's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    let code = libc::WEXITSTATUS(status);
    assert_eq!(code & 1, 0, "the child's fork generation did not move");
    assert_eq!(
        code & 2,
        0,
        "the child's read::<u64> saw the parent's memory"
    );
    assert_eq!(code & 4, 0, "the child's read_str saw the parent's memory");
    // The parent's own reads are unchanged (and keep using its cached pid).
    assert_eq!(read::<u64>(at), Some(1));
    assert_eq!(read_str(sat, 16).as_deref(), Some("parent"));
}
