//! Constructors that turn common transports into a connection's receive and
//! send halves.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::Child;

use crate::config::Config;
use crate::connection::{OnClose, PacketConnection};
use crate::error::{Error, Result};

impl PacketConnection {
    /// Starts a connection over a Unix stream socket, used both ways.
    /// Aborting the connection shuts the socket down, which unblocks its
    /// receive thread.
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
        let recv = stream.try_clone()?;
        let send = stream.try_clone()?;
        let on_close: OnClose = Some(Box::new(move || {
            let _ = stream.shutdown(Shutdown::Both);
        }));
        PacketConnection::with_on_close(Box::new(recv), Box::new(send), on_close, config)
    }

    /// Starts a connection over a TCP stream, used both ways, with Nagle's
    /// algorithm turned off (the connection batches its own writes).
    /// Aborting the connection shuts the socket down.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the socket cannot be cloned or configured, or a
    /// thread cannot be spawned.
    pub fn from_tcp_stream(stream: TcpStream, config: Config) -> Result<PacketConnection> {
        stream.set_nodelay(true)?;
        let recv = stream.try_clone()?;
        let send = stream.try_clone()?;
        let on_close: OnClose = Some(Box::new(move || {
            let _ = stream.shutdown(Shutdown::Both);
        }));
        PacketConnection::with_on_close(Box::new(recv), Box::new(send), on_close, config)
    }

    /// Starts a connection over one file descriptor used both ways, such as
    /// a socket. The connection owns `fd` and closes it when done.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the descriptor cannot be duplicated or a thread
    /// cannot be spawned.
    pub fn from_fd(fd: OwnedFd, config: Config) -> Result<PacketConnection> {
        let recv = fd.try_clone()?;
        PacketConnection::from_fds(recv, fd, config)
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
    /// returns `(recv, send, on_close)`. `on_close`, if given, runs once when
    /// the connection is finished with the streams, or must unblock its
    /// receive thread (on abort).
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
    ///         let on_close: OnClose = None;
    ///         Ok((stream.try_clone()?, stream, on_close))
    ///     },
    ///     Config::default(),
    /// )?;
    /// # let _ = conn;
    /// # Ok::<(), packetstream::Error>(())
    /// ```
    pub fn connect_with<F, R, W>(connect: F, config: Config) -> Result<PacketConnection>
    where
        F: FnOnce() -> io::Result<(R, W, OnClose)>,
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let (recv, send, on_close) = connect()?;
        PacketConnection::with_on_close(Box::new(recv), Box::new(send), on_close, config)
    }
}
