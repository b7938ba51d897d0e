//! Reading the files a user names (guest images, programs, caches, popularity data), the one
//! way every part of hbt does it:
//!
//! - only **regular files**: a FIFO, a device (`/dev/zero`), a socket or a directory is refused
//!   with a message naming what it is. The file is opened with `O_NONBLOCK`, so opening a FIFO
//!   never waits for a writer, and checked with `fstat` on the opened descriptor (no race with a
//!   rename in between);
//! - **bounded** by what the format allows: the size is checked against the limit before
//!   anything is allocated, and reading stops at the limit even if the file grows meanwhile.
//!
//! Errors carry the path and are complete in their own message (no `#[source]` chain), so a
//! caller printing the chain does not repeat the OS error.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot open {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("{path} is {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is {size} bytes; {what} can be at most {limit} bytes")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
        what: String,
    },
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
}

/// The OS error text without Rust's " (os error N)" suffix.
pub fn os_message(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading if it is a regular file; returns it with its size.
pub fn open_regular(path: &Path) -> Result<(File, u64), FileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| FileError::Open {
            path: path.to_path_buf(),
            message: os_message(&e),
        })?;
    let meta = file.metadata().map_err(|e| FileError::Open {
        path: path.to_path_buf(),
        message: os_message(&e),
    })?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(meta.file_type()),
        });
    }
    // Regular files ignore O_NONBLOCK; clear it anyway so later readers see plain blocking I/O.
    // SAFETY: fcntl on a descriptor we own, with a flags value derived from F_GETFL.
    unsafe {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok((file, meta.len()))
}

/// Reads all of regular file `path`, which may be at most `limit` bytes (`what` names the
/// format in the error: "a guest image", "a scan cache", …).
pub fn read_regular(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>, FileError> {
    let (file, size) = open_regular(path)?;
    let too_large = |size| FileError::TooLarge {
        path: path.to_path_buf(),
        size,
        limit,
        what: what.to_string(),
    };
    if size > limit {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| FileError::Read {
            path: path.to_path_buf(),
            message: os_message(&e),
        })?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// [`read_regular`] for text; invalid UTF-8 is an error naming the byte offset.
pub fn read_regular_text(path: &Path, limit: u64, what: &str) -> Result<String, FileError> {
    let bytes = read_regular(path, limit, what)?;
    String::from_utf8(bytes).map_err(|e| FileError::Read {
        path: path.to_path_buf(),
        message: format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_files_are_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("hbt-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path in our temp directory.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_regular(&fifo, 100, "a test file").unwrap_err();
        assert!(e.to_string().contains("is a FIFO, not a regular file"), "{e}");
        let e = read_regular(Path::new("/dev/zero"), 100, "a test file").unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let e = read_regular(&dir, 100, "a test file").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{} is a directory, not a regular file", dir.display())
        );
        let big = dir.join("big");
        std::fs::write(&big, vec![0u8; 101]).unwrap();
        let e = read_regular(&big, 100, "a test file").unwrap_err();
        assert!(
            e.to_string()
                .contains("101 bytes; a test file can be at most 100 bytes"),
            "{e}"
        );
        assert_eq!(read_regular(&big, 101, "a test file").unwrap().len(), 101);
        let e = read_regular(&dir.join("missing"), 100, "x").unwrap_err().to_string();
        assert!(e.ends_with("No such file or directory"), "no repeated OS error: {e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
