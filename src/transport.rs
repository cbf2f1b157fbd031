//! Constructors that turn common transports into a connection's receive and
//! send halves.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::config::Config;
use crate::connection::{OnClose, PacketConnection, Streams};
use crate::error::{Error, Result};
use crate::outbox::Control;
use crate::shared::Hook;

/// How long a write to a connection's socket may wait for room before it
/// returns: the thread that reads writes replies itself, and must never wait
/// on a peer that does not read for longer than this; other writers simply
/// try again.
const WRITE_SLICE: Duration = Duration::from_millis(5);

/// A socket used both ways: cloned for the receive and send halves, shut
/// down to interrupt them on abort, and given a short write timeout so that
/// the thread that reads can write to it without blocking for long.
trait Socket: Read + Write + Send + Sync + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;
    fn shutdown(&self) -> io::Result<()>;
    fn shutdown_read(&self) -> io::Result<()>;
    fn write_timeout(&self) -> io::Result<Option<Duration>>;
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn read_timeout(&self) -> io::Result<Option<Duration>>;
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Socket for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown(&self) -> io::Result<()> {
        UnixStream::shutdown(self, Shutdown::Both)
    }
    fn shutdown_read(&self) -> io::Result<()> {
        UnixStream::shutdown(self, Shutdown::Read)
    }
    fn write_timeout(&self) -> io::Result<Option<Duration>> {
        UnixStream::write_timeout(self)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
    fn read_timeout(&self) -> io::Result<Option<Duration>> {
        UnixStream::read_timeout(self)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

impl Socket for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shutdown(&self) -> io::Result<()> {
        TcpStream::shutdown(self, Shutdown::Both)
    }
    fn shutdown_read(&self) -> io::Result<()> {
        TcpStream::shutdown(self, Shutdown::Read)
    }
    fn write_timeout(&self) -> io::Result<Option<Duration>> {
        TcpStream::write_timeout(self)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
    fn read_timeout(&self) -> io::Result<Option<Duration>> {
        TcpStream::read_timeout(self)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
}

/// A connection's socket, with the timeouts it had before, which it gets
/// back when the connection is done with it: a clone the caller kept is as
/// it was.
struct SocketControl<S: Socket> {
    socket: S,
    write_before: Option<Duration>,
    read_before: Option<Duration>,
}

impl<S: Socket> Control for SocketControl<S> {
    fn shutdown(&self) {
        let _ = self.socket.shutdown();
    }
    fn bounded_writes(&self) -> bool {
        true
    }
    fn interruptible_reads(&self) -> bool {
        true
    }
    fn interrupt_reads(&self) {
        let _ = self.socket.shutdown_read();
    }
}

impl<S: Socket> Drop for SocketControl<S> {
    fn drop(&mut self) {
        let _ = self.socket.set_write_timeout(self.write_before);
        let _ = self.socket.set_read_timeout(self.read_before);
    }
}

/// A descriptor given to `from_fd`: shut down on abort, its reading shut
/// down when a read timeout runs out, if it is a socket; its write timeout
/// left alone (it may be shared beyond this process).
struct FdSocket {
    fd: UnixStream,
    is_socket: bool,
}

impl Control for FdSocket {
    fn shutdown(&self) {
        let _ = self.fd.shutdown(Shutdown::Both);
    }
    fn bounded_writes(&self) -> bool {
        false
    }
    fn interruptible_reads(&self) -> bool {
        self.is_socket
    }
    fn interrupt_reads(&self) {
        let _ = self.fd.shutdown(Shutdown::Read);
    }
}

/// The streams of a Unix socket, for a connection that owns it.
pub(crate) fn unix_streams(stream: UnixStream) -> io::Result<Streams> {
    socket_streams(stream)
}

/// The streams of a TCP socket, for a connection that owns it, with Nagle's
/// algorithm turned off (the connection batches its own writes).
pub(crate) fn tcp_streams(stream: TcpStream) -> io::Result<Streams> {
    stream.set_nodelay(true)?;
    socket_streams(stream)
}

fn socket_streams(socket: impl Socket) -> io::Result<Streams> {
    let recv = socket.try_clone()?;
    let send = socket.try_clone()?;
    let write_before = socket.write_timeout()?;
    let read_before = socket.read_timeout()?;
    socket.set_write_timeout(Some(WRITE_SLICE))?;
    // Reads block until the peer sends: a timeout the socket came with
    // would end an idle connection (the connection's own read timeouts are
    // kept without one, by the keeper). Both are put back when the
    // connection is done with it.
    socket.set_read_timeout(None)?;
    let control: Arc<dyn Control> = Arc::new(SocketControl {
        socket,
        write_before,
        read_before,
    });
    let interrupt = Arc::clone(&control);
    Ok(Streams {
        recv: Box::new(recv),
        send: Box::new(send),
        control: Some(control),
        interrupt: Some(Box::new(move || interrupt.shutdown())),
        release: None,
    })
}

impl PacketConnection {
    /// Starts a connection over a Unix stream socket, used both ways.
    ///
    /// The connection owns `stream` and closes its descriptors when it has
    /// ended. An orderly close leaves the socket open, so a clone the caller
    /// kept (`try_clone`) can carry another connection afterwards; aborting
    /// shuts the socket down, for every clone, which unblocks the
    /// connection's threads.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the socket cannot be cloned or a thread cannot be
    /// spawned.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::os::unix::net::UnixStream;
    /// use packetstream::{Config, PacketConnection, Request};
    ///
    /// let (a, b) = UnixStream::pair()?;
    /// let server = PacketConnection::from_unix_stream(
    ///     b,
    ///     Config::default().handler(|rq: Request| Ok(rq.flags.into())),
    /// )?;
    /// let client = PacketConnection::from_unix_stream(a, Config::default())?;
    /// assert_eq!(client.call(0, 42, b"")?.flags, 42);
    /// client.close()?;
    /// server.join()?;
    /// # Ok::<(), packetstream::Error>(())
    /// ```
    pub fn from_unix_stream(stream: UnixStream, config: Config) -> Result<PacketConnection> {
        PacketConnection::start(unix_streams(stream)?, config)
    }

    /// Starts a connection over a TCP stream, used both ways, with Nagle's
    /// algorithm turned off (the connection batches its own writes).
    /// Ownership and shutdown are as for
    /// [`from_unix_stream`](PacketConnection::from_unix_stream).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the socket cannot be cloned or configured, or a
    /// thread cannot be spawned.
    pub fn from_tcp_stream(stream: TcpStream, config: Config) -> Result<PacketConnection> {
        PacketConnection::start(tcp_streams(stream)?, config)
    }

    /// Starts a connection over one file descriptor used both ways, such as
    /// a socket. The connection owns `fd` and closes it when done. If it is a
    /// socket, aborting shuts it down, which unblocks the connection's
    /// threads (and ends every other descriptor of the socket too), and the
    /// read timeouts are kept as on any socket: one that runs out shuts the
    /// socket's reading down, for every descriptor. The
    /// descriptor's settings are left as they are, since other descriptors
    /// may share them: it must block (no `O_NONBLOCK`, no read timeout), or
    /// the first read that would wait ends the connection with an error.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the descriptor cannot be duplicated or a thread
    /// cannot be spawned.
    pub fn from_fd(fd: OwnedFd, config: Config) -> Result<PacketConnection> {
        let recv = fd.try_clone()?;
        // Shut down on abort, if it is a socket (for anything else the call
        // fails, harmlessly). `shutdown` works on a socket of any family.
        let is_socket = File::from(fd.try_clone()?)
            .metadata()
            .is_ok_and(|meta| meta.file_type().is_socket());
        let control: Arc<dyn Control> = Arc::new(FdSocket {
            fd: UnixStream::from(fd.try_clone()?),
            is_socket,
        });
        let interrupt = Arc::clone(&control);
        let streams = Streams {
            recv: Box::new(File::from(recv)),
            send: Box::new(File::from(fd)),
            control: Some(control),
            interrupt: Some(Box::new(move || interrupt.shutdown())),
            release: None,
        };
        PacketConnection::start(streams, config)
    }

    /// Starts a connection over a file descriptor the caller keeps: it is
    /// duplicated, and the caller's descriptor is never closed.
    ///
    /// # Errors
    ///
    /// As for [`from_fd`](PacketConnection::from_fd).
    pub fn from_borrowed_fd(fd: BorrowedFd<'_>, config: Config) -> Result<PacketConnection> {
        PacketConnection::from_fd(fd.try_clone_to_owned()?, config)
    }

    /// Starts a connection that receives from `recv` and sends to `send`,
    /// such as the two ends of two pipes. The connection owns both and
    /// closes them when done; closing `send` is what tells a pipe's reader
    /// that the stream has ended.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if a thread cannot be spawned.
    pub fn from_fds(recv: OwnedFd, send: OwnedFd, config: Config) -> Result<PacketConnection> {
        PacketConnection::new(File::from(recv), File::from(send), config)
    }

    /// Starts a connection over a pair of descriptors the caller keeps; both
    /// are duplicated and never closed.
    ///
    /// # Errors
    ///
    /// As for [`from_fds`](PacketConnection::from_fds).
    pub fn from_borrowed_fds(
        recv: BorrowedFd<'_>,
        send: BorrowedFd<'_>,
        config: Config,
    ) -> Result<PacketConnection> {
        PacketConnection::from_fds(
            recv.try_clone_to_owned()?,
            send.try_clone_to_owned()?,
            config,
        )
    }

    /// Starts a connection over this process's standard input (receive) and
    /// standard output (send), as a child process serving its parent does.
    /// Both are duplicated, so nothing else may write to standard output
    /// while the connection runs: log to standard error.
    ///
    /// # Errors
    ///
    /// As for [`from_fds`](PacketConnection::from_fds).
    pub fn stdio(config: Config) -> Result<PacketConnection> {
        let stdin = io::stdin();
        let stdout = io::stdout();
        PacketConnection::from_borrowed_fds(stdin.as_fd(), stdout.as_fd(), config)
    }

    /// Starts a connection to a child process over its standard output
    /// (receive) and standard input (send), which must have been piped.
    /// Takes both pipes out of `child`; the child is still the caller's to
    /// wait for.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with `InvalidInput` if either pipe is missing.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::process::{Command, Stdio};
    /// use packetstream::{Config, PacketConnection};
    ///
    /// let mut child = Command::new("my-server")
    ///     .stdin(Stdio::piped())
    ///     .stdout(Stdio::piped())
    ///     .spawn()?;
    /// let conn = PacketConnection::from_child(&mut child, Config::default())?;
    /// let rsp = conn.call(1, 0, b"hello")?;
    /// conn.close()?;
    /// child.wait()?;
    /// # let _ = rsp;
    /// # Ok::<(), packetstream::Error>(())
    /// ```
    pub fn from_child(child: &mut Child, config: Config) -> Result<PacketConnection> {
        let missing = |what| Error::Io(io::Error::new(io::ErrorKind::InvalidInput, what));
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| missing("child has no piped stdout"))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| missing("child has no piped stdin"))?;
        PacketConnection::new(stdout, stdin, config)
    }

    /// Starts a connection over streams made on demand by `connect`, which
    /// returns `(recv, send, on_close)`. `on_close`, if given, runs once:
    /// when the connection has ended, or earlier, on abort or a failed
    /// write, to unblock its receive thread.
    ///
    /// The order is `(recv, send, on_close)`, as the reference's docstring
    /// says (its code unpacks the first two the other way round).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] from `connect`, or if a thread cannot be spawned.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::os::unix::net::UnixStream;
    /// use packetstream::{Config, OnClose, PacketConnection};
    ///
    /// let conn = PacketConnection::connect_with(
    ///     || {
    ///         let stream = UnixStream::connect("/run/my-service.sock")?;
    ///         let on_close: Option<OnClose> = None;
    ///         Ok((stream.try_clone()?, stream, on_close))
    ///     },
    ///     Config::default(),
    /// )?;
    /// # let _ = conn;
    /// # Ok::<(), packetstream::Error>(())
    /// ```
    pub fn connect_with<F, R, W>(connect: F, config: Config) -> Result<PacketConnection>
    where
        F: FnOnce() -> io::Result<(R, W, Option<OnClose>)>,
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let (recv, send, on_close) = connect()?;
        // One hook, two occasions: whichever comes first runs it.
        let hook = Arc::new(Mutex::new(on_close));
        let run = |hook: Arc<Mutex<Option<OnClose>>>| -> Hook {
            Box::new(move || {
                let hook = hook.lock().take();
                if let Some(hook) = hook {
                    hook();
                }
            })
        };
        let streams = Streams {
            recv: Box::new(recv),
            send: Box::new(send),
            control: None,
            interrupt: Some(run(Arc::clone(&hook))),
            release: Some(run(hook)),
        };
        PacketConnection::start(streams, config)
    }
}
