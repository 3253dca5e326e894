//! tracefs: tracepoints are attached through it (their ids), some hosts do not mount it, and
//! its default mode (0700 root) keeps a non-root probe out unless it has CAP_DAC_READ_SEARCH.

use std::{io, os::unix::fs::MetadataExt as _, path::Path};

use super::{
    KernelError,
    privileges::{Cap, detail, is_denied},
};

const TRACEFS: &str = "/sys/kernel/tracing";
const UNDER_DEBUGFS: &str = "/sys/kernel/debug/tracing";
/// A tracepoint id every attach reads first (the scheduler hooks are always attached).
const PROBE_ID: &str = "events/sched/sched_process_exec/id";

/// What this process finds of tracefs.
#[derive(Debug)]
pub enum Tracefs {
    /// Mounted here, and tracepoint ids can be read.
    Readable(&'static str),
    /// Mounted here, but the permissions keep this process out.
    Denied {
        path: &'static str,
        error: io::Error,
        /// Mode and owner of the directory this process could not enter or read.
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// Not mounted at either place.
    Unmounted,
}

/// Looks for tracefs at /sys/kernel/tracing, then under debugfs.
pub fn find() -> Tracefs {
    for path in [TRACEFS, UNDER_DEBUGFS] {
        let root = Path::new(path);
        match std::fs::read_to_string(root.join(PROBE_ID)) {
            Ok(_) => return Tracefs::Readable(path),
            Err(error) if is_denied(&error) => {
                let meta = std::fs::metadata(root).ok();
                return Tracefs::Denied {
                    path,
                    error,
                    mode: meta.as_ref().map_or(0, |m| m.mode() & 0o7777),
                    uid: meta.as_ref().map_or(0, |m| m.uid()),
                    gid: meta.as_ref().map_or(0, |m| m.gid()),
                };
            }
            Err(_) => {}
        }
    }
    Tracefs::Unmounted
}

/// The error for tracefs this process may not read.
pub fn denied_error(path: &str, error: &io::Error, mode: u32, uid: u32, gid: u32) -> KernelError {
    KernelError::Privilege {
        what: format!(
            "reading tracepoint ids in tracefs ({path}, mode {mode:04o}, uid {uid}, gid {gid})"
        ),
        caps: Cap::DacReadSearch.name().into(),
        detail: format!(
            "{}; grant it, or mount tracefs with gid= a group of the probe and mode=0750",
            detail(Cap::DacReadSearch, error)
        ),
    }
}

/// Makes sure tracefs is mounted and readable, mounting it at /sys/kernel/tracing if needed.
pub fn ensure_mounted() -> Result<(), KernelError> {
    match find() {
        Tracefs::Readable(_) => return Ok(()),
        Tracefs::Denied {
            path,
            error,
            mode,
            uid,
            gid,
        } => return Err(denied_error(path, &error, mode, uid, gid)),
        Tracefs::Unmounted => {}
    }
    // SAFETY: valid NUL-terminated strings; no data argument.
    let ret = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            c"/sys/kernel/tracing".as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        let error = io::Error::last_os_error();
        if is_denied(&error) {
            return Err(KernelError::Privilege {
                what: format!("mounting tracefs at {TRACEFS} (it is not mounted)"),
                caps: Cap::SysAdmin.name().into(),
                detail: format!(
                    "{}; mount it on the host (`mount -t tracefs nodev {TRACEFS}`) and into \
                     the probe's container",
                    detail(Cap::SysAdmin, &error)
                ),
            });
        }
        return Err(KernelError::Tracefs(error.to_string()));
    }
    match find() {
        Tracefs::Readable(_) => Ok(()),
        Tracefs::Denied {
            path,
            error,
            mode,
            uid,
            gid,
        } => Err(denied_error(path, &error, mode, uid, gid)),
        Tracefs::Unmounted => Err(KernelError::Tracefs(format!(
            "mounted at {TRACEFS}, but {PROBE_ID} is missing (a kernel without scheduler \
             tracepoints?)"
        ))),
    }
}
