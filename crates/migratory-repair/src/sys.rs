//! The raw calls `socket2` does not cover: `TCP_REPAIR` socket options and
//! the queue-size ioctls. Every `unsafe` block of the socket code is here.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd};

/// Maps a `-1` return to the thread's `errno`.
macro_rules! syscall {
    ($e:expr) => {{
        let r = $e;
        if r == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }};
}

/// Plain data the kernel may fill with any bit pattern.
///
/// # Safety
/// Every bit pattern must be a valid value of the type, and it must have no
/// padding the kernel could leave uninitialised that we then read.
pub(crate) unsafe trait Pod: Copy {}

// SAFETY: integers are valid for every bit pattern.
unsafe impl Pod for libc::c_int {}
// SAFETY: as above.
unsafe impl Pod for u32 {}
// SAFETY: as above.
unsafe impl Pod for u64 {}
// SAFETY: an array of u32, no padding.
unsafe impl Pod for [u32; 5] {}
// SAFETY: as above.
unsafe impl Pod for [u32; 4] {}
// SAFETY: `tcp_info` is a C struct of integers; it is zeroed before the
// call, so bytes the kernel does not write (older kernels) are zero.
unsafe impl Pod for libc::tcp_info {}

/// `getsockopt` into a `T`; also returns how many bytes the kernel wrote.
pub(crate) fn getsockopt<T: Pod>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<(T, usize)> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a valid, writable buffer of `len` bytes for the
    // duration of the call, and `len` points to its size.
    syscall!(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    // SAFETY: zero-initialised, and `T: Pod` makes whatever the kernel
    // wrote over it a valid `T`.
    Ok((unsafe { value.assume_init() }, len as usize))
}

/// `setsockopt` from a byte slice (the option's exact layout).
pub(crate) fn setsockopt_bytes(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    // SAFETY: `value` is readable for `value.len()` bytes during the call.
    syscall!(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// `setsockopt` with an `int` value.
pub(crate) fn setsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    setsockopt_bytes(fd, level, name, &value.to_ne_bytes())
}

/// An `ioctl` that reads one `int` (the queue sizes).
pub(crate) fn ioctl_int(fd: BorrowedFd<'_>, request: libc::c_ulong) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    // SAFETY: these requests write one `int` through the pointer, which is
    // valid and writable for the call.
    // (The request's C type differs between libcs: `as _` fits either.)
    syscall!(unsafe { libc::ioctl(fd.as_raw_fd(), request as _, &mut value) })?;
    Ok(value)
}

/// `recv` with flags (e.g. `MSG_PEEK | MSG_DONTWAIT`) into `buf`.
pub(crate) fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    let (ptr, len) = (buf.as_mut_ptr().cast(), buf.len());
    // SAFETY: `ptr` is valid and writable for `len` bytes (it is `buf`).
    let n = syscall!(unsafe { libc::recv(fd.as_raw_fd(), ptr, len, flags) })?;
    Ok(n as usize)
}

/// `send` with flags.
pub(crate) fn send(fd: BorrowedFd<'_>, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    let (ptr, len) = (buf.as_ptr().cast(), buf.len());
    // SAFETY: `ptr` is valid and readable for `len` bytes (it is `buf`).
    let n = syscall!(unsafe { libc::send(fd.as_raw_fd(), ptr, len, flags) })?;
    Ok(n as usize)
}
