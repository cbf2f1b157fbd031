//! The library's log lines: `trace!`, `debug!`, `info!`, `warn!` and
//! `error!`, each `log`'s own, caught.
//!
//! The logger is the application's, and it may panic. A line logged while
//! a lock is held, between two halves of an update, or on a thread whose
//! loop others wait for (the accept thread, a stop) would unwind from
//! there and leave the library's state half made. So every line is logged
//! under [`sync::contained`](crate::sync::contained): a panic in the
//! logger ends that line, and the library goes on. The level is checked
//! first, as `log`'s macros do, so a line that is not logged costs what it
//! costs with `log` alone.

macro_rules! log_contained {
    ($level:ident, $($arg:tt)+) => {
        if ::log::Level::$level <= ::log::STATIC_MAX_LEVEL && ::log::Level::$level <= ::log::max_level() {
            $crate::sync::contained(|| ::log::log!(::log::Level::$level, $($arg)+));
        }
    };
}

macro_rules! trace {
    ($($arg:tt)+) => { log_contained!(Trace, $($arg)+) };
}

macro_rules! debug {
    ($($arg:tt)+) => { log_contained!(Debug, $($arg)+) };
}

macro_rules! warn {
    ($($arg:tt)+) => { log_contained!(Warn, $($arg)+) };
}

macro_rules! error {
    ($($arg:tt)+) => { log_contained!(Error, $($arg)+) };
}
