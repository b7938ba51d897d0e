//! Terminal mode for an interactive guest console: no line buffering or echo (the guest echoes),
//! signals kept so Ctrl-C still ends the run. Restored on drop, so on every exit path that
//! unwinds or returns; pipes, and terminals hbt is not the foreground job of, are left alone.

pub struct RawGuard {
    saved: Option<libc::termios>,
}

impl RawGuard {
    pub fn new(interactive: bool) -> Self {
        // Only the terminal's foreground job may change its mode: from a background process
        // group tcsetattr would stop hbt with SIGTTOU (and its --timeout with it).
        // SAFETY: tcgetpgrp/getpgrp only query process-group ids.
        let foreground = unsafe { libc::tcgetpgrp(0) == libc::getpgrp() };
        if !interactive || !foreground {
            return RawGuard { saved: None };
        }
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a valid termios.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return RawGuard { saved: None };
            }
            let saved = t;
            t.c_lflag &= !(libc::ICANON | libc::ECHO);
            t.c_iflag &= !(libc::ICRNL | libc::IXON);
            t.c_cc[libc::VMIN] = 1;
            t.c_cc[libc::VTIME] = 0;
            libc::tcsetattr(0, libc::TCSANOW, &t);
            RawGuard { saved: Some(saved) }
        }
    }
}

impl Drop for RawGuard {
    fn drop(&mut self) {
        if let Some(t) = self.saved {
            // SAFETY: restoring the attributes read in `new`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}
