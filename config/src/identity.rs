//! The users and groups that `user` and `group` name, looked up as the server will switch to
//! them: through the system's name service (getpwnam_r(3), getgrnam_r(3)), so LDAP or
//! systemd-homed users count as well as those in /etc/passwd. A number that names no entry is
//! taken as an id, as chown(1) takes one.

use std::ffi::CString;

/// The uid and primary gid of `user` (a name, or a number).
pub fn lookup_user(user: &str) -> Result<(u32, u32), String> {
    let name = CString::new(user).map_err(|_| format!("user `{user}` has a NUL byte"))?;
    let found = with_growing_buffer(|buf| {
        // SAFETY: a passwd is plain data (integers and pointers), valid all zero.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: `entry` and `buf` outlive the call, `buf.len()` is its true size, and the
        // name is NUL-terminated; getpwnam_r writes only into them and `found`.
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        (
            rc,
            (!found.is_null()).then_some((entry.pw_uid, entry.pw_gid)),
        )
    })
    .map_err(|e| format!("cannot look up user `{user}`: {e}"))?;
    match (found, user.parse::<u32>()) {
        (Some(ids), _) => Ok(ids),
        (None, Ok(uid)) => Ok((uid, uid)),
        (None, Err(_)) => Err(format!("no user `{user}` on this machine")),
    }
}

/// The gid of `group` (a name, or a number).
pub fn lookup_group(group: &str) -> Result<u32, String> {
    let name = CString::new(group).map_err(|_| format!("group `{group}` has a NUL byte"))?;
    let found = with_growing_buffer(|buf| {
        // SAFETY: a group is plain data (integers and pointers), valid all zero.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in lookup_user, with getgrnam_r.
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        (rc, (!found.is_null()).then_some(entry.gr_gid))
    })
    .map_err(|e| format!("cannot look up group `{group}`: {e}"))?;
    match (found, group.parse::<u32>()) {
        (Some(gid), _) => Ok(gid),
        (None, Ok(gid)) => Ok(gid),
        (None, Err(_)) => Err(format!("no group `{group}` on this machine")),
    }
}

/// Runs a `get*_r` lookup with a buffer that doubles while the call says ERANGE (a group
/// with many members needs more than the usual 1 KiB), up to 1 MiB.
fn with_growing_buffer<T>(
    mut lookup: impl FnMut(&mut [libc::c_char]) -> (libc::c_int, Option<T>),
) -> Result<Option<T>, std::io::Error> {
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        match lookup(&mut buf) {
            (0, found) => return Ok(found),
            // Some systems say "no such entry" with an error number instead of 0.
            (libc::ENOENT | libc::ESRCH, _) => return Ok(None),
            (libc::ERANGE, _) if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            (rc, _) => return Err(std::io::Error::from_raw_os_error(rc)),
        }
    }
}

/// The groups a worker that runs as `uid` keeps: `gid`, and the groups the user's entry is a
/// member of (getgrouplist(3)), as initgroups(3) gives them in nginx's, gunicorn's and
/// mod_wsgi's workers. A uid with no entry keeps `gid` alone.
pub fn groups_of(uid: u32, gid: u32) -> Vec<u32> {
    let Some(name) = name_entry(uid) else {
        return vec![gid];
    };
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut count = groups.len() as libc::c_int;
        // SAFETY: `groups` holds `count` entries; getgrouplist writes at most that many and
        // sets `count` to how many there are.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        let count = usize::try_from(count).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(count);
            return groups;
        }
        if count <= groups.len() || count > 1 << 16 {
            return vec![gid];
        }
        groups.resize(count, 0);
    }
}

/// The name of user `uid`, for messages; `None` when no entry has that id.
pub fn user_name(uid: u32) -> Option<String> {
    name_entry(uid).map(|name| name.to_string_lossy().into_owned())
}

/// The name and home directory of user `uid`, as the environment's `USER`, `LOGNAME` and
/// `HOME` give them to a login (login(1)); `None` when no entry has that id.
pub fn login_of(uid: u32) -> Option<(String, std::path::PathBuf)> {
    use std::os::unix::ffi::OsStringExt;
    let (name, home) = user_entry(uid)?;
    Some((
        name.to_string_lossy().into_owned(),
        std::ffi::OsString::from_vec(home.into_bytes()).into(),
    ))
}

/// The name in the user entry of `uid`.
fn name_entry(uid: u32) -> Option<CString> {
    user_entry(uid).map(|(name, _)| name)
}

/// The name and home directory in the user entry of `uid` (getpwuid_r(3)).
fn user_entry(uid: u32) -> Option<(CString, CString)> {
    with_growing_buffer(|buf| {
        // SAFETY: a passwd is plain data (integers and pointers), valid all zero.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: as in lookup_user, with getpwuid_r.
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut entry, buf.as_mut_ptr(), buf.len(), &mut found) };
        let copy = |field: *const libc::c_char| {
            // SAFETY: a found entry's pw_name and pw_dir, when not null, point at
            // NUL-terminated strings in `buf`, copied out (CString::from) before it changes.
            (!field.is_null()).then(|| CString::from(unsafe { std::ffi::CStr::from_ptr(field) }))
        };
        let strings = (!found.is_null())
            .then(|| Some((copy(entry.pw_name)?, copy(entry.pw_dir)?)))
            .flatten();
        (rc, strings)
    })
    .ok()
    .flatten()
}
