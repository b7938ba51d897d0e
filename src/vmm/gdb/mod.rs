//! `hbt run --gdb [HOST:]PORT`: a gdb remote stub (the `gdbstub` crate) for the guest
//! machine, as QEMU's `-s -S`: the guest waits at its first instruction until gdb connects and
//! lets it go. Registers, memory through the guest's page tables, breakpoints (`break` and
//! `hbreak`), single step and Ctrl-C; gdb hears of the end of the run (`W`/`X`) and hbt then
//! ends as it would without gdb.
//!
//! One file per concern: this one listens, runs the session (gdbstub's state machine, so the
//! guest runs on hbt's own vCPU thread between gdb's packets) and watches the socket while the
//! guest runs; `target.rs` answers gdb's requests over the engine's [`Debuggee`] interface
//! (`engine/debug.rs`); `arch.rs` is the register file and target description.
//!
//! While the guest runs, a watcher thread polls the socket; when gdb sends something (Ctrl-C)
//! it asks the vCPU thread for attention (`stop::request_attention`, which kicks it out of
//! translated code), the engine stops at the next block boundary and the byte goes to gdbstub.
//!
//! When gdb detaches or its connection is lost, breakpoints are removed and the guest runs on
//! to its end, as it would have without `--gdb` (gdb's `quit` detaches: the stub reports it is
//! attached to an existing machine). gdb's `kill` ends the run (status 137).

pub mod arch;
mod target;

use crate::vmm::engine::debug::{DebugStop, Debuggee, Resume};
use crate::vmm::engine::End;
use crate::vmm::stop;
use anyhow::{Context, Result};
use gdbstub::common::Signal;
use gdbstub::conn::ConnectionExt;
use gdbstub::stub::state_machine::GdbStubStateMachine;
use gdbstub::stub::{DisconnectReason, GdbStub, SingleThreadStopReason};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;
use target::GdbTarget;

/// How often a wait for gdb looks for a stop request (`--timeout`, SIGTERM).
const POLL: Duration = Duration::from_millis(100);

/// Parses `--gdb`: `PORT`, `:PORT` or `HOST:PORT` (`[::1]:PORT` for IPv6); a bare port
/// listens on 127.0.0.1 only, so the guest is not exposed to the network by default.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let what = || format!("`{s}` is not a port or HOST:PORT (e.g. 1234 or 127.0.0.1:1234)");
    let (host, port) = match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => (host.trim_start_matches('[').trim_end_matches(']'), port),
        Some((_, port)) => ("127.0.0.1", port),
        None => ("127.0.0.1", s),
    };
    let port: u16 = port.parse().map_err(|_| what())?;
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{}: {e}", what()))?
        .next()
        .ok_or_else(what)
}

/// The socket gdb connects to (bound before the guest starts, so a wrong address is an error
/// at once and port 0 is given a real port to print).
pub struct Listener {
    socket: TcpListener,
    addr: SocketAddr,
}

impl Listener {
    pub fn bind(addr: SocketAddr) -> Result<Self> {
        let socket = TcpListener::bind(addr).with_context(|| format!("--gdb: cannot listen on {addr}"))?;
        let addr = socket.local_addr()?;
        Ok(Listener { socket, addr })
    }

    /// Waits for gdb to connect; `Err(end)` when hbt is asked to stop meanwhile.
    fn accept(&self) -> Result<Result<TcpStream, End>> {
        diag!("hbt: waiting for gdb on {}", self.addr);
        self.socket.set_nonblocking(true)?;
        loop {
            if let Some(end) = stop::requested() {
                return Ok(Err(end));
            }
            match self.socket.accept() {
                Ok((stream, peer)) => {
                    stream.set_nonblocking(false)?;
                    diag!("hbt: gdb connected from {peer}");
                    return Ok(Ok(stream));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    readable(self.socket.as_raw_fd(), POLL);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("--gdb: accepting a connection"),
            }
        }
    }
}

/// Whether `fd` has input (or a hangup) within `timeout`.
fn readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
    n > 0
}

/// Polls the gdb socket while the guest runs and asks the vCPU thread for attention when gdb
/// sends something. Stopped (and joined) on drop.
struct Watcher {
    quit: UnixStream,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(socket: RawFd) -> std::io::Result<Self> {
        let (quit, quit_seen) = UnixStream::pair()?;
        let thread = std::thread::Builder::new().name("hbt-gdb".into()).spawn(move || {
            let mut fds = [socket, quit_seen.as_raw_fd()].map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            // SAFETY: two valid pollfds for the duration of the call; the socket stays open
            // until the watcher is joined.
            while unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
                if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                    return;
                }
            }
            if fds[0].revents != 0 {
                stop::request_attention();
            }
        })?;
        Ok(Watcher {
            quit,
            thread: Some(thread),
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.quit.write_all(&[0]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // A request that came after the guest had stopped is answered by reading the socket.
        stop::take_attention();
    }
}

/// What gdb is told when the run ends: the exit status hbt itself will have, or the signal
/// that ended it.
fn end_reason(end: &End) -> SingleThreadStopReason<u64> {
    match *end {
        End::ExitPort(v) => SingleThreadStopReason::Exited(v as u8),
        End::Reset | End::PowerOff => SingleThreadStopReason::Exited(0),
        End::Halted => SingleThreadStopReason::Exited(1),
        End::Timeout => SingleThreadStopReason::Terminated(Signal::SIGALRM),
        End::Interrupted(sig) => SingleThreadStopReason::Terminated(Signal(sig as u8)),
        End::OutputClosed => SingleThreadStopReason::Terminated(Signal::SIGPIPE),
        End::Killed => SingleThreadStopReason::Terminated(Signal::SIGKILL),
    }
}

/// Runs the guest without a debugger until the run ends.
fn run_on(guest: &mut dyn Debuggee) -> Result<End> {
    guest.set_breakpoints(&Default::default());
    loop {
        if let DebugStop::Ended(end) = guest.resume(Resume::Continue)? {
            return Ok(end);
        }
    }
}

/// Waits for gdb on `listener`, then runs the guest under it until the run ends.
pub fn serve(listener: &Listener, guest: &mut dyn Debuggee) -> Result<End> {
    let stream = match listener.accept()? {
        Ok(stream) => stream,
        Err(end) => return Ok(end),
    };
    let socket = stream.as_raw_fd();
    let mut target = GdbTarget::new(guest);
    // How the run ended, once gdb has been told; an engine failure gdb was shown as SIGSEGV.
    let mut ended: Option<End> = None;
    let mut failure: Option<anyhow::Error> = None;
    let mut machine = match GdbStub::new(stream).run_state_machine(&mut target) {
        Ok(m) => m,
        Err(e) => return lost(e, None, target.guest),
    };
    loop {
        let next = match machine {
            GdbStubStateMachine::Idle(mut gdb) => {
                // gdb may take its time; hbt's own stop requests still end the run.
                while !readable(socket, POLL) {
                    if let Some(end) = stop::requested() {
                        return Ok(end);
                    }
                }
                match gdb.borrow_conn().read() {
                    Ok(byte) => gdb.incoming_data(&mut target, byte),
                    Err(e) => return lost(e, failure, target.guest),
                }
            }
            GdbStubStateMachine::Running(mut gdb) => {
                if let Some(why) = failure.take() {
                    // The machine cannot go on: gdb looked at it, now the run ends.
                    let _ = gdb.report_stop(&mut target, SingleThreadStopReason::Terminated(Signal::SIGSEGV));
                    return Err(why);
                }
                let how = target.resume.take().unwrap_or(Resume::Continue);
                let wanted = target.breakpoints();
                target.guest.set_breakpoints(&wanted);
                let stop = {
                    // A step ends at once: only a continue needs the socket watched.
                    let _watcher = match how {
                        Resume::Continue => Some(Watcher::start(socket)?),
                        Resume::Step => None,
                    };
                    target.guest.resume(how)
                };
                match stop {
                    Ok(DebugStop::Breakpoint) => gdb.report_stop(&mut target, SingleThreadStopReason::SwBreak(())),
                    Ok(DebugStop::Stepped) => gdb.report_stop(&mut target, SingleThreadStopReason::DoneStep),
                    Ok(DebugStop::Attention) => match gdb.borrow_conn().read() {
                        Ok(byte) => gdb.incoming_data(&mut target, byte),
                        Err(e) => return lost(e, None, target.guest),
                    },
                    Ok(DebugStop::Ended(end)) => {
                        let reason = end_reason(&end);
                        ended = Some(end);
                        gdb.report_stop(&mut target, reason)
                    }
                    Err(why) => {
                        diag!("hbt: the guest cannot go on ({why:#}); stopped for gdb with SIGSEGV");
                        failure = Some(why);
                        gdb.report_stop(&mut target, SingleThreadStopReason::Signal(Signal::SIGSEGV))
                    }
                }
            }
            GdbStubStateMachine::CtrlCInterrupt(gdb) => {
                gdb.interrupt_handled(&mut target, Some(SingleThreadStopReason::Signal(Signal::SIGINT)))
            }
            GdbStubStateMachine::Disconnected(gdb) => {
                if let Some(why) = failure {
                    return Err(why);
                }
                return match (gdb.get_reason(), ended) {
                    (_, Some(end)) => Ok(end),
                    (DisconnectReason::Kill, None) => Ok(End::Killed),
                    (_, None) => {
                        diag!("hbt: gdb detached; the guest runs on");
                        run_on(target.guest)
                    }
                };
            }
        };
        machine = match next {
            Ok(m) => m,
            Err(e) => {
                if let Some(end) = ended {
                    return Ok(end);
                }
                return lost(e, failure, target.guest);
            }
        };
    }
}

/// The gdb session broke (connection closed or reset, a protocol error): the guest runs on,
/// unless it had already failed (`failure`), which then ends the run.
fn lost(why: impl std::fmt::Display, failure: Option<anyhow::Error>, guest: &mut dyn Debuggee) -> Result<End> {
    if let Some(failure) = failure {
        diag!("hbt: lost gdb ({why})");
        return Err(failure);
    }
    diag!("hbt: lost gdb ({why}); the guest runs on");
    run_on(guest)
}
