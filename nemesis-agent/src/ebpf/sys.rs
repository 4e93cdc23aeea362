//! Raw system calls the loader needs and aya does not expose: opening a pinned cgroup
//! link, reading its info, swapping its program (BPF_LINK_UPDATE), linking an
//! iterator and opening a walk of it, and the clock of `bpf_ktime_get_ns`. The only `unsafe` in the crate; nothing here decides anything.
#![allow(unsafe_code)]

use std::{
    ffi::CString,
    io,
    mem::{size_of, zeroed},
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_link_info, bpf_link_type};

/// What the kernel says about a cgroup link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub link_id: u32,
    pub prog_id: u32,
    /// 0 when the cgroup it was attached to is gone (the link is then defunct).
    pub cgroup_id: u64,
    pub attach_type: u32,
}

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, initialised `bpf_attr` of the size passed, and every
    // pointer stored in it (paths, info buffers) outlives this call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// BPF_OBJ_GET: a new fd for the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: all-zero is a valid `bpf_attr` (a plain C union of integers).
    let mut attr: bpf_attr = unsafe { zeroed() };
    attr.__bindgen_anon_4.pathname = c.as_ptr() as u64;
    let fd = sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// BPF_OBJ_GET_INFO_BY_FD on a link; `None` if it is not a cgroup link.
pub fn cgroup_link_info(link: BorrowedFd<'_>) -> io::Result<Option<CgroupLinkInfo>> {
    // SAFETY: all-zero is valid for both C structs.
    let mut info: bpf_link_info = unsafe { zeroed() };
    let mut attr: bpf_attr = unsafe { zeroed() };
    attr.info.bpf_fd = link.as_raw_fd() as u32;
    attr.info.info = &mut info as *mut bpf_link_info as u64;
    attr.info.info_len = size_of::<bpf_link_info>() as u32;
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info.type_ != bpf_link_type::BPF_LINK_TYPE_CGROUP as u32 {
        return Ok(None);
    }
    // SAFETY: the kernel filled the `cgroup` member for a cgroup link.
    let cg = unsafe { info.__bindgen_anon_1.cgroup };
    Ok(Some(CgroupLinkInfo {
        link_id: info.id,
        prog_id: info.prog_id,
        cgroup_id: cg.cgroup_id,
        attach_type: cg.attach_type,
    }))
}

/// BPF_LINK_UPDATE: atomically make `link` run `new_prog` instead of its program, so
/// the hook never has a moment without a program.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: all-zero is a valid `bpf_attr`.
    let mut attr: bpf_attr = unsafe { zeroed() };
    attr.link_update.link_fd = link.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_1.new_prog_fd = new_prog.as_raw_fd() as u32;
    sys_bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// BPF_LINK_CREATE for an iterator program (aya's `Iter::attach` keeps the link's fd
/// to itself). The link keeps the program loaded; each [`iter_create`] on it starts a
/// fresh walk, of the network namespace the creating thread is in for socket
/// iterators.
pub fn iter_link(prog: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: all-zero is a valid `bpf_attr`.
    let mut attr: bpf_attr = unsafe { zeroed() };
    attr.link_create.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    attr.link_create.attach_type = bpf_attach_type::BPF_TRACE_ITER as u32;
    let fd = sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: BPF_LINK_CREATE returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// BPF_ITER_CREATE: a readable fd that runs the iterator link's program over its
/// target once, as it is read.
pub fn iter_create(link: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: all-zero is a valid `bpf_attr`.
    let mut attr: bpf_attr = unsafe { zeroed() };
    attr.iter_create.link_fd = link.as_raw_fd() as u32;
    let fd = sys_bpf(bpf_cmd::BPF_ITER_CREATE, &mut attr)?;
    // SAFETY: BPF_ITER_CREATE returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    // SAFETY: all-zero is a valid timespec.
    let mut ts: libc::timespec = unsafe { zeroed() };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) cannot fail");
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The effective user id (for the "not root" prerequisite message).
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
